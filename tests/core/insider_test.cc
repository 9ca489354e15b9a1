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
#include "tests/core/kms_fixture.h"
#include "tests/support/sqlite_file.h"

namespace custos::core {
namespace {

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

void ExecuteAs3(Fixture& f, Operation operation, const std::string& key,
                OperationParams params = {}) {
  Proposal proposal;
  proposal.operation = operation;
  proposal.key = key;
  proposal.params = std::move(params);
  proposal.justification = "insider test";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, RequestDigest(*request)).ok());
  absl::StatusOr<Request> done = f.kms->Approve(f.officer3, request->id, RequestDigest(*request));
  REQUIRE(done.ok());
  REQUIRE(done->state == RequestState::kExecuted);
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
  if (decrypted_first) REQUIRE(f.kms->Decrypt(f.app, blob, {}).ok());
  const absl::Status refused =
      f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).status();
  CHECK(absl::IsDataLoss(refused));
  CHECK_THAT(std::string(refused.message()), Catch::Contains("usage:" + key->id + "/1"));
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

// Rebuilds the row index without the entry of record `seq`, through the schema table, each
// step on a connection of its own (one reads the schema once): no record changes, and only
// PRAGMA integrity_check would tell.
void DropIndexEntry(const std::string& db, const std::string& seq) {
  const std::string index =
      "CREATE INDEX audit_log_by_row ON audit_log (row_name, seq) WHERE row_name <> ''''";
  const auto define = [&](const std::string& sql) {
    REQUIRE(SqlExec(db, "PRAGMA writable_schema = ON; UPDATE sqlite_master SET sql = '" + sql +
                            "' WHERE name = 'audit_log_by_row';")
                .empty());
  };
  define(index + " AND seq <> " + seq);
  REQUIRE(SqlExec(db, "REINDEX audit_log_by_row;").empty());
  define(index);
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
    DropIndexEntry(Db(f), sealed_seq);
    f.Restart();
    REQUIRE(SqlQuery(Db(f),
                     "SELECT count(*) FROM audit_log WHERE row_name = "
                     "'setting:catalog_sealed' AND row_name <> ''") == "0");  // (through the index)
    REQUIRE(f.kms->VerifyAuditLog(true).ok());
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
  f.NewKeyWithoutGrants("tde-seal");
  OperationParams tde;
  tde.tde = {"mariadb", 1, "tde-seal"};
  ExecuteAs3(f, Operation::kCreateTdeKey, "", tde);
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

}  // namespace
}  // namespace custos::core
