// What someone who can write custos.db (a DBA, root on the host) can do to the catalogue while
// custosd is stopped, and that each edit is caught when the row is next read: a grant nobody
// approved, a key re-enabled or its deletion undone, a lowered minimum decrypt version, a
// rewound encryption count, a forged approval, observed time moved forward, a row moved to
// another key, a row put back from an older copy. And the first start over a catalogue from
// before rows carried MACs, which seals it once.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>

#include "core/operation_params.h"
#include "storage/audit_log_reader.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/sqlite_file.h"

namespace custos::core {
namespace {

using custos::testing::DropRowIndexEntries;
using custos::testing::ForgeRowIndexEntry;
using custos::testing::SqlExec;
using custos::testing::SqlQuery;
using policy::Operation;
using storage::KeyState;
using storage::RequestState;
using testing::Fixture;

std::string Db(Fixture& f) { return f.dir.File("custos.db"); }

// Closes custosd's store, runs `sql` on the file, and restarts over it.
void EditWhileStopped(Fixture& f, const std::string& sql, UsageLimits limits = {}) {
  f.kms.reset();
  f.store.reset();
  INFO(sql);
  REQUIRE(SqlExec(Db(f), sql).empty());
  f.Restart(limits);
}

// Proposed by one officer and approved by two: what the approval reaching the quorum answers.
absl::StatusOr<Request> ApprovedAs3(Fixture& f, Operation operation, const std::string& key,
                                    OperationParams params = {}) {
  Proposal proposal;
  proposal.operation = operation;
  proposal.key = key;
  proposal.params = std::move(params);
  proposal.justification = "insider test";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  INFO(request.status().ToString());
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, RequestDigest(*request)).ok());
  return f.kms->Approve(f.officer3, request->id, RequestDigest(*request));
}

void ExecuteAs3(Fixture& f, Operation operation, const std::string& key,
                OperationParams params = {}) {
  absl::StatusOr<Request> done = ApprovedAs3(f, operation, key, std::move(params));
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  REQUIRE(done->state == RequestState::kExecuted);
}

// Key "tde-seal", made to seal mount "mariadb"'s table-space key id 1: the parameters that
// made that key id.
OperationParams SealTableSpaceKey(Fixture& f) {
  f.NewKeyWithoutGrants("tde-seal");
  OperationParams tde;
  tde.tde = {"mariadb", 1, "tde-seal"};
  ExecuteAs3(f, Operation::kCreateTdeKey, "", tde);
  return tde;
}

// A key enabled, with a copy of the database made then (the key's genuine ENABLED row and
// MAC), then disabled by two officers: what a DBA holding the copy starts from. Returns the
// copy's path.
std::string DisabledKeyWithOlderCopy(Fixture& f, KeyRef& key) {
  key = f.NewKey("k");
  f.kms.reset();
  f.store.reset();
  std::string older = f.dir.File("older.db");
  std::filesystem::copy_file(Db(f), older);
  f.Restart();
  ExecuteAs3(f, Operation::kDisableKey, "k");
  return older;
}

// SQL putting back the key's state and MAC from the older copy.
std::string PutBackOlderRow(const std::string& older, const std::string& key_id) {
  return "ATTACH '" + older + "' AS old; UPDATE keys SET (state, mac) = (SELECT state, mac FROM " +
         "old.keys WHERE id = '" + key_id + "') WHERE id = '" + key_id + "';";
}

size_t Alarms(Fixture& f, const std::string& key_id) {
  const std::vector<audit::Event> events = f.sink.events();
  return static_cast<size_t>(std::count_if(events.begin(), events.end(), [&](const auto& e) {
    return e.action == "IntegrityFailure" && e.key_id == key_id &&
           e.outcome == absl::StatusCode::kDataLoss;
  }));
}

void CheckRefused(const absl::Status& status, const std::string& row, const std::string& why) {
  INFO(status.ToString());
  CHECK(absl::IsDataLoss(status));
  CHECK_THAT(std::string(status.message()),
             Catch::StartsWith("catalogue row " + row + " failed its integrity check: " + why));
}

// An absent setting's read refused (`setting`, or "" where more than one may be read first):
// the walk of the live log found record of row `unindexed` without its index entry.
void CheckAbsenceRefused(const absl::Status& status, const std::string& setting,
                         const std::string& unindexed) {
  INFO(status.ToString());
  CHECK(absl::IsDataLoss(status));
  CHECK_THAT(std::string(status.message()),
             Catch::Contains((setting.empty() ? "" : "catalogue row setting:" + setting) +
                             " is not in the database, and that is not believed: the audit "
                             "log, walked to see that no record names it, does not verify"));
  CHECK_THAT(std::string(status.message()), Catch::Contains(", which names row " + unindexed));
}

TEST_CASE("A grant inserted with SQL grants nothing, raises the alarm once, and lists as such",
          "[insider][catalog]") {
  Fixture f;
  const KeyRef key = f.NewKeyWithoutGrants("no-grants");
  EditWhileStopped(f, "INSERT INTO key_grants VALUES ('" + key->id + "', '" + testing::kApp +
                          "', 'encrypt'); INSERT INTO key_grants VALUES ('" + key->id + "', '" +
                          testing::kApp + "', 'decrypt');");
  for (int i = 0; i < 2; ++i) {
    CheckRefused(f.kms->GenerateDataKey(f.app, "no-grants", {}, 32, true).status(),
                 "key:" + key->id, "its MAC does not match its content");
  }
  CHECK(Alarms(f, key->id) == 1);  // once, not per call
  absl::StatusOr<storage::KeyPage> listed = f.kms->ListKeys(f.officer, 10, "");
  REQUIRE(listed.ok());
  REQUIRE(listed->keys.size() == 1);
  CHECK_THAT(listed->keys[0]->integrity_problem, Catch::Contains("its MAC does not match"));
}

TEST_CASE("A key's state and minimum decrypt version edited with SQL are refused",
          "[insider][catalog]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, true);
  REQUIRE(dk.ok());
  ExecuteAs3(f, Operation::kRotateKey, "k");
  OperationParams retire;
  retire.min_decrypt_version = 2;
  ExecuteAs3(f, Operation::kSetMinDecryptVersion, "k", retire);
  ExecuteAs3(f, Operation::kDisableKey, "k");

  SECTION("re-enabled") {
    EditWhileStopped(f, "UPDATE keys SET state = 1 WHERE id = '" + key->id + "'");
    CheckRefused(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status(), "key:" + key->id,
                 "its MAC does not match");
  }
  SECTION("retired versions un-retired") {
    EditWhileStopped(f, "UPDATE keys SET min_decrypt_version = 1 WHERE id = '" + key->id + "'");
    CheckRefused(f.kms->Decrypt(f.app, dk->ciphertext_blob, {}).status(), "key:" + key->id,
                 "its MAC does not match");
  }
  SECTION("its reserved versions emptied, or made unreadable") {
    REQUIRE(SqlQuery(Db(f), "SELECT reserved_versions FROM keys") == "1");
    const std::string stamp = GENERATE(as<std::string>{}, "", "x");
    EditWhileStopped(f, "UPDATE keys SET reserved_versions = '" + stamp + "'");
    CheckRefused(f.kms->Decrypt(f.app, dk->ciphertext_blob, {}).status(), "key:" + key->id,
                 "its MAC does not match");
  }
}

TEST_CASE("A key row put back from an older copy is refused: the log recorded a later one",
          "[insider][catalog]") {
  Fixture f;
  KeyRef key;
  const std::string older = DisabledKeyWithOlderCopy(f, key);
  EditWhileStopped(f, PutBackOlderRow(older, key->id));
  CheckRefused(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status(), "key:" + key->id,
               "it is not the version the audit log last recorded");
}

TEST_CASE("A row put back with the newer record naming it hidden is refused once anchored",
          "[insider][catalog][anchor]") {
  Fixture f;
  KeyRef key;
  const std::string older = DisabledKeyWithOlderCopy(f, key);
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->RecordServerStart().ok());  // later history
  REQUIRE(f.kms->Checkpoint().ok());                                     // the HSM keeps this head
  // The ENABLED row put back, and the newer record naming the key renamed so that the
  // creation's record is the newest one naming it again: no stored hash is touched, so the
  // start-up check from the HSM's head does not see it.
  const std::string row = "key:" + key->id;
  EditWhileStopped(f, PutBackOlderRow(older, key->id) +
                          "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                          "row_name = 'key:hidden' WHERE seq = (SELECT max(seq) FROM audit_log "
                          "WHERE row_name = '" +
                          row + "');");
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  const absl::Status refused = f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status();
  CheckRefused(refused, row, "the audit record that vouches for it (");
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains("is in a part of the log changed after it was written: audit "
                             "records "));
  CHECK(Alarms(f, key->id) == 1);
  // Maintenance raises the log's own alarm, once.
  REQUIRE(f.kms->RunMaintenance().ok());
  REQUIRE(f.kms->RunMaintenance().ok());
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(), [](const audit::Event& e) {
          return e.action == "IntegrityFailure" &&
                 e.detail.rfind("the audit log was changed after it was written: ", 0) == 0;
        }) == 1);
}

// The row index is not under the chain: rebuilt without the entry of the record that disabled
// the key, it made the creation's record look like the key's newest, and the ENABLED row put
// back from an older copy was believed. Every record whose chain is verified has its entry
// checked too, at start-up after the HSM's head and as older records are recomputed.
TEST_CASE("A row put back with the newer record's index entry dropped is refused",
          "[insider][catalog][anchor]") {
  Fixture f;
  KeyRef key;
  const std::string older = DisabledKeyWithOlderCopy(f, key);
  const std::string row = "key:" + key->id;
  const std::string newest =
      SqlQuery(Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = '" + row + "'");
  REQUIRE(!newest.empty());
  const std::string index_problem =
      "the audit log's row index (audit_log_by_row) is not the log's: it has no entry for audit "
      "record " +
      newest + ", which names row " + row +
      ". It was rebuilt or edited outside Custos, and no row is believed through it";
  const auto tamper = [&] {
    f.kms.reset();
    f.store.reset();
    REQUIRE(SqlExec(Db(f), PutBackOlderRow(older, key->id)).empty());
    DropRowIndexEntries(Db(f), "seq = " + newest);
    f.Restart();
    REQUIRE(SqlQuery(Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = '" + row +
                                "' AND row_name <> ''") < newest);  // (through the index)
  };
  SECTION("the record before the HSM's head: refused when the row is first read") {
    for (int i = 0; i < 3; ++i) REQUIRE(f.kms->RecordServerStart().ok());  // later history
    REQUIRE(f.kms->Checkpoint().ok());  // the HSM keeps this head
    tamper();
    REQUIRE(f.kms->VerifyAuditLog(false).ok());
    // Refused as vouched for through that part of the log, or (when another row's check
    // walked it first, noting the newer record) as not the record noted: either way the
    // newer record is named.
    for (int i = 0; i < 2; ++i) {
      const absl::Status refused = f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status();
      CheckRefused(refused, row, "");
      CHECK_THAT(std::string(refused.message()), Catch::Contains("audit record " + newest));
    }
    CHECK(f.kms->RunMaintenance().ok());  // maintenance names the index problem
    const std::vector<audit::Event> events = f.sink.events();
    CHECK(std::count_if(events.begin(), events.end(), [&](const audit::Event& e) {
            return e.action == "IntegrityFailure" &&
                   e.detail.find(index_problem) != std::string::npos;
          }) >= 1);
    CHECK(Alarms(f, key->id) == 1);
    // The offline verifier's reader (custosctl audit verify --db) names it too.
    auto reader = storage::AuditLogReader::Open(Db(f));
    REQUIRE(reader.ok());
    absl::StatusOr<std::optional<audit::Record>> read;
    do {
      read = (*reader)->Next();
    } while (read.ok() && read->has_value());
    CHECK(absl::IsDataLoss(read.status()));
    CHECK_THAT(std::string(read.status().message()), Catch::StartsWith(index_problem));
    reader->reset();
    // The remedy the message names: the rebuilt index has the newer record again, and the row
    // put back is refused for what it is.
    EditWhileStopped(f, "REINDEX audit_log_by_row;");
    REQUIRE(f.kms->VerifyAuditLog(false).ok());
    CheckRefused(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status(), row,
                 "it is not the version the audit log last recorded");
  }
  SECTION("an entry forged to sort past the newest record's, leading to the older one") {
    const std::string older_seq = SqlQuery(
        Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = '" + row + "' AND seq < " + newest);
    REQUIRE(!older_seq.empty());
    f.kms.reset();
    f.store.reset();
    REQUIRE(SqlExec(Db(f), PutBackOlderRow(older, key->id)).empty());
    ForgeRowIndexEntry(Db(f), row, 1'000'000, std::stoull(older_seq));
    f.Restart();
    REQUIRE(f.kms->VerifyAuditLog(false).ok());  // every record has its entry
    const absl::Status refused = f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status();
    CheckRefused(refused, row,
                 "the audit log's row index (audit_log_by_row) is not the log's: it has an entry "
                 "for row " +
                     row + " past the one for audit record " + older_seq +
                     " that leads to no record of its own");
    CHECK(Alarms(f, key->id) == 1);
  }
  SECTION("the record after the HSM's head: custosd does not start") {
    tamper();  // no checkpoint since the key was disabled
    const absl::Status verified = f.kms->VerifyAuditLog(false);
    INFO(verified.ToString());
    CHECK(absl::IsDataLoss(verified));
    CHECK_THAT(std::string(verified.message()), Catch::StartsWith(index_problem));
    CHECK(absl::IsDataLoss(f.kms->VerifyAuditLog(true)));
  }
}

// Queries name the row index, so that no index added beside it answers; one dropped or
// redefined (to hold some entries only) must then stop the start, saying what to do, rather
// than fail each query or answer from a partial index.
TEST_CASE("A row index dropped or redefined stops the start, and says how to put it back",
          "[insider][catalog]") {
  Fixture f;
  f.NewKey("k");
  f.kms.reset();
  f.store.reset();
  const std::string definition =
      "CREATE INDEX audit_log_by_row ON audit_log (row_name, seq) WHERE row_name <> ''";
  std::string found;
  SECTION("dropped") {
    REQUIRE(SqlExec(Db(f), "DROP INDEX audit_log_by_row;").empty());
    found = "missing";
  }
  SECTION("redefined") {
    REQUIRE(SqlExec(Db(f), "PRAGMA writable_schema = ON; UPDATE sqlite_master SET sql = '" +
                               definition.substr(0, definition.size() - 2) +
                               "'''' AND seq <> 3' WHERE name = 'audit_log_by_row';")
                .empty());
    found = "defined as \"" + definition + " AND seq <> 3\"";
  }
  const std::string problem = "the audit log's row index (audit_log_by_row) is " + found +
                              ": it was dropped or redefined outside Custos";
  const auto opened = storage::KeyStore::Open(Db(f), &f.rows);
  INFO(opened.status().ToString());
  CHECK(absl::IsDataLoss(opened.status()));
  CHECK_THAT(std::string(opened.status().message()), Catch::StartsWith(problem));
  CHECK_THAT(std::string(opened.status().message()),
             Catch::EndsWith("stop custosd, create it again (sqlite3 custos.db \"DROP INDEX IF "
                             "EXISTS audit_log_by_row; " +
                             definition + "\") and start again"));
  // The offline verifier's reader says so too.
  const auto reader = storage::AuditLogReader::Open(Db(f));
  CHECK(absl::IsDataLoss(reader.status()));
  CHECK_THAT(std::string(reader.status().message()), Catch::StartsWith(problem));
  // What the message says to do.
  REQUIRE(SqlExec(Db(f), "PRAGMA writable_schema = OFF; DROP INDEX IF EXISTS audit_log_by_row; " +
                             definition + ";")
              .empty());
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(true).ok());
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
}

TEST_CASE("A key or request row deleted with SQL is refused, not taken for unknown",
          "[insider][catalog]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, true);
  REQUIRE(dk.ok());
  Proposal proposal;
  proposal.operation = Operation::kRotateKey;
  proposal.key = "k";
  proposal.justification = "pending";
  const Request pending = *f.kms->Propose(f.officer, proposal);
  EditWhileStopped(f, "DELETE FROM keys WHERE id = '" + key->id +
                          "'; DELETE FROM requests WHERE id = '" + pending.id + "';");
  CheckRefused(f.kms->Decrypt(f.app, dk->ciphertext_blob, {}).status(), "key:" + key->id,
               "it is missing from the database although audit record ");
  CHECK(Alarms(f, key->id) == 1);
  CheckRefused(f.kms->GetRequest(f.officer, pending.id).status(), "request:" + pending.id,
               "it is missing from the database although audit record ");
  // A key that never existed is still just unknown.
  CHECK(absl::IsNotFound(f.store->GetKey("0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00").status()));
}

TEST_CASE("A key row moved onto another key is refused", "[insider][catalog]") {
  Fixture f;
  const KeyRef granted = f.NewKey("granted");
  const KeyRef other = f.NewKeyWithoutGrants("other");
  // The other key's row and grants made to look like the granted key's, MAC included.
  EditWhileStopped(f, "UPDATE keys SET mac = (SELECT mac FROM keys WHERE id = '" + granted->id +
                          "') WHERE id = '" + other->id + "'; INSERT INTO key_grants SELECT '" +
                          other->id + "', principal, use FROM key_grants WHERE key_id = '" +
                          granted->id + "';");
  CheckRefused(f.kms->GenerateDataKey(f.app, "other", {}, 32, true).status(), "key:" + other->id,
               "its MAC does not match");
  CHECK(f.kms->GenerateDataKey(f.app, "granted", {}, 32, true).ok());
}

// Three encryptions under "k" (with a reservation block of 2: reserved 2, then 4); the last
// ciphertext.
Bytes EncryptThrice(Fixture& f) {
  Bytes blob;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Ciphertext> sealed =
        f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {});
    REQUIRE(sealed.ok());
    blob = sealed->ciphertext_blob;
  }
  return blob;
}

TEST_CASE("The encryption count cannot be rewound", "[insider][catalog]") {
  UsageLimits limits;
  limits.max_encryptions = 100;
  limits.rotate_at = 100;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  const KeyRef key = f.NewKey("k");
  const Bytes blob = EncryptThrice(f);
  // A decryption first loads the key's counts without checking its reservations: the
  // encryption after it must check them all the same.
  const bool decrypted_first = GENERATE(false, true);
  INFO("a decryption first: " << decrypted_first);
  SECTION("edited") {
    EditWhileStopped(f, "UPDATE version_usage SET encryptions_reserved = 0", limits);
  }
  SECTION("deleted") { EditWhileStopped(f, "DELETE FROM version_usage", limits); }
  SECTION("an older reservation put back, MAC and all") {
    f.kms.reset();
    f.store.reset();
    const std::string older = f.dir.File("older.db");
    std::filesystem::copy_file(Db(f), older);
    f.Restart(limits);
    for (int i = 0; i < 2; ++i) {  // reserved 6
      REQUIRE(f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).ok());
    }
    EditWhileStopped(f,
                     "ATTACH '" + older +
                         "' AS old; UPDATE version_usage SET "
                         "(encryptions_reserved, mac) = (SELECT encryptions_reserved, mac FROM "
                         "old.version_usage)",
                     limits);
  }
  if (decrypted_first) {
    const absl::Status decrypted = f.kms->Decrypt(f.app, blob, {}).status();
    INFO(decrypted.ToString());
    REQUIRE(decrypted.ok());
  }
  const absl::Status refused =
      f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).status();
  CHECK(absl::IsDataLoss(refused));
  CHECK_THAT(std::string(refused.message()), Catch::Contains("usage:" + key->id + "/1"));
}

// A reservation deleted, and with it every entry of the row index naming it: nothing but the
// log's records themselves says it was ever made. The key's own newest record (its rotation)
// comes after them, so checking the key's row reads none of them. Maintenance's walk down the
// log reads them, notes the row, and finds the entries missing (the alarm); from then on the
// row is not taken for never written. (The rotation also named version 1 as reserved in the
// key's row, which refuses it at once: see the next case.)
TEST_CASE("A reservation deleted with every index entry naming it is refused once walked",
          "[insider][catalog]") {
  UsageLimits limits;
  limits.max_encryptions = 100;
  limits.rotate_at = 100;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  const KeyRef key = f.NewKey("k");
  EncryptThrice(f);
  ExecuteAs3(f, Operation::kRotateKey, "k");
  REQUIRE(f.kms->Checkpoint().ok());  // the HSM's head is the log's end
  f.EditRowAndIndexWhileStopped("DELETE FROM version_usage WHERE version = 1;",
                                "usage:" + key->id + "/1", limits);
  REQUIRE(f.kms->RunMaintenance().ok());
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(), [&](const audit::Event& e) {
          return e.action == "IntegrityFailure" &&
                 e.detail.find("it has no entry for audit record ") != std::string::npos &&
                 e.detail.find(", which names row usage:" + key->id + "/1") != std::string::npos;
        }) == 1);
  // The part of the log walked is believed no more, the key's row with it; either way the
  // reservation is not taken for never made.
  const absl::Status refused =
      f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).status();
  INFO(refused.ToString());
  CHECK(absl::IsDataLoss(refused));
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains(", which names row usage:" + key->id + "/1"));
}

// The key's row, changed after the reservation, names its version as reserved: its own newest
// record is checked when the key is first used, so nothing waits for a walk of the log.
TEST_CASE("A reservation taken away with every index entry naming it is refused at once",
          "[insider][catalog]") {
  UsageLimits limits;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  REQUIRE(f.kms->SealCatalog().ok());  // as custosd's first start does
  const KeyRef key = f.NewKey("k");
  EncryptThrice(f);
  ExecuteAs3(f, Operation::kDisableKey, "k");
  ExecuteAs3(f, Operation::kEnableKey, "k");
  REQUIRE(SqlQuery(Db(f), "SELECT reserved_versions FROM keys") == "1");
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->RecordServerStart().ok());  // later history
  REQUIRE(f.kms->Checkpoint().ok());  // the HSM's head is past every record of the reservation
  const std::string row = "usage:" + key->id + "/1";
  std::string why;
  SECTION("the row deleted") {
    f.EditRowAndIndexWhileStopped("DELETE FROM version_usage;", row, limits);
    why = "it is missing from the database although the row of key " + key->id +
          " names version 1 as reserved";
  }
  SECTION("the row made one of a version only decrypted (no reservation, no MAC)") {
    f.EditRowAndIndexWhileStopped("UPDATE version_usage SET encryptions_reserved = 0, mac = NULL;",
                                  row, limits);
    why = "it carries no MAC";
  }
  const absl::Status refused =
      f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).status();
  CheckRefused(refused, row, why);
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(), [&](const audit::Event& e) {
          return e.action == "IntegrityFailure" &&
                 e.detail.rfind("catalogue row " + row + " failed", 0) == 0;
        }) == 1);
}

// Without a change of the key after it, the reservation's records come after the key's newest
// record, which is checked with every record after it, their index entries included.
TEST_CASE(
    "A reservation recorded after its key last changed, taken away with its index "
    "entries, is refused at the key's first use",
    "[insider][catalog]") {
  UsageLimits limits;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  REQUIRE(f.kms->SealCatalog().ok());
  const KeyRef key = f.NewKey("k");
  EncryptThrice(f);
  REQUIRE(SqlQuery(Db(f), "SELECT reserved_versions FROM keys").empty());
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->RecordServerStart().ok());
  REQUIRE(f.kms->Checkpoint().ok());
  const std::string row = "usage:" + key->id + "/1";
  f.EditRowAndIndexWhileStopped("DELETE FROM version_usage;", row, limits);
  const absl::Status refused =
      f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).status();
  INFO(refused.ToString());
  CHECK(absl::IsDataLoss(refused));
  CHECK_THAT(std::string(refused.message()), Catch::Contains("it has no entry for audit record ") &&
                                                 Catch::Contains(", which names row " + row));
}

TEST_CASE(
    "A reservation edited, then put back while custosd serves: encryptions resume from the "
    "genuine one, not from what a decryption read unchecked",
    "[insider][catalog]") {
  UsageLimits limits;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  f.NewKey("k");
  const Bytes blob = EncryptThrice(f);
  const std::string genuine_mac = SqlQuery(Db(f), "SELECT hex(mac) FROM version_usage");
  REQUIRE(SqlQuery(Db(f), "SELECT encryptions_reserved FROM version_usage") == "4");
  EditWhileStopped(f, "UPDATE version_usage SET encryptions_reserved = 0", limits);
  REQUIRE(f.kms->Decrypt(f.app, blob, {}).ok());  // reads the counts, reservation 0, unchecked
  REQUIRE(SqlExec(Db(f),
                  "UPDATE version_usage SET encryptions_reserved = 4, mac = x'" + genuine_mac + "'")
              .empty());
  REQUIRE(f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).ok());
  absl::StatusOr<Kms::KeyDescription> described = f.kms->DescribeKey(f.officer, "k");
  REQUIRE(described.ok());
  REQUIRE(described->usage.size() == 1);
  CHECK(described->usage[0].encryptions_reserved == 6);  // 4 checked, then the next block
  CHECK(described->usage[0].encryptions == 5);
  CHECK(described->usage[0].decryptions == 1);
}

// While custosd runs, the records it wrote in this run are not recomputed (nor are older ones
// a second time): it holds the file to the newest record it wrote or checked for each row.
TEST_CASE("A rejected request put back while custosd runs is refused: record or index edited",
          "[insider][catalog]") {
  Fixture f;
  f.NewKey("k");
  Proposal proposal;
  proposal.operation = Operation::kDisableKey;
  proposal.key = "k";
  proposal.justification = "insider test";
  const absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  REQUIRE(request.ok());
  const std::string id = request->id;
  const std::string row = "request:" + id;
  // The pending row, MAC and all, kept by someone who can write the file.
  REQUIRE(SqlExec(Db(f), "CREATE TABLE kept AS SELECT * FROM requests WHERE id = '" + id + "';")
              .empty());
  REQUIRE(f.kms->Reject(f.officer3, id, "not this week").ok());
  const std::string rejected =
      SqlQuery(Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = '" + row + "'");
  const std::string put_back =
      "DELETE FROM requests WHERE id = '" + id + "'; INSERT INTO requests SELECT * FROM kept;";
  SECTION("the rejection's record edited to carry the pending row's digest") {
    REQUIRE(SqlExec(Db(f), put_back +
                               "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                               "row_digest = (SELECT row_digest FROM audit_log WHERE row_name = '" +
                               row + "' AND seq < " + rejected +
                               " ORDER BY seq DESC LIMIT 1) WHERE seq = " + rejected + ";")
                .empty());
  }
  SECTION("the rejection's row index entry dropped") {
    REQUIRE(SqlExec(Db(f), put_back).empty());
    DropRowIndexEntries(Db(f), "seq = " + rejected);
  }
  const absl::Status refused = f.kms->Approve(f.officer2, id, RequestDigest(*request)).status();
  CheckRefused(refused, row,
               "custosd wrote or checked audit record " + rejected +
                   " as the newest naming it in this run, but the log now says ");
  CHECK(f.store->GetRequest(id).status().code() == absl::StatusCode::kDataLoss);
}

// A row not read yet in this run is held to no noted record; a record after the trusted point
// was verified or written by this process, which noted the rows it named then. One renamed
// since to name another row (its digest set to an older copy's) must not vouch for it.
TEST_CASE("A record custosd wrote, renamed while it runs to vouch for another row, is refused",
          "[insider][catalog][anchor]") {
  Fixture f;
  KeyRef key;
  const std::string older = DisabledKeyWithOlderCopy(f, key);
  const std::string row = "key:" + key->id;
  const std::string enabled_digest =
      SqlQuery(Db(f), "SELECT row_digest FROM audit_log WHERE row_name = '" + row +
                          "' ORDER BY seq LIMIT 1");
  REQUIRE(f.kms->Checkpoint().ok());
  f.Restart();  // nothing cached, nothing noted of "k"
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  // A record written in this run by a call that reads no row (reading one, or making a new
  // version, which proves the root in use first, checks older records and notes "k").
  CreateKeyParams params;
  params.alias = "other";
  REQUIRE(absl::IsPermissionDenied(f.kms->CreateKey(f.app, params).status()));
  const std::string renamed = SqlQuery(Db(f), "SELECT max(seq) FROM audit_log");
  REQUIRE(SqlExec(Db(f), PutBackOlderRow(older, key->id) +
                             "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                             "row_name = '" +
                             row + "', row_digest = '" + enabled_digest +
                             "' WHERE seq = " + renamed + ";")
              .empty());
  CheckRefused(
      f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status(), row,
      "audit record " + renamed + " names it now, but did not when custosd verified or wrote it");
}

TEST_CASE("An approval inserted with SQL does not execute anything", "[insider][catalog]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  Proposal proposal;
  proposal.operation = Operation::kScheduleKeyDeletion;
  proposal.key = "k";
  proposal.justification = "cleanup";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  REQUIRE(request.ok());
  EditWhileStopped(f, "INSERT INTO request_approvals VALUES ('" + request->id + "', '" +
                          testing::kOfficer2 + "', 1800000000, 0);");
  const std::string digest = RequestDigest(*request);  // what officer3 reviewed
  CheckRefused(f.kms->Approve(f.officer3, request->id, digest).status(), "request:" + request->id,
               "its MAC does not match");
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kEnabled);
  absl::StatusOr<storage::RequestPage> listed = f.kms->ListRequests(f.officer, {}, 10, "");
  REQUIRE(listed.ok());
  for (const Request& listed_request : listed->requests) {
    INFO(listed_request.id);
    CHECK(listed_request.integrity_problem.empty() == (listed_request.id != request->id));
  }
  // The server's own sweep acts only on requests that pass: it neither expires nor reseals it.
  f.clock.Advance(2 * policy::kDay);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(SqlQuery(Db(f), "SELECT state FROM requests WHERE id = '" + request->id + "'") == "1");
}

TEST_CASE("Observed time moved forward with SQL hastens no destruction", "[insider][catalog]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  OperationParams schedule;
  schedule.deletion_waiting_days = 7;
  ExecuteAs3(f, Operation::kScheduleKeyDeletion, "k", schedule);
  REQUIRE(f.kms->RunMaintenance().ok());  // persists observed time
  f.clock.StepWallClock(8 * policy::kDay);
  EditWhileStopped(f, "UPDATE settings SET value = '99999999' WHERE name = 'observed_seconds'");
  CHECK(absl::IsDataLoss(f.kms->RunMaintenance()));
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kPendingDeletion);
  // Nothing else depends on it: requests are still proposed and expire on time.
  f.NewKey("other");
  absl::StatusOr<Request> proposed = f.kms->Propose(f.officer, [] {
    Proposal proposal;
    proposal.operation = Operation::kDisableKey;
    proposal.key = "other";
    proposal.justification = "observed time refused, requests still served";
    return proposal;
  }());
  INFO(proposed.status().ToString());
  CHECK(proposed.ok());
}

// The record saying the catalogue was sealed used to be looked up through the row index alone,
// and sealing re-read every row unchecked: with that record out of sight, the next start
// sealed whatever had been written into the file meanwhile.
TEST_CASE("A sealed catalogue is not sealed again when its record is hidden or renamed",
          "[insider][catalog][anchor]") {
  Fixture f;
  REQUIRE(f.kms->SealCatalog().ok());
  const KeyRef key = f.NewKeyWithoutGrants("no-grants");
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->RecordServerStart().ok());  // later history
  REQUIRE(f.kms->Checkpoint().ok());                                     // the HSM keeps this head
  const std::string sealed_seq =
      SqlQuery(Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = 'setting:catalog_sealed'");
  REQUIRE(!sealed_seq.empty());
  const std::string grant = "INSERT INTO key_grants VALUES ('" + key->id + "', '" + testing::kApp +
                            "', 'encrypt'); INSERT INTO key_grants VALUES ('" + key->id + "', '" +
                            testing::kApp + "', 'decrypt');";
  SECTION("its entry dropped from the row index, no record changed") {
    f.kms.reset();
    f.store.reset();
    REQUIRE(SqlExec(Db(f), grant).empty());
    DropRowIndexEntries(Db(f), "seq = " + sealed_seq);
    f.Restart();
    REQUIRE(SqlQuery(Db(f),
                     "SELECT count(*) FROM audit_log WHERE row_name = "
                     "'setting:catalog_sealed' AND row_name <> ''") == "0");  // (through the index)
    // A check of the whole log finds the index short of the record; the start-up check from
    // the HSM's head does not reach it, and the table itself is asked.
    CHECK(absl::IsDataLoss(f.kms->VerifyAuditLog(true)));
    REQUIRE(f.kms->VerifyAuditLog(false).ok());
    const absl::StatusOr<uint64_t> resealed = f.kms->SealCatalog();
    INFO(resealed.status().ToString());
    REQUIRE(resealed.ok());
    CHECK(*resealed == 0);
  }
  SECTION("its record renamed, no hash changed") {
    EditWhileStopped(f, grant +
                            "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                            "row_name = 'setting:x' WHERE seq = " +
                            sealed_seq + ";");
    REQUIRE(f.kms->VerifyAuditLog(false).ok());
    const absl::StatusOr<uint64_t> resealed = f.kms->SealCatalog();
    INFO(resealed.status().ToString());
    CHECK(absl::IsFailedPrecondition(resealed.status()));
    CHECK_THAT(std::string(resealed.status().message()),
               Catch::StartsWith("the catalogue is not marked sealed, and the audit log it would "
                                 "be sealed with does not verify, so nothing is sealed: audit "
                                 "records "));
  }
  // Either way the grant no officer approved grants nothing.
  CheckRefused(f.kms->GenerateDataKey(f.app, "no-grants", {}, 32, true).status(), "key:" + key->id,
               "its MAC does not match its content");
}

// A record inserted with plain SQL (no trigger touched) at `seq`, while custosd runs.
std::string PlantRecord(uint64_t seq, const std::string& row, const std::string& digest) {
  return "INSERT INTO audit_log (seq, time, principal, role, action, key_id, key_version, "
         "source_key_id, source_key_version, request_id, outcome, peer, context_hmac, detail, "
         "hash, format, call_id, row_name, row_digest) VALUES (" +
         std::to_string(seq) +
         ", 0, 'custosd', 'server', 'X', '', 0, '', 0, '', 'OK', '', '', '', zeroblob(32), 2, '', "
         "'" +
         row + "', '" + digest + "');";
}

// Records after the start-up anchor were all believed as this process's own: one added while
// it ran vouched for whatever row it named. Past the head, or at the head's next seq, which
// custosd's next write then takes, fails on, and must not count as its own.
TEST_CASE("A record added to the log while custosd runs vouches for nothing",
          "[insider][catalog][anchor]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  f.NewKey("k2");
  const std::string row = "key:" + key->id;
  // The ENABLED row, its MAC and the digest its record carries, as a DBA reads them.
  const std::string state = SqlQuery(Db(f), "SELECT state FROM keys WHERE id = '" + key->id + "'");
  const std::string mac = SqlQuery(Db(f), "SELECT hex(mac) FROM keys WHERE id = '" + key->id + "'");
  const std::string digest = SqlQuery(Db(f), "SELECT row_digest FROM audit_log WHERE row_name = '" +
                                                 row + "' ORDER BY seq DESC LIMIT 1");
  ExecuteAs3(f, Operation::kDisableKey, "k");
  REQUIRE(f.kms->Checkpoint().ok());
  f.Restart();  // nothing cached
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  const uint64_t head = f.store->AuditHead()->first;
  const bool next_seq = GENERATE(false, true);
  const uint64_t planted = next_seq ? head + 1 : 1000000000;
  INFO("planted at " << planted << ", head " << head);
  // Live, through another connection.
  REQUIRE(SqlExec(Db(f), "UPDATE keys SET state = " + state + ", mac = X'" + mac +
                             "' WHERE id = '" + key->id + "'; " + PlantRecord(planted, row, digest))
              .empty());
  // custosd writes: at the next seq that write fails (the seq is taken), and so does every
  // later one, each call's record included (fail closed); the row is refused either way.
  CHECK(f.kms->RecordServerStart().ok() == !next_seq);
  const absl::Status refused = f.store->GetKey(key->id).status();
  CheckRefused(refused, row,
               "the audit record that vouches for it (" + std::to_string(planted) + ")");
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains("audit record " + std::to_string(planted) +
                             " is past the last record custosd committed ("));
  CHECK_FALSE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  if (!next_seq) {  // alarmed; custosd's own records go on being written and believed
    CHECK(Alarms(f, key->id) == 1);
    REQUIRE(f.kms->RecordServerStart().ok());
    CHECK(f.kms->GenerateDataKey(f.app, "k2", {}, 32, true).ok());
  }
}

// A setting deleted with SQL was taken for one never set: the interlock that keeps a TDE
// sealing key from being disabled went with its row, unseen.
TEST_CASE("A setting deleted with SQL is refused, not taken for never set", "[insider][catalog]") {
  Fixture f;
  SealTableSpaceKey(f);
  Proposal disable;
  disable.operation = Operation::kDisableKey;
  disable.key = "tde-seal";
  disable.justification = "insider test";
  REQUIRE(absl::IsFailedPrecondition(f.kms->Propose(f.officer, disable).status()));  // in use
  const std::string setting =
      SqlQuery(Db(f), "SELECT name FROM settings WHERE name LIKE 'tde-sealing/%'");
  REQUIRE(!setting.empty());
  EditWhileStopped(f, "DELETE FROM settings WHERE name = '" + setting + "';");
  const absl::Status refused = f.kms->Propose(f.officer, disable).status();
  CheckRefused(refused, "setting:" + setting,
               "it is missing from the database although audit record ");
  CHECK_THAT(std::string(refused.message()), Catch::Contains("(deleted outside Custos?)"));
}

// Deleted with the index entries of every record naming it, a setting leaves no trace a probe
// can find: only a walk of the whole live log shows its records unindexed. Its absence is
// believed only once the log is walked, so each read below walks it first.
TEST_CASE("A setting deleted with every index entry naming it is refused, not taken for never set",
          "[insider][catalog]") {
  Fixture f;
  const OperationParams tde = SealTableSpaceKey(f);
  // The key's row changes after the setting's records: its own check walks none of them.
  ExecuteAs3(f, Operation::kRotateKey, "tde-seal");
  REQUIRE(f.kms->Checkpoint().ok());  // the HSM's head is the log's end: nothing walked at start
  Proposal proposal;
  std::string setting;
  SECTION("a table-space sealing entry: the versions that sealed could be retired") {
    proposal.operation = Operation::kSetMinDecryptVersion;
    proposal.key = "tde-seal";
    proposal.params.min_decrypt_version = 2;
    setting = SqlQuery(Db(f), "SELECT name FROM settings WHERE name LIKE 'tde-sealing/%'");
  }
  SECTION("a mount's key id: a second key would be made for the same table spaces") {
    proposal.operation = Operation::kCreateTdeKey;
    proposal.params = tde;
    setting = "tde/mariadb/1";
  }
  proposal.justification = "insider test";
  REQUIRE(!setting.empty());
  REQUIRE(!f.kms->Propose(f.officer, proposal).ok());  // refused while the setting is there
  f.EditRowAndIndexWhileStopped("DELETE FROM settings WHERE name = '" + setting + "';",
                                "setting:" + setting);
  for (int attempt = 0; attempt < 2; ++attempt) {
    CheckAbsenceRefused(f.kms->Propose(f.officer, proposal).status(), "", "setting:" + setting);
  }
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(), [](const audit::Event& e) {
          return e.action == "IntegrityFailure";
        }) == 1);  // the log's alarm, once
}

// Over a log found changed, an absence waiting for the walk is refused, one that can be undone
// is not: officers can still disable a key whose own row holds up.
TEST_CASE("Over a log found changed, a key can be disabled but not have versions retired",
          "[insider][catalog]") {
  Fixture f;
  SealTableSpaceKey(f);
  REQUIRE(f.kms->Checkpoint().ok());  // below the HSM's head: walked only when asked
  f.NewKeyWithoutGrants("other");     // after it: checked at every start
  ExecuteAs3(f, Operation::kRotateKey, "other");
  f.EditRowAndIndexWhileStopped("SELECT 1;", "setting:tde/mariadb/1");  // entries dropped only
  Proposal retire;
  retire.operation = Operation::kSetMinDecryptVersion;
  retire.key = "other";
  retire.params.min_decrypt_version = 2;
  retire.justification = "insider test";
  const absl::Status refused = f.kms->Propose(f.officer, retire).status();
  INFO(refused.ToString());
  CHECK(absl::IsDataLoss(refused));
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains(" is not in the database, and that is not believed: "));
  Proposal schedule;
  schedule.operation = Operation::kScheduleKeyDeletion;
  schedule.key = "other";
  schedule.justification = "insider test";
  CHECK(absl::IsDataLoss(f.kms->Propose(f.officer, schedule).status()));  // destroyed for good
  ExecuteAs3(f, Operation::kDisableKey, "other");
  const absl::StatusOr<Kms::KeyDescription> disabled = f.kms->DescribeKey(f.officer, "other");
  INFO(disabled.status().ToString());
  REQUIRE(disabled.ok());
  CHECK(disabled->key->state == KeyState::kDisabled);
}

// The walk an absence waits for finds an intact log: a setting never written reads as such.
TEST_CASE("A setting never written is taken for never set once the log is walked",
          "[insider][catalog]") {
  Fixture f;
  OperationParams tde = SealTableSpaceKey(f);
  REQUIRE(f.kms->Checkpoint().ok());
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  for (const char* name : {"tde/mariadb/2", "tde/other/1"}) {
    const absl::StatusOr<std::optional<std::string>> read = f.store->GetSetting(name);
    INFO(read.status().ToString());
    REQUIRE(read.ok());
    CHECK(!read->has_value());
  }
  tde.tde.key_id = 2;
  ExecuteAs3(f, Operation::kCreateTdeKey, "", tde);
  const absl::StatusOr<std::optional<std::string>> made = f.store->GetSetting("tde/mariadb/2");
  REQUIRE(made.ok());
  CHECK(made->has_value());
}

// The root new versions go under is read at start, before the log is checked against the HSM.
// Its setting deleted with every index entry naming it, new versions went under the root the
// last root rotation retired (still on the token while versions it wrapped remain).
TEST_CASE("The root in use deleted with every index entry naming it wraps nothing new",
          "[insider][catalog][root]") {
  Fixture f;
  f.NewKeyWithoutGrants("k");  // its version keeps the retired (confining) root on the token
  ExecuteAs3(f, Operation::kRotateRootKey, "");
  REQUIRE(f.kms->CurrentRoot() == "custos-root.2");
  REQUIRE(f.kms->Checkpoint().ok());  // below the HSM's head: walked only when asked
  CreateKeyParams daily;              // after it: checked at every start
  daily.alias = "k2";
  daily.rotation_period_days = 1;
  REQUIRE(f.kms->CreateKey(f.officer, daily).ok());
  f.EditRowAndIndexWhileStopped("DELETE FROM settings WHERE name = 'root_key_label';",
                                "setting:root_key_label");
  REQUIRE(f.kms->CurrentRoot() == "custos-root");  // as custosd reads it at start
  REQUIRE(f.hsm->CheckRootKey("custos-root").ok());
  CreateKeyParams params;
  params.alias = "new";
  CheckAbsenceRefused(f.kms->CreateKey(f.officer, params).status(), "root_key_label",
                      "setting:root_key_label");
  const absl::Status rotated = ApprovedAs3(f, Operation::kRotateKey, "k2").status();
  INFO(rotated.ToString());
  CHECK(absl::IsFailedPrecondition(rotated));  // the request closed as failed, saying why
  CHECK_THAT(std::string(rotated.message()),
             Catch::Contains("could not execute: catalogue row setting:root_key_label is not in "
                             "the database"));
  CheckAbsenceRefused(ApprovedAs3(f, Operation::kRotateRootKey, "").status(), "root_key_label",
                      "setting:root_key_label");
  // Maintenance neither rotates the key now due (nor records a refusal for it at each turn)
  // nor drops the retired root from the list it is destroyed from.
  f.clock.Advance(2 * policy::kDay);
  const int wakes = f.maintenance_wakes;
  for (int turn = 0; turn < 2; ++turn) {
    const absl::Status done = f.kms->RunMaintenance();
    INFO(done.ToString());
    CHECK(done.ok());
  }
  CHECK(f.maintenance_wakes == wakes);  // no turn after turn: the walk is over, found changed
  CHECK(f.hsm->CheckRootKey("custos-root").ok());
  CHECK(SqlQuery(Db(f), "SELECT value FROM settings WHERE name = 'retired_root_key_labels'") ==
        R"(["custos-root"])");
  CHECK(SqlQuery(Db(f),
                 "SELECT group_concat(root_key_label) FROM (SELECT root_key_label FROM "
                 "key_versions ORDER BY root_key_label)") ==
        "custos-root,custos-root.2");  // k's and k2's first versions only
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(), [](const audit::Event& e) {
          return e.action == "IntegrityFailure";
        }) == 1);  // the log's alarm, once
  CHECK(std::none_of(events.begin(), events.end(),
                     [](const audit::Event& e) { return e.action == "AutoRotateKey"; }));
}

// A root rotation's setting put back from a copy made before it, with the index entry of the
// rotation's record dropped: custosd starts on the root that rotation retired (still on the
// token while versions it wrapped remain), and the row agrees with the newest record the index
// leads to. Proving the root reads the row as any setting is read: its record, below the HSM's
// head, is checked with the part of the log after it, which holds the rotation's record.
TEST_CASE("The root in use put back from an older copy wraps nothing new",
          "[insider][catalog][root]") {
  Fixture f;
  f.NewKeyWithoutGrants("k");
  ExecuteAs3(f, Operation::kRotateRootKey, "");
  f.NewKeyWithoutGrants("k2");  // its version keeps custos-root.2 on the token once retired
  f.kms.reset();
  f.store.reset();
  const std::string older = f.dir.File("older.db");
  std::filesystem::copy_file(Db(f), older);
  f.Restart();
  ExecuteAs3(f, Operation::kRotateRootKey, "");
  REQUIRE(f.kms->CurrentRoot() == "custos-root.3");
  const std::string row = "setting:root_key_label";
  const std::string newest =
      SqlQuery(Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = '" + row + "'");
  REQUIRE(!newest.empty());
  const std::string retired =
      SqlQuery(Db(f), "SELECT value FROM settings WHERE name = 'retired_root_key_labels'");
  REQUIRE(retired == R"(["custos-root","custos-root.2"])");
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->RecordServerStart().ok());  // later history
  REQUIRE(f.kms->Checkpoint().ok());                                     // the HSM keeps this head
  CreateKeyParams daily;  // after it: checked at every start
  daily.alias = "k3";
  daily.rotation_period_days = 1;
  REQUIRE(f.kms->CreateKey(f.officer, daily).ok());
  f.kms.reset();
  f.store.reset();
  REQUIRE(SqlExec(Db(f), "ATTACH '" + older +
                             "' AS old; UPDATE settings SET (value, mac) = (SELECT value, mac "
                             "FROM old.settings WHERE name = 'root_key_label') WHERE name = "
                             "'root_key_label';")
              .empty());
  DropRowIndexEntries(Db(f), "seq = " + newest);
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  REQUIRE(f.kms->CurrentRoot() == "custos-root.2");  // as custosd reads it at start
  REQUIRE(f.hsm->CheckRootKey("custos-root.2").ok());
  CreateKeyParams params;
  params.alias = "new";
  const absl::Status refused = f.kms->CreateKey(f.officer, params).status();
  CheckRefused(refused, row, "the audit record that vouches for it (");
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains("has no entry for audit record " + newest + ", which names row " +
                             row + ". "));
  const absl::Status again = f.kms->CreateKey(f.officer, params).status();
  CheckRefused(again, row, "");
  CHECK_THAT(std::string(again.message()), Catch::Contains("audit record " + newest + " "));
  const absl::Status rotated = ApprovedAs3(f, Operation::kRotateKey, "k3").status();
  INFO(rotated.ToString());
  CHECK(absl::IsFailedPrecondition(rotated));  // the request closed as failed, saying why
  CHECK_THAT(
      std::string(rotated.message()),
      Catch::Contains("could not execute: catalogue row " + row + " failed its integrity check: "));
  CheckRefused(ApprovedAs3(f, Operation::kRotateRootKey, "").status(), row, "");
  // Maintenance neither rotates k3, now due, nor destroys or drops a retired root.
  f.clock.Advance(2 * policy::kDay);
  for (int turn = 0; turn < 2; ++turn) REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(SqlQuery(Db(f),
                 "SELECT group_concat(root_key_label) FROM (SELECT root_key_label FROM "
                 "key_versions ORDER BY root_key_label)") ==
        "custos-root,custos-root.2,custos-root.3");  // k's, k2's and k3's first versions only
  CHECK(SqlQuery(Db(f), "SELECT value FROM settings WHERE name = 'retired_root_key_labels'") ==
        retired);
  for (const char* root : {"custos-root", "custos-root.2", "custos-root.3"}) {
    CHECK(f.hsm->CheckRootKey(root).ok());
  }
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(), [](const audit::Event& e) {
          return e.action == "IntegrityFailure" &&
                 e.detail.rfind("the audit log was changed after it was written: ", 0) == 0;
        }) == 1);  // the log's alarm, once
  CHECK(std::count_if(events.begin(), events.end(), [](const audit::Event& e) {
          return e.action == "IntegrityFailure";
        }) == 2);  // and the row's
  CHECK(std::none_of(events.begin(), events.end(),
                     [](const audit::Event& e) { return e.action == "AutoRotateKey"; }));
}

// On a server never rotated, the root in use is proven by the walk of the live log its absent
// setting waits for: made by maintenance's first turn, or else by the first new version. An
// index entry dropped while custosd runs shows which: after the walk it goes unseen.
TEST_CASE("The root in use is proven by maintenance's first turn, else by the first new version",
          "[insider][root]") {
  Fixture f;
  const KeyRef k = f.NewKeyWithoutGrants("k");
  REQUIRE(f.kms->Checkpoint().ok());  // the HSM's head is the log's end: nothing walked at start
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  CreateKeyParams params;
  params.alias = "after";
  SECTION("a maintenance turn first: the new version walks nothing") {
    REQUIRE(f.kms->RunMaintenance().ok());
    DropRowIndexEntries(Db(f), "row_name = 'key:" + k->id + "'");
    const absl::StatusOr<KeyRef> made = f.kms->CreateKey(f.officer, params);
    INFO(made.status().ToString());
    REQUIRE(made.ok());
    CHECK((*made)->versions[0].root_key_label == "custos-root");
  }
  SECTION("no turn yet: the new version walks the log, and finds the entry gone") {
    DropRowIndexEntries(Db(f), "row_name = 'key:" + k->id + "'");
    CheckAbsenceRefused(f.kms->CreateKey(f.officer, params).status(), "root_key_label",
                        "key:" + k->id);
  }
}

// Maintenance stopped at the first row its integrity check refused: one key edited into a
// due deletion held up every other key's destruction, rotation and the usage flush for good.
TEST_CASE("A row edited outside Custos holds up no other key's maintenance", "[insider][catalog]") {
  Fixture f;
  const KeyRef due = f.NewKey("due");
  const KeyRef edited = f.NewKey("edited");
  OperationParams schedule;
  schedule.deletion_waiting_days = 7;
  ExecuteAs3(f, Operation::kScheduleKeyDeletion, "due", schedule);
  EditWhileStopped(
      f, "UPDATE keys SET state = 3, deletion_due_at = 0 WHERE id = '" + edited->id + "';");
  REQUIRE(f.kms->RunMaintenance().ok());  // (observed time resumes)
  f.clock.Advance(7 * 24 * 3600 + 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(due->id))->state == KeyState::kDestroyed);
  CheckRefused(f.store->GetKey(edited->id).status(), "key:" + edited->id,
               "its MAC does not match its content");
  CHECK(Alarms(f, edited->id) == 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(Alarms(f, edited->id) == 1);
}

TEST_CASE("A catalogue from before row MACs is sealed once; then an unsealed row is refused",
          "[insider][catalog]") {
  Fixture f;
  const KeyRef key = f.NewKey("old-key");
  // Make the file look as an older custosd left it: no MACs, no record of any row.
  EditWhileStopped(f,
                   "DROP TRIGGER audit_log_append_only_delete; DELETE FROM audit_log; "
                   "UPDATE keys SET mac = NULL; UPDATE settings SET mac = NULL;");
  f.Restart();  // (the chain head is read again from the emptied log)
  absl::StatusOr<uint64_t> sealed = f.kms->SealCatalog();
  REQUIRE(sealed.ok());
  CHECK(*sealed >= 1);
  const std::vector<audit::Record> log = *f.store->ReadAudit(1, 100);
  CHECK(std::any_of(log.begin(), log.end(), [&](const audit::Record& r) {
    return r.action == "SealCatalogRow" && r.row == "key:" + key->id && r.row_digest.size() == 64;
  }));
  CHECK(f.kms->GenerateDataKey(f.app, "old-key", {}, 32, true).ok());
  CHECK(*f.kms->SealCatalog() == 0);  // once only

  EditWhileStopped(f, "UPDATE keys SET mac = NULL");
  CHECK(*f.kms->SealCatalog() == 0);  // never sealed again...
  CheckRefused(f.kms->GenerateDataKey(f.app, "old-key", {}, 32, true).status(), "key:" + key->id,
               "it carries no MAC");  // ...so the unsealed row is refused
}

// The alarms raised so far, whichever row.
size_t AllAlarms(Fixture& f) {
  const std::vector<audit::Event> events = f.sink.events();
  return static_cast<size_t>(std::count_if(events.begin(), events.end(), [](const auto& e) {
    return e.action == "IntegrityFailure" && e.outcome == absl::StatusCode::kDataLoss;
  }));
}

TEST_CASE("Version rows edited with SQL do not get a retired root destroyed under live keys",
          "[insider][catalog][root]") {
  Fixture f;
  const KeyRef a = f.NewKey("a");
  const KeyRef b = f.NewKey("b");
  ExecuteAs3(f, Operation::kRotateRootKey, "");
  // The confining root still wraps a's and b's versions: kept, listed as retired.
  REQUIRE(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["custos-root"])");
  const std::string under_old_root = " WHERE root_key_label = 'custos-root'";
  const std::string both = "('" + a->id + "', '" + b->id + "')";
  std::string sql;
  SECTION("moved to the new root") {
    sql = "UPDATE key_versions SET root_key_label = 'custos-root.2'" + under_old_root;
  }
  SECTION("emptied, as a destroyed key's are") {
    sql = "UPDATE key_versions SET wrapped = x''" + under_old_root;
  }
  SECTION("deleted") { sql = "DELETE FROM key_versions" + under_old_root; }
  SECTION("deleted with their keys") {
    sql = "DELETE FROM key_versions WHERE key_id IN " + both + "; DELETE FROM key_grants WHERE " +
          "key_id IN " + both + "; DELETE FROM keys WHERE id IN " + both;
  }
  EditWhileStopped(f, sql);
  // The version index now finds nothing under the old root; the checked rows disagree.
  REQUIRE(*f.store->CountVersionsUnderRoot("custos-root") == 0);
  for (int turn = 0; turn < 2; ++turn) {
    REQUIRE(f.kms->RunMaintenance().ok());
    CHECK(f.hsm->CheckRootKey("custos-root").ok());
  }
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["custos-root"])");
  CHECK(AllAlarms(f) == 1);  // the first key found refused, once
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::none_of(events.begin(), events.end(),
                     [](const audit::Event& e) { return e.action == "DestroyRootKey"; }));
}

TEST_CASE("A version row naming another key on the token gets it neither retired nor destroyed",
          "[insider][catalog][root]") {
  Fixture f;
  // Another root on the same token, say another copy's: no key of this catalogue uses it.
  REQUIRE(f.real_hsm->CreateRootKey("other-root").ok());
  const KeyRef a = f.NewKey("a");
  const std::string orphan = "'0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00'";
  EditWhileStopped(
      f, "INSERT INTO key_versions VALUES (" + orphan + ", 1, x'00112233', 'other-root', 0)");
  ExecuteAs3(f, Operation::kRotateRootKey, "");
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["custos-root"])");
  // Once the row is gone again, nothing counts versions under it, but it was never retired.
  EditWhileStopped(f, "DELETE FROM key_versions WHERE key_id = " + orphan);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.hsm->CheckRootKey("other-root").ok());
  CHECK(f.hsm->CheckRootKey("custos-root").ok());  // a's version is under it
}

}  // namespace
}  // namespace custos::core
