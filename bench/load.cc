#include "bench/load.h"

#include <algorithm>
#include <mutex>
#include <thread>
#include <vector>

namespace custos::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(rank, sorted.size() - 1)];
}

Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

}  // namespace

LoadResult RunLoad(const LoadOptions& options, const Operation& op) {
  const Clock::time_point start = Clock::now() + std::chrono::milliseconds(50);  // all ready
  const Clock::time_point record_from = start + Seconds(options.warmup_seconds);
  const Clock::time_point end = record_from + Seconds(options.seconds);

  std::mutex mu;
  std::vector<double> latencies_us;
  LoadResult result;
  result.threads = options.threads;
  std::vector<std::thread> threads;
  for (int t = 0; t < options.threads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<double> mine;  // merged once at the end: no lock in the loop
      long errors = 0;
      std::string first_error;
      std::this_thread::sleep_until(start);
      for (Clock::time_point now = Clock::now(); now < end; now = Clock::now()) {
        std::string error = op(t);
        const Clock::time_point done = Clock::now();
        if (done < record_from || done >= end) continue;
        if (!error.empty()) {
          if (errors++ == 0) first_error = std::move(error);
          continue;
        }
        mine.push_back(std::chrono::duration<double, std::micro>(done - now).count());
      }
      std::lock_guard lock(mu);
      latencies_us.insert(latencies_us.end(), mine.begin(), mine.end());
      result.errors += errors;
      if (result.first_error.empty()) result.first_error = std::move(first_error);
    });
  }
  for (std::thread& thread : threads) thread.join();

  std::sort(latencies_us.begin(), latencies_us.end());
  result.ops = static_cast<long>(latencies_us.size());
  result.seconds = options.seconds;
  result.ops_per_second = static_cast<double>(result.ops) / options.seconds;
  result.p50_us = Percentile(latencies_us, 0.50);
  result.p99_us = Percentile(latencies_us, 0.99);
  return result;
}

}  // namespace custos::bench
