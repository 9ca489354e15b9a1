// Backup, restore and the recovery drill of docs/OPERATIONS.md, end to end: an online backup
// of the key database with custosctl while custosd serves, a token backup, a restore of both
// (with the config, the policy and the PKI) onto a fresh folder, the officers' re-anchoring of
// the restored log, and then exactly what the drill promises: old blobs decrypt, the log
// verifies offline, what happened after the backup is listed from the later log, keys created
// after it are gone, and a deletion scheduled after it is back until re-applied.
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <set>
#include <sstream>
#include <string>

#include "audit/record.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

namespace fs = std::filesystem;
using grpc::StatusCode;

std::string Encrypt(const CustosServer& server, const std::string& key, const std::string& text) {
  pb::EncryptRequest req;
  req.set_key(key);
  req.set_plaintext(text);
  (*req.mutable_encryption_context())["record"] = "drill";
  pb::EncryptResponse reply;
  const grpc::Status status = server.Keys("app")->Encrypt(Context().get(), req, &reply);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return reply.ciphertext_blob();
}

grpc::Status Decrypt(const CustosServer& server, const std::string& blob, std::string* text) {
  pb::DecryptRequest req;
  req.set_ciphertext_blob(blob);
  (*req.mutable_encryption_context())["record"] = "drill";
  pb::DecryptResponse reply;
  const grpc::Status status = server.Keys("app")->Decrypt(Context().get(), req, &reply);
  *text = reply.plaintext();
  return status;
}

pb::ChangeRequest ScheduleDeletion(const CustosServer& server, const std::string& key) {
  pb::ProposeRequest proposal;
  proposal.set_operation(pb::SCHEDULE_KEY_DELETION);
  proposal.set_key(key);
  proposal.set_justification("patient data retention ended");
  return ProposeAndApprove(server, proposal);
}

// The number `name` in custosctl's JSON; REQUIREs it is there.
uint64_t Number(const std::string& json, const std::string& name) {
  INFO(json);
  REQUIRE(NumberField(json, name));
  return *NumberField(json, name);
}

std::string Run(const std::string& command, int expected_exit) {
  int exit_code = -1;
  const std::string output = RunCommand(command + " 2>&1", &exit_code);
  INFO(command);
  INFO(output);
  REQUIRE(exit_code == expected_exit);
  return output;
}

void CopyFolder(const fs::path& from, const fs::path& to) {
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
}

TEST_CASE("The recovery drill: an online backup restored onto a fresh folder", "[e2e][backup]") {
  CustosServer original;
  const std::string kept = CreateKey(original, "drill/kept", true, true).key_id();
  const std::string doomed = CreateKey(original, "drill/doomed", true, true).key_id();
  const std::string kept_blob = Encrypt(original, "drill/kept", "patient 1");
  const std::string doomed_blob = Encrypt(original, "drill/doomed", "patient 2");

  // 1. The database, online: custosd keeps serving while custosctl copies it.
  TempDir vault;  // stands for the backup server
  const std::string backup = vault.File("custos-backup.db");
  const std::string ctl = std::string(CUSTOSCTL_PATH);
  const std::string summary =
      Run(ctl + " backup --db " + original.state_dir() + "/custos.db " + backup, 0);
  const uint64_t backup_end = Number(summary, "last_record");
  CHECK(backup_end > 0);
  CHECK(Number(summary, "keys") == 2);
  CHECK(Number(summary, "custos-root") == 2);  // versions_by_root: what the token must hold
  struct stat st {};
  REQUIRE(stat(backup.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK_FALSE(fs::exists(backup + "-wal"));
  CHECK_THAT(Run(ctl + " backup --db " + original.state_dir() + "/custos.db " + backup, 2),
             Catch::Contains("ALREADY_EXISTS"));
  CHECK_THAT(
      Run(ctl + " backup --db " + original.state_dir() + "/policy.toml " + vault.File("not-a-db"),
          2),
      Catch::Contains("error: "));
  CHECK_FALSE(fs::exists(vault.File("not-a-db")));

  // 2. Life goes on after the backup: a new key, a deletion scheduled.
  const std::string later = CreateKey(original, "drill/later", true, true).key_id();
  const std::string later_blob = Encrypt(original, "drill/later", "patient 3");
  ScheduleDeletion(original, "drill/doomed");
  std::string text;
  CHECK(Decrypt(original, doomed_blob, &text).error_code() == StatusCode::FAILED_PRECONDITION);

  // What the backup does not hold, from the later log: the auditor's export past its end.
  const std::string export_after = Run(
      CtlCommand(original, "auditor", "audit export --from " + std::to_string(backup_end + 1)), 0);
  std::set<std::pair<std::string, std::string>> changes;  // (action, key id) of executed changes
  std::istringstream lines(export_after);
  for (std::string line; std::getline(lines, line);) {
    const absl::StatusOr<audit::Record> record = audit::FromJsonLine(line);
    if (!record.ok()) continue;  // the checkpoint lines that close the export
    CHECK(record->seq > backup_end);
    if (record->outcome == "OK" && !record->request_id.empty() && !record->key_id.empty() &&
        (record->action == "CreateKey" || record->action == "ScheduleKeyDeletion")) {
      changes.emplace(record->action, record->key_id);
    }
  }
  CHECK(changes == std::set<std::pair<std::string, std::string>>{{"CreateKey", later},
                                                                 {"ScheduleKeyDeletion", doomed}});

  // 3. The HSM token's backup (SoftHSM2: its token folder, copied while custosd is stopped).
  // It holds the audit head custosd signed at its stop, past the database backup's end.
  original.Stop();
  CopyFolder(original.state_dir() + "/hsm/tokens", vault.File("tokens"));

  // 4. The restore, onto a fresh folder: config, policy and PKI as kept, the token, the
  // database backup.
  CustosServer restored;
  restored.Stop();
  const fs::path to = restored.state_dir();
  CopyFolder(original.state_dir() + "/pki", to / "pki");
  fs::copy_file(original.state_dir() + "/policy.toml", to / "policy.toml",
                fs::copy_options::overwrite_existing);
  fs::copy_file(original.state_dir() + "/hsm/pin", to / "hsm/pin",
                fs::copy_options::overwrite_existing);
  CopyFolder(vault.File("tokens"), to / "hsm/tokens");
  for (const char* suffix : {"", "-wal", "-shm"})
    fs::remove(to / ("custos.db" + std::string(suffix)));
  fs::copy_file(backup, to / "custos.db");

  // The restored log is older than the head the token vouches for: custosd refuses it...
  std::string output;
  CHECK(RunCustosd("--config " + (to / "custosd.toml").string(), &output) == 1);
  CHECK_THAT(output, Catch::Contains("an older copy of the database was restored"));
  // ...until two officers accept it.
  restored.Start({"--allow-re-anchor"});
  CHECK(Decrypt(restored, kept_blob, &text).error_code() == StatusCode::UNAVAILABLE);
  pb::ProposeRequest re_anchor;
  re_anchor.set_operation(pb::RE_ANCHOR_AUDIT_LOG);
  re_anchor.set_justification("recovery drill: restored the backup onto a fresh folder");
  CHECK(ProposeAndApprove(restored, re_anchor).state() == pb::EXECUTED);

  // 5. What the drill promises. Blobs made before the backup decrypt.
  const grpc::Status opened = Decrypt(restored, kept_blob, &text);
  INFO(opened.error_message());
  CHECK(opened.ok());
  CHECK(text == "patient 1");
  // A key created after the backup is gone, and with it what was encrypted under it (to the
  // app, a key it may not use, as any key unknown to it).
  const grpc::Status lost = Decrypt(restored, later_blob, &text);
  INFO(lost.error_message());
  CHECK(lost.error_code() == StatusCode::PERMISSION_DENIED);
  // A deletion scheduled after the backup is undone by the restore...
  REQUIRE(Decrypt(restored, doomed_blob, &text).ok());
  CHECK(text == "patient 2");
  // ...until the officers re-apply it from the later log.
  CHECK(ScheduleDeletion(restored, doomed).state() == pb::EXECUTED);
  CHECK(Decrypt(restored, doomed_blob, &text).error_code() == StatusCode::FAILED_PRECONDITION);

  // The restored log verifies offline, against a checkpoint signed after the re-anchoring.
  const std::string anchor = vault.File("anchor");
  Run(CtlCommand(restored, "auditor", "audit checkpoint --out-dir " + anchor), 0);
  const std::string verified =
      Run(ctl + " audit verify --db " + (to / "custos.db").string() + " --anchor " + anchor +
              "/checkpoint.json --public-key " + anchor + "/audit-public.pem",
          0);
  CHECK_THAT(verified, Catch::Contains("OK"));
  bool re_anchored = false;
  for (const pb::AuditRecord& r : AuditRecords(restored)) {
    re_anchored = re_anchored || r.action() == "ReAnchorAuditLog";
  }
  CHECK(re_anchored);
  CHECK(kept.size() == 36);
}

}  // namespace
}  // namespace custos::testing
