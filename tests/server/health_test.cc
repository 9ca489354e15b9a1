#include "server/health.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace custos::server {
namespace {

using namespace std::chrono_literals;

// What gRPC's health service would answer, by service name.
class RecordedHealth : public grpc::HealthCheckServiceInterface {
 public:
  void SetServingStatus(const std::string& service, bool serving) override {
    std::lock_guard lock(mu_);
    serving_[service] = serving;
  }
  void SetServingStatus(bool serving) override {
    std::lock_guard lock(mu_);
    for (auto& [service, status] : serving_) status = serving;
  }
  // 1 SERVING, 0 NOT_SERVING, -1 never set.
  int Status(const std::string& service) const {
    std::lock_guard lock(mu_);
    const auto it = serving_.find(service);
    return it == serving_.end() ? -1 : (it->second ? 1 : 0);
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, bool> serving_;
};

// A probe whose answer the test sets, and which can be made to hang until released.
class ScriptedProbe {
 public:
  HealthProbe Probe(const std::string& name) {
    return {name, [this] {
              std::unique_lock lock(mu_);
              ++runs_;
              cv_.wait(lock, [this] { return !hang_; });
              return answer_;
            }};
  }
  void Answer(absl::Status answer) {
    std::lock_guard lock(mu_);
    answer_ = std::move(answer);
  }
  void Hang(bool hang) {
    {
      std::lock_guard lock(mu_);
      hang_ = hang;
    }
    cv_.notify_all();
  }
  int runs() {
    std::lock_guard lock(mu_);
    return runs_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  absl::Status answer_;
  bool hang_ = false;
  int runs_ = 0;
};

// True once `done` holds, polling for up to 10 s.
bool Eventually(const std::function<bool()>& done) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

constexpr char kService[] = "custos.v1.KeyService";

struct Fixture {
  RecordedHealth health;
  ScriptedProbe hsm;
  ScriptedProbe store;
  std::atomic<bool> refuse{false};
  HealthMonitor monitor{
      HealthMonitor::Options{
          .interval = 20ms,
          .probe_timeout = 200ms,
          .probes = {hsm.Probe("HSM"), store.Probe("key database")},
          .refusal = [this]() -> std::string { return refuse ? "log awaits re-anchoring" : ""; }},
      &health,
      {kService}};
  bool Serving() { return health.Status("") == 1 && health.Status(kService) == 1; }
  bool NotServing() { return health.Status("") == 0 && health.Status(kService) == 0; }
};

TEST_CASE("Healthy probes are SERVING from the moment Start returns", "[health]") {
  Fixture f;
  f.monitor.Start();
  CHECK(f.Serving());
  CHECK(f.monitor.verdict().ok());
}

TEST_CASE("A failing probe is NOT_SERVING, naming it, until it passes again", "[health]") {
  Fixture f;
  f.monitor.Start();
  f.store.Answer(absl::UnavailableError("database is locked"));
  REQUIRE(Eventually([&] { return f.NotServing(); }));
  CHECK(f.monitor.verdict().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(f.monitor.verdict().message()),
             Catch::Contains("key database: database is locked"));
  f.store.Answer(absl::OkStatus());
  REQUIRE(Eventually([&] { return f.Serving(); }));
}

TEST_CASE("A probe that hangs is NOT_SERVING after the probe timeout, and never run twice",
          "[health]") {
  Fixture f;
  f.monitor.Start();
  const int runs_before = f.hsm.runs();
  f.hsm.Hang(true);
  REQUIRE(Eventually([&] { return f.NotServing(); }));
  CHECK_THAT(std::string(f.monitor.verdict().message()),
             Catch::Contains("HSM: no answer to the health probe for "));
  // Several more rounds while it hangs: none starts a second run.
  std::this_thread::sleep_for(300ms);
  CHECK(f.hsm.runs() - runs_before <= 1);
  CHECK(f.NotServing());
  f.hsm.Hang(false);
  REQUIRE(Eventually([&] { return f.Serving(); }));
  CHECK(Eventually([&] { return f.hsm.runs() - runs_before >= 2; }));  // rounds go on
}

TEST_CASE("A refusal is NOT_SERVING whatever the probes say", "[health]") {
  Fixture f;
  f.refuse = true;
  f.monitor.Start();
  CHECK(f.NotServing());
  CHECK_THAT(std::string(f.monitor.verdict().message()),
             Catch::Contains("log awaits re-anchoring"));
  f.refuse = false;
  REQUIRE(Eventually([&] { return f.Serving(); }));
}

TEST_CASE("Stop ends the rounds; the statuses stay as they were", "[health]") {
  Fixture f;
  f.monitor.Start();
  f.monitor.Stop();
  const int runs = f.hsm.runs();
  f.hsm.Answer(absl::UnavailableError("gone"));
  std::this_thread::sleep_for(100ms);
  CHECK(f.hsm.runs() == runs);
  CHECK(f.Serving());
}

}  // namespace
}  // namespace custos::server
