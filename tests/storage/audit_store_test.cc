// The audit table: records sealed in commit order without gaps, atomically with the change
// they record, append-only, and the head restored on reopen.
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <thread>

#include "storage/audit_log_reader.h"
#include "storage/row_codec.h"
#include "tests/storage/store_test_util.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using test::IdFor;
using test::MakeKey;
using test::OpenStore;
using test::Reopen;

// Runs `sql` on a separate connection to the file; the error message, or "" on success.
std::string ExecOnFile(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) ==
          SQLITE_OK);
  char* error = nullptr;
  sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
  std::string message = error != nullptr ? error : "";
  sqlite3_free(error);
  sqlite3_close(db);
  return message;
}

audit::Record Event(const std::string& action) { return test::AuditEvent(action); }

TEST_CASE("Audit records are sealed in order, with their change, without gaps", "[audit]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);

  REQUIRE(
      store->Apply(WriteBatch{{MakeKey(1, "taken")}, {}, {}, {Event("CreateKey")}, {}, {}}).ok());
  // A batch that fails takes its records with it: no seq is used up.
  CHECK(store->Apply(WriteBatch{{MakeKey(2, "taken")}, {}, {}, {Event("CreateKey")}, {}, {}})
            .code() == absl::StatusCode::kAlreadyExists);
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt"), Event("Encrypt")}, {}, {}}).ok());

  const std::vector<audit::Record> rows = store->ReadAudit(1, 100).value();
  REQUIRE(rows.size() == 3);
  CHECK(rows[0].seq == 1);
  CHECK(rows[0].action == "CreateKey");
  CHECK(rows[0].hash == audit::ChainHash(Bytes(32, 0), rows[0]));
  CHECK(rows[1].seq == 2);
  CHECK(rows[1].action == "Decrypt");
  CHECK(rows[1].hash == audit::ChainHash(rows[0].hash, rows[1]));  // no gap for the failure
  CHECK(rows[2].seq == 3);
  CHECK(rows[2].hash == audit::ChainHash(rows[1].hash, rows[2]));
  CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);

  // The log is append-only, whatever SQL reaches the file.
  CHECK_THAT(ExecOnFile(path, "UPDATE audit_log SET action = 'x' WHERE seq = 1"),
             Catch::Contains("append-only"));
  CHECK_THAT(ExecOnFile(path, "DELETE FROM audit_log WHERE seq = 3"),
             Catch::Contains("append-only"));

  // Reopened, the chain continues from its head.
  Reopen(store, path);
  CHECK(store->AuditHead()->first == 3);
  CHECK(store->AuditHead()->second == rows[2].hash);
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("ListKeys")}, {}, {}}).ok());
  const audit::Record next = store->ReadAudit(4, 10)->front();
  CHECK(next.hash == audit::ChainHash(rows[2].hash, next));
}

// A seq is an int64 in SQLite: a from_seq past its largest would bind as a negative number and
// read from the start.
TEST_CASE("Reading from a seq past any stored one returns nothing, however large", "[audit]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt"), Event("Encrypt")}, {}, {}}).ok());
  REQUIRE(store->PutCheckpoint({2, Bytes(32, 1), 100, Bytes{1}, "audit-signing", 0, Bytes(32, 0)})
              .ok());
  CHECK(store->ReadAudit(1, 10)->size() == 2);
  CHECK(store->ReadCheckpoints(1, 10)->size() == 1);
  for (const uint64_t from : {uint64_t{3}, uint64_t{1} << 63, ~uint64_t{0}}) {
    INFO(from);
    CHECK(store->ReadAudit(from, 10)->empty());
    CHECK(store->ReadCheckpoints(from, 10)->empty());
  }
}

TEST_CASE("Concurrent audit records get distinct consecutive seqs", "[audit]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  std::vector<std::thread> threads;
  std::atomic<int> failed{0};  // Catch2's assertions are for the test's own thread only
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        if (!store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt")}, {}, {}}).ok()) ++failed;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  REQUIRE(failed == 0);
  const std::vector<audit::Record> rows = store->ReadAudit(1, 1000).value();
  REQUIRE(rows.size() == 320);
  for (size_t i = 0; i < rows.size(); ++i) CHECK(rows[i].seq == i + 1);
}

TEST_CASE("Checkpoints are stored and the newest is returned", "[audit]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  CHECK(store->LatestCheckpoint().value() == std::nullopt);
  REQUIRE(
      store->PutCheckpoint({5, Bytes(32, 1), 100, Bytes{1, 2}, "audit-signing", 0, Bytes(32, 0)})
          .ok());
  REQUIRE(store->PutCheckpoint({9, Bytes(32, 2), 200, Bytes{3}, "audit-signing", 5, Bytes(32, 1)})
              .ok());
  const auto latest = store->LatestCheckpoint().value();
  REQUIRE(latest.has_value());
  CHECK(latest->seq == 9);
  CHECK(latest->signature == Bytes{3});
  CHECK(latest->prev_seq == 5);
  CHECK(latest->prev_hash == Bytes(32, 1));
  CHECK(latest->format == 2);
  CHECK(store->Checkpoints()->size() == 2);
  // Never replaced: a second checkpoint at a seq already signed is refused.
  CHECK(absl::IsAlreadyExists(
      store->PutCheckpoint({9, Bytes(32, 3), 300, Bytes{4}, "audit-signing", 5, Bytes(32, 1)})));
  CHECK(store->LatestCheckpoint().value()->signature == Bytes{3});
}

TEST_CASE("AuditLogReader streams a database's log and checkpoints without writing", "[audit]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  WriteBatch batch;
  for (int i = 0; i < 2500; ++i) batch.audit.push_back(Event(i % 2 ? "Decrypt" : "Encrypt"));
  REQUIRE(store->Apply(batch).ok());
  REQUIRE(
      store->PutCheckpoint({2000, Bytes(32, 7), 100, Bytes{1}, "audit-signing", 0, Bytes(32, 0)})
          .ok());
  const std::vector<audit::Record> stored = store->ReadAudit(1, 3000).value();

  const auto contents = [&] {
    std::string bytes;
    for (const std::string& file : {path, path + "-wal"}) {
      std::ifstream in(file, std::ios::binary);
      bytes += std::string(std::istreambuf_iterator<char>(in), {});
    }
    return bytes;
  };
  const std::string before = contents();
  // Read while the server's connection is still open, as an auditor on the live file would.
  auto reader = AuditLogReader::Open(path).value();
  std::vector<audit::Record> read;
  for (;;) {
    absl::StatusOr<std::optional<audit::Record>> next = reader->Next();
    REQUIRE(next.ok());
    if (!next->has_value()) break;
    read.push_back(**next);
  }
  CHECK(read == stored);  // across page boundaries, in seq order
  CHECK(reader->Next().value() == std::nullopt);
  const std::vector<audit::Checkpoint> checkpoints = reader->Checkpoints().value();
  REQUIRE(checkpoints.size() == 1);
  CHECK(checkpoints[0].seq == 2000);
  CHECK(checkpoints[0].hash == Bytes(32, 7));
  reader.reset();
  CHECK(contents() == before);  // the database and its WAL, byte for byte
}

TEST_CASE("AuditLogReader refuses files that are not a Custos audit log", "[audit]") {
  TempDir dir;
  CHECK(AuditLogReader::Open(dir.File("missing.db")).status().code() ==
        absl::StatusCode::kUnavailable);
  CHECK(!std::filesystem::exists(dir.File("missing.db")));  // never creates anything
  const std::string empty = dir.File("empty.db");
  CHECK(ExecOnFile(empty, "CREATE TABLE t (x)").empty());
  CHECK(AuditLogReader::Open(empty).status().code() == absl::StatusCode::kFailedPrecondition);
  const std::string newer = dir.File("newer.db");
  OpenStore(newer).reset();
  CHECK(ExecOnFile(newer, "PRAGMA user_version = 99").empty());
  absl::Status status = AuditLogReader::Open(newer).status();
  CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(status.message()), Catch::Contains("newer"));
}

// Appends `count` records such as GenerateDataKey writes, 10,000 per commit; with `rows`, each
// names a catalogue row of its own (a setting it writes), as an officer's change does.
void FillLog(KeyStore& store, int count, bool rows = false) {
  for (int done = 0; done < count;) {
    WriteBatch batch;
    for (int i = 0; i < 10'000 && done < count; ++i, ++done) {
      audit::Record record;
      if (rows) {  // a setting: the smallest row a batch writes
        const std::string name = "walk/" + std::to_string(done);
        batch.settings[name] = "1";
        record.row = SettingRowName(name);
      }
      record.time = 1800000000 + done;
      record.principal = "spiffe://custos.local/app/demo";
      record.role = "app";
      record.action = "GenerateDataKey";
      record.key_id = "00000000-0000-4000-8000-000000000001";
      record.key_version = 1;
      record.outcome = "OK";
      record.peer = "ipv4:127.0.0.1:40000";
      record.context_hmac = std::string(64, 'a');
      batch.audit.push_back(std::move(record));
    }
    const absl::Status applied = store.Apply(batch);
    INFO(applied.ToString());
    REQUIRE(applied.ok());
  }
}

double Seconds(const std::function<void()>& run) {
  const auto start = std::chrono::steady_clock::now();
  run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// A measurement, not a test (hidden: run with `test_storage "[.verify_chain_bench]"`): how long
// custosd's start-up check takes over a log of 1,000,000 records, from record 1 (the full check,
// `[audit] verify_full_chain_at_start`) and from a head near the end (the default). The numbers
// are in docs/PERFORMANCE.md.
TEST_CASE("Full audit chain verification over 1M records (measurement)", "[.verify_chain_bench]") {
  TempDir dir;
  auto store = test::OpenStore(dir.File("keys.db"));
  constexpr int kRecords = 1'000'000;
  FillLog(*store, kRecords);
  const auto head = store->AuditHead().value();
  REQUIRE(head.first == kRecords);
  const double full =
      Seconds([&] { REQUIRE(store->VerifyAuditChainFrom(0, Bytes(audit::kHashBytes, 0)).ok()); });
  const std::vector<audit::Record> near_end = store->ReadAudit(kRecords - 1000, 1).value();
  const double tail = Seconds(
      [&] { REQUIRE(store->VerifyAuditChainFrom(near_end[0].seq, near_end[0].hash).ok()); });
  WARN("full verification of " << kRecords << " records: " << full << " s; from 1000 records "
                               << "before the head: " << tail << " s");
}

// A measurement, not a test (hidden: `test_storage "[.live_log_walk_bench]"`): how long the
// walk of the live log below the anchored point takes, which the first read of an absent
// setting with Absence::kProven (the root in use, on a server never rotated) waits for unless
// maintenance (500,000 records a turn) has made it, over 1,000,000 records: naming no row (the
// data path's) and each naming a row of its own (officers' changes). In docs/PERFORMANCE.md.
TEST_CASE("Walking a live log of 1M records (measurement)", "[.live_log_walk_bench]") {
  constexpr int kRecords = 1'000'000;
  for (const bool rows : {false, true}) {
    TempDir dir;
    auto store = test::OpenStore(dir.File("keys.db"));
    FillLog(*store, kRecords, rows);
    const auto head = store->AuditHead().value();
    store->AnchorAuditLog(head.first, head.second);
    REQUIRE(!store->LiveLogWalked());
    const double walk = Seconds([&] { REQUIRE(store->VerifyOlderAuditRecords(kRecords).ok()); });
    REQUIRE(store->LiveLogWalked());
    WARN("walk of " << kRecords << " records" << (rows ? ", each naming a row: " : ": ") << walk
                    << " s");
  }
}

// A measurement, not a test (hidden: `test_storage "[.archive_stall_bench]"`): how long an
// archival of 1,000,000 records holds the store (every other commit waits for it), with its
// records left to slices of 5,000, against removing them in one transaction as the commit
// used to. The numbers are in docs/PERFORMANCE.md.
TEST_CASE("Archiving 1M records holds commits for a slice at a time (measurement)",
          "[.archive_stall_bench]") {
  constexpr int kRecords = 1'000'000;
  const auto archive = [](KeyStore& store) {
    const audit::Record floor = store.ReadAudit(kRecords, 1).value().at(0);
    WriteBatch batch;
    batch.archival = AuditArchival{AuditFloor{floor.seq, floor.hash}, 1700000000, "req"};
    batch.audit.push_back(Event("ArchiveAuditLog"));
    REQUIRE(store.Apply(std::move(batch)).ok());
  };
  TempDir dir;
  auto sliced = test::OpenStore(dir.File("sliced.db"));
  FillLog(*sliced, kRecords);
  const double commit = Seconds([&] { archive(*sliced); });
  double longest = 0;
  double total = 0;
  for (size_t removed = 1; removed > 0;) {
    const double slice = Seconds([&] { removed = sliced->RemoveArchivedRecords(5000).value(); });
    longest = std::max(longest, slice);
    total += slice;
  }
  auto whole = test::OpenStore(dir.File("whole.db"));
  FillLog(*whole, kRecords);
  archive(*whole);
  const double at_once =
      Seconds([&] { REQUIRE(whole->RemoveArchivedRecords(kRecords).value() == kRecords); });
  WARN("archival commit " << commit << " s; slices of 5,000: longest " << longest << " s, total "
                          << total << " s; all " << kRecords << " in one transaction " << at_once
                          << " s");
}

// A measurement, not a test (hidden: `test_storage "[.carry_bench]"`): carrying forward the
// rows of a 200,000-key catalogue before an archival, in pages of 1,000, each page going on
// from where the last stopped, against each page walking the row index from its start. The
// numbers are in docs/PERFORMANCE.md.
TEST_CASE("Carrying 200,000 rows forward, page after page (measurement)", "[.carry_bench]") {
  constexpr int kRows = 200'000;
  const CarryRecord carry = [](const std::string&, uint64_t) { return Event("CarryRowRecord"); };
  const auto run = [&](KeyStore& store, bool resume) {
    double longest = 0;
    double total = 0;
    std::string after;
    for (size_t carried = 1; carried > 0;) {
      if (!resume) after.clear();
      const double page = Seconds(
          [&] { carried = store.CarryForwardRowRecords(kRows, carry, 1000, after).value(); });
      longest = std::max(longest, page);
      total += page;
    }
    REQUIRE(store.AuditHead()->first == 2 * kRows);
    return std::make_pair(total, longest);
  };
  // Each record made to name a row of its own, as a key's creation does (the store writes
  // such records only with their rows; the walk reads only the records).
  const auto catalogue = [&](const std::string& path) {
    { FillLog(*test::OpenStore(path), kRows); }
    REQUIRE(ExecOnFile(path,
                       "DROP TRIGGER audit_log_append_only_update; UPDATE audit_log SET "
                       "row_name = 'key:' || (1000000000 + seq), row_digest = 'b'") == "");
    return test::OpenStore(path);
  };
  TempDir dir;
  auto resumed = catalogue(dir.File("resumed.db"));
  const auto [resumed_total, resumed_longest] = run(*resumed, true);
  auto restarted = catalogue(dir.File("restarted.db"));
  const auto [restarted_total, restarted_longest] = run(*restarted, false);
  WARN("carrying " << kRows << " rows: each page going on, " << resumed_total << " s (longest page "
                   << resumed_longest << " s); each page from the start, " << restarted_total
                   << " s (longest page " << restarted_longest << " s)");
}

TEST_CASE("An archival's records leave in slices after its commit, unseen meanwhile",
          "[audit][archive]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  WriteBatch records;
  for (int i = 0; i < 25; ++i) records.audit.push_back(Event("Decrypt"));
  REQUIRE(store->Apply(std::move(records)).ok());
  const audit::Record floor_record = store->ReadAudit(20, 1).value().at(0);

  WriteBatch archival;
  archival.archival = AuditArchival{AuditFloor{20, floor_record.hash}, 1700000000, "req-1"};
  archival.audit.push_back(Event("ArchiveAuditLog"));
  REQUIRE(store->Apply(std::move(archival)).ok());

  // The commit moved the floor and left the records: the live log starts after the floor.
  CHECK(store->AuditLogFloor()->seq == 20);
  CHECK(*store->FirstAuditSeq() == 21);
  CHECK(store->ReadAudit(1, 100)->front().seq == 21);
  CHECK(store->ReadAudit(1, 100)->size() == 6);
  auto reader = AuditLogReader::Open(path);
  REQUIRE(reader.ok());
  CHECK((*(*reader)->Next())->seq == 21);
  // Removed oldest first, at most a slice at a time, never past the floor.
  CHECK(*store->RemoveArchivedRecords(7) == 7);
  CHECK(*store->RemoveArchivedRecords(7) == 7);
  CHECK(*store->RemoveArchivedRecords(7) == 6);
  CHECK(*store->RemoveArchivedRecords(7) == 0);
  const std::vector<audit::Record> live = store->ReadAudit(0, 100).value();
  REQUIRE(live.size() == 6);
  CHECK(live.front().seq == 21);
  CHECK(live.back().action == "ArchiveAuditLog");
  // The triggers still refuse the live log's records to anyone else.
  CHECK_THAT(ExecOnFile(path, "DELETE FROM audit_log WHERE seq = 21"),
             Catch::Contains("append-only"));
}

}  // namespace
}  // namespace custos::storage
