#include "storage/key_store.h"

#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "storage/key_cache.h"
#include "tests/storage/store_test_util.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using namespace custos::storage::test;  // NOLINT: the shared helpers

mode_t FileMode(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 0777;
}

TEST_CASE("CreateKey round-trips every field by id and by alias", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  const KeyRecord key = MakeKey(1, "billing-master");
  REQUIRE(store->CreateKey(key).ok());

  auto by_id = store->GetKey(key.id);
  REQUIRE(by_id.ok());
  CheckSameKey(**by_id, key);
  auto by_alias = store->FindKeyByAlias("billing-master");
  REQUIRE(by_alias.ok());
  CheckSameKey(**by_alias, key);
  // Both reads come from the same in-memory record, not from SQLite.
  CHECK(by_id->get() == by_alias->get());
}

TEST_CASE("Keys are durable: a new KeyStore on the same file reads them back", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  const KeyRecord with_alias = MakeKey(1, "billing-master");
  KeyRecord without_alias = MakeKey(2);
  without_alias.tags.clear();
  without_alias.encrypt_grants.clear();
  without_alias.state = KeyState::kPendingDeletion;
  without_alias.versions[0].wrapped.clear();  // An empty blob is stored as empty, not NULL.
  {
    auto store = OpenStore(path);
    REQUIRE(store->CreateKey(with_alias).ok());
    REQUIRE(store->CreateKey(without_alias).ok());
  }
  auto store = OpenStore(path);
  CHECK(store->CachedKeyCount() == 0);  // Nothing in memory yet: what follows is from disk.
  auto first = store->GetKey(with_alias.id);
  REQUIRE(first.ok());
  CheckSameKey(**first, with_alias);
  auto second = store->GetKey(without_alias.id);
  REQUIRE(second.ok());
  CheckSameKey(**second, without_alias);
  CHECK((*second)->alias.empty());

  auto& reopened = Reopen(store, path);
  auto by_alias = reopened->FindKeyByAlias("billing-master");
  REQUIRE(by_alias.ok());
  CheckSameKey(**by_alias, with_alias);
  auto page = reopened->ListKeys(10, "");
  REQUIRE(page.ok());
  REQUIRE(page->keys.size() == 2);
  CheckSameKey(*page->keys[0], with_alias);
  CheckSameKey(*page->keys[1], without_alias);
}

TEST_CASE("A duplicate alias is ALREADY_EXISTS and writes nothing", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "billing")).ok());
  const std::string before = RowCounts(path);
  CHECK(before == "keys=1 key_tags=2 key_versions=2 key_grants=3 ");

  const absl::Status status = store->CreateKey(MakeKey(2, "billing"));
  CHECK(status.code() == absl::StatusCode::kAlreadyExists);
  CHECK_THAT(std::string(status.message()), Catch::Contains("alias 'billing' is already in use"));
  CHECK(RowCounts(path) == before);
  CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("A duplicate id is ALREADY_EXISTS and writes nothing", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "billing")).ok());
  const std::string before = RowCounts(path);

  const absl::Status status = store->CreateKey(MakeKey(1, "other"));
  CHECK(status.code() == absl::StatusCode::kAlreadyExists);
  CHECK_THAT(std::string(status.message()), Catch::Contains(IdFor(1)));
  CHECK(RowCounts(path) == before);
  CHECK(store->FindKeyByAlias("other").status().code() == absl::StatusCode::kNotFound);
  CHECK(store->GetKey(IdFor(1)).value()->alias == "billing");
}

TEST_CASE("A key with a repeated or zero version number is INVALID_ARGUMENT", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  KeyRecord key = MakeKey(1, "billing");
  key.versions.push_back(key.versions.front());
  absl::Status status = store->CreateKey(key);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == "key '" + IdFor(1) + "' has version number 2 more than once");
  key.versions.back().version = 0;
  status = store->CreateKey(key);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == "key '" + IdFor(1) + "' has version number 0 (versions start at 1)");
  CHECK(RowCounts(path) == "keys=0 key_tags=0 key_versions=0 key_grants=0 ");
  CHECK(store->GetKey(key.id).status().code() == absl::StatusCode::kNotFound);
  REQUIRE(store->CreateKey(MakeKey(1, "billing")).ok());
}

TEST_CASE("A CreateKey that the database refuses writes nothing", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  KeyRecord key = MakeKey(1, "billing");
  key.state = static_cast<KeyState>(9);  // Refused by the keys table's CHECK: our own bug.
  CHECK(store->CreateKey(key).code() == absl::StatusCode::kInternal);
  CHECK(RowCounts(path) == "keys=0 key_tags=0 key_versions=0 key_grants=0 ");
  CHECK(store->GetKey(key.id).status().code() == absl::StatusCode::kNotFound);
  // The store is still usable afterwards.
  REQUIRE(store->CreateKey(MakeKey(1, "billing")).ok());
}

TEST_CASE("Unknown ids and aliases are NOT_FOUND with a message naming them", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  REQUIRE(store->CreateKey(MakeKey(1, "billing")).ok());

  auto by_id = store->GetKey("no-such-id");
  CHECK(by_id.status().code() == absl::StatusCode::kNotFound);
  CHECK(by_id.status().message() == "no key with id 'no-such-id'");
  auto by_alias = store->FindKeyByAlias("no-such-alias");
  CHECK(by_alias.status().code() == absl::StatusCode::kNotFound);
  CHECK(by_alias.status().message() == "no key with alias 'no-such-alias'");
  CHECK(store->FindKeyByAlias("").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("CreateKey needs an id; keys without an alias coexist", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  KeyRecord nameless = MakeKey(1);
  nameless.id.clear();
  CHECK(store->CreateKey(nameless).code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->CreateKey(MakeKey(1)).ok());
  CHECK(store->CreateKey(MakeKey(2)).ok());
  CHECK(store->ListKeys(10, "").value().keys.size() == 2);
}

TEST_CASE("ListKeys visits every key exactly once, in id order", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  constexpr int kKeys = 2500;
  // Created in a scrambled order so the listing order is the store's doing.
  for (int i = 0; i < kKeys; ++i) REQUIRE(store->CreateKey(MakeKey((i * 7919) % kKeys)).ok());

  std::vector<std::string> seen;
  std::vector<size_t> page_sizes;
  std::string token;
  do {
    auto page = store->ListKeys(1000, token);
    REQUIRE(page.ok());
    page_sizes.push_back(page->keys.size());
    for (const auto& key : page->keys) seen.push_back(key->id);
    token = page->next_page_token;
  } while (!token.empty());

  CHECK(page_sizes == std::vector<size_t>{1000, 1000, 500});
  REQUIRE(seen.size() == kKeys);
  for (int i = 0; i < kKeys; ++i) REQUIRE(seen[i] == IdFor(i));
  // Children come along with every key of the page.
  auto last = store->ListKeys(1, "").value().keys.front();
  CheckSameKey(*last, MakeKey(0));
}

TEST_CASE("ListKeys ends exactly on a full last page, and on an empty store", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  auto empty = store->ListKeys(5, "");
  REQUIRE(empty.ok());
  CHECK(empty->keys.empty());
  CHECK(empty->next_page_token.empty());

  for (int i = 0; i < 4; ++i) REQUIRE(store->CreateKey(MakeSmallKey(i)).ok());
  auto first = store->ListKeys(2, "");
  REQUIRE(first.ok());
  CHECK(first->keys.size() == 2);
  REQUIRE_FALSE(first->next_page_token.empty());
  auto second = store->ListKeys(2, first->next_page_token);
  REQUIRE(second.ok());
  CHECK(second->keys.size() == 2);
  CHECK(second->keys.front()->id == IdFor(2));
  CHECK(second->next_page_token.empty());
}

TEST_CASE("ListKeys rejects page sizes outside 1..1000 and malformed tokens", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  REQUIRE(store->CreateKey(MakeSmallKey(1)).ok());
  CHECK(store->ListKeys(0, "").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->ListKeys(1001, "").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->ListKeys(1000, "").ok());
  CHECK(store->ListKeys(1, "").ok());
  for (const char* token : {"zz", "abc", "ABCD", "0g", "not a token", "00-"}) {
    INFO("token: " << token);
    CHECK(store->ListKeys(10, token).status().code() == absl::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("The database and its WAL files are readable by the owner only", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  const mode_t old_umask = ::umask(0);  // The loosest umask: the store must not rely on it.
  auto store = OpenStore(path);
  ::umask(old_umask);
  REQUIRE(store->CreateKey(MakeKey(1)).ok());
  CHECK(FileMode(path) == 0600);
  CHECK(FileMode(path + "-wal") == 0600);
  CHECK(FileMode(path + "-shm") == 0600);

  SECTION("a looser existing file is tightened on open") {
    store.reset();
    REQUIRE(::chmod(path.c_str(), 0644) == 0);
    Reopen(store, path);
    CHECK(FileMode(path) == 0600);
  }
}

TEST_CASE("The database is in WAL mode at the current schema version", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  CHECK(store->SchemaVersion() == 8);
  CHECK(QueryFile(path, "PRAGMA journal_mode") == "wal");
  CHECK(QueryFile(path, "PRAGMA user_version") == "8");
  store.reset();
  CHECK(Reopen(store, path)->SchemaVersion() == 8);  // Reopening migrates nothing.
}

TEST_CASE("A database from a newer Custos is FAILED_PRECONDITION and left alone", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  OpenStore(path).reset();
  QueryFile(path, "PRAGMA user_version = 99");
  auto store = KeyStore::Open(path);
  CHECK(store.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(store.status().message()), Catch::Contains("99"));
  CHECK(QueryFile(path, "PRAGMA user_version") == "99");
}

TEST_CASE("ProbeCommit commits nothing of meaning, and fails while another holds the lock",
          "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "probed")).ok());
  const std::string before = Snapshot(path);
  REQUIRE(store->ProbeCommit(std::chrono::milliseconds(100)).ok());
  CHECK(Snapshot(path) == before);
  CHECK(QueryFile(path, "PRAGMA user_version") == "8");
  CHECK(store->GetCommitStats().transactions == 0);  // not counted as a group commit

  // A DBA's session holds the write lock: the probe gives up after its own busy timeout.
  sqlite3* dba = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &dba, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_exec(dba, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  const auto start = std::chrono::steady_clock::now();
  const absl::Status locked = store->ProbeCommit(std::chrono::milliseconds(100));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));
  CHECK(locked.code() == absl::StatusCode::kUnavailable);
  REQUIRE(sqlite3_exec(dba, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(dba);
  CHECK(store->ProbeCommit(std::chrono::milliseconds(100)).ok());

  store->InjectWriteFault(absl::UnavailableError("disk full"));
  CHECK(store->ProbeCommit(std::chrono::milliseconds(100)).message() == "disk full");
  store->InjectWriteFault(absl::OkStatus());
  CHECK(store->ProbeCommit(std::chrono::milliseconds(100)).ok());
}

TEST_CASE(
    "Writers queued behind another connection's lock each wait one busy timeout, not one "
    "per group ahead of them",
    "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  sqlite3* dba = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &dba, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_exec(dba, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);

  // One writer leads into the lock; more queue behind it halfway through its wait, as the next
  // group and for the database mutex. Each gives up 5 s (the busy timeout) after it arrived.
  constexpr int kLate = 6;
  std::atomic<int> unavailable{0};
  std::atomic<int64_t> longest_ms{0};
  const auto write = [&](int n) {
    const auto start = std::chrono::steady_clock::now();
    // Group commits (every call's audit record) and the store's single writes alike.
    const KeyRecord key = MakeKey(n, "queued-" + std::to_string(n));
    WriteBatch batch;
    batch.keys.push_back(key);
    const absl::Status status = n % 2 == 0 ? store->Apply(batch) : store->CreateKey(key);
    const int64_t ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::steady_clock::now() - start)
                           .count();
    if (status.code() == absl::StatusCode::kUnavailable) ++unavailable;
    int64_t seen = longest_ms.load();
    while (ms > seen && !longest_ms.compare_exchange_weak(seen, ms)) {
    }
  };
  std::vector<std::thread> writers;
  writers.emplace_back(write, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  for (int n = 1; n <= kLate; ++n) writers.emplace_back(write, n);
  for (std::thread& w : writers) w.join();
  CHECK(unavailable == kLate + 1);
  CHECK(longest_ms >= 4900);
  CHECK(longest_ms < 6500);  // the late ones waited 7.5 s when each group waited 5 s anew

  // The lock let go, the same store writes at once, and nothing of the refused writes is there.
  REQUIRE(sqlite3_exec(dba, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(dba);
  REQUIRE(store->CreateKey(MakeKey(kLate + 1, "after")).ok());
  CHECK(QueryFile(path, "SELECT count(*) FROM keys") == "1");
}

TEST_CASE("Open reports files it cannot use", "[key_store]") {
  TempDir dir;
  CHECK(KeyStore::Open(dir.File("missing/keys.db")).status().code() ==
        absl::StatusCode::kUnavailable);
  const std::string garbage = dir.File("garbage.db");
  std::ofstream(garbage) << std::string(8192, 'x');
  CHECK_FALSE(KeyStore::Open(garbage).ok());
  const std::string link = dir.File("link.db");
  REQUIRE(::symlink(dir.File("target.db").c_str(), link.c_str()) == 0);
  CHECK_FALSE(KeyStore::Open(link).ok());
}

TEST_CASE("Eight threads create and read keys at once", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  constexpr int kThreads = 8;
  constexpr int kPerThread = 200;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const int n = t * kPerThread + i;
        if (!store->CreateKey(MakeKey(n, "alias-" + std::to_string(n))).ok()) ++failures;
        auto mine = store->GetKey(IdFor(n));
        if (!mine.ok() || (*mine)->alias != "alias-" + std::to_string(n)) ++failures;
        // Another thread's key: either not there yet or complete.
        auto other = store->FindKeyByAlias("alias-" + std::to_string((n + 37) % 1600));
        if (other.ok() ? (*other)->versions.size() != 2
                       : other.status().code() != absl::StatusCode::kNotFound) {
          ++failures;
        }
        if (i % 50 == 0 && !store->ListKeys(100, "").ok()) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
  for (int n = 0; n < kThreads * kPerThread; ++n) {
    auto key = store->FindKeyByAlias("alias-" + std::to_string(n));
    REQUIRE(key.ok());
    CHECK((*key)->id == IdFor(n));
  }
}

TEST_CASE("100k keys: every key is found and the cache stays bounded", "[key_store][scale]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  constexpr int kKeys = 100000;
  static_assert(kKeys > KeyCache::kDefaultCapacity, "the test must overflow the cache");
  int failures = 0;  // Counted, not asserted one by one: 100k assertions cost seconds.
  for (int i = 0; i < kKeys; ++i) failures += store->CreateKey(MakeSmallKey(i)).ok() ? 0 : 1;
  REQUIRE(failures == 0);
  CHECK(store->CachedKeyCount() == KeyCache::kDefaultCapacity);
  // Early keys were evicted long ago: they come back from SQLite, and the cache stays full.
  for (int i = 0; i < kKeys; i += 997) {
    auto key = store->GetKey(IdFor(i));
    REQUIRE(key.ok());
    CHECK((*key)->versions.size() == 1);
  }
  CHECK(store->CachedKeyCount() == KeyCache::kDefaultCapacity);
}

TEST_CASE("KeyStateName and FindVersion", "[key_store]") {
  CHECK(KeyStateName(KeyState::kEnabled) == "ENABLED");
  CHECK(KeyStateName(KeyState::kDisabled) == "DISABLED");
  CHECK(KeyStateName(KeyState::kPendingDeletion) == "PENDING_DELETION");
  CHECK(KeyStateName(KeyState::kDestroyed) == "DESTROYED");
  const KeyRecord key = MakeKey(1);
  REQUIRE(key.FindVersion(1) != nullptr);
  CHECK(key.FindVersion(1)->root_key_label == "root-1");
  CHECK(key.FindVersion(3) == nullptr);
  CHECK(key.FindVersion(0) == nullptr);
}

TEST_CASE("A database file deleted or replaced while open takes no more commits", "[key_store]") {
  // As root on the host could: each of the three files, deleted or moved over by a copy.
  for (const std::string suffix : {"", "-wal", "-shm"}) {
    for (const bool replace : {false, true}) {
      DYNAMIC_SECTION((replace ? "replaced: " : "deleted: ") << "keys.db" << suffix) {
        TempDir dir;
        const std::string path = dir.File("keys.db");
        auto store = OpenStore(path);
        REQUIRE(store->CreateKey(MakeKey(1, "before")).ok());
        const std::string file = path + suffix;
        if (replace) {
          const std::string copy = dir.File("copy");
          REQUIRE(std::system(("cp " + file + " " + copy).c_str()) == 0);
          REQUIRE(std::rename(copy.c_str(), file.c_str()) == 0);
        } else {
          REQUIRE(std::remove(file.c_str()) == 0);
        }
        const std::string expected = "the key database file '" + file + "' was " +
                                     (replace ? "replaced" : "deleted") + " while open";
        for (int attempt = 0; attempt < 2; ++attempt) {  // for good, not once
          const absl::Status created = store->CreateKey(MakeKey(2, "after"));
          CHECK(created.code() == absl::StatusCode::kUnavailable);
          CHECK_THAT(std::string(created.message()), Catch::StartsWith(expected));
          storage::WriteBatch batch;
          batch.keys.push_back(MakeKey(3, "batched"));
          CHECK(store->Apply(batch).code() == absl::StatusCode::kUnavailable);
          CHECK(store->ProbeCommit(std::chrono::milliseconds(100)).code() ==
                absl::StatusCode::kUnavailable);
        }
        // What was committed before is still read, and nothing after was.
        CHECK(store->FindKeyByAlias("before").ok());
        CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);
      }
    }
  }
}

}  // namespace
}  // namespace custos::storage
