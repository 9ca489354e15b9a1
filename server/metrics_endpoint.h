// custosd's metrics: GET /metrics in Prometheus's text format (common/metrics.h), over plain
// HTTP on a loopback address only ([metrics] listen, off by default), served by cpp-httplib on
// two threads of its own. What it shows is listed in docs/OPERATIONS.md ("Metrics"): counts,
// latencies and sizes, never a key, a context value or a principal.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "common/clock.h"
#include "common/metrics.h"
#include "common/status.h"
#include "core/kms.h"
#include "storage/key_store.h"

namespace httplib {
class Server;
}

namespace custos::server {

class CallRunner;

class MetricsEndpoint {
 public:
  // Serves `registry` on `listen` ("host:port", port 0 picks one; the host must be loopback).
  // INVALID_ARGUMENT for a bad address, UNAVAILABLE if it cannot listen.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(const metrics::Registry* registry,
                                                                const std::string& listen);
  ~MetricsEndpoint();  // stops listening and waits for the scrapes under way
  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

// Adds the metrics read at each scrape: keys by state, pending requests, the audit log's length
// and the database's size on disk, the age of the last signed checkpoint, the context HMAC
// cache's hits and misses, and the calls waiting or turned away by `runner`. Everything passed must
// outlive the registry's last Render.
void AddServerGauges(metrics::Registry& registry, const storage::KeyStore& store,
                     const core::Kms& kms, const std::string& db_path, const CallRunner& runner,
                     const Clock& clock);

}  // namespace custos::server
