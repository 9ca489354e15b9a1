#include "core/usage_tracker.h"

#include <catch2/catch.hpp>
#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "common/strings.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/files.h"

namespace custos::core {
namespace {

using namespace std::chrono_literals;
using testing::Fixture;

// A reservation writer that holds the reservations of one key until released.
class HeldReservations {
 public:
  explicit HeldReservations(std::string held_key) : held_key_(std::move(held_key)) {}
  absl::Status Reserve(const storage::VersionUsage& usage) {
    std::unique_lock lock(mu_);
    ++writes_;
    cv_.notify_all();
    if (usage.key_id == held_key_) cv_.wait(lock, [this] { return released_; });
    return absl::OkStatus();
  }
  void AwaitWrites(int n) {
    std::unique_lock lock(mu_);
    REQUIRE(cv_.wait_for(lock, 10s, [&] { return writes_ >= n; }));
  }
  void Release() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }
  int writes() {
    std::lock_guard lock(mu_);
    return writes_;
  }

 private:
  const std::string held_key_;
  std::mutex mu_;
  std::condition_variable cv_;
  int writes_ = 0;
  bool released_ = false;
};

TEST_CASE("A reservation being written holds up only encryptions under its own version",
          "[usage]") {
  Fixture f;
  HeldReservations writer("slow-key");
  UsageLimits limits;
  limits.reservation_block = 10;
  UsageTracker tracker(
      f.store.get(), &f.clock, limits,
      [&](const storage::VersionUsage& usage) { return writer.Reserve(usage); }, nullptr);

  // The first encryption under slow-key reserves a block, and its write does not return.
  auto slow =
      std::async(std::launch::async, [&] { return tracker.CountEncryption("slow-key", 1); });
  writer.AwaitWrites(1);
  // Other keys, their first use (a load and a reservation) included, go on meanwhile.
  auto other = std::async(std::launch::async, [&] {
    for (int i = 0; i < 25; ++i) {
      if (absl::Status counted = tracker.CountEncryption("other-key", 1); !counted.ok()) {
        return counted;
      }
    }
    return tracker.CountEncryption("third-key", 2);
  });
  REQUIRE(other.wait_for(5s) == std::future_status::ready);
  CHECK(other.get().ok());
  // A second encryption under slow-key waits for the block being reserved, not past it.
  auto waiting =
      std::async(std::launch::async, [&] { return tracker.CountEncryption("slow-key", 1); });
  CHECK(waiting.wait_for(200ms) == std::future_status::timeout);
  writer.Release();
  CHECK(slow.get().ok());
  CHECK(waiting.get().ok());
  // one block for slow-key; three for other-key (25 encryptions, blocks of 10); one for third-key
  CHECK(writer.writes() == 5);
  absl::StatusOr<std::vector<storage::VersionUsage>> usage = tracker.Usage("slow-key");
  REQUIRE(usage.ok());
  REQUIRE(usage->size() == 1);
  CHECK((*usage)[0].encryptions == 2);
  CHECK((*usage)[0].encryptions_reserved == 10);
}

// A store without row MACs, and a tracker whose reservations it writes as Kms would (without
// the audit record, which only row checking needs).
struct PlainTracker {
  explicit PlainTracker(UsageLimits limits)
      : store(*storage::KeyStore::Open(dir.File("custos.db"))),
        tracker(
            store.get(), &clock, limits,
            [this](const storage::VersionUsage& usage) {
              ++reservations;
              storage::WriteBatch batch;
              batch.usage.push_back(usage);
              return store->Apply(batch);
            },
            nullptr) {}

  testing::TempDir dir;
  ManualClock clock{1'800'000'000};
  std::atomic<int> reservations{0};
  std::unique_ptr<storage::KeyStore> store;
  UsageTracker tracker;
};

// The durable reservation of (key_id, 1), 0 if none is stored.
uint64_t StoredReservation(storage::KeyStore& store, const std::string& key_id) {
  absl::StatusOr<std::vector<storage::VersionUsage>> stored = store.GetUsage(key_id);
  REQUIRE(stored.ok());
  return stored->empty() ? 0 : stored->front().encryptions_reserved;
}

// Writes a deferred reservation's row as the call's commit would (the row as counted when it
// was reserved), then settles it.
void WriteDeferred(PlainTracker& p, UsageTracker::Deferred& deferred) {
  storage::WriteBatch batch;
  batch.usage.push_back(*deferred.due());
  REQUIRE(p.store->Apply(batch).ok());
  deferred.Written();
}

TEST_CASE(
    "A deferred reservation is the caller's to write; others wait for it, and one never "
    "written is as if never made",
    "[usage]") {
  UsageLimits limits;
  limits.reservation_block = 10;
  PlainTracker p(limits);
  UsageTracker& tracker = p.tracker;

  auto deferred = std::make_unique<UsageTracker::Deferred>();
  REQUIRE(tracker.CountEncryption("k", 1, deferred.get()).ok());
  // Counted, but nothing written: the block is left to the caller.
  CHECK(p.reservations == 0);
  CHECK(StoredReservation(*p.store, "k") == 0);
  REQUIRE(deferred->due() != nullptr);
  CHECK(deferred->due()->key_id == "k");
  CHECK(deferred->due()->version == 1);
  CHECK(deferred->due()->encryptions_reserved == 10);
  // A call holding it counts nothing more with it: it would wait for itself.
  CHECK(absl::IsInternal(tracker.CountEncryption("k", 1, deferred.get())));
  // Until it is settled, another encryption under k waits (it may not count into a block not
  // yet durable); other keys do not.
  auto waiting = std::async(std::launch::async, [&] { return tracker.CountEncryption("k", 1); });
  // Should a REQUIRE fail first, the waiter is let go before its future is waited for.
  const absl::Cleanup let_go = [&] {
    if (deferred) deferred->Abandon();
  };
  CHECK(tracker.CountEncryption("other", 1).ok());
  CHECK(waiting.wait_for(200ms) == std::future_status::timeout);

  SECTION("written with the caller's record") {
    WriteDeferred(p, *deferred);
    CHECK(deferred->due() == nullptr);
    REQUIRE(waiting.wait_for(5s) == std::future_status::ready);
    CHECK(waiting.get().ok());
    // The waiter counted into the caller's block: no write of its own.
    CHECK(p.reservations == 1);  // other's
    CHECK(StoredReservation(*p.store, "k") == 10);
    absl::StatusOr<std::vector<storage::VersionUsage>> usage = tracker.Usage("k");
    REQUIRE(usage.ok());
    CHECK((*usage)[0].encryptions == 2);
    CHECK((*usage)[0].encryptions_reserved == 10);
  }
  SECTION("dropped unwritten (the call failed, or its commit did)") {
    deferred.reset();
    REQUIRE(waiting.wait_for(5s) == std::future_status::ready);
    CHECK(waiting.get().ok());
    // The waiter reserved the block itself, durably, and counts on past the one counted
    // for the call that failed: skipped ahead, never rewound.
    CHECK(p.reservations == 2);
    CHECK(StoredReservation(*p.store, "k") == 10);
    absl::StatusOr<std::vector<storage::VersionUsage>> usage = tracker.Usage("k");
    REQUIRE(usage.ok());
    CHECK((*usage)[0].encryptions == 2);
    CHECK((*usage)[0].encryptions_reserved == 10);
  }
}

TEST_CASE(
    "A deferred reservation keeps its counter through flushes and eviction pressure, and its "
    "row, written late, undoes no counts",
    "[usage]") {
  UsageLimits limits;
  limits.reservation_block = 10;
  limits.tracked_keys = 1;
  PlainTracker p(limits);
  UsageTracker& tracker = p.tracker;
  UsageTracker::Deferred deferred;
  REQUIRE(tracker.CountEncryption("k", 1, &deferred).ok());
  REQUIRE(deferred.due() != nullptr);
  p.clock.Advance(5);
  tracker.CountDecryption("k", 1);
  REQUIRE(tracker.Flush().ok());  // k's counts are written, its reservation is not
  // Two more keys, then a flush: k is the least recently used of three, one over the bound,
  // but its counter is what the call's reservation will settle.
  REQUIRE(tracker.CountEncryption("a", 1).ok());
  REQUIRE(tracker.CountEncryption("b", 1).ok());
  REQUIRE(tracker.Flush().ok());
  CHECK(tracker.tracked_keys() == 1);

  SECTION("another count under k still waits for it") {
    // Had k been dropped, its counter would be read back without the due reservation and this
    // count would reserve a block of its own at once.
    auto waiting = std::async(std::launch::async, [&] { return tracker.CountEncryption("k", 1); });
    const absl::Cleanup let_go = [&] { deferred.Abandon(); };  // should a REQUIRE fail first
    CHECK(waiting.wait_for(200ms) == std::future_status::timeout);
    WriteDeferred(p, deferred);
    REQUIRE(waiting.wait_for(5s) == std::future_status::ready);
    CHECK(waiting.get().ok());
    CHECK(p.reservations == 2);  // a's and b's: the second count under k used the call's block
  }
  SECTION("the counts flushed before the row was written are written again") {
    WriteDeferred(p, deferred);
    REQUIRE(tracker.Flush().ok());
    absl::StatusOr<std::vector<storage::VersionUsage>> stored = p.store->GetUsage("k");
    REQUIRE(stored.ok());
    REQUIRE(stored->size() == 1);
    CHECK((*stored)[0].encryptions_reserved == 10);
    CHECK((*stored)[0].encryptions == 1);
    CHECK((*stored)[0].decryptions == 1);
    CHECK((*stored)[0].last_used_at == 1'800'000'005);
  }
}

TEST_CASE(
    "Counters past the bound are dropped once written, and a key used again resumes "
    "from its reservation",
    "[usage]") {
  UsageLimits limits;
  limits.reservation_block = 10;
  limits.tracked_keys = 2;
  PlainTracker p(limits);
  UsageTracker& tracker = p.tracker;
  for (int i = 0; i < 3; ++i) REQUIRE(tracker.CountEncryption("a", 1).ok());
  tracker.CountDecryption("a", 1);
  p.clock.Advance(7);
  REQUIRE(tracker.CountEncryption("b", 1).ok());
  REQUIRE(tracker.CountEncryption("c", 1).ok());
  // Counts not written yet keep their keys in memory, past the bound.
  CHECK(tracker.tracked_keys() == 3);
  REQUIRE(tracker.Flush().ok());
  CHECK(tracker.tracked_keys() == 2);  // a, the least recently used, is gone
  CHECK(p.reservations == 3);

  // Used again, a is read back: its decryptions and last use as written, its encryptions
  // from its reservation (10), never back to the 3 made: a drop may skip, never rewind.
  absl::StatusOr<std::vector<storage::VersionUsage>> usage = tracker.Usage("a");
  REQUIRE(usage.ok());
  REQUIRE(usage->size() == 1);
  CHECK((*usage)[0].encryptions == 10);
  CHECK((*usage)[0].encryptions_reserved == 10);
  CHECK((*usage)[0].decryptions == 1);
  CHECK((*usage)[0].last_used_at == 1'800'000'000);
  // Loading it dropped b, written and unused since.
  CHECK(tracker.tracked_keys() == 2);
  REQUIRE(tracker.CountEncryption("a", 1).ok());  // past its block: reserves the next one
  CHECK(p.reservations == 4);
  usage = tracker.Usage("a");
  REQUIRE(usage.ok());
  CHECK((*usage)[0].encryptions == 11);
  CHECK((*usage)[0].encryptions_reserved == 20);
  // b lost nothing either.
  usage = tracker.Usage("b");
  REQUIRE(usage.ok());
  CHECK((*usage)[0].encryptions == 10);
  CHECK((*usage)[0].last_used_at == 1'800'000'007);
}

TEST_CASE(
    "A key whose reservation is being written keeps its counters, however many keys "
    "come and go",
    "[usage]") {
  testing::TempDir dir;
  auto store = *storage::KeyStore::Open(dir.File("custos.db"));
  ManualClock clock{1'800'000'000};
  HeldReservations writer("slow-key");
  UsageLimits limits;
  limits.reservation_block = 10;
  limits.tracked_keys = 1;
  UsageTracker tracker(
      store.get(), &clock, limits,
      [&](const storage::VersionUsage& usage) { return writer.Reserve(usage); }, nullptr);
  auto slow =
      std::async(std::launch::async, [&] { return tracker.CountEncryption("slow-key", 1); });
  writer.AwaitWrites(1);
  // A second encryption waits for that block, holding on to the same counter.
  auto waiting =
      std::async(std::launch::async, [&] { return tracker.CountEncryption("slow-key", 1); });
  CHECK(waiting.wait_for(100ms) == std::future_status::timeout);
  for (int i = 0; i < 50; ++i) tracker.CountDecryption(StrCat("other-", i), 1);
  REQUIRE(tracker.Flush().ok());
  CHECK(tracker.tracked_keys() == 1);  // slow-key alone
  writer.Release();
  CHECK(slow.get().ok());
  CHECK(waiting.get().ok());
  absl::StatusOr<std::vector<storage::VersionUsage>> usage = tracker.Usage("slow-key");
  REQUIRE(usage.ok());
  REQUIRE(usage->size() == 1);
  CHECK((*usage)[0].encryptions == 2);
  CHECK((*usage)[0].encryptions_reserved == 10);
  CHECK(writer.writes() == 1);
  // Read back, every other key has its one decryption.
  for (int i = 0; i < 50; i += 7) {
    usage = tracker.Usage(StrCat("other-", i));
    REQUIRE(usage.ok());
    REQUIRE(usage->size() == 1);
    CHECK((*usage)[0].decryptions == 1);
  }
}

TEST_CASE(
    "Counting on many keys under a small bound, flushed meanwhile, loses no count and "
    "never rewinds",
    "[usage]") {
  UsageLimits limits;
  limits.reservation_block = 5;
  limits.tracked_keys = 8;
  PlainTracker p(limits);
  constexpr int kKeys = 40, kThreads = 4, kRounds = 600;
  std::vector<std::atomic<uint64_t>> encryptions(kKeys), decryptions(kKeys);
  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::thread flusher([&] {
    while (!done) {
      if (!p.tracker.Flush().ok()) ++failures;
      std::this_thread::sleep_for(1ms);
    }
  });
  std::vector<std::thread> callers;
  callers.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < kRounds; ++i) {
        const int k = (i * 7 + t * 13) % kKeys;
        const std::string id = StrCat("key-", k);
        if (i % 3 == 0) {
          p.tracker.CountDecryption(id, 1);
          ++decryptions[k];
        } else if (i % 3 == 1) {
          if (p.tracker.CountEncryption(id, 1).ok())
            ++encryptions[k];
          else
            ++failures;
        } else if (!p.tracker.Usage(id).ok()) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& caller : callers) caller.join();
  done = true;
  flusher.join();
  CHECK(failures == 0);
  REQUIRE(p.tracker.Flush().ok());
  CHECK(p.tracker.tracked_keys() <= 8);
  for (int k = 0; k < kKeys; ++k) {
    absl::StatusOr<std::vector<storage::VersionUsage>> usage = p.tracker.Usage(StrCat("key-", k));
    REQUIRE(usage.ok());
    if (usage->empty()) {
      CHECK(encryptions[k] + decryptions[k] == 0);
      continue;
    }
    const storage::VersionUsage& u = usage->front();
    INFO("key-" << k);
    CHECK(u.decryptions == decryptions[k]);
    CHECK(u.encryptions >= encryptions[k]);
    CHECK(u.encryptions <= u.encryptions_reserved);
  }
}

}  // namespace
}  // namespace custos::core

namespace custos::core {
namespace {

// A measurement, not a test (hidden): the memory a tracked key's counters take, which sizes
// keys.usage_cache (docs/PERFORMANCE.md, "Memory per cached key").
TEST_CASE("Memory per tracked key", "[.usage_memory]") {
  constexpr int kKeys = 200'000;
  UsageLimits limits;
  limits.tracked_keys = kKeys;
  PlainTracker p(limits);
  const size_t before = custos::testing::ResidentBytes();
  for (int i = 0; i < kKeys; ++i) {
    // Ids as Custos makes them: 36 characters.
    p.tracker.CountDecryption(StrCat("0b0e1c6a-5b7d-4c55-9f1e-", 100'000'000'000 + i), 1);
  }
  const size_t after = custos::testing::ResidentBytes();
  REQUIRE(p.tracker.tracked_keys() == kKeys);
  WARN("bytes per tracked key: " << (after - before) / kKeys);
}

}  // namespace
}  // namespace custos::core
