// The audit table: records sealed in commit order without gaps, atomically with the change
// they record, append-only, and the head restored on reopen.
#include <catch2/catch.hpp>
#include <thread>

#include "tests/storage/store_test_util.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using test::IdFor;
using test::MakeKey;
using test::OpenStore;

// Runs `sql` on a separate connection to the file; the error message, or "" on success.
std::string ExecOnFile(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
  char* error = nullptr;
  sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
  std::string message = error != nullptr ? error : "";
  sqlite3_free(error);
  sqlite3_close(db);
  return message;
}

// A stand-in sealer: the hash is prev_hash with its first byte replaced by seq (enough to
// see that each record is sealed after its predecessor, in order).
Bytes TestSeal(std::span<const uint8_t> prev, const AuditRow& row) {
  Bytes hash(prev.begin(), prev.end());
  hash[0] = static_cast<uint8_t>(row.seq);
  hash[1] = static_cast<uint8_t>(prev[0]);
  return hash;
}

AuditRow Event(const std::string& action) {
  AuditRow row;
  row.time = 1800000000;
  row.principal = "spiffe://t/app/a";
  row.role = "app";
  row.action = action;
  row.outcome = "OK";
  return row;
}

TEST_CASE("Audit records are sealed in order, with their change, without gaps", "[audit]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  WriteBatch needs_sealer;
  needs_sealer.audit.push_back(Event("Decrypt"));
  CHECK(store->Apply(needs_sealer).code() == absl::StatusCode::kFailedPrecondition);
  store->SetAuditSealer(TestSeal);

  REQUIRE(store->Apply(WriteBatch{{MakeKey(1, "taken")}, {}, {}, {Event("CreateKey")}}).ok());
  // A batch that fails takes its records with it: no seq is used up.
  CHECK(store->Apply(WriteBatch{{MakeKey(2, "taken")}, {}, {}, {Event("CreateKey")}}).code() ==
        absl::StatusCode::kAlreadyExists);
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt"), Event("Encrypt")}}).ok());

  const std::vector<AuditRow> rows = store->ReadAudit(1, 100).value();
  REQUIRE(rows.size() == 3);
  CHECK(rows[0].seq == 1);
  CHECK(rows[0].action == "CreateKey");
  CHECK(rows[1].seq == 2);
  CHECK(rows[1].action == "Decrypt");
  CHECK(rows[2].seq == 3);
  CHECK(rows[2].hash[0] == 3);
  CHECK(rows[2].hash[1] == 2);  // sealed on top of record 2
  CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);

  // The log is append-only, whatever SQL reaches the file.
  CHECK_THAT(ExecOnFile(path, "UPDATE audit_log SET action = 'x' WHERE seq = 1"),
             Catch::Contains("append-only"));
  CHECK_THAT(ExecOnFile(path, "DELETE FROM audit_log WHERE seq = 3"),
             Catch::Contains("append-only"));

  // Reopened, the chain continues from its head.
  store = OpenStore(path);
  store->SetAuditSealer(TestSeal);
  CHECK(store->AuditHead()->first == 3);
  REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("ListKeys")}}).ok());
  CHECK(store->ReadAudit(4, 10)->front().hash[1] == 3);
}

TEST_CASE("Concurrent audit records get distinct consecutive seqs", "[audit]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  store->SetAuditSealer(TestSeal);
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        REQUIRE(store->Apply(WriteBatch{{}, {}, {}, {Event("Decrypt")}}).ok());
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const std::vector<AuditRow> rows = store->ReadAudit(1, 1000).value();
  REQUIRE(rows.size() == 320);
  for (size_t i = 0; i < rows.size(); ++i) CHECK(rows[i].seq == i + 1);
}

TEST_CASE("Checkpoints are stored and the newest is returned", "[audit]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  CHECK(store->LatestCheckpoint().value() == std::nullopt);
  REQUIRE(store->PutCheckpoint({5, Bytes(32, 1), 100, "audit-signing", Bytes{1, 2}}).ok());
  REQUIRE(store->PutCheckpoint({9, Bytes(32, 2), 200, "audit-signing", Bytes{3}}).ok());
  const auto latest = store->LatestCheckpoint().value();
  REQUIRE(latest.has_value());
  CHECK(latest->seq == 9);
  CHECK(latest->signature == Bytes{3});
  CHECK(store->Checkpoints()->size() == 2);
}

}  // namespace
}  // namespace custos::storage
