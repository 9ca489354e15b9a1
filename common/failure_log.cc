#include "common/failure_log.h"

#include <spdlog/spdlog.h>

namespace custos {
namespace {

int64_t SecondsBetween(FailureLog::Clock::time_point from, FailureLog::Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::seconds>(to - from).count();
}

}  // namespace

void FailureLog::Failed(const absl::Status& status) {
  const Clock::time_point now = Clock::now();
  std::lock_guard lock(mu_);
  last_error_ = status.ToString();
  if (!failing_.load()) {
    failing_ = true;
    since_ = last_line_ = now;
    failed_total_ = 1;
    failed_since_line_ = 0;
    spdlog::error("{} failing: {}", what_, last_error_);
    return;
  }
  ++failed_total_;
  ++failed_since_line_;
  if (now - last_line_ < summary_interval_) return;
  spdlog::error(
      "{} still failing after {} s: {} calls failed since the last report; last error: {}", what_,
      SecondsBetween(since_, now), failed_since_line_, last_error_);
  last_line_ = now;
  failed_since_line_ = 0;
}

void FailureLog::Recovered() {
  const Clock::time_point now = Clock::now();
  std::lock_guard lock(mu_);
  if (!failing_.load()) return;  // another caller logged the recovery
  failing_ = false;
  spdlog::info("{} working again after {} s; {} calls failed meanwhile", what_,
               SecondsBetween(since_, now), failed_total_);
}

}  // namespace custos
