// LoadConfig over arbitrary file contents. It reads a path, so each input is written to an
// in-memory file (memfd) and loaded through /proc/self/fd. Nothing may escape as an exception or
// a sanitizer report, every failure is INVALID_ARGUMENT, and a config that loads keeps every
// documented bound (server/config.h): whatever the file says, nothing out of range gets in.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_check.h"
#include "server/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custos;
  static const int fd = memfd_create("custos-config-fuzz.toml", 0);
  FUZZ_CHECK(fd >= 0);
  FUZZ_CHECK(ftruncate(fd, 0) == 0);
  FUZZ_CHECK(pwrite(fd, data, size, 0) == static_cast<ssize_t>(size));
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);

  const absl::StatusOr<server::Config> config = server::LoadConfig(path);
  if (!config.ok()) {
    FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  const server::Config& c = *config;
  FUZZ_CHECK(c.worker_threads >= 1 && c.worker_threads <= 1024);
  FUZZ_CHECK(c.admin_worker_threads >= 1 && c.admin_worker_threads <= 64);
  FUZZ_CHECK(c.max_waiting_calls >= 1 && c.max_waiting_calls <= 1'000'000);
  FUZZ_CHECK(c.rate_limit_per_peer >= 0 && c.rate_limit_per_peer <= 1'000'000);
  FUZZ_CHECK(c.rate_limit_per_principal >= 0 && c.rate_limit_per_principal <= 1'000'000);
  FUZZ_CHECK(c.max_message_bytes >= 4096 && c.max_message_bytes <= 16 * 1024 * 1024);
  FUZZ_CHECK(c.max_connection_age_seconds >= 1 && c.max_connection_age_seconds <= 86400);
  FUZZ_CHECK(c.key_cache_capacity >= 1);
  FUZZ_CHECK(c.maintenance_interval_seconds >= 1 && c.maintenance_interval_seconds <= 3600);
  FUZZ_CHECK(c.health_interval_ms >= 100 && c.health_interval_ms <= 60000);
  FUZZ_CHECK(c.health_probe_timeout_ms >= 100 && c.health_probe_timeout_ms <= 60000);
  FUZZ_CHECK(c.checkpoint_interval_seconds >= 1 && c.checkpoint_interval_seconds <= 86400);
  FUZZ_CHECK(c.checkpoint_every >= 1 && c.checkpoint_every <= 1'000'000);
  FUZZ_CHECK(c.context_hmac_cache >= 0 && c.context_hmac_cache <= 10'000'000);
  FUZZ_CHECK(c.usage_limits.max_encryptions >= 1 &&
             c.usage_limits.max_encryptions <= (uint64_t{1} << 32));
  FUZZ_CHECK(c.usage_limits.rotate_at <= c.usage_limits.max_encryptions);
  FUZZ_CHECK(c.usage_limits.reservation_block >= 1);
  // Dual control never fails open.
  FUZZ_CHECK(c.dual_control.Validate().ok());
  for (policy::Operation operation : policy::kAllOperations) {
    FUZZ_CHECK(c.dual_control.approvals.count(operation) == 1);
    if (operation != policy::Operation::kCreateKey) {
      FUZZ_CHECK(c.dual_control.ApprovalsFor(operation) >= 1);
    }
  }
  FUZZ_CHECK(!c.tls_cert.empty() && !c.tls_key.empty() && !c.client_ca.empty());
  FUZZ_CHECK(!c.hsm_module.empty() && !c.hsm_token_label.empty());
  FUZZ_CHECK(!c.storage_path.empty() && !c.policy_file.empty());
  FUZZ_CHECK(c.hsm_pin_file.empty() != c.hsm_pin_env.empty());
  FUZZ_CHECK(c.dual_control.Summary().size() > 0);
  return 0;
}
