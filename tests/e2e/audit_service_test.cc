// The audit log end to end: auditors export it and a signed checkpoint; the chain recomputes
// from the export alone, and plain openssl verifies the checkpoint signature. custosctl also
// verifies the database file itself and names what was done to a tampered copy.
#include <sqlite3.h>
#include <sys/wait.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>

#include <fstream>
#include "audit/record.h"
#include "tests/e2e/e2e_util.h"
#include "tests/support/files.h"

namespace custos::testing {
namespace {

std::string Run(const std::string& command, int* exit_code) {
  return RunCommand(command, exit_code);
}

// GetCheckpoint answers with the last checkpoint the server signed, never a new one. With this
// config the server signs one after every record, on its maintenance thread, soon after.
const ServerOptions kCheckpointEveryRecord{.extra_config = "[audit]\ncheckpoint_every = 1\n"};

// `audit checkpoint --out-dir dir` once the checkpoint it saves covers record `seq`.
std::string CheckpointCovering(const std::string& ctl, const std::string& dir, uint64_t seq) {
  std::string saved;
  for (int i = 0; i < 100; ++i) {
    int code = 0;
    saved = Run(ctl + " --as auditor audit checkpoint --out-dir " + dir + " 2>&1", &code);
    REQUIRE(code == 0);
    const std::optional<uint64_t> covered = NumberField(saved, "seq");
    if (covered && *covered >= seq) return saved;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL("no checkpoint covering record " << seq << " was signed: " << saved);
  return saved;
}

TEST_CASE("Auditors export a log whose chain and checkpoint verify", "[e2e][audit]") {
  CustosServer server(kCheckpointEveryRecord);
  const std::string alias = "audited/key";
  CreateKey(server, alias, true, true);
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  (*gdk.mutable_encryption_context())["mrn"] = "patient-42";
  pb::GenerateDataKeyResponse dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());

  const std::string ctl = std::string(CUSTOSCTL_PATH) +
                          " --addr localhost:" + std::to_string(server.port()) + " --state " +
                          server.state_dir();
  int code = 0;
  const std::string dir = server.state_dir();
  // Server start, policy load, the key's proposal and approval, CreateKey, the data key.
  const std::string checkpoint = CheckpointCovering(ctl, dir, 6);
  INFO(checkpoint);
  REQUIRE(NumberField(checkpoint, "seq"));
  const uint64_t anchored = *NumberField(checkpoint, "seq");
  Run("openssl dgst -sha256 -verify " + dir + "/audit-public.pem -signature " + dir +
          "/checkpoint.sig " + dir + "/checkpoint.msg 2>&1",
      &code);
  CHECK(code == 0);  // plain openssl, no Custos code
  Run("printf x >> " + dir + "/checkpoint.msg; openssl dgst -sha256 -verify " + dir +
          "/audit-public.pem -signature " + dir + "/checkpoint.sig " + dir + "/checkpoint.msg 2>&1",
      &code);
  CHECK(code != 0);

  const std::string exported = Run(ctl + " --as auditor audit export", &code);
  REQUIRE(code == 0);
  std::istringstream lines(exported);
  std::string line;
  std::vector<std::string> all;
  std::vector<std::string> checkpoint_lines;
  bool saw_gdk = false;
  while (std::getline(lines, line)) {
    if (audit::IsCheckpointLine(line)) {  // the stored signed checkpoints follow the records
      absl::StatusOr<audit::Checkpoint> signed_head = audit::CheckpointFromJsonLine(line);
      REQUIRE(signed_head.ok());
      CHECK(signed_head->seq <= all.size());
      checkpoint_lines.push_back(line);
      continue;
    }
    REQUIRE(checkpoint_lines.empty());
    absl::StatusOr<audit::Record> record = audit::FromJsonLine(line);
    REQUIRE(record.ok());
    CHECK(record->seq == all.size() + 1);
    if (record->action == "GenerateDataKey") {
      saw_gdk = true;
      CHECK(record->context_hmac.size() == 64);
      CHECK(line.find("patient-42") == std::string::npos);
    }
    all.push_back(line);
  }
  CHECK(saw_gdk);
  REQUIRE_FALSE(checkpoint_lines.empty());  // `audit checkpoint` above signed one

  // The export alone verifies, its own checkpoints' signatures included.
  std::ofstream(dir + "/alone.jsonl") << exported;
  const std::string alone = Run(std::string(CUSTOSCTL_PATH) + " audit verify " + dir +
                                    "/alone.jsonl --public-key " + dir + "/audit-public.pem 2>&1",
                                &code);
  INFO(alone);
  CHECK(code == 0);
  CHECK_THAT(alone, Catch::Contains(std::to_string(checkpoint_lines.size()) +
                                    " signed checkpoint(s) in the log verified"));
  // A checkpoint line whose signature was tampered with fails the export.
  std::string forged = exported;
  const size_t signature = forged.find("\"signature\":\"", forged.find("{\"checkpoint\":"));
  REQUIRE(signature != std::string::npos);
  forged[signature + 16] = forged[signature + 16] == 'A' ? 'B' : 'A';
  std::ofstream(dir + "/alone.jsonl") << forged;
  const std::string forged_report =
      Run(std::string(CUSTOSCTL_PATH) + " audit verify " + dir + "/alone.jsonl --public-key " +
              dir + "/audit-public.pem 2>&1",
          &code);
  INFO(forged_report);
  CHECK(code == 3);
  CHECK_THAT(forged_report, Catch::Contains("signature does not verify"));

  // custosctl verifies the export offline against the anchor kept from `audit checkpoint`.
  const std::string verify = std::string(CUSTOSCTL_PATH) + " audit verify " + dir +
                             "/audit.jsonl --anchor " + dir + "/checkpoint.json --public-key " +
                             dir + "/audit-public.pem 2>&1";
  std::ofstream(dir + "/audit.jsonl") << exported;
  const std::string report = Run(verify, &code);
  INFO(report);
  CHECK(code == 0);
  // An edited record is named.
  std::string edited = exported;
  const size_t at = edited.find("\"GenerateDataKey\"");
  REQUIRE(at != std::string::npos);
  edited.replace(at, 16, "\"GenerateDataKez");
  std::ofstream(dir + "/audit.jsonl") << edited;
  const std::string caught = Run(verify, &code);
  INFO(caught);
  CHECK(code == 3);
  CHECK_THAT(caught, Catch::Contains("record"));
  // A tail cut back past the anchor is caught too.
  std::string cut;
  for (size_t n = 0; n + 1 < anchored; ++n) cut += all[n] + "\n";  // ends before the anchor
  std::ofstream(dir + "/audit.jsonl") << cut;
  Run(verify, &code);
  CHECK(code == 3);

  // Only auditors read the log.
  for (const char* who : {"app", "officer1"}) {
    const std::string refused = Run(ctl + " --as " + who + " audit checkpoint 2>&1", &code);
    CHECK(code == 2);
    CHECK_THAT(refused, Catch::Contains("only auditors read the audit log"));
  }
}

TEST_CASE("audit checkpoint --out-dir creates the folder, and fails loudly if it cannot write",
          "[e2e][audit]") {
  CustosServer& server = CustosServer::Shared();
  const std::string ctl = std::string(CUSTOSCTL_PATH) +
                          " --addr localhost:" + std::to_string(server.port()) + " --state " +
                          server.state_dir() + " --as auditor audit checkpoint --out-dir ";
  TempDir dir;
  int code = 0;
  const std::string made = Run(ctl + dir.File("anchors/today") + " 2>&1", &code);
  INFO(made);
  CHECK(code == 0);
  for (const char* file :
       {"checkpoint.msg", "checkpoint.sig", "audit-public.pem", "checkpoint.json"}) {
    CHECK_FALSE(ReadFile(dir.File("anchors/today/") + file).empty());
  }
  // A path through a regular file cannot be a folder: an error, never a silent success.
  std::ofstream(dir.File("plain-file")) << "x";
  const std::string refused = Run(ctl + dir.File("plain-file/anchor") + " 2>&1", &code);
  INFO(refused);
  CHECK(code == 2);
  CHECK_THAT(refused, Catch::Contains("error: cannot create " + dir.File("plain-file/anchor")));
}

// Copies the live database (its WAL included) to `copy` and runs `sql` on the copy with the
// append-only triggers dropped, as someone holding the file could.
void TamperedCopy(const std::string& db_path, const std::string& copy, const std::string& sql) {
  std::remove(copy.c_str());
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db, ("VACUUM INTO '" + copy + "'").c_str(), nullptr, nullptr, nullptr) ==
          SQLITE_OK);
  sqlite3_close(db);
  REQUIRE(sqlite3_open_v2(copy.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
  char* error = nullptr;
  const int rc = sqlite3_exec(db,
                              ("DROP TRIGGER audit_log_append_only_update;"
                               "DROP TRIGGER audit_log_append_only_delete;"
                               "DROP TRIGGER audit_checkpoints_append_only_update;"
                               "DROP TRIGGER audit_checkpoints_append_only_delete;" +
                               sql)
                                  .c_str(),
                              nullptr, nullptr, &error);
  INFO((error != nullptr ? error : ""));
  sqlite3_free(error);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
}

TEST_CASE("custosctl verifies the database file and names what was done to it", "[e2e][audit]") {
  CustosServer server(kCheckpointEveryRecord);
  const std::string alias = "audited/db";
  CreateKey(server, alias, true, false);
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  pb::GenerateDataKeyResponse dk;
  for (int i = 0; i < 3; ++i) {
    REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());
  }
  const std::string dir = server.state_dir();
  const std::string ctl = std::string(CUSTOSCTL_PATH) +
                          " --addr localhost:" + std::to_string(server.port()) + " --state " + dir;
  int code = 0;
  // The anchor, at record 6 or later: server start, policy load, CreateKey and three data keys.
  CheckpointCovering(ctl, dir, 6);
  for (int i = 0; i < 3; ++i) {
    REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());
  }
  const std::string key = " --public-key " + dir + "/audit-public.pem";
  const std::string anchor = " --anchor " + dir + "/checkpoint.json";
  auto verify = [&](const std::string& db, const std::string& options) {
    const std::string report = Run(
        std::string(CUSTOSCTL_PATH) + " audit verify --db " + db + key + options + " 2>&1", &code);
    UNSCOPED_INFO(report);
    return report;
  };

  // The live file, read while custosd writes it: the chain and the stored checkpoint verify.
  std::string report = verify(dir + "/custos.db", anchor);
  CHECK(code == 0);
  CHECK_THAT(report, Catch::StartsWith("OK: records 1 to "));
  // The anchor's checkpoint is stored in the file too (maintenance may have signed more).
  CHECK_THAT(report, Catch::Matches("(.|\\n)*\\n[1-9][0-9]* signed checkpoint\\(s\\) in the log "
                                    "verified(.|\\n)*"));

  const std::string copy = dir + "/copy.db";
  TamperedCopy(dir + "/custos.db", copy, "");
  verify(copy, anchor);
  CHECK(code == 0);

  TamperedCopy(dir + "/custos.db", copy,
               "UPDATE audit_log SET action = 'GenerateDataKez' WHERE seq = 3");
  CHECK_THAT(verify(copy, anchor),
             Catch::StartsWith("FAILED: record 3: hash does not match its contents"));
  CHECK(code == 3);

  TamperedCopy(dir + "/custos.db", copy, "DELETE FROM audit_log WHERE seq = 3");
  CHECK_THAT(verify(copy, anchor), Catch::StartsWith("FAILED: record 2 is followed by 4"));
  CHECK(code == 3);

  TamperedCopy(dir + "/custos.db", copy,
               "UPDATE audit_log SET seq = 100 WHERE seq = 3;"
               "UPDATE audit_log SET seq = 3 WHERE seq = 4;"
               "UPDATE audit_log SET seq = 4 WHERE seq = 100;");
  CHECK_THAT(verify(copy, anchor), Catch::StartsWith("FAILED: record 3: hash does not match"));
  CHECK(code == 3);

  // A tail cut back before the checkpoint stored in the file is caught without an anchor...
  TamperedCopy(dir + "/custos.db", copy, "DELETE FROM audit_log WHERE seq >= 4");
  CHECK_THAT(verify(copy, ""),
             Catch::Contains("log ends at 3 but it holds a signed checkpoint at "));
  CHECK(code == 3);
  // ...and with the checkpoints deleted as well, only the anchor kept off the server shows it.
  TamperedCopy(dir + "/custos.db", copy,
               "DELETE FROM audit_log WHERE seq >= 4; DELETE FROM audit_checkpoints;");
  CHECK_THAT(verify(copy, anchor),
             Catch::Contains("log ends at 3 but the anchor checkpoint is at "));
  CHECK(code == 3);
  CHECK_THAT(verify(copy, ""),
             Catch::Contains("no anchor checkpoint given: truncation of the tail cannot be ruled "
                             "out"));
  CHECK(code == 0);

  // Not a database: a clear error, exit 2.
  CHECK_THAT(verify(dir + "/checkpoint.json", ""), Catch::Contains("error:"));
  CHECK(code == 2);
}

// SELECT max(seq) FROM `table` of the live database (0 if empty).
int64_t MaxSeq(const std::string& db_path, const std::string& table) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, ("SELECT coalesce(max(seq), 0) FROM " + table).c_str(), -1, &stmt,
                             nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const int64_t seq = sqlite3_column_int64(stmt, 0);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return seq;
}

// Polls until a stored checkpoint covers record `seq`; false after 15 seconds.
bool CheckpointReaches(const std::string& db_path, int64_t seq) {
  for (int i = 0; i < 150; ++i) {
    if (MaxSeq(db_path, "audit_checkpoints") >= seq) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

TEST_CASE("Checkpoints are signed every checkpoint_every records", "[e2e][audit]") {
  CustosServer server("[audit]\ncheckpoint_every = 5\ncheckpoint_interval_seconds = 86400\n");
  const std::string db = server.state_dir() + "/custos.db";
  CreateKey(server, "audited/every", true, false);
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key("audited/every");
  pb::GenerateDataKeyResponse dk;
  for (int i = 0; i < 12; ++i) {
    REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());
  }
  const int64_t head = MaxSeq(db, "audit_log");
  REQUIRE(head >= 15);  // start, policy, CreateKey and 12 data keys
  // The timer is a day away: only the record count can have brought the signature this far.
  CHECK(CheckpointReaches(db, head - 4));
}

TEST_CASE("Checkpoints are signed every checkpoint_interval_seconds", "[e2e][audit]") {
  CustosServer server("[audit]\ncheckpoint_every = 1000000\ncheckpoint_interval_seconds = 1\n");
  const std::string db = server.state_dir() + "/custos.db";
  CreateKey(server, "audited/timer", true, false);
  const int64_t head = MaxSeq(db, "audit_log");
  CHECK(CheckpointReaches(db, head));
}

TEST_CASE("A certificate of the Custos CA without a usable identity is refused and recorded",
          "[e2e][audit]") {
  CustosServer server;
  const std::string dir = server.state_dir();
  // Signed by the trusted CA, but claiming the app's URI identity in its CN with no URI SAN.
  const std::string base = dir + "/pki/clients/uri-cn";
  int code = 0;
  const std::string made =
      Run("cd " + dir +
              " && printf 'extendedKeyUsage = clientAuth\\n' > uri-cn.ext && "
              "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " +
              base +
              ".key && "
              "openssl req -new -key " +
              base +
              ".key -subj '/CN=spiffe:\\/\\/custos.local\\/app\\/demo' -out uri-cn.csr && "
              "openssl x509 -req -in uri-cn.csr -CA pki/ca.crt -CAkey pki/ca.key -days 1 -sha256 "
              "-extfile uri-cn.ext -out " +
              base + ".crt 2>&1",
          &code);
  INFO(made);
  REQUIRE(code == 0);
  pb::ListKeysRequest list;
  pb::ListKeysResponse keys;
  const grpc::Status refused = server.Admin("uri-cn")->ListKeys(Context().get(), list, &keys);
  CHECK(refused.error_code() == grpc::StatusCode::UNAUTHENTICATED);
  // Which certificate it was, as openssl names it.
  std::string fingerprint =
      Run("openssl x509 -noout -fingerprint -sha256 -in " + base + ".crt", &code);
  REQUIRE(code == 0);
  fingerprint = fingerprint.substr(fingerprint.find('=') + 1);
  std::string hex;
  for (char c : fingerprint) {
    if (std::isxdigit(static_cast<unsigned char>(c)))
      hex.push_back(static_cast<char>(std::tolower(c)));
  }
  REQUIRE(hex.size() == 64);
  const std::string reason =
      "client certificate has a URI-like common name but no URI SAN "
      "(certificate sha256 " +
      hex + ")";
  CHECK(refused.error_message() == reason);

  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2((dir + "/custos.db").c_str(), &db, SQLITE_OPEN_READONLY, nullptr) ==
          SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db,
                             "SELECT principal, role, action, outcome, peer, detail FROM audit_log "
                             "ORDER BY seq DESC LIMIT 1",
                             -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  auto column = [&](int i) {
    return std::string(reinterpret_cast<const char*>(sqlite3_column_text(stmt, i)));
  };
  CHECK(column(0).empty());
  CHECK(column(1).empty());
  CHECK(column(2) == "ListKeys");
  CHECK(column(3) == "UNAUTHENTICATED");
  CHECK_THAT(column(4), Catch::StartsWith("ipv"));
  CHECK(column(5) == reason);
  sqlite3_finalize(stmt);
  sqlite3_close(db);

  // A client retrying in a loop: its repeats are counted in tally records (one at the end of
  // the burst's first 200 ms, then at most one every 10 s), not one record each.
  for (int i = 0; i < 20; ++i) {
    CHECK(server.Admin("uri-cn")->ListKeys(Context().get(), list, &keys).error_code() ==
          grpc::StatusCode::UNAUTHENTICATED);
  }
  const std::vector<pb::AuditRecord> records =
      AwaitTallied(server, "ListKeys", "UNAUTHENTICATED", 20);
  CHECK(records.front().detail() == reason);
  for (const pb::AuditRecord& r : records) CHECK(r.principal().empty());
  for (auto r = records.begin() + 1; r != records.end(); ++r) {
    CHECK_THAT(r->detail(), Catch::EndsWith(": " + reason));
  }
}

TEST_CASE("An app refused in a loop adds one record and a tally, not a record per call",
          "[e2e][audit]") {
  CustosServer server;
  const std::string alias = UniqueAlias("closed/key");
  CreateKey(server, alias, false, false);  // no grant for the app
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  pb::GenerateDataKeyResponse dk;
  std::string refusal;
  for (int i = 0; i < 30; ++i) {
    const grpc::Status status = server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk);
    REQUIRE(status.error_code() == grpc::StatusCode::PERMISSION_DENIED);
    refusal = status.error_message();
  }
  const std::vector<pb::AuditRecord> refused =
      AwaitTallied(server, "GenerateDataKey", "PERMISSION_DENIED", 29);
  // The first with the facts of the call; then tallies of its repeats, with the reason.
  CHECK(refused[0].principal() == "spiffe://custos.local/app/demo");
  CHECK_FALSE(refused[0].key_id().empty());
  for (auto r = refused.begin() + 1; r != refused.end(); ++r) {
    CHECK(r->principal() == "spiffe://custos.local/app/demo");
    CHECK_THAT(r->detail(), Catch::EndsWith(": " + refusal));
  }
  // An allowed call is recorded as always.
  CreateKey(server, alias + "/open", true, true);
  gdk.set_key(alias + "/open");
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());
}

}  // namespace
}  // namespace custos::testing

namespace custos::testing {
namespace {

// An auditor's stream set up and left unread after its first record.
struct Unread {
  std::unique_ptr<pb::AuditService::Stub> stub;
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::ClientReader<pb::AuditRecord>> reader;
};

// Reads the whole log on a connection of its own; the status, and the count in `*records`.
grpc::Status ReadWholeLog(const CustosServer& server, size_t* records) {
  auto stub = pb::AuditService::NewStub(server.Channel("auditor"));
  auto context = Context();
  auto reader = stub->ReadRecords(context.get(), pb::ReadRecordsRequest());
  pb::AuditRecord record;
  *records = 0;
  while (reader->Read(&record)) ++*records;
  return reader->Finish();
}

TEST_CASE("Auditors that stop reading hold no thread; streams are bounded; stalled ones make room",
          "[e2e][audit]") {
  CustosServer server("[audit]\nmax_streams = 10\nstream_stall_seconds = 5\n");
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("audit/streams"), true, false);
  // A log far longer than what flow control lets a stream send ahead of its reader.
  pb::BatchGenerateDataKeyRequest batch;
  batch.set_without_plaintext(true);
  for (int i = 0; i < 1000; ++i) {
    pb::GenerateDataKeyRequest* item = batch.add_items();
    item->set_key(key.key_id());
    (*item->mutable_encryption_context())["row"] = "row-" + std::to_string(i);
  }
  auto app = server.Keys("app");
  for (int round = 0; round < 3; ++round) {
    pb::BatchGenerateDataKeyResponse reply;
    REQUIRE(app->BatchGenerateDataKey(Context().get(), batch, &reply).ok());
  }

  // Ten auditors (more than the eight threads the service once had) read one record each and
  // stop, each on a connection of its own.
  std::vector<Unread> unread(10);
  for (Unread& u : unread) {
    // Flow control at its initial 64 KiB window: without the bandwidth probe the client's
    // transport takes no more than that ahead of a reader.
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    u.stub = pb::AuditService::NewStub(server.Channel("auditor", args));
    u.context = std::make_unique<grpc::ClientContext>();
    u.context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    u.reader = u.stub->ReadRecords(u.context.get(), pb::ReadRecordsRequest());
    pb::AuditRecord first;
    REQUIRE(u.reader->Read(&first));
  }
  // An eleventh is refused at once, and says why.
  size_t records = 0;
  grpc::Status refused = ReadWholeLog(server, &records);
  CHECK(refused.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK(refused.error_message() ==
        "too many audit streams are open (10, audit.max_streams); retry with backoff");
  // No thread waits on the unread streams: every service answers at once, the auditor's too.
  auto audit = pb::AuditService::NewStub(server.Channel("auditor"));
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    pb::Checkpoint checkpoint;
    CHECK(audit->GetCheckpoint(Context().get(), pb::GetCheckpointRequest(), &checkpoint).ok());
    pb::ListKeysResponse keys;
    CHECK(server.Admin("officer1")->ListKeys(Context().get(), pb::ListKeysRequest(), &keys).ok());
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));
  }

  // Past audit.stream_stall_seconds, a new stream cancels the stalled ones and is served.
  std::this_thread::sleep_for(std::chrono::milliseconds(5500));
  const grpc::Status served = ReadWholeLog(server, &records);
  INFO(served.error_message());
  CHECK(served.ok());
  CHECK(records > 3000);
  CHECK(Occurrences(server.Log(), "audit: cancelled a stream from ") == 10);
  for (Unread& u : unread) {
    pb::AuditRecord record;
    while (u.reader->Read(&record)) {
    }
    CHECK(u.reader->Finish().error_code() == grpc::StatusCode::CANCELLED);
  }
}

}  // namespace
}  // namespace custos::testing
