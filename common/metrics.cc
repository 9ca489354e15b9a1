#include "common/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace custos::metrics {
namespace {

// A label value as the text format wants it: backslash, double quote and newline escaped.
std::string Escaped(std::string_view value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// {a="x",b="y"} with `extra` (le="...") last; "" for no labels.
std::string LabelText(const Labels& labels, const std::pair<std::string, std::string>* extra) {
  if (labels.empty() && extra == nullptr) return "";
  std::string out = "{";
  for (const auto& [name, value] : labels) out += name + "=\"" + Escaped(value) + "\",";
  if (extra != nullptr) out += extra->first + "=\"" + extra->second + "\",";
  out.back() = '}';
  return out;
}

std::string Number(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (std::isnan(value)) return "NaN";
  char text[32];
  std::snprintf(text, sizeof(text), "%.17g", value);
  return text;
}

}  // namespace

Histogram::Histogram(std::span<const double> bounds)
    : bounds_(bounds.begin(), bounds.end()),
      buckets_(std::make_unique<std::atomic<uint64_t>[]>(bounds.size() + 1)) {}

void Histogram::Observe(double value) {
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot snapshot;
  snapshot.bounds = bounds_;
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    total += buckets_[i].load(std::memory_order_relaxed);
    snapshot.cumulative.push_back(total);
  }
  snapshot.sum = sum_.load(std::memory_order_relaxed);
  return snapshot;
}

Registry::Family& Registry::FamilyOf(std::string_view name, std::string_view help,
                                     std::string_view type) {
  auto it = families_.find(name);
  if (it == families_.end()) {
    it = families_.emplace(std::string(name), Family{}).first;
    it->second.help = help;
    it->second.type = type;
  }
  return it->second;
}

Counter& Registry::GetCounter(std::string_view name, std::string_view help, const Labels& labels) {
  std::lock_guard lock(mu_);
  std::unique_ptr<Counter>& counter = FamilyOf(name, help, "counter").counters[labels];
  if (!counter) counter = std::make_unique<Counter>();
  return *counter;
}

Histogram& Registry::GetHistogram(std::string_view name, std::string_view help,
                                  const Labels& labels, std::span<const double> bounds) {
  std::lock_guard lock(mu_);
  std::unique_ptr<Histogram>& histogram = FamilyOf(name, help, "histogram").histograms[labels];
  if (!histogram) histogram = std::make_unique<Histogram>(bounds);
  return *histogram;
}

void Registry::AddGauge(std::string_view name, std::string_view help, GaugeReader read) {
  std::lock_guard lock(mu_);
  FamilyOf(name, help, "gauge").read = std::move(read);
}

void Registry::AddCounterReader(std::string_view name, std::string_view help, GaugeReader read) {
  std::lock_guard lock(mu_);
  FamilyOf(name, help, "counter").read = std::move(read);
}

std::string Registry::Render() const {
  // Readers run outside the lock: one may take a while (a database query) and must not hold
  // up the calls that count.
  struct Read {
    std::string name, help, type;
    GaugeReader read;
  };
  std::vector<Read> reads;
  std::string out;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, family] : families_) {
      if (family.read) {
        reads.push_back({name, family.help, family.type, family.read});
        continue;
      }
      out.append("# HELP ").append(name).append(" ").append(family.help);
      out.append("\n# TYPE ").append(name).append(" ").append(family.type).append("\n");
      for (const auto& [labels, counter] : family.counters) {
        out += name + LabelText(labels, nullptr) + " " + std::to_string(counter->value()) + "\n";
      }
      for (const auto& [labels, histogram] : family.histograms) {
        const Histogram::Snapshot s = histogram->Read();
        for (size_t i = 0; i < s.cumulative.size(); ++i) {
          const std::pair<std::string, std::string> le{
              "le", i < s.bounds.size() ? Number(s.bounds[i]) : "+Inf"};
          out += name + "_bucket" + LabelText(labels, &le) + " " + std::to_string(s.cumulative[i]) +
                 "\n";
        }
        out += name + "_sum" + LabelText(labels, nullptr) + " " + Number(s.sum) + "\n";
        out += name + "_count" + LabelText(labels, nullptr) + " " +
               std::to_string(s.cumulative.back()) + "\n";
      }
    }
  }
  for (const Read& r : reads) {
    out += "# HELP " + r.name + " " + r.help + "\n# TYPE " + r.name + " " + r.type + "\n";
    for (const auto& [labels, value] : r.read()) {
      out += r.name + LabelText(labels, nullptr) + " " + Number(value) + "\n";
    }
  }
  return out;
}

}  // namespace custos::metrics
