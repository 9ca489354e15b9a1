// Metrics: counters, histograms and scrape-time gauges, rendered in Prometheus's text
// exposition format (version 0.0.4) for custosd's metrics endpoint.
//
// Cheap enough for every call: a counter or histogram is a few atomics; a registry lookup takes
// a mutex only to find or add a label set, so hot paths keep the reference they got. Nothing
// recorded here may name a key, a context value or a principal: labels are methods, status
// codes, HSM operations and the like, a set bounded by the code.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace custos::metrics {

using Labels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Add(uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// Latency buckets in seconds, 100 µs to 10 s.
inline constexpr double kSecondsBuckets[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                             0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                             1,      2.5,     5,      10};
// Sizes (batches per group commit), 1 to 512.
inline constexpr double kSizeBuckets[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};

class Histogram {
 public:
  // `bounds`: the buckets' upper bounds, ascending; +Inf is added.
  explicit Histogram(std::span<const double> bounds);
  void Observe(double value);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // per bound, then +Inf (= count)
    double sum = 0;
  };
  Snapshot Read() const;

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1
  std::atomic<double> sum_{0};
};

class Registry {
 public:
  // The counter or histogram `name` with `labels`, made on first use. A name keeps the help
  // text and kind of its first use.
  Counter& GetCounter(std::string_view name, std::string_view help, const Labels& labels = {});
  Histogram& GetHistogram(std::string_view name, std::string_view help, const Labels& labels = {},
                          std::span<const double> bounds = kSecondsBuckets);

  // A gauge read when the metrics are rendered: `read` returns its samples, each a label set
  // and a value. It may fail (a database that cannot be read now): it then returns no samples.
  using GaugeReader = std::function<std::vector<std::pair<Labels, double>>()>;
  void AddGauge(std::string_view name, std::string_view help, GaugeReader read);
  // The same for a counter kept elsewhere (a cache's own hit count), read when rendered.
  void AddCounterReader(std::string_view name, std::string_view help, GaugeReader read);

  // Every metric, in the Prometheus text format.
  std::string Render() const;

 private:
  struct Family {
    std::string help;
    std::string type;  // counter, histogram, gauge
    std::map<Labels, std::unique_ptr<Counter>> counters;
    std::map<Labels, std::unique_ptr<Histogram>> histograms;
    GaugeReader read;  // gauges and counters kept elsewhere
  };
  Family& FamilyOf(std::string_view name, std::string_view help, std::string_view type);

  mutable std::mutex mu_;
  std::map<std::string, Family, std::less<>> families_;
};

}  // namespace custos::metrics
