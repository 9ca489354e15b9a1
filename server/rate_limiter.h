// RateLimiter: at most `per_second` calls a second for each caller it tells apart (a principal,
// or a peer address), with bursts of up to one second's worth: a token bucket per caller.
//
// A client in a loop must not starve everybody else of the workers and the HSM. custosd keeps
// one limiter per principal and one per peer address (server.rate_limit_per_principal,
// server.rate_limit_per_peer; both off by default, and far above what a benchmark drives when
// set). Memory is bounded: at most `max_callers` buckets; when full, buckets that have refilled
// (their callers idle for a second or more) are dropped, and if none has, the new caller
// shares one overflow bucket with every other newcomer. Thread-safe.
#pragma once

#include <chrono>
#include <cstddef>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

namespace custos::server {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr size_t kDefaultMaxCallers = 65536;

  // `per_second` > 0.
  explicit RateLimiter(int per_second, size_t max_callers = kDefaultMaxCallers);

  // True if `caller` may make one more call at `now` (and counts it); false if over its rate.
  bool Allow(std::string_view caller, Clock::time_point now = Clock::now());

  int per_second() const { return static_cast<int>(per_second_); }
  size_t callers() const;

 private:
  struct Bucket {
    double tokens = 0;
    Clock::time_point at;
  };
  // `bucket` refilled up to `now`.
  void Refill(Bucket& bucket, Clock::time_point now) const;

  const double per_second_;
  const size_t max_callers_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, Bucket> buckets_;  // guarded by mu_
  Bucket overflow_;                                  // guarded by mu_
};

}  // namespace custos::server
