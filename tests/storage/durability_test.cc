// Durability as the OS sees it, through SyncVfs: KeyStore::Apply returns only after SQLite
// synced the write-ahead log holding the batch; concurrent batches share syncs (group
// commit); and a sync that fails fails the batch, which then is neither stored nor logged.
#include <sqlite3.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include "tests/storage/store_test_util.h"
#include "tests/storage/sync_vfs.h"
#include "tests/support/sqlite_file.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using test::IdFor;
using test::MakeKey;
using test::OpenStore;
using test::Reopen;
using test::SyncVfs;
using Op = SyncVfs::Op;
using custos::testing::SqlQuery;
using namespace std::chrono_literals;

WriteBatch Audited(const std::string& action, std::vector<KeyRecord> keys = {}) {
  audit::Record record;
  record.time = 1800000000;
  record.principal = "spiffe://t/app/a";
  record.role = "app";
  record.action = action;
  record.outcome = "OK";
  WriteBatch batch;
  batch.keys = std::move(keys);
  batch.audit.push_back(std::move(record));
  return batch;
}

TEST_CASE("Apply returns only once the log holding its batch is synced", "[durability]") {
  SyncVfs vfs;
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  for (int i = 0; i < 20; ++i) {
    const size_t before = vfs.WalOps().size();
    REQUIRE(store->Apply(Audited("Decrypt")).ok());
    const std::vector<Op> ops = vfs.WalOps();
    // The batch was written to the WAL, and the last thing done to the WAL before Apply
    // returned was a sync: nothing of the batch is left waiting in the OS's cache.
    REQUIRE(ops.size() > before);
    CHECK(std::find(ops.begin() + static_cast<std::ptrdiff_t>(before), ops.end(), Op::kWrite) !=
          ops.end());
    CHECK(ops.back() == Op::kSync);
  }
}

TEST_CASE("Concurrent batches share one sync (group commit)", "[durability]") {
  SyncVfs vfs;
  vfs.SetSyncDelay(std::chrono::milliseconds(2));  // a disk with a 2 ms flush
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  const size_t syncs_before = vfs.WalSyncs();
  constexpr int kThreads = 64, kEach = 10;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kEach; ++i) {
        if (!store->Apply(Audited("Decrypt")).ok()) ++failures;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  REQUIRE(failures == 0);
  const size_t syncs = vfs.WalSyncs() - syncs_before;
  INFO(kThreads * kEach << " batches, " << syncs << " WAL syncs");
  CHECK(syncs * 4 <= kThreads * kEach);  // one fsync per request would be 640
  // The store's own count agrees: every batch committed, in one transaction per WAL sync.
  const CommitStats stats = store->GetCommitStats();
  CHECK(stats.batches == kThreads * kEach);
  CHECK(stats.transactions <= syncs);
  const std::vector<audit::Record> rows = store->ReadAudit(1, 1000).value();
  REQUIRE(rows.size() == kThreads * kEach);
  for (size_t i = 0; i < rows.size(); ++i) CHECK(rows[i].seq == i + 1);
}

TEST_CASE("A failed sync fails the batch: nothing stored, nothing logged", "[durability]") {
  SyncVfs vfs;
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->Apply(Audited("CreateKey", {MakeKey(1, "one")})).ok());

  vfs.SetSyncFails(true);
  const absl::Status failed = store->Apply(Audited("CreateKey", {MakeKey(2, "two")}));
  CHECK(failed.code() == absl::StatusCode::kUnavailable);
  CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);
  CHECK(store->AuditHead()->first == 1);

  // It carries on by itself once the disk does: the chain continues without a gap.
  vfs.SetSyncFails(false);
  REQUIRE(store->Apply(Audited("Decrypt")).ok());
  for (int reopen = 0; reopen < 2; ++reopen) {
    const std::vector<audit::Record> rows = store->ReadAudit(1, 10).value();
    REQUIRE(rows.size() == 2);
    CHECK(rows[1].seq == 2);
    CHECK(rows[1].action == "Decrypt");
    CHECK(rows[1].hash == audit::ChainHash(rows[0].hash, rows[1]));
    CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);
    store.reset();
    Reopen(store, path);  // and the file says the same after a restart
  }
}

// A full disk while a group commits (a group big enough for SQLite to spill pages mid-way):
// SQLite rolls the whole transaction back by itself. The group's later batches then began,
// and committed, transactions of their own, durable while their callers were told they
// failed, and every write after that reused a stored seq until a restart.
TEST_CASE("A full disk fails a commit group whole, and writes resume when there is room",
          "[durability]") {
  TempDir dir;
  const std::string volume = dir.File("volume");
  REQUIRE(::mkdir(volume.c_str(), 0700) == 0);
  if (::mount("tmpfs", volume.c_str(), "tmpfs", 0, "size=6m,mode=0700") != 0) {
    WARN("cannot mount a tmpfs (not root): " << std::strerror(errno) << "; not run");
    return;
  }
  struct Unmount {
    std::string at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{volume};
  const std::string path = volume + "/keys.db";
  auto store = OpenStore(path);
  REQUIRE(store->Apply(Audited("First")).ok());
  {  // The volume filled, then about 700 KiB freed.
    std::ofstream filler(volume + "/filler", std::ios::binary);
    const std::string block(64 * 1024, 'x');
    while (filler.write(block.data(), block.size())) {
    }
  }
  struct stat filled {};
  REQUIRE(::stat((volume + "/filler").c_str(), &filled) == 0);
  REQUIRE(::truncate((volume + "/filler").c_str(), filled.st_size - 11 * 64 * 1024) == 0);

  // Another connection holds the write lock: the first batch waits alone, and the big one and
  // a small one queue behind it, to be committed as one group.
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &other) == SQLITE_OK);
  REQUIRE(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  absl::Status lead, big, small;
  std::thread leading([&] { lead = store->Apply(Audited("Lead")); });
  std::this_thread::sleep_for(500ms);  // (queued, also under sanitizers)
  std::thread bigger([&] {
    WriteBatch batch;  // about 4 MB: more than SQLite's page cache, and than the room left
    for (int i = 0; i < 4000; ++i) {
      batch.audit.push_back(Audited("Big").audit[0]);
      batch.audit.back().detail = std::string(1000, 'd');
    }
    big = store->Apply(batch);
  });
  std::this_thread::sleep_for(500ms);  // (queued, also under sanitizers)
  std::thread smaller([&] { small = store->Apply(Audited("SmallAfterBig")); });
  std::this_thread::sleep_for(500ms);  // (queued, also under sanitizers)
  REQUIRE(sqlite3_exec(other, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  leading.join();
  bigger.join();
  smaller.join();
  sqlite3_close(other);
  CHECK(lead.ok());
  INFO("big: " << big.ToString() << "; small: " << small.ToString());
  CHECK(big.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(big.message()), Catch::Contains("the disk is full"));
  CHECK(small == big);  // its group's fate
  // What is durable is what was acknowledged.
  CHECK(SqlQuery(path,
                 "SELECT group_concat(action, ',') FROM (SELECT action FROM audit_log "
                 "ORDER BY seq)") == "First,Lead");

  // Room again: writes go on by themselves, the chain without a gap.
  REQUIRE(::unlink((volume + "/filler").c_str()) == 0);
  for (int i = 0; i < 3; ++i) CHECK(store->Apply(Audited("AfterRoom")).ok());
  const std::vector<audit::Record> rows = store->ReadAudit(1, 10).value();
  REQUIRE(rows.size() == 5);
  for (size_t i = 1; i < rows.size(); ++i) {
    CHECK(rows[i].seq == i + 1);
    CHECK(rows[i].hash == audit::ChainHash(rows[i - 1].hash, rows[i]));
  }
  store.reset();
}

}  // namespace
}  // namespace custos::storage
