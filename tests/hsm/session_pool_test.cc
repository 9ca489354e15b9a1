#include "hsm/session_pool.h"

#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "hsm/pkcs11_module.h"
#include "tests/hsm/hsm_test_util.h"

namespace custos::testing {
namespace {

using hsm::SessionPool;

std::unique_ptr<SessionPool> MakePool(const SoftHsmToken& token, size_t size,
                                      std::chrono::milliseconds wait) {
  auto module = hsm::Pkcs11Module::Load(kSoftHsmModule);
  REQUIRE(module.ok());
  SessionPool::Options options;
  options.size = size;
  options.wait_timeout = wait;
  auto pool =
      SessionPool::Create(*module, token.label(), SecureBytes::FromString(token.pin()), options);
  REQUIRE(pool.ok());
  return std::move(pool).value();
}

TEST_CASE("a caller waits for a free session, and gives up after the timeout") {
  SoftHsmToken token;
  SECTION("gives up") {
    auto pool = MakePool(token, 1, std::chrono::milliseconds(100));
    auto held = pool->Acquire();
    REQUIRE(held.ok());
    auto none = pool->Acquire();
    CHECK(absl::IsUnavailable(none.status()));
    CHECK_THAT(std::string(none.status().message()), Catch::Contains("no HSM session free"));
  }
  SECTION("gets the session someone returns") {
    auto pool = MakePool(token, 1, std::chrono::milliseconds(5000));
    std::optional<SessionPool::Lease> held(pool->Acquire().value());
    const CK_SESSION_HANDLE session = held->handle();
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      held.reset();
    });
    auto waited = pool->Acquire();
    releaser.join();
    REQUIRE(waited.ok());
    CHECK(waited->handle() == session);
  }
}

TEST_CASE("the pool never opens more than its size, however many threads ask") {
  SoftHsmToken token;
  auto pool = MakePool(token, 3, std::chrono::milliseconds(5000));
  std::mutex mu;
  std::set<CK_SESSION_HANDLE> seen;
  std::atomic<int> in_use{0}, most_in_use{0}, failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        auto lease = pool->Acquire();
        if (!lease.ok()) {
          ++failures;
          continue;
        }
        int now = ++in_use;
        for (int most = most_in_use; now > most && !most_in_use.compare_exchange_weak(most, now);) {
        }
        {
          std::lock_guard lock(mu);
          seen.insert(lease->handle());
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        --in_use;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
  CHECK(most_in_use <= 3);
  CHECK(seen.size() <= 3);
}

TEST_CASE("a broken lease's session is closed, a returned one is reused") {
  SoftHsmToken token;
  auto pool = MakePool(token, 1, std::chrono::milliseconds(100));
  CK_SESSION_HANDLE first;
  {
    auto lease = pool->Acquire().value();
    first = lease.handle();
  }
  CK_SESSION_HANDLE broken;
  {
    auto lease = pool->Acquire().value();
    CHECK(lease.handle() == first);
    broken = lease.handle();
    lease.MarkBroken();
  }
  CK_SESSION_INFO info;
  CHECK(pool->module()->api()->C_GetSessionInfo(broken, &info) == CKR_SESSION_HANDLE_INVALID);
  auto lease = pool->Acquire();
  REQUIRE(lease.ok());
  CHECK(pool->module()->api()->C_GetSessionInfo(lease->handle(), &info) == CKR_OK);
  CHECK(info.state == CKS_RW_USER_FUNCTIONS);
}

TEST_CASE("LongestLease shows how long the oldest lease has been out") {
  SoftHsmToken token;
  auto pool = MakePool(token, 2, std::chrono::milliseconds(100));
  CHECK(pool->LongestLease() == std::chrono::steady_clock::duration::zero());
  {
    auto lease = pool->Acquire();
    REQUIRE(lease.ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(120));
    auto second = pool->Acquire();
    REQUIRE(second.ok());
    CHECK(pool->LongestLease() >= std::chrono::milliseconds(120));
  }
  CHECK(pool->LongestLease() == std::chrono::steady_clock::duration::zero());
}

}  // namespace
}  // namespace custos::testing
