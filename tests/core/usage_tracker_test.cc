#include "core/usage_tracker.h"

#include <catch2/catch.hpp>
#include <chrono>
#include <future>
#include <mutex>

#include "tests/core/kms_fixture.h"

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

}  // namespace
}  // namespace custos::core
