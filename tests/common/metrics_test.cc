// metrics::Registry: the Prometheus text format exactly as scrapers parse it (cumulative
// buckets, +Inf, _sum and _count, escaped label values), counters from many threads, and
// readers evaluated at each render.
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

#include "common/metrics.h"

namespace custos::metrics {
namespace {

TEST_CASE("Counters and histograms render in the Prometheus text format", "[metrics]") {
  Registry registry;
  registry.GetCounter("calls_total", "Calls", {{"method", "Decrypt"}, {"code", "OK"}}).Add(3);
  registry.GetCounter("calls_total", "ignored: the first help stays", {{"method", "A\"b\\c\nd"}})
      .Add();
  const double bounds[] = {0.5, 1};
  Histogram& latency = registry.GetHistogram("latency_seconds", "Latency", {}, bounds);
  for (double v : {0.25, 0.5, 0.75, 3.0}) latency.Observe(v);
  CHECK(registry.Render() ==
        "# HELP calls_total Calls\n"
        "# TYPE calls_total counter\n"
        "calls_total{method=\"A\\\"b\\\\c\\nd\"} 1\n"
        "calls_total{method=\"Decrypt\",code=\"OK\"} 3\n"
        "# HELP latency_seconds Latency\n"
        "# TYPE latency_seconds histogram\n"
        "latency_seconds_bucket{le=\"0.5\"} 2\n"
        "latency_seconds_bucket{le=\"1\"} 3\n"
        "latency_seconds_bucket{le=\"+Inf\"} 4\n"
        "latency_seconds_sum 4.5\n"
        "latency_seconds_count 4\n");
}

TEST_CASE("Readers run at each render, after the kept metrics", "[metrics]") {
  Registry registry;
  int reads = 0;
  registry.AddGauge("keys", "Keys by state", [&reads]() -> std::vector<std::pair<Labels, double>> {
    ++reads;
    return {{{{"state", "ENABLED"}}, 2}, {{{"state", "DISABLED"}}, 0}};
  });
  registry.AddCounterReader("hits_total", "Hits", []() -> std::vector<std::pair<Labels, double>> {
    return {{{}, 7}};
  });
  registry.AddGauge("broken", "A reader that cannot read now",
                    []() -> std::vector<std::pair<Labels, double>> { return {}; });
  const std::string expected =
      "# HELP broken A reader that cannot read now\n# TYPE broken gauge\n"
      "# HELP hits_total Hits\n# TYPE hits_total counter\nhits_total 7\n"
      "# HELP keys Keys by state\n# TYPE keys gauge\n"
      "keys{state=\"ENABLED\"} 2\nkeys{state=\"DISABLED\"} 0\n";
  CHECK(registry.Render() == expected);
  CHECK(registry.Render() == expected);
  CHECK(reads == 2);
}

TEST_CASE("Counts from many threads add up", "[metrics]") {
  Registry registry;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&registry] {
      for (int i = 0; i < 10000; ++i) {
        registry.GetCounter("c_total", "C", {{"t", "x"}}).Add();
        registry.GetHistogram("h_seconds", "H").Observe(0.001);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  CHECK(registry.GetCounter("c_total", "C", {{"t", "x"}}).value() == 40000);
  const Histogram::Snapshot h = registry.GetHistogram("h_seconds", "H").Read();
  CHECK(h.cumulative.back() == 40000);
  CHECK(h.sum == Approx(40.0));
}

}  // namespace
}  // namespace custos::metrics
