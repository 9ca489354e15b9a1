#include "server/health.h"

#include <spdlog/spdlog.h>

#include <string_view>
#include <utility>

#include "common/strings.h"

namespace custos::server {

using Clock = std::chrono::steady_clock;

// One probe on a long-lived thread of its own: the monitor asks for a run and waits for its
// answer as long as it likes, and a run that never returns costs this thread, not the monitor.
class ProbeThread {
 public:
  explicit ProbeThread(HealthProbe probe)
      : probe_(std::move(probe)), thread_([this] { RunWhenAsked(); }) {}
  // Waits for a run under way to return.
  ~ProbeThread() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  ProbeThread(const ProbeThread&) = delete;
  ProbeThread& operator=(const ProbeThread&) = delete;

  // Starts a run, unless the last one has not returned yet.
  void Begin() {
    std::lock_guard lock(mu_);
    if (running_) return;
    running_ = true;
    asked_ = true;
    started_ = Clock::now();
    cv_.notify_all();
  }

  // The run's answer if it comes by `deadline`, prefixed with the probe's name; otherwise
  // DEADLINE_EXCEEDED saying how long it has gone unanswered.
  absl::Status Await(Clock::time_point deadline) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_until(lock, deadline, [this] { return !running_; })) {
      const auto waited =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_);
      return absl::DeadlineExceededError(
          StrCat(probe_.name, ": no answer to the health probe for ", waited.count(), " ms"));
    }
    if (result_.ok()) return result_;
    return absl::Status(result_.code(), StrCat(probe_.name, ": ", result_.message()));
  }

  const std::string& name() const { return probe_.name; }

 private:
  void RunWhenAsked() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || asked_; });
      if (stop_) return;
      asked_ = false;
      lock.unlock();
      absl::Status result = probe_.run();
      lock.lock();
      result_ = std::move(result);
      running_ = false;
      cv_.notify_all();
    }
  }

  const HealthProbe probe_;
  std::mutex mu_;
  std::condition_variable cv_;  // both ways: a run asked for, a run returned
  bool stop_ = false;
  bool asked_ = false;
  bool running_ = false;
  Clock::time_point started_;
  absl::Status result_;
  std::thread thread_;  // last: started once the members above exist
};

HealthMonitor::HealthMonitor(Options options, grpc::HealthCheckServiceInterface* health,
                             std::vector<std::string> services)
    : options_(std::move(options)), health_(health), services_(std::move(services)) {}

HealthMonitor::~HealthMonitor() { Stop(); }

void HealthMonitor::Start() {
  for (const HealthProbe& probe : options_.probes) {
    probes_.push_back(std::make_unique<ProbeThread>(probe));
  }
  RunRound();
  thread_ = std::thread([this] {
    std::unique_lock lock(mu_);
    while (!cv_.wait_for(lock, options_.interval, [this] { return stop_; })) {
      lock.unlock();
      RunRound();
      lock.lock();
    }
  });
}

void HealthMonitor::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  probes_.clear();
}

absl::Status HealthMonitor::verdict() const {
  std::lock_guard lock(mu_);
  return verdict_;
}

void HealthMonitor::RunRound() {
  // The probes run side by side, under one deadline: a round takes at most probe_timeout.
  for (const auto& probe : probes_) probe->Begin();
  const Clock::time_point deadline = Clock::now() + options_.probe_timeout;
  std::string reasons, failing;
  auto add = [&](std::string_view name, std::string_view reason) {
    reasons += StrCat(reasons.empty() ? "" : "; ", reason);
    failing += StrCat(failing.empty() ? "" : ",", name);
  };
  if (options_.refusal) {
    if (const std::string refused = options_.refusal(); !refused.empty()) add("refusal", refused);
  }
  for (const auto& probe : probes_) {
    if (const absl::Status answer = probe->Await(deadline); !answer.ok()) {
      add(probe->name(), answer.ToString());
    }
  }
  Publish(failing.empty() ? absl::OkStatus() : absl::UnavailableError(reasons), failing);
}

void HealthMonitor::Publish(const absl::Status& verdict, const std::string& failing) {
  std::lock_guard lock(mu_);
  const bool serving = verdict.ok();
  if (published_ && verdict_.ok() == serving && failing == failing_) {
    verdict_ = verdict;  // the same state; the message may say more (how long a probe hangs)
    return;
  }
  health_->SetServingStatus("", serving);
  for (const std::string& service : services_) health_->SetServingStatus(service, serving);
  if (serving && published_) {
    spdlog::info("health: SERVING again");
  } else if (!serving) {
    spdlog::warn("health: NOT_SERVING: {}", std::string(verdict.message()));
  }
  published_ = true;
  verdict_ = verdict;
  failing_ = failing;
}

}  // namespace custos::server
