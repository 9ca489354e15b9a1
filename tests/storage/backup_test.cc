// storage::BackupDatabase: an online copy of a database another connection keeps writing is one
// consistent state (each key with the record of its creation, the records without gaps), mode
// 0600, a file of its own, never written over; a failed backup leaves nothing behind.
#include <sys/stat.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <thread>

#include "storage/backup.h"
#include "tests/storage/store_test_util.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using test::MakeKey;
using test::OpenStore;
using test::QueryFile;

audit::Record Created() { return test::AuditEvent("CreateKey"); }

TEST_CASE("An online backup is one consistent state of a database being written", "[backup]") {
  TempDir dir;
  const std::string path = dir.File("custos.db");
  auto store = OpenStore(path);
  REQUIRE(store->Apply(WriteBatch{{MakeKey(1)}, {}, {}, {Created()}, {}, {}}).ok());
  std::atomic<bool> stop{false};
  std::atomic<int> written{1};
  std::atomic<bool> write_failed{false};
  std::thread writer([&] {  // no Catch2 assertions off the test's thread
    for (int n = 2; !stop && !write_failed; ++n) {
      write_failed = !store->Apply(WriteBatch{{MakeKey(n)}, {}, {}, {Created()}, {}, {}}).ok();
      written = n;
    }
  });
  for (int i = 0; i < 5; ++i) {
    const std::string copy = dir.File("backup-" + std::to_string(i) + ".db");
    const absl::StatusOr<BackupSummary> summary = BackupDatabase(path, copy);
    INFO(summary.status().ToString());
    REQUIRE(summary.ok());
    // Each key's creation and its record were one commit: the copy has both or neither.
    CHECK(summary->keys == summary->last_record);
    CHECK(QueryFile(copy, "SELECT count(*) FROM keys") == std::to_string(summary->keys));
    CHECK(QueryFile(copy, "SELECT count(*) = max(seq) FROM audit_log") == "1");
    CHECK(QueryFile(copy, "PRAGMA journal_mode") == "delete");
    // MakeKey's two versions, one under each of two roots.
    CHECK(summary->versions_by_root ==
          std::map<std::string, uint64_t>{{"root-1", summary->keys}, {"root-2", summary->keys}});
    CHECK(summary->bytes == std::filesystem::file_size(copy));
    struct stat st {};
    REQUIRE(stat(copy.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    CHECK_FALSE(std::filesystem::exists(copy + "-wal"));
  }
  stop = true;
  writer.join();
  CHECK_FALSE(write_failed);
  CHECK(written > 1);
}

TEST_CASE("A backup never writes over a file, and a failed one leaves nothing", "[backup]") {
  TempDir dir;
  const std::string path = dir.File("custos.db");
  auto store = OpenStore(path);
  REQUIRE(store->Apply(WriteBatch{{MakeKey(1)}, {}, {}, {Created()}, {}, {}}).ok());
  const std::string copy = dir.File("backup.db");
  REQUIRE(BackupDatabase(path, copy).ok());
  const std::string before = QueryFile(copy, "SELECT count(*) FROM keys");
  REQUIRE(store->Apply(WriteBatch{{MakeKey(2)}, {}, {}, {Created()}, {}, {}}).ok());
  CHECK(BackupDatabase(path, copy).status().code() == absl::StatusCode::kAlreadyExists);
  CHECK(QueryFile(copy, "SELECT count(*) FROM keys") == before);

  // Not a Custos database: refused, and the new file is gone again.
  { std::ofstream(dir.File("notes.db")) << ""; }
  const std::string refused = dir.File("refused.db");
  CHECK(BackupDatabase(dir.File("notes.db"), refused).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  CHECK_FALSE(std::filesystem::exists(refused));
  CHECK(BackupDatabase(dir.File("missing.db"), refused).status().code() != absl::StatusCode::kOk);
  CHECK_FALSE(std::filesystem::exists(refused));
}

}  // namespace
}  // namespace custos::storage
