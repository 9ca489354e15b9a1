// Config: custosd's settings, read from a TOML file (see deploy/custosd.example.toml).
//
// Relative paths in the file resolve against the file's own folder, so a state folder can be
// moved as a whole. The HSM PIN comes from a file (pin_file) or an environment variable
// (pin_env), never from the config text itself.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "core/usage_tracker.h"
#include "policy/dual_control.h"

namespace custos::server {

struct Config {
  std::string listen = "127.0.0.1:7443";
  // gRPC server reflection (grpc.reflection.v1alpha), so that generic gRPC tools can list and
  // call the API; it describes the API only, to callers the CA vouches for, and is not audited.
  bool reflection = true;
  // Threads running calls' blocking work (they hand HSM calls to hsm.threads and lead audit
  // commits). Calls beyond them wait, in arrival order, up to max_waiting_calls; a call
  // arriving while that many wait is refused (RESOURCE_EXHAUSTED, logged and audited).
  int worker_threads = 16;
  // The same for officers' calls, and as many for auditors' (by the caller's role): lanes of
  // their own, so they never queue behind applications' calls, nor officers' behind
  // auditors'. Each lane has room for max_waiting_calls.
  int admin_worker_threads = 4;
  size_t max_waiting_calls = 4096;
  // Calls a second (bursts of one second's worth) from one peer address and from one
  // principal; beyond them RESOURCE_EXHAUSTED before the call queues, counted and audited.
  // 0 = no limit (the default).
  int rate_limit_per_peer = 0;
  int rate_limit_per_principal = 0;
  // Larger requests are refused inside gRPC (RESOURCE_EXHAUSTED). Enough for a batch of 1,000
  // Decrypt items with short contexts. Waiting calls hold their parsed requests, which can be
  // several times larger than on the wire (a batch of many empty items): keep
  // max_waiting_calls x max_message_bytes well inside the host's memory.
  size_t max_message_bytes = 256 * 1024;

  std::string tls_cert;
  std::string tls_key;
  std::string client_ca;
  std::string crl_dir;  // optional: a folder of CRLs (PEM, hashed names) of the client CA
  // Every connection is closed after this long (gRPC adds +-10% jitter): a backstop, so that
  // no handshake is relied on forever. Calls are still checked one by one for expiry and
  // revocation (server/peer_identity.h). 1..86400.
  int max_connection_age_seconds = 3600;

  std::string hsm_module;
  std::string hsm_token_label;
  std::string hsm_pin_file;
  std::string hsm_pin_env;
  std::string root_key_label = "custos-root";
  std::string audit_hmac_key_label = "custos-audit-hmac";        // HMACs of contexts
  std::string audit_signing_key_label = "custos-audit-signing";  // checkpoint signatures
  std::string catalog_hmac_key_label = "custos-catalog-hmac";    // MACs of catalogue rows
  std::string audit_head_label = "custos-audit-head";  // data object: last signed log head
  std::string instance_label = "custos-instance";      // data object: this server's claim
  size_t key_cache_capacity = 4096;
  // Every HSM call is answered within hsm.call_timeout_ms (100..60000), UNAVAILABLE if the
  // module has not answered; up to hsm.max_stuck_calls (0..1024) calls stuck inside the module
  // are replaced by fresh threads and sessions at once; a call still stuck after
  // hsm.hang_limit_ms (0 = never, else at least call_timeout_ms) makes custosd exit (code 70)
  // so that its supervisor restarts it. See hsm/call_executor.h.
  int hsm_call_timeout_ms = 2000;
  // HSM calls under way at once (1..1024): the threads that call the module, and its pooled
  // sessions. Each worker waits for its own HSM call, so beyond worker_threads + 2 x
  // admin_worker_threads (and a few for background tasks: health probes, checkpoints) threads
  // stay idle; fewer suit a module that limits its sessions. See docs/PERFORMANCE.md, "HSM
  // threads".
  int hsm_threads = 16;
  int hsm_max_stuck_calls = 8;
  int64_t hsm_hang_limit_ms = 60000;
  // One server per token (hsm/token_lease.h): a claim unrenewed for hsm.instance_lease_ms
  // (1000..600000, at least 2.5 * hsm.call_timeout_ms, since it is renewed every lease / 5;
  // unset, max(5000, 2.5 * call_timeout_ms)) may be taken over by a server starting; one
  // renewed meanwhile stops it. The wait at a start after a crash.
  int64_t hsm_instance_lease_ms = 5000;

  std::string storage_path;
  // [storage] wal_warn_mb (16..1048576; SQLite checkpoints at about 4 MiB): a WAL past this size (a
  // reader holding a transaction open keeps checkpoints from reaching its end) is warned about;
  // once it starts over it is cut back to min(64, wal_warn_mb / 2) MiB. See
  // storage::KeyStore::WarnWalAbove.
  int64_t wal_warn_mb = 256;
  // [audit] archive_dir: where ArchiveAuditLog writes archive files; default: audit-archive
  // beside the database.
  std::string audit_archive_dir;
  std::string policy_file;
  std::string log_level = "info";  // trace, debug, info, warn, error, critical
  // [log] format: "text" (spdlog's usual lines) or "json" (one JSON object per line).
  std::string log_format = "text";
  // [log] audit_mirror: also write each committed audit record to the operator's log, one line
  // per record (the audit log in the database is the record either way). Off by default: it
  // costs every call a formatted line on the request path.
  bool audit_mirror = false;

  // [dual_control]: request_ttl_hours, deletion_waiting_days, and [dual_control.approvals]
  // with one entry per operation name (e.g. RotateKey = 2) overriding the defaults.
  policy::DualControlConfig dual_control = policy::DualControlConfig::Defaults();
  int maintenance_interval_seconds = 60;  // request expiry and due destructions
  // grpc.health.v1 (server/health.h): the HSM and the key database are probed every
  // health_interval_ms (100..60000); a probe with no answer within health_probe_timeout_ms
  // (100..60000) counts as failed, and custosd then answers NOT_SERVING.
  int health_interval_ms = 1000;
  int health_probe_timeout_ms = 2000;

  // [audit]: a signed checkpoint every checkpoint_interval_seconds, and as soon as
  // checkpoint_every records were added since the last one.
  int checkpoint_interval_seconds = 60;
  uint64_t checkpoint_every = 1000;
  // At start-up, recompute the whole chain rather than from the HSM's last signed head.
  bool verify_full_chain_at_start = false;
  // Auditors' streams (ReadRecords, ReadCheckpoints) open at once (1..1024); when that many
  // are open, a stream whose client has read nothing for stream_stall_seconds (1..3600) is
  // cancelled to make room for a new one.
  int audit_max_streams = 16;
  int audit_stream_stall_seconds = 30;
  // Encryption contexts whose audit HMAC is kept in memory (core/context_mac_cache.h); 0 = none.
  int64_t context_hmac_cache = 65536;

  // [keys]: the AES-GCM encryption limit per key version and when to rotate before it.
  core::UsageLimits usage_limits;

  // [gateway]: the key/value gateway databases fetch table-space keys from (docs/TDE.md):
  // host:port of its HTTPS listener, with tls.cert and tls.key; empty = off (the default).
  std::string gateway_listen;
  // Connections from one client address (IPv4, or an IPv6 /64) the gateway serves at once
  // while all its threads are busy; 0 = no such limit (behind a proxy that hides clients).
  int64_t gateway_connections_per_address = 8;

  // [metrics] listen: host:port of the Prometheus endpoint (GET /metrics, plain HTTP), on a
  // loopback address only; empty = off (the default).
  std::string metrics_listen;
};

// True for the loopback hosts the metrics endpoint may listen on: 127.0.0.0/8, ::1, localhost.
bool IsLoopbackHost(std::string_view host);

// A listen setting's host (an IPv6 one without its brackets) and port (0: chosen at start).
struct ListenAddress {
  std::string host;
  int port = 0;
};
// "host:port", the host a name, an IPv4 address or an IPv6 one in brackets ("[::]:8200", as
// gRPC's listen takes it) or bare ("::1:8200", split at the last colon); nullopt otherwise.
std::optional<ListenAddress> ParseListen(std::string_view listen);

// INVALID_ARGUMENT naming the key at fault; NOT_FOUND if the file cannot be read.
absl::StatusOr<Config> LoadConfig(const std::string& path);

// Reads the PIN from pin_file (trailing newline dropped) or pin_env; NOT_FOUND if neither
// yields one. A pin_file readable by group or others is refused (PERMISSION_DENIED).
absl::StatusOr<SecureBytes> ReadHsmPin(const Config& config);

}  // namespace custos::server
