// HealthMonitor: keeps what grpc.health.v1 answers about custosd true.
//
// gRPC's default health service says SERVING for as long as the process listens. A load
// balancer needs more: whether a call sent here now could succeed. Every `interval` the monitor
// runs its probes (custosd: the HSM answers a cheap call, the key database can commit) and asks
// whether serving is refused outright (the audit log awaits re-anchoring). While every probe
// passes and nothing is refused, the whole server ("") and each named service are SERVING;
// otherwise all of them are NOT_SERVING. A change is logged once: a warning with the reason when
// serving stops (again if the reason moves to another probe), an info line when it resumes.
//
// A probe may block for good (a PKCS#11 call cannot be cancelled; a store waits on a lock), so
// each one runs on a thread of its own and the monitor waits for it at most `probe_timeout`:
// no answer by then is a failure. While a probe still hangs, no second one starts: each round
// waits for the one under way (again at most `probe_timeout`) and fails, saying how long it has
// gone unanswered, until it returns.
//
// Health checks are not audited: they change nothing and name no key.
#pragma once

#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace custos::server {

struct HealthProbe {
  std::string name;                   // for the log: "HSM", "key database"
  std::function<absl::Status()> run;  // OK if healthy; may block
};

class ProbeThread;  // health.cc

class HealthMonitor {
 public:
  struct Options {
    std::chrono::milliseconds interval{1000};
    std::chrono::milliseconds probe_timeout{2000};
    std::vector<HealthProbe> probes;
    // Non-empty while the server must not be sent calls whatever the probes say: why.
    std::function<std::string()> refusal;
  };

  // Publishes to `health` (which must outlive the monitor) under "" and each of `services`.
  HealthMonitor(Options options, grpc::HealthCheckServiceInterface* health,
                std::vector<std::string> services);
  // Stop().
  ~HealthMonitor();
  HealthMonitor(const HealthMonitor&) = delete;
  HealthMonitor& operator=(const HealthMonitor&) = delete;

  // Runs the first round of probes before it returns, so the first answer is already true,
  // then one every `interval` on a thread of its own.
  void Start();
  // Ends the monitor's thread and its probes'. Waits for a probe still running: one hung in
  // the HSM keeps Stop from returning until the call does. The statuses stay as they were
  // (HealthCheckServiceInterface::Shutdown is what marks a stopping server NOT_SERVING).
  void Stop();

  // OK while serving; otherwise why not. Set by the last round.
  absl::Status verdict() const;

 private:
  void RunRound();
  void Publish(const absl::Status& verdict, const std::string& failing);

  const Options options_;
  grpc::HealthCheckServiceInterface* const health_;
  const std::vector<std::string> services_;
  std::vector<std::unique_ptr<ProbeThread>> probes_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;                        // guarded by mu_
  absl::Status verdict_ = absl::OkStatus();  // guarded by mu_
  bool published_ = false;                   // guarded by mu_: a verdict was published
  std::string failing_;                      // guarded by mu_: what the last warning named
  std::thread thread_;
};

}  // namespace custos::server
