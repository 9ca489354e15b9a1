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

  REQUIRE(store->Apply(WriteBatch{{MakeKey(1, "taken")}, {}, {}, {Event("CreateKey")}, {}}).ok());
  // A batch that fails takes its records with it: no seq is used up.
  CHECK(store->Apply(WriteBatch{{MakeKey(2, "taken")}, {}, {}, {Event("CreateKey")}, {}}).code() ==
        absl::StatusCode::kAlreadyExists);
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt"), Event("Encrypt")}, {}}).ok());

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
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("ListKeys")}, {}}).ok());
  const audit::Record next = store->ReadAudit(4, 10)->front();
  CHECK(next.hash == audit::ChainHash(rows[2].hash, next));
}

TEST_CASE("Concurrent audit records get distinct consecutive seqs", "[audit]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  std::vector<std::thread> threads;
  std::atomic<int> failed{0};  // Catch2's assertions are for the test's own thread only
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        if (!store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt")}, {}}).ok()) ++failed;
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

// A measurement, not a test (hidden: run with `test_storage "[.verify_chain_bench]"`): how long
// custosd's start-up check takes over a log of 1,000,000 records, from record 1 (the full check,
// `[audit] verify_full_chain_at_start`) and from a head near the end (the default). The numbers
// are in docs/PERFORMANCE.md.
TEST_CASE("Full audit chain verification over 1M records (measurement)", "[.verify_chain_bench]") {
  TempDir dir;
  auto store = test::OpenStore(dir.File("keys.db"));
  constexpr int kRecords = 1'000'000;
  for (int done = 0; done < kRecords;) {
    WriteBatch batch;
    for (int i = 0; i < 10'000; ++i, ++done) {
      audit::Record record;
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
    REQUIRE(store->Apply(batch).ok());
  }
  const auto head = store->AuditHead().value();
  REQUIRE(head.first == kRecords);
  const auto time = [](const std::function<void()>& run) {
    const auto start = std::chrono::steady_clock::now();
    run();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const double full =
      time([&] { REQUIRE(store->VerifyAuditChainFrom(0, Bytes(audit::kHashBytes, 0)).ok()); });
  const std::vector<audit::Record> near_end = store->ReadAudit(kRecords - 1000, 1).value();
  const double tail =
      time([&] { REQUIRE(store->VerifyAuditChainFrom(near_end[0].seq, near_end[0].hash).ok()); });
  WARN("full verification of " << kRecords << " records: " << full << " s; from 1000 records "
                               << "before the head: " << tail << " s");
}

}  // namespace
}  // namespace custos::storage
