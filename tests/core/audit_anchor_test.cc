// Laundering the audit log while custosd is stopped, as someone who can write custos.db would
// try it, and that start-up refuses each variant: history edited and re-chained (with or
// without the stored checkpoints), checkpoints deleted, the database rolled back to an older
// copy. And the way back for a legitimate restore: re-anchoring, approved by two officers.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include "audit/record.h"
#include "core/operation_params.h"
#include "storage/audit_log_reader.h"
#include "storage/row_codec.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/sqlite_file.h"

namespace custos::core {
namespace {

using custos::testing::SqlExec;
using testing::Fixture;

std::string Db(Fixture& f) { return f.dir.File("custos.db"); }

void Stop(Fixture& f) {
  f.kms.reset();
  f.store.reset();
}

// A log with checkpoints: a key, some use, a checkpoint at its end (kept in the HSM too), and
// a few records after it.
void MakeHistory(Fixture& f) {
  f.NewKey("k");
  for (int i = 0; i < 4; ++i) REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  REQUIRE(f.kms->Checkpoint().ok());
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
}

// Rewrites who did record `seq` and recomputes every later hash, as a DBA with a script can.
void RewriteAndRechain(const std::string& db, uint64_t seq, const std::string& principal) {
  auto reader = storage::AuditLogReader::Open(db);
  REQUIRE(reader.ok());
  std::vector<audit::Record> log;
  while (true) {
    absl::StatusOr<std::optional<audit::Record>> next = (*reader)->Next();
    REQUIRE(next.ok());
    if (!next->has_value()) break;
    log.push_back(**next);
  }
  reader->reset();
  log.at(seq - 1).principal = principal;
  audit::Chain chain;
  std::string sql =
      "DROP TRIGGER audit_log_append_only_update; DROP TRIGGER audit_log_append_only_delete;";
  for (audit::Record& record : log) {
    chain.Seal(record);
    sql += "UPDATE audit_log SET principal = '" + record.principal + "', hash = X'" +
           audit::ToHex(record.hash) + "' WHERE seq = " + std::to_string(record.seq) + ";";
  }
  REQUIRE(SqlExec(db, sql).empty());
}

constexpr char kDropCheckpointTriggers[] =
    "DROP TRIGGER audit_checkpoints_append_only_update;"
    "DROP TRIGGER audit_checkpoints_append_only_delete;";

TEST_CASE("A log that extends the HSM's last signed head starts; full verification too",
          "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  Stop(f);
  f.Restart();
  CHECK(f.kms->VerifyAuditLog(false).ok());
  CHECK(f.kms->VerifyAuditLog(true).ok());
  // The HSM keeps the head of the last checkpoint; checkpoints name their predecessor.
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  REQUIRE(f.kms->Checkpoint().ok());
  const std::vector<audit::Checkpoint> checkpoints = *f.store->Checkpoints();
  REQUIRE(checkpoints.size() == 2);
  CHECK(checkpoints[0].prev_seq == checkpoints[1].seq);
  CHECK(checkpoints[0].prev_hash == checkpoints[1].hash);
  CHECK(*f.hsm->ReadTokenData("custos-audit-head") ==
        std::vector<std::string>{"custos-audit-head-v1\nseq=" + std::to_string(checkpoints[0].seq) +
                                 "\nhash=" + audit::ToHex(checkpoints[0].hash) + "\n"});
}

TEST_CASE("Stored checkpoints are never changed or removed", "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  CHECK_THAT(SqlExec(Db(f), "UPDATE audit_checkpoints SET time = 0"),
             Catch::Contains("audit checkpoints are never changed"));
  CHECK_THAT(SqlExec(Db(f), "DELETE FROM audit_checkpoints"),
             Catch::Contains("audit checkpoints are never removed"));
}

TEST_CASE("Laundered history is refused at start-up", "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  Stop(f);
  std::string expected;
  SECTION("record 3 rewritten, every later hash recomputed, the checkpoints deleted") {
    RewriteAndRechain(Db(f), 3, "someone-else");
    REQUIRE(SqlExec(Db(f), std::string(kDropCheckpointTriggers) + "DELETE FROM audit_checkpoints;")
                .empty());
    expected = "stored checkpoints were deleted";
  }
  SECTION("record 3 rewritten and re-chained, the checkpoints kept") {
    RewriteAndRechain(Db(f), 3, "someone-else");
    expected = "does not extend the checkpoint this HSM signed";
  }
  SECTION("the checkpoints deleted") {
    REQUIRE(SqlExec(Db(f), std::string(kDropCheckpointTriggers) + "DELETE FROM audit_checkpoints;")
                .empty());
    expected = "stored checkpoints were deleted";
  }
  SECTION("the tail after the checkpoint cut off") {
    REQUIRE(SqlExec(Db(f),
                    "DROP TRIGGER audit_log_append_only_delete; DELETE FROM audit_log "
                    "WHERE seq > (SELECT max(seq) FROM audit_checkpoints) - 2;")
                .empty());
    expected = "records were removed, an older copy of the database was restored, or another copy";
  }
  f.Restart();
  const absl::Status refused = f.kms->VerifyAuditLog(false);
  INFO(refused.ToString());
  CHECK(absl::IsFailedPrecondition(refused));
  CHECK_THAT(std::string(refused.message()), Catch::Contains(expected));
}

TEST_CASE("Records added to the file while custosd was stopped cleanly are refused",
          "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  REQUIRE(f.kms->RecordServerStop().ok());
  REQUIRE(f.kms->CloseAuditLog().ok());
  const uint64_t stopped_at = f.store->AuditHead()->first;
  Stop(f);
  f.Restart();
  SECTION("a plain restart starts, and clears the mark: a crash after it is no problem") {
    REQUIRE(f.kms->VerifyAuditLog(false).ok());
    REQUIRE(f.kms->RecordServerStart().ok());  // then killed: no stop, no checkpoint
    Stop(f);
    f.Restart();
    CHECK(f.kms->VerifyAuditLog(false).ok());
  }
  SECTION("a record appended with the store's own chaining is refused") {
    audit::Record forged;
    forged.time = 1'800'000'100;
    forged.principal = testing::kOfficer2;
    forged.role = "officer";
    forged.action = "Approve";
    forged.outcome = "OK";
    forged.format = 2;
    storage::WriteBatch batch;
    batch.audit.push_back(forged);
    REQUIRE(f.store->Apply(batch).ok());
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    CHECK(absl::IsFailedPrecondition(refused));
    CHECK(refused.message() == "custosd stopped at audit record " + std::to_string(stopped_at) +
                                   " (the head this HSM signed) but the log goes on to record " +
                                   std::to_string(stopped_at + 1) +
                                   ": records were added while it was stopped");
  }
}

// A record as custosd writes one of its own.
audit::Record Plain(const std::string& action) {
  audit::Record record;
  record.time = 1'800'000'100;
  record.principal = "custosd";
  record.role = "server";
  record.action = action;
  record.outcome = "OK";
  record.format = 2;
  return record;
}

// After a run that did not sign its end (a crash; or a stop whose last writes a DBA's lock
// held off), records past the HSM's head are the crashed run's own only if its last write
// marked them: a record appended with the store's own chaining, vouching for a key's row put
// back from before officers disabled it, would otherwise re-enable the key.
TEST_CASE("Records appended after a run that did not sign its end are refused",
          "[insider][anchor]") {
  Fixture f;
  const KeyRef enabled = f.NewKey("k");
  Proposal disable;
  disable.operation = policy::Operation::kDisableKey;
  disable.key = "k";
  disable.justification = "compromised application";
  const Request proposed = *f.kms->Propose(f.officer, disable);
  REQUIRE(f.kms->Approve(f.officer2, proposed.id, RequestDigest(proposed)).ok());
  REQUIRE(f.kms->Approve(f.officer3, proposed.id, RequestDigest(proposed))->state ==
          storage::RequestState::kExecuted);
  REQUIRE(f.kms->Checkpoint().ok());
  for (int i = 0; i < 2; ++i) {  // refused, disabled; recorded after the head
    REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status().code() ==
            absl::StatusCode::kFailedPrecondition);
  }
  Stop(f);  // no stop record, no signed end
  SECTION("the crashed run's own records start") {
    f.Restart();
    CHECK(f.kms->VerifyAuditLog(false).ok());
  }
  SECTION("a key's row put back, with a record chained after the log's end") {
    {
      // As a DBA's script: the ENABLED row written back through a store of its own (no HSM,
      // so no MAC, no mark), then its genuine MAC put back.
      auto dba = storage::KeyStore::Open(Db(f), nullptr);
      REQUIRE(dba.ok());
      storage::WriteBatch batch;
      batch.keys.push_back(*enabled);
      audit::Record vouch = Plain("EnableKey");
      vouch.row = storage::KeyRowName(enabled->id);
      batch.audit.push_back(vouch);
      REQUIRE((*dba)->Apply(batch).ok());
    }
    REQUIRE(SqlExec(Db(f), "UPDATE keys SET mac = X'" + audit::ToHex(enabled->mac) +
                               "' WHERE id = '" + enabled->id + "'")
                .empty());
    f.Restart();
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    INFO(refused.ToString());
    CHECK(absl::IsFailedPrecondition(refused));
    CHECK_THAT(std::string(refused.message()),
               Catch::Contains("was not written by custosd: the audit log goes on from record ") &&
                   Catch::Contains("as its newest: records were added or removed"));
  }
  SECTION("the mark moved onto a record appended") {
    {
      auto dba = storage::KeyStore::Open(Db(f), nullptr);
      REQUIRE(dba.ok());
      storage::WriteBatch batch;
      batch.audit.push_back(Plain("ReAnchorAuditLog"));
      REQUIRE((*dba)->Apply(batch).ok());
    }
    REQUIRE(SqlExec(Db(f), "UPDATE audit_tail SET seq = seq + 1").empty());
    f.Restart();
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    CHECK(absl::IsFailedPrecondition(refused));
    CHECK_THAT(std::string(refused.message()),
               Catch::Contains("but its newest record does not carry the mark of this HSM"));
  }
  SECTION("the mark deleted") {
    REQUIRE(SqlExec(Db(f), "DELETE FROM audit_tail").empty());
    f.Restart();
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    CHECK(absl::IsFailedPrecondition(refused));
    CHECK_THAT(std::string(refused.message()),
               Catch::Contains("but no record carries the mark of the server that wrote it"));
  }
  SECTION("the newest record cut off") {
    REQUIRE(SqlExec(Db(f),
                    "DROP TRIGGER audit_log_append_only_delete; DELETE FROM audit_log WHERE seq = "
                    "(SELECT max(seq) FROM audit_log)")
                .empty());
    f.Restart();
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    CHECK(absl::IsFailedPrecondition(refused));
    CHECK_THAT(std::string(refused.message()),
               Catch::Contains("as its newest: records were added or removed"));
  }
  SECTION("a state from before marks, left by a crash, waits for a re-anchoring") {
    REQUIRE(SqlExec(Db(f),
                    "DROP TABLE audit_tail; DROP INDEX key_grants_by_principal; "
                    "PRAGMA user_version = 7;")
                .empty());
    f.Restart();
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    CHECK(absl::IsFailedPrecondition(refused));
    CHECK_THAT(std::string(refused.message()),
               Catch::Contains("but no record carries the mark of the server that wrote it"));
  }
}

// A run awaiting re-anchoring writes records (its start, refusals) after a tail that failed
// the check: they must not carry the mark that would pass the next start's check, until
// officers approve the re-anchoring.
TEST_CASE("Only an approved re-anchoring marks a tail that failed the check", "[insider][anchor]") {
  Fixture f;
  f.NewKey("k");
  REQUIRE(f.kms->Checkpoint().ok());
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  Stop(f);  // no signed end
  {
    auto dba = storage::KeyStore::Open(Db(f), nullptr);
    REQUIRE(dba.ok());
    storage::WriteBatch batch;
    batch.audit.push_back(Plain("EnableKey"));
    REQUIRE((*dba)->Apply(batch).ok());
  }
  const auto start_awaiting = [&f] {
    f.Restart();
    const absl::Status refused = f.kms->VerifyAuditLog(false);
    REQUIRE(absl::IsFailedPrecondition(refused));
    f.kms->RequireReAnchoring(std::string(refused.message()));
    REQUIRE(f.kms->RecordServerStart().ok());  // written, unmarked
    CHECK(absl::IsUnavailable(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status()));
  };
  start_awaiting();
  Stop(f);  // the checkpoint a clean stop signs waits for the re-anchoring: never clean
  start_awaiting();
  Proposal reanchor;
  reanchor.operation = policy::Operation::kReAnchorAuditLog;
  reanchor.justification = "the records after the crash were reviewed";
  const absl::StatusOr<Request> request = f.kms->Propose(f.officer, reanchor);
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, RequestDigest(*request)).ok());
  // The checkpoint the re-anchoring signs fails: only the mark vouches for its records.
  f.hsm->BeforeNextCallTo("SignSha256",
                          [&f] { f.hsm->FailNext(1, absl::UnavailableError("HSM busy")); });
  REQUIRE(f.kms->Approve(f.officer3, request->id, RequestDigest(*request))->state ==
          storage::RequestState::kExecuted);
  Stop(f);
  f.Restart();
  CHECK(f.kms->VerifyAuditLog(false).ok());
}

TEST_CASE("A record edited before the last checkpoint is caught by the full check",
          "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  Stop(f);
  // Edited without re-chaining: the tail check from the HSM's head does not read it; the full
  // check (and any offline verifier) names it.
  REQUIRE(SqlExec(Db(f),
                  "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                  "principal = 'x' WHERE seq = 2;")
              .empty());
  f.Restart();
  CHECK(f.kms->VerifyAuditLog(false).ok());
  const absl::Status full = f.kms->VerifyAuditLog(true);
  CHECK(absl::IsFailedPrecondition(full));
  CHECK_THAT(std::string(full.message()), Catch::Contains("audit record 2 does not chain"));
}

TEST_CASE("An older copy of the database is refused, and accepted only by re-anchoring",
          "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  Stop(f);
  const std::string backup = f.dir.File("backup.db");
  REQUIRE(SqlExec(Db(f), "VACUUM INTO '" + backup + "'").empty());
  f.Restart();
  for (int i = 0; i < 3; ++i) REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  REQUIRE(f.kms->Checkpoint().ok());  // the HSM now holds a head the backup does not reach
  Stop(f);
  std::filesystem::remove(Db(f) + "-wal");
  std::filesystem::remove(Db(f) + "-shm");
  std::filesystem::copy_file(backup, Db(f), std::filesystem::copy_options::overwrite_existing);
  f.Restart();
  const absl::Status refused = f.kms->VerifyAuditLog(false);
  CHECK(absl::IsFailedPrecondition(refused));
  CHECK_THAT(std::string(refused.message()),
             Catch::Contains("an older copy of the database was restored"));

  // The restore was legitimate: custosd waits for two officers, serving nothing else.
  f.kms->RequireReAnchoring(std::string(refused.message()));
  CHECK(absl::IsUnavailable(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status()));
  CHECK(absl::IsUnavailable(f.kms->DescribeKey(f.officer, "k").status()));
  CHECK(absl::IsFailedPrecondition(f.kms->Checkpoint()));
  CHECK(absl::IsUnavailable(f.kms->RunMaintenance()));
  Proposal rotate;
  rotate.operation = policy::Operation::kRotateKey;
  rotate.key = "k";
  rotate.justification = "not now";
  CHECK(absl::IsUnavailable(f.kms->Propose(f.officer, rotate).status()));
  Proposal reanchor;
  reanchor.operation = policy::Operation::kReAnchorAuditLog;
  reanchor.justification = "restored from last night's backup after the disk failure";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, reanchor);
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, RequestDigest(*request)).ok());
  absl::StatusOr<Request> done = f.kms->Approve(f.officer3, request->id, RequestDigest(*request));
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == storage::RequestState::kExecuted);
  CHECK_THAT(done->reason, Catch::StartsWith("audit log re-anchored at record "));
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::any_of(events.begin(), events.end(), [&](const audit::Event& e) {
    return e.action == "ReAnchorAuditLog" && e.request_id == request->id &&
           e.detail == refused.message();
  }));
  // Serving again, and the next start accepts the restored log as it now stands.
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  Stop(f);
  f.Restart();
  CHECK(f.kms->VerifyAuditLog(false).ok());
}

// Approvals given while the log is sound, or for an earlier start's problem, must not count
// toward re-anchoring it after a later restore or edit: such a proposal is not stored, a
// request still pending at a start expires, and one whose log is found sound fails.
TEST_CASE("A re-anchoring is proposed only while the log awaits it, and lasts one run",
          "[insider][anchor]") {
  Fixture f;
  MakeHistory(f);
  Proposal reanchor;
  reanchor.operation = policy::Operation::kReAnchorAuditLog;
  reanchor.justification = "in case a restore is ever needed";
  const absl::StatusOr<Request> early = f.kms->Propose(f.officer, reanchor);
  CHECK(absl::IsFailedPrecondition(early.status()));
  CHECK(early.status().message() ==
        "the audit log extends the HSM's last signed checkpoint: there is nothing to re-anchor");
  absl::StatusOr<std::vector<Request>> pending = f.store->PendingRequests();
  REQUIRE(pending.ok());
  CHECK(pending->empty());

  // Proposed and approved once for one start's problem; the next start finds another.
  f.kms->RequireReAnchoring("an older copy of the database was restored");
  const absl::StatusOr<Request> request = f.kms->Propose(f.officer, reanchor);
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, RequestDigest(*request)).ok());
  f.Restart();
  f.kms->RequireReAnchoring("a record was edited");
  REQUIRE(f.kms->ExpireEarlierReAnchorings().ok());
  const absl::StatusOr<Request> expired = f.kms->GetRequest(f.officer, request->id);
  REQUIRE(expired.ok());
  CHECK(expired->state == storage::RequestState::kExpired);
  CHECK(expired->reason ==
        "expired at a restart: a re-anchoring is approved in the run whose start-up check it "
        "answers");
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::any_of(events.begin(), events.end(), [&](const audit::Event& e) {
    return e.action == "ExpireRequest" && e.request_id == request->id;
  }));
  // Its last approval cannot re-anchor the new problem; a proposal of this run can.
  CHECK(absl::IsFailedPrecondition(
      f.kms->Approve(f.officer3, request->id, RequestDigest(*request)).status()));
  const absl::StatusOr<Request> again = f.kms->Propose(f.officer, reanchor);
  REQUIRE(again.ok());

  // Found sound before its quorum (the right file put back): it fails rather than re-anchor.
  f.kms->RequireReAnchoring("");
  REQUIRE(f.kms->Approve(f.officer2, again->id, RequestDigest(*again)).ok());
  const absl::StatusOr<Request> closed =
      f.kms->Approve(f.officer3, again->id, RequestDigest(*again));
  CHECK(absl::IsFailedPrecondition(closed.status()));
  CHECK_THAT(std::string(closed.status().message()),
             Catch::EndsWith("could not execute: the audit log extends the HSM's last signed "
                             "checkpoint: there is nothing to re-anchor"));
  const absl::StatusOr<Request> failed = f.kms->GetRequest(f.officer, again->id);
  REQUIRE(failed.ok());
  CHECK(failed->state == storage::RequestState::kFailed);
  const std::vector<audit::Event> all = f.sink.events();
  CHECK(std::none_of(all.begin(), all.end(), [](const audit::Event& e) {
    return e.action == "ReAnchorAuditLog" && e.outcome == absl::StatusCode::kOk;
  }));
}

}  // namespace
}  // namespace custos::core
