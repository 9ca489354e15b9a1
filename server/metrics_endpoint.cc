#include "server/metrics_endpoint.h"

#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <atomic>

#include "common/strings.h"
#include "server/config.h"
#include "server/services.h"

namespace custos::server {
namespace {

using Samples = std::vector<std::pair<metrics::Labels, double>>;

uint64_t FileBytes(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const metrics::Registry* registry, const std::string& listen) {
  const std::optional<ListenAddress> address = ParseListen(listen);
  if (!address || !IsLoopbackHost(address->host)) {
    return absl::InvalidArgumentError(
        StrCat("config: metrics.listen must be a loopback host:port, not '", listen, "'"));
  }
  const auto& [host, port] = *address;
  auto endpoint = std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint());
  endpoint->server_ = std::make_unique<httplib::Server>();
  httplib::Server& server = *endpoint->server_;
  server.new_task_queue = [] { return new httplib::ThreadPool(2); };
  server.set_read_timeout(2, 0);
  server.set_write_timeout(2, 0);
  server.set_keep_alive_max_count(1);
  server.set_payload_max_length(1024);
  server.set_exception_handler([](const httplib::Request&, httplib::Response& response,
                                  const std::exception_ptr&) { response.status = 500; });
  server.Get("/metrics", [registry](const httplib::Request&, httplib::Response& response) {
    response.set_content(registry->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  endpoint->port_ =
      port == 0 ? server.bind_to_any_port(host) : (server.bind_to_port(host, port) ? port : -1);
  if (endpoint->port_ <= 0) {
    return absl::UnavailableError(StrCat("metrics: cannot listen on ", listen));
  }
  auto ended = std::make_shared<std::atomic<bool>>(false);
  endpoint->thread_ = std::thread([&server, listen, ended] {
    if (!server.listen_after_bind()) {
      spdlog::error("metrics endpoint on {}: accepting connections failed", listen);
    }
    *ended = true;
  });
  // Running before it is returned: stop() does nothing to a server that is not running yet.
  while (!server.is_running() && !*ended) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (*ended) {
    endpoint->thread_.join();
    return absl::UnavailableError(StrCat("metrics: cannot serve on ", listen));
  }
  return endpoint;
}

MetricsEndpoint::~MetricsEndpoint() {
  if (!server_) return;
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

void AddServerGauges(metrics::Registry& registry, const storage::KeyStore& store,
                     const core::Kms& kms, const std::string& db_path, const CallRunner& runner,
                     const Clock& clock) {
  registry.AddCounterReader(
      "custos_context_hmac_cache_lookups_total",
      "Encryption contexts whose audit HMAC was found in memory, or had to be computed",
      [&kms]() -> Samples {
        const auto [hits, misses] = kms.ContextHmacCacheCounts();
        return {{{{"result", "hit"}}, static_cast<double>(hits)},
                {{{"result", "miss"}}, static_cast<double>(misses)}};
      });
  registry.AddGauge("custos_usage_tracked_keys",
                    "Keys whose usage counters are in memory (bounded by keys.usage_cache)",
                    [&kms]() -> Samples {
                      return {{{}, static_cast<double>(kms.UsageTrackedKeys())}};
                    });
  registry.AddGauge("custos_keys", "Keys in the catalogue, by state", [&store]() -> Samples {
    const auto counts = store.CountKeysByState();
    if (!counts.ok()) return {};
    Samples samples;
    for (const auto& [state, count] : *counts) {
      samples.push_back(
          {{{"state", std::string(storage::KeyStateName(state))}}, static_cast<double>(count)});
    }
    return samples;
  });
  registry.AddGauge("custos_pending_requests", "Dual-control requests awaiting approval",
                    [&store]() -> Samples {
                      const auto pending = store.PendingRequests();
                      if (!pending.ok()) return {};
                      return {{{}, static_cast<double>(pending->size())}};
                    });
  registry.AddGauge("custos_audit_records", "Records in the audit log (the last seq)",
                    [&store]() -> Samples {
                      const auto head = store.AuditHead();
                      if (!head.ok()) return {};
                      return {{{}, static_cast<double>(head->first)}};
                    });
  registry.AddGauge("custos_audit_archived_through",
                    "The last record archived out of the live database (0: none); the live log "
                    "holds the records after it",
                    [&store]() -> Samples {
                      const auto floor = store.AuditLogFloor();
                      if (!floor.ok()) return {};
                      return {{{}, static_cast<double>(floor->seq)}};
                    });
  registry.AddGauge(
      "custos_database_bytes", "Size on disk of the key database and its write-ahead log, by file",
      [db_path]() -> Samples {
        return {{{{"file", "db"}}, static_cast<double>(FileBytes(db_path))},
                {{{"file", "wal"}}, static_cast<double>(FileBytes(db_path + "-wal"))}};
      });
  registry.AddGauge("custos_audit_checkpoint_age_seconds",
                    "Seconds since the last signed checkpoint of the audit log",
                    [&store, &clock]() -> Samples {
                      const auto latest = store.LatestCheckpoint();
                      if (!latest.ok() || !latest->has_value()) return {};
                      return {{{}, static_cast<double>(clock.NowSeconds() - (*latest)->time)}};
                    });
  registry.AddGauge(
      "custos_calls_waiting", "Calls waiting for a worker, by lane", [&runner]() -> Samples {
        using Lane = CallRunner::Lane;
        return {{{{"lane", "data"}}, static_cast<double>(runner.waiting(Lane::kData))},
                {{{"lane", "officer"}}, static_cast<double>(runner.waiting(Lane::kOfficer))},
                {{{"lane", "auditor"}}, static_cast<double>(runner.waiting(Lane::kAuditor))}};
      });
  registry.AddCounterReader(
      "custos_calls_turned_away_total",
      "Calls never run: the queue was full, a rate limit, or abandoned by their clients first",
      [&runner]() -> Samples {
        const CallRunner::Counts counts = runner.counts();
        return {{{{"reason", "queue_full"}}, static_cast<double>(counts.refused)},
                {{{"reason", "rate_limited"}}, static_cast<double>(counts.rate_limited)},
                {{{"reason", "abandoned"}}, static_cast<double>(counts.abandoned)}};
      });
}

}  // namespace custos::server
