#include "server/rate_limiter.h"

#include <catch2/catch.hpp>
#include <chrono>

namespace custos::server {
namespace {

using std::chrono::milliseconds;

TEST_CASE("A caller gets a second's worth at once, then its rate", "[rate]") {
  RateLimiter limiter(10);
  const auto t0 = RateLimiter::Clock::now();
  int allowed = 0;
  for (int i = 0; i < 25; ++i) allowed += limiter.Allow("app", t0) ? 1 : 0;
  CHECK(allowed == 10);  // the burst
  CHECK_FALSE(limiter.Allow("app", t0 + milliseconds(50)));
  CHECK(limiter.Allow("app", t0 + milliseconds(100)));  // one more each 100 ms
  CHECK_FALSE(limiter.Allow("app", t0 + milliseconds(150)));
  CHECK(limiter.Allow("other", t0));  // callers are counted apart
  // An idle caller's bucket refills to one second's worth, no more.
  allowed = 0;
  for (int i = 0; i < 25; ++i) allowed += limiter.Allow("app", t0 + milliseconds(60'000)) ? 1 : 0;
  CHECK(allowed == 10);
}

TEST_CASE("The limiter's memory is bounded; newcomers beyond it share one bucket", "[rate]") {
  RateLimiter limiter(2, /*max_callers=*/3);
  const auto t0 = RateLimiter::Clock::now();
  for (const char* caller : {"a", "b", "c"}) REQUIRE(limiter.Allow(caller, t0));
  CHECK(limiter.callers() == 3);
  // Full, and nobody has refilled: "d" and "e" share the overflow bucket (2 a second).
  CHECK(limiter.Allow("d", t0));
  CHECK(limiter.Allow("e", t0));
  CHECK_FALSE(limiter.Allow("d", t0));
  CHECK(limiter.callers() == 3);
  // A second later every bucket has refilled: the idle ones are forgotten to make room.
  CHECK(limiter.Allow("d", t0 + milliseconds(1000)));
  CHECK(limiter.callers() == 1);
}

}  // namespace
}  // namespace custos::server
