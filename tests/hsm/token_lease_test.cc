// One server per token: the claim a starting server finds, waits out, or is refused by. Real
// SoftHSM2 tokens; "servers" are leases taken in this process with short timings.
#include "hsm/token_lease.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <thread>

#include <unistd.h>

#include "tests/hsm/hsm_test_util.h"

namespace custos::testing {
namespace {

using namespace std::chrono_literals;
using hsm::TokenLease;

const TokenLease::Options kShort{.label = "custos-instance", .lease = 600ms, .poll = 50ms};

TEST_CASE("A token claimed and renewed refuses a second server; released, it does not wait",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto first = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(first.ok());
  std::atomic<bool> stop{false};
  std::thread renewing([&] {
    while (!stop) {
      CHECK((*first)->Renew().ok());
      std::this_thread::sleep_for(100ms);
    }
  });
  const auto refused = TokenLease::Acquire(hsm.get(), kShort);
  stop = true;
  renewing.join();
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("holds this HSM token: it renewed its claim while this one waited"));
  CHECK((*first)->Renew().ok());  // the refused one wrote nothing

  REQUIRE((*first)->Release().ok());
  const auto started = std::chrono::steady_clock::now();
  auto next = TokenLease::Acquire(hsm.get(), kShort);
  CHECK(next.ok());
  CHECK(std::chrono::steady_clock::now() - started < kShort.lease);
  CHECK(hsm->ReadTokenData("custos-instance")->size() == 1);
  CHECK((*next)->taken_over_state().empty());  // released: nothing taken over
}

TEST_CASE("A claim left unrenewed is taken over after a lease, and its holder told",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  TokenLease::Options with_state = kShort;
  with_state.state = [] { return std::string("7 abc\n"); };  // one line, whatever it says
  auto stalled = TokenLease::Acquire(hsm.get(), with_state);
  REQUIRE(stalled.ok());
  REQUIRE((*stalled)->Renew().ok());
  const auto started = std::chrono::steady_clock::now();
  auto taker = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(taker.ok());
  CHECK(std::chrono::steady_clock::now() - started >= kShort.lease);
  CHECK((*taker)->taken_over_state() == "7 abc");  // what the last renewal said
  CHECK((*taker)->taken_over_from().ends_with(":" + std::to_string(::getpid())));
  const absl::Status lost = (*stalled)->Renew();
  CHECK(lost.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(lost.message()), Catch::Contains("took this HSM token over"));
  // The old holder neither renews over the new claim nor releases it.
  CHECK((*stalled)->Release().ok());
  CHECK((*taker)->Renew().ok());
}

}  // namespace
}  // namespace custos::testing
