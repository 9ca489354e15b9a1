// KeyStore's lifecycle surface: Apply, crypto-shredding (PurgeErased), migration from schema
// version 1, the sweeps' queries and usage counters.
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "storage/key_store.h"
#include "storage/schema.h"
#include "storage/sqlite.h"
#include "tests/storage/store_test_util.h"
#include "tests/support/captured_log.h"
#include "tests/support/files.h"
#include "tests/support/sqlite_file.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::CapturedLog;
using custos::testing::CheckpointLockHeld;
using custos::testing::ReadFile;
using custos::testing::TempDir;
using namespace custos::storage::test;  // NOLINT: the shared helpers
using namespace std::chrono_literals;

RequestRecord MakeRequest(int n, std::string key_id) {
  RequestRecord request;
  request.id = "10000000-0000-4000-8000-" + IdFor(n).substr(24);
  request.operation = "RotateKey";
  request.key_id = std::move(key_id);
  request.parameters = "key_id=" + request.key_id;
  request.justification = "quarterly rotation";
  request.proposer = "officer/alice";
  request.created_at = 1700000000 + n;
  request.expires_at = request.created_at + 86400;
  return request;
}

// A lifecycle-bearing key: every new field set to something other than its default.
KeyRecord MakeLifecycleKey(int n, std::string alias = "") {
  KeyRecord key = MakeKey(n, std::move(alias));
  key.min_decrypt_version = 2;
  key.rotation_period_seconds = 90 * 86400;
  key.deletion_due_at = 1800000000;
  key.destroyed_at = 1800000001;
  return key;
}

TEST_CASE("The new KeyRecord fields round-trip through CreateKey, cache, disk and listing",
          "[key_store][lifecycle]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  const KeyRecord key = MakeLifecycleKey(1, "billing");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(key).ok());
  CheckSameKey(*store->GetKey(key.id).value(), key);  // From the cache.

  auto& reopened = Reopen(store, path);
  CheckSameKey(*reopened->GetKey(key.id).value(), key);  // From disk.
  CheckSameKey(*reopened->FindKeyByAlias("billing").value(), key);
  auto page = reopened->ListKeys(10, "");
  REQUIRE(page.ok());
  REQUIRE(page->keys.size() == 1);
  CheckSameKey(*page->keys[0], key);

  // And the defaults of a record that sets none of them.
  KeyRecord plain = MakeSmallKey(2);
  REQUIRE(reopened->CreateKey(plain).ok());
  auto fresh = Reopen(store, path)->GetKey(plain.id);
  REQUIRE(fresh.ok());
  CHECK((*fresh)->min_decrypt_version == 1);
  CHECK((*fresh)->rotation_period_seconds == 0);
  CHECK((*fresh)->deletion_due_at == 0);
  CHECK((*fresh)->destroyed_at == 0);
}

TEST_CASE("A version 1 database with keys migrates to version 2 with the defaults",
          "[key_store][lifecycle]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  {
    // The database as Custos with schema version 1 left it.
    auto db = sqlite::Database::Open(path);
    REQUIRE(db.ok());
    REQUIRE(MigrateSchemaTo(**db, 1).value() == 1);
    REQUIRE((*db)
                ->Exec("INSERT INTO keys VALUES ('k1', 'old-alias', 'from v1', 2, 1600000000, "
                       "'officer/bob', 1);"
                       "INSERT INTO key_tags VALUES ('k1', 'env', 'prod');"
                       "INSERT INTO key_versions VALUES ('k1', 1, x'0102', 'root-1', 1600000000);"
                       "INSERT INTO key_grants VALUES ('k1', 'app/x', 'decrypt');")
                .ok());
  }
  CHECK(QueryFile(path, "PRAGMA user_version") == "1");
  CHECK(QueryFile(path, "SELECT count(*) FROM sqlite_schema WHERE name = 'requests'") == "0");

  auto store = OpenStore(path);
  CHECK(store->SchemaVersion() == 8);
  CHECK(QueryFile(path, "PRAGMA user_version") == "8");
  KeyRecord want;
  want.id = "k1";
  want.alias = "old-alias";
  want.description = "from v1";
  want.tags = {{"env", "prod"}};
  want.state = KeyState::kDisabled;
  want.created_at = 1600000000;
  want.created_by = "officer/bob";
  want.primary_version = 1;
  want.versions = {{1, Bytes{1, 2}, "root-1", 1600000000}};
  want.decrypt_grants = {"app/x"};
  // min_decrypt_version 1, rotation 0, deletion_due_at 0, destroyed_at 0: the defaults.
  CheckSameKey(*store->GetKey("k1").value(), want);
  CHECK(store->GetUsage("k1").value().empty());
  CHECK(store->PendingRequests().value().empty());
  CHECK(store->KeysDueForRotation(std::numeric_limits<int64_t>::max()).value().empty());

  // The new tables work on the migrated file.
  WriteBatch batch;
  batch.requests.push_back(MakeRequest(1, "k1"));
  REQUIRE(store->Apply(batch).ok());
  CHECK(store->GetRequest(batch.requests[0].id).ok());

  // Asking for an older version than the file is at changes nothing.
  store.reset();
  auto db = sqlite::Database::Open(path);
  REQUIRE(db.ok());
  CHECK(MigrateSchemaTo(**db, 1).value() == 8);
  CHECK(MigrateSchemaTo(**db, 9).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Apply inserts new keys and requests in one go", "[key_store][apply]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  WriteBatch batch;
  batch.keys = {MakeLifecycleKey(1, "one"), MakeKey(2)};
  batch.requests = {MakeRequest(1, IdFor(1))};
  REQUIRE(store->Apply(batch).ok());
  CHECK(RowCounts(path) == "keys=2 key_tags=4 key_versions=4 key_grants=6 ");
  CHECK(QueryFile(path, "SELECT count(*) FROM requests") == "1");

  CHECK(store->CachedKeyCount() == 2);  // Written through.
  CheckSameKey(*store->GetKey(IdFor(1)).value(), batch.keys[0]);
  CheckSameKey(*store->FindKeyByAlias("one").value(), batch.keys[0]);
  auto& reopened = Reopen(store, path);
  CheckSameKey(*reopened->GetKey(IdFor(1)).value(), batch.keys[0]);
  CheckSameKey(*reopened->GetKey(IdFor(2)).value(), batch.keys[1]);
  CHECK(reopened->GetRequest(batch.requests[0].id).value().key_id == IdFor(1));

  // An empty batch is fine and writes nothing.
  const std::string before = Snapshot(path);
  CHECK(store->Apply(WriteBatch{}).ok());
  CHECK(Snapshot(path) == before);
}

TEST_CASE("Apply replaces a stored key entirely, in the cache and on disk", "[key_store][apply]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "old-alias")).ok());
  REQUIRE(store->CreateKey(MakeKey(2, "neighbour")).ok());
  auto held = store->GetKey(IdFor(1)).value();  // Cached before the change.

  KeyRecord changed = MakeKey(1, "new-alias");
  changed.description = "rotated";
  changed.tags = {{"team", "payments"}, {"tier", "1"}};  // One changed, one gone, one new.
  changed.state = KeyState::kDisabled;
  changed.primary_version = 3;
  changed.versions = {{3, Bytes{3, 3, 3}, "root-3", 1700000300},                  // New.
                      {1, Bytes{1, 2, 3, 4, 5, 6, 7, 8}, "root-9", 1700000000}};  // Relabelled.
  // Version 2 is gone.
  changed.encrypt_grants.clear();
  changed.decrypt_grants = {"spiffe://custos.local/app/audit"};
  changed.min_decrypt_version = 3;
  changed.rotation_period_seconds = 3600;
  WriteBatch batch;
  batch.keys = {changed};
  REQUIRE(store->Apply(batch).ok());

  CheckSameKey(*store->GetKey(IdFor(1)).value(), changed);
  CheckSameKey(*store->FindKeyByAlias("new-alias").value(), changed);
  CHECK(store->FindKeyByAlias("old-alias").status().code() == absl::StatusCode::kNotFound);
  CHECK(held->alias == "old-alias");  // Whoever held the old record still has it intact.
  CHECK(RowCounts(path) == "keys=2 key_tags=4 key_versions=4 key_grants=4 ");

  auto& reopened = Reopen(store, path);
  CheckSameKey(*reopened->GetKey(IdFor(1)).value(), changed);
  CheckSameKey(*reopened->GetKey(IdFor(2)).value(), MakeKey(2, "neighbour"));
  CHECK(reopened->FindKeyByAlias("old-alias").status().code() == absl::StatusCode::kNotFound);

  SECTION("the freed alias can be taken by another key") {
    KeyRecord neighbour = MakeKey(2, "old-alias");
    REQUIRE(store->Apply(WriteBatch{{neighbour}, {}, {}, {}, {}, {}}).ok());
    CHECK(store->FindKeyByAlias("old-alias").value()->id == IdFor(2));
    CHECK(store->FindKeyByAlias("neighbour").status().code() == absl::StatusCode::kNotFound);
    CHECK(Reopen(store, path)->FindKeyByAlias("old-alias").value()->id == IdFor(2));
  }
  SECTION("clearing the alias frees it") {
    changed.alias.clear();
    REQUIRE(store->Apply(WriteBatch{{changed}, {}, {}, {}, {}, {}}).ok());
    CHECK(store->FindKeyByAlias("new-alias").status().code() == absl::StatusCode::kNotFound);
    CHECK(Reopen(store, path)->GetKey(IdFor(1)).value()->alias.empty());
  }
}

TEST_CASE("Apply refuses an alias held by another key, naming it, and writes nothing",
          "[key_store][apply]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "a")).ok());
  REQUIRE(store->CreateKey(MakeKey(2, "b")).ok());
  const std::string before = Snapshot(path);

  WriteBatch batch;
  SECTION("held by a stored key") {
    // A new key and a request first, so the refusal comes after rows were written.
    batch.keys = {MakeKey(3, "c"), MakeKey(2, "a")};
    batch.requests = {MakeRequest(1, IdFor(2))};
  }
  SECTION("claimed twice within the batch") {
    batch.keys = {MakeKey(3, "a2"), MakeKey(4, "a2")};
    batch.requests = {MakeRequest(1, IdFor(3))};
  }
  const absl::Status status = store->Apply(batch);
  CHECK(status.code() == absl::StatusCode::kAlreadyExists);
  CHECK_THAT(std::string(status.message()), Catch::Matches("alias '(a|a2)' is already in use"));
  CHECK(Snapshot(path) == before);
  CHECK(store->GetKey(IdFor(3)).status().code() == absl::StatusCode::kNotFound);
  CHECK(store->GetKey(IdFor(2)).value()->alias == "b");
  CHECK(store->FindKeyByAlias("a").value()->id == IdFor(1));
  CHECK(store->GetRequest(batch.requests[0].id).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("An Apply that fails halfway is rolled back whole, cache included",
          "[key_store][apply]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "a")).ok());
  REQUIRE(store->GetKey(IdFor(1)).ok());  // Cached.
  const std::string before = Snapshot(path);

  WriteBatch batch;
  KeyRecord changed = MakeKey(1, "a");
  changed.description = "changed";
  batch.keys = {changed, MakeKey(2, "b")};
  batch.requests = {MakeRequest(1, IdFor(1)), MakeRequest(2, IdFor(2))};
  batch.requests[1].state = static_cast<RequestState>(7);  // The last row: refused by CHECK.
  CHECK(store->Apply(batch).code() == absl::StatusCode::kInternal);
  CHECK(Snapshot(path) == before);
  CHECK(store->GetKey(IdFor(1)).value()->description == "key number 1");
  CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);
  CHECK(store->GetRequest(batch.requests[0].id).status().code() == absl::StatusCode::kNotFound);

  batch.requests[1].state = RequestState::kPending;  // And the store carries on.
  REQUIRE(store->Apply(batch).ok());
  CHECK(store->GetKey(IdFor(1)).value()->description == "changed");
}

TEST_CASE("Apply refuses malformed records up front", "[key_store][apply]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1)).ok());
  const std::string before = Snapshot(path);

  WriteBatch batch;
  batch.keys = {MakeKey(2)};
  batch.requests = {MakeRequest(1, IdFor(2))};
  std::string message;
  SECTION("a key without an id") {
    batch.keys.push_back(KeyRecord{});
    message = "a key needs a non-empty id";
  }
  SECTION("a key with a version twice") {
    batch.keys[0].versions.push_back(batch.keys[0].versions[0]);
    message = "key '" + IdFor(2) + "' has version number 2 more than once";
  }
  SECTION("a request without an id") {
    batch.requests[0].id.clear();
    message = "a request needs a non-empty id";
  }
  SECTION("an approver listed twice") {
    batch.requests[0].approvals = {{"officer/bob", 1}, {"officer/carol", 2}, {"officer/bob", 3}};
    message = "request '" + batch.requests[0].id + "' lists approver 'officer/bob' more than once";
  }
  const absl::Status status = store->Apply(batch);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == message);
  CHECK(Snapshot(path) == before);
  CHECK(store->GetKey(IdFor(2)).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("Writers and readers of one key never see a stale cached record", "[key_store][apply]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1, "hot")).ok());
  constexpr int kWrites = 200;
  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&] {
      int last_seen = -1;
      while (!done) {
        auto key = store->GetKey(IdFor(1));
        if (!key.ok()) {
          ++failures;
          continue;
        }
        // The description counts up; a reader may lag but never go back.
        const int seen = (*key)->description.rfind("write ", 0) == 0
                             ? std::stoi((*key)->description.substr(6))
                             : -1;
        if (seen < last_seen) ++failures;
        last_seen = seen;
      }
    });
  }
  for (int i = 0; i < kWrites; ++i) {
    KeyRecord key = MakeKey(1, "hot");
    key.description = "write " + std::to_string(i);
    if (!store->Apply(WriteBatch{{key}, {}, {}, {}, {}, {}}).ok()) ++failures;
  }
  done = true;
  for (auto& reader : readers) reader.join();
  CHECK(failures == 0);
  const std::string last = "write " + std::to_string(kWrites - 1);
  CHECK(store->GetKey(IdFor(1)).value()->description == last);
  CHECK(store->FindKeyByAlias("hot").value()->description == last);
  CHECK(Reopen(store, path)->GetKey(IdFor(1)).value()->description == last);
}

// Crypto-shredding. The wrapped material of the key to be destroyed is a pattern that
// appears nowhere else, so finding any 16 bytes of it in the files means it survived.
const Bytes kShredPattern = [] {
  Bytes pattern;
  for (int i = 0; i < 5; ++i) {
    for (uint8_t b : {0xA5, 0x5A, 0xC3, 0x3C, 0x96, 0x69, 0xF0, 0x0F}) pattern.push_back(b);
  }
  return pattern;
}();

// How many times a 16-byte window of the pattern occurs in the database and its WAL.
size_t PatternHits(const std::string& path) {
  size_t hits = 0;
  for (const std::string& file : {path, path + "-wal"}) {
    const std::string bytes = ReadFile(file);  // Empty if absent.
    for (size_t offset = 0; offset + 16 <= kShredPattern.size(); offset += 8) {
      const std::string needle(kShredPattern.begin() + offset, kShredPattern.begin() + offset + 16);
      for (size_t at = bytes.find(needle); at != std::string::npos;
           at = bytes.find(needle, at + 1)) {
        ++hits;
      }
    }
  }
  return hits;
}

TEST_CASE("Erased key material cannot be found in the database files after PurgeErased",
          "[key_store][shred]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  constexpr int kTarget = 150;
  KeyRecord target = MakeKey(kTarget, "doomed");
  target.versions = {{1, kShredPattern, "root-1", 1}, {2, kShredPattern, "root-1", 2}};
  // The target goes in first, then hundreds of neighbours around it (ids on both sides), so
  // its rows share pages with others and move through page splits before the erase.
  REQUIRE(store->CreateKey(target).ok());
  for (int n = 0; n < 400; ++n) {
    if (n != kTarget) REQUIRE(store->CreateKey(MakeSmallKey(n)).ok());
  }
  // Before: the material is there (so this test can fail).
  REQUIRE(PatternHits(path) > 0);

  KeyRecord destroyed = target;
  destroyed.state = KeyState::kDestroyed;
  destroyed.destroyed_at = 1800000000;
  SECTION("versions emptied (the tombstone keeps them)") {
    for (KeyVersion& version : destroyed.versions) version.wrapped.clear();
  }
  SECTION("versions dropped") { destroyed.versions.clear(); }
  SECTION("after a checkpoint had already copied the material into the database") {
    REQUIRE(store->PurgeErased().ok());
    REQUIRE(PatternHits(path) > 0);
    for (KeyVersion& version : destroyed.versions) version.wrapped.clear();
  }
  REQUIRE(store->Apply(WriteBatch{{destroyed}, {}, {}, {}, {}, {}}).ok());
  REQUIRE(store->PurgeErased().ok());

  CHECK(PatternHits(path) == 0);
  std::ifstream wal(path + "-wal", std::ios::binary | std::ios::ate);
  CHECK((!wal || wal.tellg() == 0));  // Truncated.
  // The tombstone and every neighbour are intact.
  auto& reopened = Reopen(store, path);
  CheckSameKey(*reopened->GetKey(IdFor(kTarget)).value(), destroyed);
  CheckSameKey(*reopened->FindKeyByAlias("doomed").value(), destroyed);
  for (int n = 0; n < 400; n += 37) {
    if (n != kTarget) CheckSameKey(*reopened->GetKey(IdFor(n)).value(), MakeSmallKey(n));
  }
  CHECK(QueryFile(path, "PRAGMA integrity_check") == "ok");
}

uint64_t WalBytes(const std::string& path) {
  std::error_code error;
  const uintmax_t size = std::filesystem::file_size(path + "-wal", error);
  return error ? 0 : size;
}

TEST_CASE(
    "A reader holding the database open keeps the WAL growing: warned past its size, cut "
    "back once the reader lets go",
    "[key_store][wal]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  // Above the 1,000 pages (4 MiB) at which SQLite checkpoints by itself; once the WAL starts
  // over, it is cut back to kWarn / 2.
  constexpr uint64_t kWarn = uint64_t{8} << 20;
  REQUIRE(store->WarnWalAbove(kWarn).ok());
  CHECK(store->WarnWalAbove(1).code() == absl::StatusCode::kInvalidArgument);
  const CapturedLog log;
  const std::string warning = "warning the key database's WAL has grown to ";
  const std::string cleared = "info the key database's WAL is back under 8 MiB";
  const auto count = [&log](const std::string& line) {
    size_t n = 0;
    const std::string text = log.text();
    for (size_t at = text.find(line); at != std::string::npos; at = text.find(line, at + 1)) ++n;
    return n;
  };
  int next = 0;
  const auto write_until = [&](const std::function<bool()>& done) {
    for (int i = 0; i < 20000 && !done(); ++i) REQUIRE(store->CreateKey(MakeSmallKey(next++)).ok());
    REQUIRE(done());
    REQUIRE(store->ProbeCommit(1s).ok());
  };

  // Without a reader, SQLite's own checkpoints keep the WAL near 1,000 pages: no warning.
  write_until([&] { return next >= 3000; });
  CHECK(WalBytes(path) < kWarn);
  CHECK(count(warning) == 0);

  // An auditor's sqlite3 session left inside a transaction: every checkpoint stops at its
  // snapshot, and the WAL grows with each commit.
  sqlite3* reader = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &reader, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_exec(reader, "BEGIN; SELECT count(*) FROM keys;", nullptr, nullptr, nullptr) ==
          SQLITE_OK);
  write_until([&] { return WalBytes(path) > kWarn; });
  INFO(log.text());
  CHECK(count(warning) == 1);
  REQUIRE(store->ProbeCommit(1s).ok());
  CHECK(count(warning) == 1);  // once, not every round
  CHECK(count(cleared) == 0);

  // The reader lets go: the next checkpoint reaches the WAL's end, the commit after it starts
  // the WAL over and cuts the file back to half the warning size.
  REQUIRE(sqlite3_exec(reader, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(reader);
  write_until([&] { return WalBytes(path) <= kWarn / 2; });
  CHECK(count(cleared) == 1);
  CHECK(count(warning) == 1);
  // Nothing was lost on the way.
  CHECK(QueryFile(path, "SELECT count(*) FROM keys") == std::to_string(next));
  CHECK(QueryFile(path, "PRAGMA integrity_check") == "ok");
}

TEST_CASE("PurgeErased is UNAVAILABLE while another process is checkpointing",
          "[key_store][shred]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1)).ok());
  {
    // Another process's checkpoint: SQLite gives up at once (see CheckpointLockHeld).
    const CheckpointLockHeld checkpointing(path);
    const absl::Status status = store->PurgeErased();
    CHECK(status.code() == absl::StatusCode::kUnavailable);
    CHECK_THAT(std::string(status.message()), Catch::Contains("could not checkpoint"));
  }
  CHECK(store->PurgeErased().ok());
}

TEST_CASE("PurgeErased gives up at once while another process reads", "[key_store][shred]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1)).ok());
  // An auditor's sqlite3 session (or a backup) inside its read transaction.
  sqlite3* reader = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &reader, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_exec(reader, "BEGIN; SELECT count(*) FROM keys;", nullptr, nullptr, nullptr) ==
          SQLITE_OK);
  REQUIRE(store->CreateKey(MakeKey(2)).ok());  // a frame past the reader's snapshot
  // Every commit waits for the purge (it holds the store): not the 5 s a commit would wait.
  const auto started = std::chrono::steady_clock::now();
  const absl::Status status = store->PurgeErased();
  CHECK(std::chrono::steady_clock::now() - started < 1s);
  CHECK(status.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(status.message()), Catch::Contains("could not checkpoint"));
  REQUIRE(sqlite3_exec(reader, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(reader);
  CHECK(store->PurgeErased().ok());
}

TEST_CASE("KeysDueForDeletion: PENDING_DELETION keys due by both the wall clock and observed time",
          "[key_store][sweeps]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  auto add = [&](int n, KeyState state, int64_t due, int64_t due_observed) {
    KeyRecord key = MakeSmallKey(n);
    key.state = state;
    key.deletion_due_at = due;
    key.deletion_due_observed = due_observed;
    REQUIRE(store->CreateKey(key).ok());
  };
  add(1, KeyState::kPendingDeletion, 1001, 50);
  add(2, KeyState::kPendingDeletion, 1000, 40);
  add(3, KeyState::kEnabled, 500, 0);    // Due time left from a cancelled deletion: not pending.
  add(4, KeyState::kDestroyed, 500, 0);  // Already done.
  add(5, KeyState::kDisabled, 0, 0);
  using Ids = std::vector<std::string>;
  constexpr int64_t kEver = std::numeric_limits<int64_t>::max();
  CHECK(store->KeysDueForDeletion(999, kEver).value() == Ids{});
  CHECK(store->KeysDueForDeletion(1000, kEver).value() == Ids{IdFor(2)});
  CHECK(store->KeysDueForDeletion(1001, kEver).value() == Ids{IdFor(1), IdFor(2)});
  CHECK(store->KeysDueForDeletion(kEver, kEver).value() == Ids{IdFor(1), IdFor(2)});
  // A wall clock far ahead is not enough: the server must also have observed the period.
  CHECK(store->KeysDueForDeletion(kEver, 39).value() == Ids{});
  CHECK(store->KeysDueForDeletion(kEver, 40).value() == Ids{IdFor(2)});
  CHECK(store->KeysDueForDeletion(kEver, 50).value() == Ids{IdFor(1), IdFor(2)});
  CHECK(store->GetKey(IdFor(1)).value()->deletion_due_observed == 50);

  // Cancelling (back to DISABLED) takes a key off the list.
  KeyRecord cancelled = MakeSmallKey(2);
  cancelled.state = KeyState::kDisabled;
  cancelled.deletion_due_at = 0;
  REQUIRE(store->Apply(WriteBatch{{cancelled}, {}, {}, {}, {}, {}}).ok());
  CHECK(store->KeysDueForDeletion(1001, kEver).value() == Ids{IdFor(1)});
}

TEST_CASE("KeysDueForRotation: ENABLED keys whose primary version is a period old",
          "[key_store][sweeps]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  auto add = [&](int n, KeyState state, int64_t period, uint32_t primary) {
    KeyRecord key = MakeSmallKey(n);
    key.state = state;
    key.rotation_period_seconds = period;
    key.versions = {{1, Bytes{1}, "root", 0}, {2, Bytes{2}, "root", 1000}};
    key.primary_version = primary;
    REQUIRE(store->CreateKey(key).ok());
    return key;
  };
  KeyRecord a = add(1, KeyState::kEnabled, 100, 2);  // Due at 1100.
  add(2, KeyState::kEnabled, 0, 1);                  // No automatic rotation.
  add(3, KeyState::kDisabled, 100, 2);               // Not enabled.
  add(4, KeyState::kEnabled, 1050, 1);               // Primary v1 (created 0): due at 1050.
  add(5, KeyState::kPendingDeletion, 1, 1);
  add(6, KeyState::kEnabled, 1, 3);  // Primary version not stored (cannot happen): skipped.
  using Ids = std::vector<std::string>;
  CHECK(store->KeysDueForRotation(1049).value() == Ids{});
  CHECK(store->KeysDueForRotation(1050).value() == Ids{IdFor(4)});
  CHECK(store->KeysDueForRotation(1099).value() == Ids{IdFor(4)});
  CHECK(store->KeysDueForRotation(1100).value() == Ids{IdFor(1), IdFor(4)});

  // Rotating (a new primary created at 1100) resets the clock.
  a.versions.push_back({3, Bytes{3}, "root", 1100});
  a.primary_version = 3;
  REQUIRE(store->Apply(WriteBatch{{a}, {}, {}, {}, {}, {}}).ok());
  CHECK(store->KeysDueForRotation(1199).value() == Ids{IdFor(4)});
  CHECK(store->KeysDueForRotation(1200).value() == Ids{IdFor(1), IdFor(4)});
}

void CheckSameUsage(const std::vector<VersionUsage>& got, const std::vector<VersionUsage>& want) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CHECK(got[i].key_id == want[i].key_id);
    CHECK(got[i].version == want[i].version);
    CHECK(got[i].encryptions_reserved == want[i].encryptions_reserved);
    CHECK(got[i].encryptions == want[i].encryptions);
    CHECK(got[i].decryptions == want[i].decryptions);
    CHECK(got[i].last_used_at == want[i].last_used_at);
  }
}

// A usage row without a MAC (no authenticator in these tests).
VersionUsage Usage(const std::string& key_id, uint32_t version, uint64_t reserved,
                   uint64_t encryptions, uint64_t decryptions, int64_t last_used_at) {
  VersionUsage usage;
  usage.key_id = key_id;
  usage.version = version;
  usage.encryptions_reserved = reserved;
  usage.encryptions = encryptions;
  usage.decryptions = decryptions;
  usage.last_used_at = last_used_at;
  return usage;
}

TEST_CASE("Reservations are written by Apply, counts by PutUsageCounts; GetUsage reads both",
          "[key_store][usage]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeKey(1)).ok());
  CHECK(store->GetUsage(IdFor(1)).value().empty());
  CHECK(store->GetUsage("no-such-key").value().empty());

  const uint64_t kBig = std::numeric_limits<uint64_t>::max();
  std::vector<VersionUsage> usage = {Usage(IdFor(1), 2, 1 << 20, 1000, 7, 1700000500),
                                     Usage(IdFor(1), 1, 4096, 4000, 1u << 31, 1700000400),
                                     Usage(IdFor(2), 1, kBig, kBig - 1, 0, 0)};
  WriteBatch reservations;
  reservations.usage = usage;
  REQUIRE(store->Apply(reservations).ok());
  CheckSameUsage(store->GetUsage(IdFor(1)).value(), {usage[1], usage[0]});
  CheckSameUsage(store->GetUsage(IdFor(2)).value(), {usage[2]});

  // A reservation replaces one row and leaves the others alone.
  const VersionUsage updated = Usage(IdFor(1), 2, 2 << 20, 1500, 9, 1700000600);
  WriteBatch reserve;
  reserve.usage = {updated};
  REQUIRE(store->Apply(reserve).ok());
  CheckSameUsage(Reopen(store, path)->GetUsage(IdFor(1)).value(), {usage[1], updated});

  // Counts never move a reservation, and make a row for a version never reserved.
  VersionUsage counted = updated;
  counted.encryptions_reserved = 1;  // ignored
  counted.decryptions = 99;
  counted.last_used_at = 1700000700;
  REQUIRE(store->PutUsageCounts({counted, Usage(IdFor(1), 3, 0, 0, 5, 1700000800)}).ok());
  VersionUsage expected = counted;
  expected.encryptions_reserved = updated.encryptions_reserved;
  CheckSameUsage(store->GetUsage(IdFor(1)).value(),
                 {usage[1], expected, Usage(IdFor(1), 3, 0, 0, 5, 1700000800)});

  // Rewriting the key (rotation, destruction) leaves its counters alone.
  KeyRecord key = MakeKey(1);
  key.state = KeyState::kDisabled;
  REQUIRE(store->Apply(WriteBatch{{key}, {}, {}, {}, {}, {}}).ok());
  CHECK(store->GetUsage(IdFor(1)).value().size() == 3);
  // ... and the key's row names the versions reserved, however out of date the record given
  // (version 3 was only counted); never fewer than the record given names, of the versions
  // the key has.
  using Versions = std::vector<uint32_t>;
  CHECK(store->GetKey(IdFor(1)).value()->reserved_versions == Versions{1, 2});
  CHECK(QueryFile(path, "SELECT reserved_versions FROM keys WHERE id = '" + IdFor(1) + "'") ==
        "1,2");
  key.versions.push_back({3, Bytes{3}, "root-2", 1700000200});
  key.reserved_versions = {2, 3, 5};
  REQUIRE(store->Apply(WriteBatch{{key}, {}, {}, {}, {}, {}}).ok());
  CHECK(Reopen(store, path)->GetKey(IdFor(1)).value()->reserved_versions == Versions{1, 2, 3});
  // A list longer than a short string's inline buffer is stored as written.
  KeyRecord many = MakeKey(3);
  many.versions.clear();
  for (uint32_t v = 1; v <= 12; ++v) {
    many.versions.push_back({v, Bytes{static_cast<uint8_t>(v)}, "root-2", 1700000000 + v});
    many.reserved_versions.push_back(v);
  }
  many.primary_version = 12;
  REQUIRE(store->Apply(WriteBatch{{many}, {}, {}, {}, {}, {}}).ok());
  CHECK(QueryFile(path, "SELECT reserved_versions FROM keys WHERE id = '" + IdFor(3) + "'") ==
        "1,2,3,4,5,6,7,8,9,10,11,12");
  CHECK(Reopen(store, path)->GetKey(IdFor(3)).value()->reserved_versions.size() == 12);
  // A stamp edited into something else is unreadable, and read as one no key's row holds.
  REQUIRE(QueryFile(path, "UPDATE keys SET reserved_versions = '2,1'").empty());
  CHECK(Reopen(store, path)->GetKey(IdFor(1)).value()->reserved_versions == Versions{0});
  REQUIRE(QueryFile(path, "UPDATE keys SET reserved_versions = '1,2,3'").empty());

  // A malformed entry anywhere in the list: nothing written.
  const std::string before = Snapshot(path);
  CHECK(store->PutUsageCounts({Usage(IdFor(1), 3, 1, 1, 1, 1), Usage(IdFor(1), 0, 1, 1, 1, 1)})
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->PutUsageCounts({Usage("", 1, 1, 1, 1, 1)}).code() ==
        absl::StatusCode::kInvalidArgument);
  WriteBatch bad;
  bad.usage = {Usage(IdFor(1), 0, 1, 1, 1, 1)};
  CHECK(store->Apply(bad).code() == absl::StatusCode::kInvalidArgument);
  CHECK(Snapshot(path) == before);
  CHECK(store->PutUsageCounts({}).ok());
}

TEST_CASE("Settings are written with a batch and read back after reopening", "[key_store]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  CHECK(store->GetSetting("root_key_label").value() == std::nullopt);
  WriteBatch batch;
  batch.settings["root_key_label"] = "custos-root.2";
  REQUIRE(store->Apply(batch).ok());
  batch.settings["root_key_label"] = "custos-root.3";
  REQUIRE(store->Apply(batch).ok());
  Reopen(store, path);
  CHECK(store->GetSetting("root_key_label").value() == "custos-root.3");
  WriteBatch unnamed;
  unnamed.settings[""] = "x";
  CHECK(store->Apply(unnamed).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Concurrent batches commit in groups; a failing one fails alone", "[key_store]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  REQUIRE(store->Apply(WriteBatch{{MakeKey(0, "taken")}, {}, {}, {}, {}, {}}).ok());
  constexpr int kThreads = 32;
  std::vector<absl::Status> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Thread 0 claims an alias that is already taken; every other thread's key is new.
      const std::string alias = t == 0 ? "taken" : "alias-" + std::to_string(t);
      results[t] = store->Apply(WriteBatch{{MakeKey(1000 + t, alias)}, {}, {}, {}, {}, {}});
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(results[0].code() == absl::StatusCode::kAlreadyExists);
  for (int t = 1; t < kThreads; ++t) {
    INFO("thread " << t);
    CHECK(results[t].ok());
    CHECK(store->FindKeyByAlias("alias-" + std::to_string(t)).ok());
  }
  CHECK(store->GetKey(IdFor(1000)).status().code() == absl::StatusCode::kNotFound);
  // Reopened from disk, the same picture: every success was durable.
  Reopen(store, dir.File("keys.db"));
  CHECK(store->ListKeys(1000, "").value().keys.size() == kThreads);
}

}  // namespace
}  // namespace custos::storage
