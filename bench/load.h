// RunLoad: N threads each calling one operation in a closed loop for a fixed time.
#pragma once

#include <chrono>
#include <functional>
#include <string>

namespace custos::bench {

struct LoadOptions {
  int threads = 1;
  double warmup_seconds = 0;  // run but not recorded
  double seconds = 10;        // recorded
};

struct LoadResult {
  int threads = 0;
  long ops = 0;     // successful operations completed inside the recorded window
  long errors = 0;  // failed ones (not in ops, nor in the latencies)
  std::string first_error;
  double seconds = 0;  // the recorded window
  double ops_per_second = 0;
  double p50_us = 0;
  double p99_us = 0;
};

// One call of the operation by thread `thread` (0..threads-1): empty on success, else what
// failed. Must be safe to call from all threads at once (each with its own index).
using Operation = std::function<std::string(int thread)>;

// Starts `options.threads` threads that call `op` back to back until the window ends. An
// operation counts if it completes inside the recorded window; latency is measured per call
// with steady_clock and p50/p99 come from the sorted samples of all threads.
LoadResult RunLoad(const LoadOptions& options, const Operation& op);

}  // namespace custos::bench
