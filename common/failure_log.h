// FailureLog: how a failing dependency (the HSM, the key database) shows in the operator's log
// while the calls that need it fail.
//
// A failure that every call meets must neither go unlogged nor write one line per call: the
// first failure is logged when it starts, a summary (calls failed, the last error) at most
// once per `summary_interval` while it lasts, and one line when a call succeeds again.
// Succeeded() is one atomic load while nothing is failing, so it can sit on the hot path.
// Messages passed in must carry no secret (Custos statuses never do). Thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "common/status.h"

namespace custos {

class FailureLog {
 public:
  using Clock = std::chrono::steady_clock;

  explicit FailureLog(std::string what,
                      std::chrono::milliseconds summary_interval = std::chrono::seconds(30))
      : what_(std::move(what)), summary_interval_(summary_interval) {}

  // One call failed with `status` (not OK).
  void Failed(const absl::Status& status);
  // One call succeeded; ends a failure period, if one is under way.
  void Succeeded() {
    if (failing_.load(std::memory_order_relaxed)) Recovered();
  }
  bool failing() const { return failing_.load(); }

 private:
  void Recovered();

  const std::string what_;
  const std::chrono::milliseconds summary_interval_;
  std::atomic<bool> failing_{false};
  std::mutex mu_;  // guards the fields below
  Clock::time_point since_{};
  Clock::time_point last_line_{};
  uint64_t failed_total_ = 0;
  uint64_t failed_since_line_ = 0;
  std::string last_error_;
};

}  // namespace custos
