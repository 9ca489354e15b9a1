#include "server/rate_limiter.h"

#include <algorithm>

namespace custos::server {

RateLimiter::RateLimiter(int per_second, size_t max_callers)
    : per_second_(per_second), max_callers_(max_callers) {
  overflow_.tokens = per_second_;
  overflow_.at = Clock::now();
}

void RateLimiter::Refill(Bucket& bucket, Clock::time_point now) const {
  const double elapsed = std::chrono::duration<double>(now - bucket.at).count();
  if (elapsed > 0) {
    bucket.tokens = std::min(per_second_, bucket.tokens + elapsed * per_second_);
    bucket.at = now;
  }
}

bool RateLimiter::Allow(std::string_view caller, Clock::time_point now) {
  std::lock_guard lock(mu_);
  auto it = buckets_.find(std::string(caller));
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_callers_) {
      // Callers idle long enough to have refilled lose nothing by being forgotten.
      for (auto b = buckets_.begin(); b != buckets_.end();) {
        Refill(b->second, now);
        b = b->second.tokens >= per_second_ ? buckets_.erase(b) : std::next(b);
      }
    }
    if (buckets_.size() >= max_callers_) {  // still full: newcomers share one bucket
      Refill(overflow_, now);
      if (overflow_.tokens < 1) return false;
      overflow_.tokens -= 1;
      return true;
    }
    it = buckets_.emplace(std::string(caller), Bucket{per_second_, now}).first;
  }
  Refill(it->second, now);
  if (it->second.tokens < 1) return false;
  it->second.tokens -= 1;
  return true;
}

size_t RateLimiter::callers() const {
  std::lock_guard lock(mu_);
  return buckets_.size();
}

}  // namespace custos::server
