// Audit log archival: records up to a signed checkpoint leave the live database for a verified
// archive file, under dual control, and everything that relied on them still holds: the rows
// they vouched for, the start-up check, the offline verifier over the archives and the live
// log together. And what someone who can write custos.db tries next: removing more than was
// archived, putting archived records back, moving the floor.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_format.h"
#include "audit/verifier.h"
#include "core/operation_params.h"
#include "storage/audit_archive.h"
#include "storage/audit_log_reader.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/sqlite_file.h"

namespace custos::core {
namespace {

using custos::testing::DropRowIndexEntries;
using custos::testing::SqlExec;
using custos::testing::SqlQuery;
using testing::Fixture;

std::string Db(Fixture& f) { return f.dir.File("custos.db"); }

std::string ArchivePath(Fixture& f, uint64_t first, uint64_t last) {
  return absl::StrFormat("%s/audit-%012u-%012u.jsonl", f.dir.File("audit-archive"), first, last);
}

audit::PublicKeyVerifier AuditKey(Fixture& f) {
  return *audit::PublicKeyVerifier::FromPem(*f.real_hsm->PublicKeyPem("custos-audit-signing"));
}

// Use of key "k", then a checkpoint at the log's end; returns its seq.
uint64_t UseAndSign(Fixture& f, int calls) {
  for (int i = 0; i < calls; ++i) REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  REQUIRE(f.kms->Checkpoint().ok());
  return (*f.store->LatestCheckpoint())->seq;
}

// Key "k" rotated by three officers.
void RotateByThree(Fixture& f) {
  Proposal rotate;
  rotate.operation = policy::Operation::kRotateKey;
  rotate.key = "k";
  rotate.justification = "yearly";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, rotate);
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, RequestDigest(*request)).ok());
  REQUIRE(f.kms->Approve(f.officer3, request->id, RequestDigest(*request)).ok());
}

absl::StatusOr<Request> Archive(Fixture& f, uint64_t through) {
  Proposal proposal;
  proposal.operation = policy::Operation::kArchiveAuditLog;
  proposal.params.archive_through = through;
  proposal.justification = "the log's first quarter goes to write-once storage";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  if (!request.ok()) return request;
  for (const Caller* approver : {&f.officer2, &f.officer3}) {
    if (request->state != storage::RequestState::kPending) break;
    request = f.kms->Approve(*approver, request->id, RequestDigest(*request));
    if (!request.ok()) return request;
  }
  return request;
}

// Verifies `files` (archives, oldest first) and then the live database as one log.
audit::VerifyReport VerifyTogether(Fixture& f, const std::vector<std::string>& files,
                                   bool with_db = true) {
  std::vector<std::unique_ptr<std::ifstream>> streams;
  std::vector<std::unique_ptr<audit::RecordSource>> owned;
  std::vector<audit::RecordSource*> sources;
  std::map<uint64_t, audit::Checkpoint> checkpoints;
  for (const std::string& file : files) {
    std::ifstream lines(file);
    const auto found = audit::ReadCheckpointLines(lines);
    REQUIRE(found.ok());
    for (const audit::Checkpoint& c : *found) checkpoints[c.seq] = c;
    streams.push_back(std::make_unique<std::ifstream>(file));
    owned.push_back(std::make_unique<audit::JsonLinesRecordSource>(streams.back().get()));
    sources.push_back(owned.back().get());
  }
  std::unique_ptr<storage::AuditLogReader> reader;
  if (with_db) {
    reader = *storage::AuditLogReader::Open(Db(f));
    const auto found = reader->Checkpoints();
    REQUIRE(found.ok());
    for (const audit::Checkpoint& c : *found) checkpoints[c.seq] = c;
    sources.push_back(reader.get());
  }
  std::vector<audit::Checkpoint> all;
  for (auto& [seq, c] : checkpoints) all.push_back(c);
  audit::ConcatenatedRecordSource records(sources);
  return audit::Verify(records, all, nullptr, AuditKey(f));
}

TEST_CASE("Archiving moves the records up to a signed checkpoint to a verified file", "[archive]") {
  Fixture f;
  f.NewKey("k");  // a request and a key, each vouched for by a record about to be archived
  const uint64_t through = UseAndSign(f, 4);
  absl::StatusOr<DataKey> before = f.kms->GenerateDataKey(f.app, "k", {{"t", "1"}}, 32, true);
  REQUIRE(before.ok());

  // A proposal names a stored checkpoint; nothing else.
  CHECK(Archive(f, 0).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(Archive(f, through - 1).status().code() == absl::StatusCode::kNotFound);
  const uint64_t records_before = (*f.store->AuditHead()).first;

  absl::StatusOr<Request> done = Archive(f, through);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == storage::RequestState::kExecuted);
  const std::string archive = ArchivePath(f, 1, through);
  CHECK_THAT(done->reason, Catch::StartsWith("audit records 1 to " + std::to_string(through) +
                                             " archived to " + archive + " (sha256 "));

  // The archive: owner-only, records 1 to `through` and the checkpoints up to it, verifying.
  struct stat st {};
  REQUIRE(stat(archive.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  const audit::VerifyReport alone = VerifyTogether(f, {archive}, /*with_db=*/false);
  INFO(alone.reason);
  CHECK(alone.ok);
  CHECK(alone.last_verified_seq == through);
  CHECK(alone.signed_through_seq == through);
  CHECK_FALSE(std::filesystem::exists(archive + ".partial"));

  // The live log starts right after it, from the checkpoint signed there. The records
  // themselves were not removed in the archival's transaction (millions would hold every commit
  // meanwhile): maintenance, woken, removes them in slices.
  CHECK(SqlQuery(Db(f), "SELECT count(*) FROM audit_log WHERE seq <= " + std::to_string(through)) ==
        std::to_string(through));
  CHECK(f.maintenance_wakes > 0);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(SqlQuery(Db(f), "SELECT min(seq) FROM audit_log") == std::to_string(through + 1));
  CHECK(*f.store->FirstAuditSeq() == through + 1);
  CHECK((*f.store->AuditLogFloor()).seq == through);
  CHECK(SqlQuery(Db(f), "SELECT min(seq) FROM audit_checkpoints") == std::to_string(through));
  CHECK(SqlQuery(Db(f), "SELECT through_seq || ' ' || request_id FROM audit_archived") ==
        std::to_string(through) + " " + done->id);
  // The rows last named by archived records were carried forward, with their digests, before
  // the ArchiveAuditLog record; nothing else was written in between.
  const std::string carried =
      SqlQuery(Db(f),
               "SELECT group_concat(row_name, ',') FROM (SELECT row_name FROM audit_log "
               "WHERE action = 'CarryRowRecord' ORDER BY row_name)");
  CHECK_THAT(carried, Catch::Contains("key:") && Catch::Contains("request:"));
  CHECK(SqlQuery(Db(f),
                 "SELECT count(*) FROM audit_log WHERE action = 'CarryRowRecord' AND "
                 "row_digest = ''") == "0");
  const std::vector<audit::Event> events = f.sink.events();
  // Carried records reach the operator's mirror like any other.
  CHECK(std::to_string(std::count_if(events.begin(), events.end(), [](const audit::Event& e) {
          return e.action == "CarryRowRecord" && !e.row.empty();
        })) == SqlQuery(Db(f), "SELECT count(*) FROM audit_log WHERE action = 'CarryRowRecord'"));
  const auto archived = std::find_if(events.begin(), events.end(), [](const audit::Event& e) {
    return e.action == "ArchiveAuditLog";
  });
  REQUIRE(archived != events.end());
  CHECK(archived->request_id == done->id);
  CHECK_THAT(archived->detail,
             Catch::StartsWith("records 1 to " + std::to_string(through) + " and ") &&
                 Catch::Contains("sha256="));
  CHECK(archived->row == "setting:audit_floor");
  CHECK(records_before > through);

  // The live database verifies on its own, from the checkpoint, and with the archive as one.
  const audit::VerifyReport live = VerifyTogether(f, {});
  INFO(live.reason);
  CHECK(live.ok);
  CHECK(live.starts_after == through);
  const audit::VerifyReport whole = VerifyTogether(f, {archive});
  INFO(whole.reason);
  CHECK(whole.ok);
  CHECK(whole.starts_after == 0);

  // A restart believes the rows again only through the carried records, and verifies the
  // log from the archive floor, in part and in full; maintenance walks down to the floor.
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  CHECK(f.store->VerifyOlderAuditRecords(1'000'000).ok());
  CHECK(f.kms->DescribeKey(f.officer, "k").ok());
  absl::StatusOr<Plaintext> plain = f.kms->Decrypt(f.app, before->ciphertext_blob, {{"t", "1"}});
  REQUIRE(plain.ok());
  CHECK(plain->plaintext.view() == before->plaintext.view());
  CHECK(f.kms->VerifyAuditLog(true).ok());

  // The triggers' exception reaches no further than the archival.
  const std::string next = std::to_string(through + 1);
  CHECK_THAT(SqlExec(Db(f), "DELETE FROM audit_log WHERE seq = " + next),
             Catch::Contains("the audit log is append-only"));
  CHECK_THAT(SqlExec(Db(f), "DELETE FROM audit_checkpoints WHERE seq = " + std::to_string(through)),
             Catch::Contains("audit checkpoints are never removed"));
  CHECK_THAT(SqlExec(Db(f), "DELETE FROM audit_archived"),
             Catch::Contains("audit archivals are never removed"));
  CHECK_THAT(SqlExec(Db(f), "UPDATE audit_archived SET through_seq = through_seq + 5"),
             Catch::Contains("audit archivals are never changed"));
  CHECK_THAT(SqlExec(Db(f), "INSERT INTO audit_archived VALUES (1, zeroblob(32), 0, 'x')"),
             Catch::Contains("audit archival only moves forward"));

  // Once archived, never again; a second archival goes on from the floor.
  CHECK(Archive(f, through).status().code() == absl::StatusCode::kFailedPrecondition);
  const uint64_t second = UseAndSign(f, 3);
  absl::StatusOr<Request> again = Archive(f, second);
  INFO(again.status().ToString());
  REQUIRE(again.ok());
  const std::string archive2 = ArchivePath(f, through + 1, second);
  const audit::VerifyReport on_its_own = VerifyTogether(f, {archive2}, false);
  INFO(on_its_own.reason);
  CHECK(on_its_own.ok);
  CHECK(on_its_own.starts_after == through);
  const audit::VerifyReport all = VerifyTogether(f, {archive, archive2});
  INFO(all.reason);
  CHECK(all.ok);
  CHECK(all.starts_after == 0);
  // Given out of order, or with one missing, they do not meet.
  CHECK_FALSE(VerifyTogether(f, {archive2, archive}).ok);
  const audit::VerifyReport gap = VerifyTogether(f, {archive});
  CHECK_FALSE(gap.ok);
  CHECK(gap.reason == absl::StrFormat("record %d is followed by %d (records %d to %d deleted?)",
                                      through, second + 1, through + 1, second));
  f.Restart();
  CHECK(f.kms->VerifyAuditLog(true).ok());
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
}

// An archived log, stopped, for someone with the database file to work on.
struct ArchivedLog {
  Fixture f;
  uint64_t floor = 0;
  uint64_t later = 0;  // a checkpoint after the floor

  ArchivedLog() {
    f.NewKey("k");
    floor = UseAndSign(f, 3);
    REQUIRE(Archive(f, floor).ok());
    later = UseAndSign(f, 3);
    UseAndSign(f, 1);
    f.kms.reset();
    f.store.reset();
  }

  absl::Status Start() {
    f.Restart();
    return f.kms->VerifyAuditLog(false);
  }
};

constexpr char kUnguarded[] =
    "DROP TRIGGER audit_log_append_only_delete; DROP TRIGGER audit_checkpoints_append_only_delete;"
    "DROP TRIGGER audit_archived_forward;";

TEST_CASE("A DBA cannot remove more than was archived, or undo an archival", "[archive][insider]") {
  ArchivedLog log;
  Fixture& f = log.f;
  const std::string floor = std::to_string(log.floor);
  const std::string later = std::to_string(log.later);
  const std::string db = Db(f);

  SECTION("records removed just after the floor") {
    REQUIRE(SqlExec(db, std::string(kUnguarded) +
                            "DELETE FROM audit_log WHERE seq <= " + std::to_string(log.floor + 2))
                .empty());
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK(refused.message() ==
          absl::StrFormat("the audit log starts at record %d, but it was archived up to record "
                          "%d only: records %d to %d were removed outside Custos",
                          log.floor + 3, log.floor, log.floor + 1, log.floor + 2));
  }
  SECTION("records removed after the floor, up to a later checkpoint") {
    REQUIRE(SqlExec(db, std::string(kUnguarded) + "DELETE FROM audit_log WHERE seq <= " + later +
                            "; DELETE FROM audit_checkpoints WHERE seq < " + later)
                .empty());
    // The ArchiveAuditLog record that vouched for the sealed floor went with them.
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK(refused.message() ==
          "catalogue row setting:audit_floor failed its integrity check: no audit record names "
          "it (written outside Custos?); it is not used until an operator restores it from a "
          "backup of this state");
    // Offline, the live file alone starts from a genuine checkpoint; beside the archive the
    // cut shows.
    const std::string archive = ArchivePath(f, 1, log.floor);
    const audit::VerifyReport seam = VerifyTogether(f, {archive});
    CHECK_FALSE(seam.ok);
    CHECK(seam.reason == absl::StrFormat("record %d is followed by %d (records %d to %d deleted?)",
                                         log.floor, log.later + 1, log.floor + 1, log.later));
  }
  SECTION("the archival's record edited (before the HSM's head, so not recomputed by it)") {
    const std::string record =
        SqlQuery(db, "SELECT seq FROM audit_log WHERE action = 'ArchiveAuditLog'");
    REQUIRE(SqlExec(db,
                    "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET detail = "
                    "'records 1 to 2 archived' WHERE seq = " +
                        record)
                .empty());
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK_THAT(
        std::string(refused.message()),
        Catch::StartsWith("catalogue row setting:audit_floor failed its integrity check: "
                          "the audit record that vouches for it (" +
                          record + ") is in a part of the log changed after it was written"));
  }
  SECTION("the database's archival table moved along") {
    const std::string hash =
        SqlQuery(db, "SELECT hex(hash) FROM audit_checkpoints WHERE seq = " + later);
    REQUIRE(SqlExec(db, std::string(kUnguarded) + "INSERT INTO audit_archived VALUES (" + later +
                            ", X'" + hash + "', 0, 'x');")
                .empty());
    // Past the archival's own record: that record no longer counts (it is at or before the
    // floor the table claims), so the sealed floor is vouched for by nothing.
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK(refused.message() ==
          "catalogue row setting:audit_floor failed its integrity check: no audit record names "
          "it (written outside Custos?); it is not used until an operator restores it from a "
          "backup of this state");
  }
  SECTION("the database's archival table moved along, short of the archival's record") {
    const std::string record =
        SqlQuery(db, "SELECT seq FROM audit_log WHERE action = 'ArchiveAuditLog'");
    const uint64_t moved = std::stoull(record) - 1;
    REQUIRE(moved > log.floor);
    const std::string hash =
        SqlQuery(db, "SELECT hex(hash) FROM audit_log WHERE seq = " + std::to_string(moved));
    REQUIRE(SqlExec(db, std::string(kUnguarded) + "INSERT INTO audit_archived VALUES (" +
                            std::to_string(moved) + ", X'" + hash + "', 0, 'x');")
                .empty());
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK(refused.message() ==
          absl::StrFormat("the database's audit_archived table says the log was archived up to "
                          "record %d, but the archival custosd sealed says %d: it was changed "
                          "outside Custos",
                          moved, log.floor));
  }
  SECTION("... with the sealed floor rewritten") {
    REQUIRE(SqlExec(db, "UPDATE settings SET value = '" + later +
                            " ' || substr(value, instr(value, ' ') + 1) WHERE name = "
                            "'audit_floor'")
                .empty());
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK_THAT(std::string(refused.message()),
               Catch::Contains("catalogue row setting:audit_floor failed its integrity check: "
                               "its MAC does not match its content"));
  }
  SECTION("archived records still stored (removal cut short), or put back") {
    // The archival left its records to maintenance, which has not run: as after a crash.
    REQUIRE(SqlQuery(db, "SELECT count(*) FROM audit_log WHERE seq <= " + floor) == floor);
    REQUIRE(log.Start().ok());
    // They are not the live log's: not read, not exported, not verified beside the archive.
    const auto read = f.store->ReadAudit(1, 1);
    REQUIRE(read.ok());
    REQUIRE(read->size() == 1);
    CHECK((*read)[0].seq == log.floor + 1);
    CHECK(*f.store->FirstAuditSeq() == log.floor + 1);
    const audit::VerifyReport together = VerifyTogether(f, {ArchivePath(f, 1, log.floor)});
    INFO(together.reason);
    CHECK(together.ok);
    // Maintenance removes them, and nothing else.
    const std::string live_before =
        SqlQuery(db, "SELECT count(*) FROM audit_log WHERE seq > " + floor);
    REQUIRE(f.kms->RunMaintenance().ok());
    CHECK(SqlQuery(db, "SELECT count(*) FROM audit_log WHERE seq <= " + floor) == "0");
    CHECK(SqlQuery(db, "SELECT count(*) FROM audit_log WHERE seq > " + floor) == live_before);
    CHECK(SqlQuery(db, "SELECT min(seq) FROM audit_log") == std::to_string(log.floor + 1));
    CHECK(VerifyTogether(f, {ArchivePath(f, 1, log.floor)}).ok);
  }
  SECTION("a record naming a row, put back at or before the floor, vouches for nothing") {
    REQUIRE(log.Start().ok());
    REQUIRE(f.kms->RunMaintenance().ok());  // the archived records removed: seq 1 is free
    f.kms.reset();
    f.store.reset();
    const std::string planted = "00000000-0000-4000-8000-0000000000ff";
    REQUIRE(SqlExec(db,
                    "INSERT INTO audit_log (seq, time, principal, role, action, key_id, "
                    "key_version, source_key_id, source_key_version, request_id, outcome, peer, "
                    "context_hmac, detail, hash, format, call_id, row_name, row_digest) SELECT 1, "
                    "time, principal, role, 'CreateKey', key_id, key_version, source_key_id, "
                    "source_key_version, request_id, outcome, peer, context_hmac, detail, hash, "
                    "format, call_id, 'key:" +
                        planted + "', '" + std::string(64, 'e') +
                        "' FROM audit_log WHERE seq = " + later)
                .empty());
    REQUIRE(log.Start().ok());
    // No "deleted outside Custos" alarm for a key that never was...
    CHECK(f.store->GetKey(planted).status().code() == absl::StatusCode::kNotFound);
    // ...and the next archival carries nothing forward for it.
    absl::StatusOr<Request> done = Archive(f, log.later);
    INFO(done.status().ToString());
    REQUIRE(done.ok());
    CHECK(SqlQuery(db, "SELECT count(*) FROM audit_log WHERE row_name = 'key:" + planted +
                           "' AND seq > 1") == "0");
  }
  SECTION("the checkpoint the live log starts from deleted") {
    REQUIRE(
        SqlExec(db, std::string(kUnguarded) + "DELETE FROM audit_checkpoints WHERE seq = " + floor)
            .empty());
    const absl::Status refused = log.Start();
    CHECK(refused.code() == absl::StatusCode::kDataLoss);
    CHECK(refused.message() ==
          absl::StrFormat("the checkpoint at record %d, where the archived log starts, was "
                          "deleted",
                          log.floor));
  }
  SECTION("nothing changed: it starts") { CHECK(log.Start().ok()); }
}

TEST_CASE("An archive that cannot be written leaves the log as it was", "[archive]") {
  Fixture f;
  f.NewKey("k");
  const uint64_t through = UseAndSign(f, 2);
  // A file where the archive directory should be.
  { std::ofstream(f.dir.File("audit-archive")) << "not a directory"; }
  const absl::StatusOr<Request> refused = Archive(f, through);
  CHECK(refused.status().code() == absl::StatusCode::kUnavailable);
  CHECK(*f.store->FirstAuditSeq() == 1);
  CHECK((*f.store->AuditLogFloor()).seq == 0);
  CHECK(SqlQuery(Db(f),
                 "SELECT count(*) FROM audit_log WHERE action IN ('CarryRowRecord', "
                 "'ArchiveAuditLog')") == "0");
  // The request is still pending: the approval can be given again once the disk is fixed.
  std::filesystem::remove(f.dir.File("audit-archive"));
  const std::vector<Request> pending = *f.store->PendingRequests();
  REQUIRE(pending.size() == 1);
  absl::StatusOr<Request> done =
      f.kms->Approve(f.officer3, pending.front().id, RequestDigest(pending.front()));
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == storage::RequestState::kExecuted);
  CHECK(*f.store->FirstAuditSeq() == through + 1);
}

TEST_CASE("An archive file is never overwritten by a different one", "[archive]") {
  Fixture f;
  f.NewKey("k");
  const uint64_t through = UseAndSign(f, 2);
  const std::string path = ArchivePath(f, 1, through);
  std::filesystem::create_directories(f.dir.File("audit-archive"));

  SECTION("a pending archive, left by an archival that did not commit, is not an archive") {
    const std::optional<audit::Checkpoint> checkpoint = *f.store->LatestCheckpoint();
    REQUIRE(checkpoint.has_value());
    REQUIRE(
        storage::WriteAuditArchive(*f.store, f.dir.File("audit-archive"), *checkpoint, AuditKey(f))
            .ok());
    CHECK_FALSE(std::filesystem::exists(path));
    CHECK(std::filesystem::exists(path + ".pending"));
    absl::StatusOr<Request> done = Archive(f, through);
    INFO(done.status().ToString());
    REQUIRE(done.ok());
    CHECK(done->state == storage::RequestState::kExecuted);
    CHECK_FALSE(std::filesystem::exists(path + ".pending"));
    CHECK(VerifyTogether(f, {path}).ok);
  }
  SECTION("the same archive under its name (published before a restart) is kept") {
    const std::optional<audit::Checkpoint> checkpoint = *f.store->LatestCheckpoint();
    REQUIRE(
        storage::WriteAuditArchive(*f.store, f.dir.File("audit-archive"), *checkpoint, AuditKey(f))
            .ok());
    std::filesystem::rename(path + ".pending", path);
    struct stat before {};
    REQUIRE(stat(path.c_str(), &before) == 0);
    absl::StatusOr<Request> done = Archive(f, through);
    INFO(done.status().ToString());
    REQUIRE(done.ok());
    struct stat after {};
    REQUIRE(stat(path.c_str(), &after) == 0);
    CHECK(after.st_ino == before.st_ino);  // kept, not written again
    CHECK_FALSE(std::filesystem::exists(path + ".pending"));
    CHECK(VerifyTogether(f, {path}).ok);
  }
  SECTION("another log's archive (a restore since) is left alone, and nothing is removed") {
    { std::ofstream(path) << "an archive of a log this database no longer holds\n"; }
    const absl::StatusOr<Request> refused = Archive(f, through);
    CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK_THAT(std::string(refused.status().message()),
               Catch::Contains(path + " already holds a different archive of these records"));
    std::ifstream kept(path);
    std::string line;
    std::getline(kept, line);
    CHECK(line == "an archive of a log this database no longer holds");
    CHECK(*f.store->FirstAuditSeq() == 1);
    CHECK_FALSE(std::filesystem::exists(path + ".partial"));
  }
}

// The directory's archives, by name.
std::vector<std::string> ArchiveDir(Fixture& f) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(f.dir.File("audit-archive"))) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST_CASE("An archival that does not commit leaves no archive, and a later one only its own",
          "[archive]") {
  Fixture f;
  f.NewKey("k");
  const uint64_t first = UseAndSign(f, 2);
  // The commit fails once the file is written (the disk, say).
  REQUIRE(SqlExec(Db(f),
                  "CREATE TRIGGER refuse_archival BEFORE INSERT ON audit_archived "
                  "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;")
              .empty());
  const absl::StatusOr<Request> failed = Archive(f, first);
  REQUIRE_FALSE(failed.ok());
  CHECK_THAT(std::string(failed.status().message()), Catch::Contains("disk trouble"));
  CHECK((*f.store->AuditLogFloor()).seq == 0);
  const std::string stray = absl::StrFormat("audit-%012u-%012u.jsonl.pending", 1, first);
  CHECK(ArchiveDir(f) == std::vector<std::string>{stray});
  REQUIRE(SqlExec(Db(f), "DROP TRIGGER refuse_archival").empty());
  // The request waits for the approval to be given again (the disk is to blame); officers
  // withdraw it instead.
  const std::vector<Request> pending = *f.store->PendingRequests();
  REQUIRE(pending.size() == 1);
  REQUIRE(f.kms->Reject(f.officer, pending.front().id, "archive further on").ok());

  // A restart leaves it pending: its records are still live.
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  CHECK(ArchiveDir(f) == std::vector<std::string>{stray});

  // A later archival, further on: one archive, no overlap for `verify audit-*.jsonl` to trip on.
  const uint64_t second = UseAndSign(f, 2);
  absl::StatusOr<Request> done = Archive(f, second);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(ArchiveDir(f) ==
        std::vector<std::string>{absl::StrFormat("audit-%012u-%012u.jsonl", 1, second)});
  CHECK(VerifyTogether(f, {ArchivePath(f, 1, second)}).ok);

  // Committed, then a crash before the file took its name: the next start gives it.
  std::filesystem::rename(ArchivePath(f, 1, second), ArchivePath(f, 1, second) + ".pending");
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());
  CHECK(ArchiveDir(f) ==
        std::vector<std::string>{absl::StrFormat("audit-%012u-%012u.jsonl", 1, second)});
}

TEST_CASE("No row is carried forward over a log changed after the archived part",
          "[archive][insider]") {
  Fixture f;
  f.NewKey("k");
  const uint64_t through = UseAndSign(f, 2);
  // The key changes after the checkpoint: the newest record naming it is after `through`.
  RotateByThree(f);
  UseAndSign(f, 1);  // and the HSM's head covers that record
  f.kms.reset();
  f.store.reset();
  // A DBA hides that record, so that the older one looks like the key's newest and would be
  // carried forward (with an older row put back, it would be believed).
  const std::string hidden = SqlQuery(
      Db(f), "SELECT max(seq) FROM audit_log WHERE row_name LIKE 'key:%' AND action = 'RotateKey'");
  REQUIRE_FALSE(hidden.empty());
  REQUIRE(SqlExec(Db(f),
                  "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                  "row_name = '', row_digest = '' WHERE seq = " +
                      hidden)
              .empty());
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());  // the edit is before the HSM's head
  const absl::StatusOr<Request> refused = Archive(f, through);
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("not archiving through record " + std::to_string(through) +
                             ": the audit log does not verify"));
  CHECK(*f.store->FirstAuditSeq() == 1);
  CHECK(SqlQuery(Db(f), "SELECT count(*) FROM audit_log WHERE action = 'CarryRowRecord'") == "0");
}

// A key's row names the reservations of when it was last written; one made since is found by
// checking the key's newest record and every one after it. Carrying the key's row forward puts
// its newest record after its reservations, so every one of them is carried again right after
// it, in the same transaction (an archival cut short between pages keeps that so): taking one
// away with its index entries is still refused.
TEST_CASE("A key's reservations are carried again right after its key's row",
          "[archive][insider]") {
  UsageLimits limits;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  REQUIRE(f.kms->SealCatalog().ok());
  const KeyRef key = f.NewKey("k");
  const KeyRef other = f.NewKey("k2");
  REQUIRE(f.kms->GenerateDataKey(f.app, "k2", {}, 32, true).ok());  // reserved before `through`
  const uint64_t through = UseAndSign(f, 3);                        // reserves 2, then 4
  for (int i = 0; i < 2; ++i) {  // the 5th reserves 6: after `through`
    REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  }
  const std::string row = "usage:" + key->id + "/1";
  const auto newest = [&](const std::string& name) {
    return std::stoull(
        SqlQuery(Db(f), "SELECT max(seq) FROM audit_log WHERE row_name = '" + name + "'"));
  };
  REQUIRE(newest(row) > through);
  REQUIRE(SqlQuery(Db(f), "SELECT reserved_versions FROM keys WHERE id = '" + key->id + "'")
              .empty());  // never changed
  const absl::StatusOr<Request> done = Archive(f, through);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  REQUIRE(done->state == storage::RequestState::kExecuted);
  REQUIRE(f.kms->RunMaintenance().ok());  // the archived records removed
  // Each key's reservation right after the key's row, whether its newest record was archived
  // (k2's) or not (k's).
  CHECK(newest(row) == newest("key:" + key->id) + 1);
  CHECK(newest("usage:" + other->id + "/1") == newest("key:" + other->id) + 1);
  CHECK(SqlQuery(Db(f),
                 "SELECT count(*) FROM audit_log WHERE action = 'CarryRowRecord' AND "
                 "row_name LIKE 'usage:%' AND seq > " +
                     std::to_string(through)) == "2");  // each once

  REQUIRE(f.kms->Checkpoint().ok());  // the HSM's head is the log's end
  f.EditRowAndIndexWhileStopped("DELETE FROM version_usage;", row, limits);
  const absl::Status refused = f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status();
  INFO(refused.ToString());
  CHECK(absl::IsDataLoss(refused));
  CHECK_THAT(std::string(refused.message()), Catch::Contains("it has no entry for audit record ") &&
                                                 Catch::Contains(", which names row " + row));
}

// Rows are carried forward by what the row index says is each one's newest record: with the
// entry of the key's rotation record dropped, the creation's digest would have been carried
// into the live log, and the key's row as created believed from then on.
TEST_CASE("No row is carried forward through a row index rebuilt short of a record",
          "[archive][insider]") {
  Fixture f;
  f.NewKey("k");
  RotateByThree(f);
  const uint64_t through = UseAndSign(f, 2);  // the rotation's record is archived with the rest
  const std::string rotated = SqlQuery(
      Db(f), "SELECT max(seq) FROM audit_log WHERE row_name LIKE 'key:%' AND action = 'RotateKey'");
  REQUIRE_FALSE(rotated.empty());
  REQUIRE(std::stoull(rotated) < through);
  f.kms.reset();
  f.store.reset();
  DropRowIndexEntries(Db(f), "seq = " + rotated);
  f.Restart();
  REQUIRE(f.kms->VerifyAuditLog(false).ok());  // the HSM's head is at `through`
  const absl::StatusOr<Request> refused = Archive(f, through);
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("not archiving through record " + std::to_string(through) +
                             ": the audit log does not verify: the audit log's row index "
                             "(audit_log_by_row) is not the log's: it has no entry for audit "
                             "record " +
                             rotated));
  CHECK(*f.store->FirstAuditSeq() == 1);
  CHECK(SqlQuery(Db(f), "SELECT count(*) FROM audit_log WHERE action = 'CarryRowRecord'") == "0");
}

TEST_CASE("An archival past the head the HSM kept (its write failed) still starts", "[archive]") {
  Fixture f;
  f.NewKey("k");
  UseAndSign(f, 2);
  for (int i = 0; i < 2; ++i) REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  // Every write of the HSM's head fails from now on (the archival's own checkpoint's too).
  bool failing = true;
  std::function<void()> fail_head = [&] {
    if (!failing) return;
    f.hsm->FailNext(1, absl::UnavailableError("token full"));
    f.hsm->BeforeNextCallTo("WriteTokenData", fail_head);
  };
  f.hsm->BeforeNextCallTo("WriteTokenData", fail_head);
  CHECK_FALSE(f.kms->Checkpoint().ok());  // stored and signed, but the HSM's head lags
  const uint64_t through = (*f.store->LatestCheckpoint())->seq;
  absl::StatusOr<Request> done = Archive(f, through);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(*f.store->FirstAuditSeq() == through + 1);
  failing = false;
  f.Restart();
  const absl::Status started = f.kms->VerifyAuditLog(false);
  INFO(started.ToString());
  CHECK(started.ok());
  CHECK(f.kms->VerifyAuditLog(true).ok());
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
}

}  // namespace
}  // namespace custos::core
