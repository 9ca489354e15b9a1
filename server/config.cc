#include "server/config.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

#include <toml++/toml.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <type_traits>

#include "common/strings.h"
#include "common/toml_text.h"

namespace custos::server {
namespace {

namespace fs = std::filesystem;

std::string Resolve(const fs::path& base, const std::string& value) {
  if (value.empty()) return value;
  fs::path p(value);
  return p.is_absolute() ? value : (base / p).lexically_normal().string();
}

// `node` as a T. Whole-number settings take TOML integers only: toml++ 3.3.0 would convert a
// float, and its cast of one beyond the int64 range (1e300) is undefined behaviour.
template <typename T>
std::optional<T> ValueOf(const toml::node& node) {
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    if (!node.is_integer()) return std::nullopt;
  }
  return node.value<T>();
}

// Reads settings from the parsed file and remembers which were asked for, so that a
// misspelt setting is refused instead of silently left at its default.
class SettingsReader {
 public:
  explicit SettingsReader(const toml::table& root) : root_(root) {}

  // Copies [section] key into *out if present; INVALID_ARGUMENT if it has the wrong type.
  template <typename T>
  absl::Status Read(std::string_view section, std::string_view key, T* out) {
    known_.emplace(section, key);
    const toml::node_view<const toml::node> node = root_[section][key];
    if (!node) return absl::OkStatus();
    std::optional<T> value = ValueOf<T>(*node.node());
    if (!value) {
      return absl::InvalidArgumentError(
          StrCat("config: ", section, ".", key, " has the wrong type"));
    }
    *out = *value;
    return absl::OkStatus();
  }

  // INVALID_ARGUMENT naming a setting no Read asked for, in any section but `checked_elsewhere`.
  absl::Status RefuseUnknown(std::string_view checked_elsewhere) const {
    for (const auto& [section, table] : root_) {
      if (section.str() == checked_elsewhere || !table.is_table()) continue;
      for (const auto& [key, value] : *table.as_table()) {
        if (!known_.count({std::string(section.str()), std::string(key.str())})) {
          return absl::InvalidArgumentError(
              StrCat("config: unknown setting ", section.str(), ".", key.str()));
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  const toml::table& root_;
  std::set<std::pair<std::string, std::string>> known_;
};

absl::Status Require(const std::string& value, std::string_view name) {
  if (!value.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(StrCat("config: ", name, " is required"));
}

// Validate()'s "dual_control: setting ..." as "config: dual_control.setting ...", which Located
// then finds in the file.
absl::Status AsSetting(const absl::Status& status) {
  constexpr std::string_view kPrefix = "dual_control: ";
  const std::string message(status.message());
  if (status.ok() || message.rfind(kPrefix, 0) != 0) return status;
  return absl::Status(status.code(),
                      StrCat("config: dual_control.", message.substr(kPrefix.size())));
}

// [dual_control] over the defaults; Validate() then rejects anything that fails open.
absl::Status ReadDualControl(const toml::table& root, policy::DualControlConfig* out) {
  const toml::table* section = root["dual_control"].as_table();
  if (section == nullptr) return AsSetting(out->Validate());
  // default_approvals first, so that per-operation entries override it wherever they stand.
  if (const toml::node* fallback = section->get("default_approvals")) {
    const std::optional<int64_t> value = ValueOf<int64_t>(*fallback);
    if (!value || *value < -1'000'000 || *value > 1'000'000) {
      return absl::InvalidArgumentError(
          "config: dual_control.default_approvals must be a whole number");
    }
    for (policy::Operation operation : policy::kAllOperations) {
      if (operation != policy::Operation::kCreateKey) {
        out->approvals[operation] = static_cast<int>(*value);
      }
    }
  }
  for (const auto& [name, node] : *section) {
    const std::string_view key = name.str();
    if (key == "default_approvals") continue;
    if (key == "approvals") {
      const toml::table* approvals = node.as_table();
      if (approvals == nullptr) {
        return absl::InvalidArgumentError("config: dual_control.approvals must be a table");
      }
      for (const auto& [op_name, count] : *approvals) {
        const std::optional<policy::Operation> operation = policy::ParseOperation(op_name.str());
        const std::optional<int64_t> value = ValueOf<int64_t>(count);
        if (!operation) {
          return absl::InvalidArgumentError(
              StrCat("config: dual_control.approvals.", op_name.str(), " is not an operation"));
        }
        if (!value || *value < -1'000'000 || *value > 1'000'000) {
          return absl::InvalidArgumentError(
              StrCat("config: dual_control.approvals.", op_name.str(), " must be a whole number"));
        }
        out->approvals[*operation] = static_cast<int>(*value);
      }
    } else if (key == "request_ttl_hours" || key == "deletion_waiting_days") {
      const std::optional<int64_t> value = ValueOf<int64_t>(node);
      // Bounded before scaling to seconds, so a huge value cannot wrap into the valid range.
      if (!value || *value < -1'000'000 || *value > 1'000'000) {
        return absl::InvalidArgumentError(
            StrCat("config: dual_control.", key, " must be a whole number"));
      }
      if (key == "request_ttl_hours") {
        out->request_ttl_seconds = *value * 3600;
      } else {
        out->deletion_waiting_seconds = *value * policy::kDay;
      }
    } else {
      return absl::InvalidArgumentError(StrCat("config: unknown setting dual_control.", key));
    }
  }
  return AsSetting(out->Validate());
}

// `status` ("config: [unknown setting ]section.key ...") located: "config FILE:LINE: ..." with
// the line of the setting at fault, or "config FILE: ..." when it is absent from the file.
absl::Status Located(const absl::Status& status, const std::string& path, const toml::table& root) {
  const std::string text(status.message());
  constexpr std::string_view kPrefix = "config: ";
  if (status.ok() || text.rfind(kPrefix, 0) != 0) return status;
  const std::string_view message = std::string_view(text).substr(kPrefix.size());
  std::string_view name = message;
  for (std::string_view lead : {"unknown setting ", "set exactly one of "}) {
    if (name.substr(0, lead.size()) == lead) name.remove_prefix(lead.size());
  }
  name = name.substr(0, name.find_first_of(" '"));
  std::string where = path;
  if (const toml::node_view<const toml::node> node = root.at_path(name); node) {
    where = StrCat(path, ":", node.node()->source().begin.line);
  }
  return absl::Status(status.code(), StrCat("config ", where, ": ", message));
}

absl::StatusOr<Config> ReadConfig(const toml::table& root, const std::string& path);

}  // namespace

bool IsLoopbackHost(std::string_view host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

std::optional<ListenAddress> ParseListen(std::string_view listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return std::nullopt;
  const std::string_view port = listen.substr(colon + 1);
  ListenAddress address;
  const char* end = port.data() + port.size();
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != port.npos ||
      std::from_chars(port.data(), end, address.port).ptr != end || address.port > 65535) {
    return std::nullopt;
  }
  std::string_view host = listen.substr(0, colon);
  if (host.front() == '[') {
    if (host.size() < 4 || host.back() != ']') return std::nullopt;
    host = host.substr(1, host.size() - 2);
    if (host.find(':') == std::string_view::npos) return std::nullopt;  // "[name]"
  }
  if (host.find_first_of("[]") != std::string_view::npos) return std::nullopt;
  address.host = std::string(host);
  // A host with a colon is an IPv6 address (with a zone, "fe80::1%eth0", or without), bare or
  // bracketed: "::8200" is not host ":".
  const size_t zone = address.host.find('%');
  if (zone != std::string::npos &&
      (address.host.find(':') == std::string::npos || zone + 1 == address.host.size())) {
    return std::nullopt;  // a zone belongs to an IPv6 address, and has a name
  }
  const std::string address_part = address.host.substr(0, zone);
  in6_addr parsed;
  if (address.host.find(':') != std::string::npos &&
      inet_pton(AF_INET6, address_part.c_str(), &parsed) != 1) {
    return std::nullopt;
  }
  return address;
}

absl::StatusOr<Config> LoadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(StrCat("cannot read config file ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (const size_t line = TomlUnsafeLine(text.str()); line != 0) {
    return absl::InvalidArgumentError(StrCat("config ", path, ":", line, ": ", kTomlUnsafeText));
  }
  toml::table root;
  try {
    root = toml::parse(text.str(), path);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(
        StrCat("config ", path, ":", e.source().begin.line, ": ", e.description()));
  }
  static const std::set<std::string_view> kSections = {
      "server",       "tls",  "hsm",   "storage", "policy", "log",
      "dual_control", "keys", "audit", "gateway", "metrics"};
  for (const auto& [name, node] : root) {
    if (!kSections.count(name.str()) || !node.is_table()) {
      return absl::InvalidArgumentError(StrCat("config ", path, ":", node.source().begin.line,
                                               ": unknown section '", name.str(), "'"));
    }
  }
  absl::StatusOr<Config> config = ReadConfig(root, path);
  if (!config.ok()) return Located(config.status(), path, root);
  return config;
}

namespace {

absl::StatusOr<Config> ReadConfig(const toml::table& root, const std::string& path) {
  Config c;
  SettingsReader settings(root);
  int64_t threads = c.worker_threads, cache = static_cast<int64_t>(c.key_cache_capacity);
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "listen", &c.listen));
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "reflection", &c.reflection));
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "worker_threads", &threads));
  int64_t admin_threads = c.admin_worker_threads;
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "admin_worker_threads", &admin_threads));
  CUSTOS_RETURN_IF_ERROR(settings.Read("tls", "cert", &c.tls_cert));
  CUSTOS_RETURN_IF_ERROR(settings.Read("tls", "key", &c.tls_key));
  CUSTOS_RETURN_IF_ERROR(settings.Read("tls", "client_ca", &c.client_ca));
  CUSTOS_RETURN_IF_ERROR(settings.Read("tls", "crl_dir", &c.crl_dir));
  CUSTOS_RETURN_IF_ERROR(settings.Read("gateway", "listen", &c.gateway_listen));
  if (!c.gateway_listen.empty() && !ParseListen(c.gateway_listen)) {
    return absl::InvalidArgumentError(
        "config: gateway.listen must be host:port (an IPv6 host in brackets: \"[::]:8200\")");
  }
  CUSTOS_RETURN_IF_ERROR(
      settings.Read("gateway", "connections_per_address", &c.gateway_connections_per_address));
  if (c.gateway_connections_per_address < 0 || c.gateway_connections_per_address > 16) {
    return absl::InvalidArgumentError(
        "config: gateway.connections_per_address must be 0 (no limit) or 1..16");
  }
  CUSTOS_RETURN_IF_ERROR(settings.Read("metrics", "listen", &c.metrics_listen));
  if (const std::optional<ListenAddress> metrics = ParseListen(c.metrics_listen);
      !c.metrics_listen.empty() && (!metrics || !IsLoopbackHost(metrics->host))) {
    return absl::InvalidArgumentError(
        "config: metrics.listen must be on a loopback address (127.0.0.1, ::1 or localhost)");
  }
  int64_t max_connection_age = c.max_connection_age_seconds;
  CUSTOS_RETURN_IF_ERROR(settings.Read("tls", "max_connection_age_seconds", &max_connection_age));
  if (max_connection_age < 1 || max_connection_age > 86400) {
    return absl::InvalidArgumentError("config: tls.max_connection_age_seconds must be 1..86400");
  }
  c.max_connection_age_seconds = static_cast<int>(max_connection_age);
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "module", &c.hsm_module));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "token_label", &c.hsm_token_label));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "pin_file", &c.hsm_pin_file));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "pin_env", &c.hsm_pin_env));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "root_key_label", &c.root_key_label));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "audit_hmac_key_label", &c.audit_hmac_key_label));
  CUSTOS_RETURN_IF_ERROR(
      settings.Read("hsm", "audit_signing_key_label", &c.audit_signing_key_label));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "catalog_hmac_key_label", &c.catalog_hmac_key_label));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "audit_head_label", &c.audit_head_label));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "instance_label", &c.instance_label));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "key_cache", &cache));
  CUSTOS_RETURN_IF_ERROR(settings.Read("storage", "path", &c.storage_path));
  CUSTOS_RETURN_IF_ERROR(settings.Read("storage", "wal_warn_mb", &c.wal_warn_mb));
  if (c.wal_warn_mb < 16 || c.wal_warn_mb > 1'048'576) {
    return absl::InvalidArgumentError("config: storage.wal_warn_mb must be 16..1048576");
  }
  CUSTOS_RETURN_IF_ERROR(settings.Read("policy", "file", &c.policy_file));
  CUSTOS_RETURN_IF_ERROR(settings.Read("log", "level", &c.log_level));
  static const std::set<std::string_view> kLevels = {"trace",   "debug", "info",    "warn",
                                                     "warning", "error", "critical"};
  if (!kLevels.count(c.log_level)) {
    return absl::InvalidArgumentError(
        "config: log.level must be trace, debug, info, warn, error or critical");
  }
  CUSTOS_RETURN_IF_ERROR(settings.Read("log", "format", &c.log_format));
  if (c.log_format != "text" && c.log_format != "json") {
    return absl::InvalidArgumentError("config: log.format must be \"text\" or \"json\"");
  }
  CUSTOS_RETURN_IF_ERROR(settings.Read("log", "audit_mirror", &c.audit_mirror));
  CUSTOS_RETURN_IF_ERROR(ReadDualControl(root, &c.dual_control));
  int64_t maintenance = c.maintenance_interval_seconds;
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "maintenance_interval_seconds", &maintenance));
  if (maintenance < 1 || maintenance > 3600) {
    return absl::InvalidArgumentError(
        "config: server.maintenance_interval_seconds must be 1..3600");
  }
  c.maintenance_interval_seconds = static_cast<int>(maintenance);
  int64_t health_interval = c.health_interval_ms, probe_timeout = c.health_probe_timeout_ms;
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "health_interval_ms", &health_interval));
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "health_probe_timeout_ms", &probe_timeout));
  if (health_interval < 100 || health_interval > 60000) {
    return absl::InvalidArgumentError("config: server.health_interval_ms must be 100..60000");
  }
  if (probe_timeout < 100 || probe_timeout > 60000) {
    return absl::InvalidArgumentError("config: server.health_probe_timeout_ms must be 100..60000");
  }
  c.health_interval_ms = static_cast<int>(health_interval);
  c.health_probe_timeout_ms = static_cast<int>(probe_timeout);
  int64_t checkpoint_interval = c.checkpoint_interval_seconds;
  int64_t checkpoint_every = static_cast<int64_t>(c.checkpoint_every);
  CUSTOS_RETURN_IF_ERROR(
      settings.Read("audit", "checkpoint_interval_seconds", &checkpoint_interval));
  CUSTOS_RETURN_IF_ERROR(settings.Read("audit", "checkpoint_every", &checkpoint_every));
  CUSTOS_RETURN_IF_ERROR(settings.Read("audit", "archive_dir", &c.audit_archive_dir));
  CUSTOS_RETURN_IF_ERROR(
      settings.Read("audit", "verify_full_chain_at_start", &c.verify_full_chain_at_start));
  CUSTOS_RETURN_IF_ERROR(settings.Read("audit", "context_hmac_cache", &c.context_hmac_cache));
  int64_t streams = c.audit_max_streams, stall = c.audit_stream_stall_seconds;
  CUSTOS_RETURN_IF_ERROR(settings.Read("audit", "max_streams", &streams));
  CUSTOS_RETURN_IF_ERROR(settings.Read("audit", "stream_stall_seconds", &stall));
  if (streams < 1 || streams > 1024) {
    return absl::InvalidArgumentError("config: audit.max_streams must be 1..1024");
  }
  if (stall < 1 || stall > 3600) {
    return absl::InvalidArgumentError("config: audit.stream_stall_seconds must be 1..3600");
  }
  c.audit_max_streams = static_cast<int>(streams);
  c.audit_stream_stall_seconds = static_cast<int>(stall);
  if (c.context_hmac_cache < 0 || c.context_hmac_cache > 10'000'000) {
    return absl::InvalidArgumentError("config: audit.context_hmac_cache must be 0..10000000");
  }
  if (checkpoint_interval < 1 || checkpoint_interval > 86400) {
    return absl::InvalidArgumentError("config: audit.checkpoint_interval_seconds must be 1..86400");
  }
  if (checkpoint_every < 1 || checkpoint_every > 1'000'000) {
    return absl::InvalidArgumentError("config: audit.checkpoint_every must be 1..1000000");
  }
  c.checkpoint_interval_seconds = static_cast<int>(checkpoint_interval);
  c.checkpoint_every = static_cast<uint64_t>(checkpoint_every);
  int64_t limit = static_cast<int64_t>(c.usage_limits.max_encryptions), rotate_percent = 75,
          block = static_cast<int64_t>(c.usage_limits.reservation_block),
          usage_cache = static_cast<int64_t>(c.usage_limits.tracked_keys);
  CUSTOS_RETURN_IF_ERROR(settings.Read("keys", "encryption_limit", &limit));
  CUSTOS_RETURN_IF_ERROR(settings.Read("keys", "rotate_at_percent", &rotate_percent));
  CUSTOS_RETURN_IF_ERROR(settings.Read("keys", "reservation_block", &block));
  CUSTOS_RETURN_IF_ERROR(settings.Read("keys", "usage_cache", &usage_cache));
  if (limit < 1 || limit > (int64_t{1} << 32)) {
    return absl::InvalidArgumentError("config: keys.encryption_limit must be 1..2^32");
  }
  if (rotate_percent < 1 || rotate_percent > 100 || block < 1) {
    return absl::InvalidArgumentError(
        "config: keys.rotate_at_percent must be 1..100 and keys.reservation_block at least 1");
  }
  c.usage_limits.max_encryptions = static_cast<uint64_t>(limit);
  c.usage_limits.rotate_at = static_cast<uint64_t>(limit * rotate_percent / 100);
  if (usage_cache < 1 || usage_cache > 100'000'000) {
    return absl::InvalidArgumentError("config: keys.usage_cache must be 1..100000000");
  }
  c.usage_limits.reservation_block = static_cast<uint64_t>(block);
  c.usage_limits.tracked_keys = static_cast<size_t>(usage_cache);
  if (threads < 1 || threads > 1024) {
    return absl::InvalidArgumentError("config: server.worker_threads must be 1..1024");
  }
  if (cache < 1) return absl::InvalidArgumentError("config: hsm.key_cache must be at least 1");
  c.worker_threads = static_cast<int>(threads);
  if (admin_threads < 1 || admin_threads > 64) {
    return absl::InvalidArgumentError("config: server.admin_worker_threads must be 1..64");
  }
  c.admin_worker_threads = static_cast<int>(admin_threads);
  int64_t max_waiting = static_cast<int64_t>(c.max_waiting_calls);
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "max_waiting_calls", &max_waiting));
  if (max_waiting < 1 || max_waiting > 1'000'000) {
    return absl::InvalidArgumentError("config: server.max_waiting_calls must be 1..1000000");
  }
  c.max_waiting_calls = static_cast<size_t>(max_waiting);
  for (auto [name, rate] : {std::pair{"rate_limit_per_peer", &c.rate_limit_per_peer},
                            std::pair{"rate_limit_per_principal", &c.rate_limit_per_principal}}) {
    int64_t value = *rate;
    CUSTOS_RETURN_IF_ERROR(settings.Read("server", name, &value));
    if (value < 0 || value > 1'000'000) {
      return absl::InvalidArgumentError(
          StrCat("config: server.", name, " must be 0 (no limit)..1000000 calls a second"));
    }
    *rate = static_cast<int>(value);
  }
  int64_t max_message = static_cast<int64_t>(c.max_message_bytes);
  CUSTOS_RETURN_IF_ERROR(settings.Read("server", "max_message_bytes", &max_message));
  if (max_message < 4096 || max_message > int64_t{16} * 1024 * 1024) {
    return absl::InvalidArgumentError(
        "config: server.max_message_bytes must be 4096..16777216 (16 MiB)");
  }
  c.max_message_bytes = static_cast<size_t>(max_message);
  c.key_cache_capacity = static_cast<size_t>(cache);
  int64_t call_timeout = c.hsm_call_timeout_ms, stuck = c.hsm_max_stuck_calls;
  int64_t hsm_threads = c.hsm_threads;
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "threads", &hsm_threads));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "call_timeout_ms", &call_timeout));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "max_stuck_calls", &stuck));
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "hang_limit_ms", &c.hsm_hang_limit_ms));
  if (hsm_threads < 1 || hsm_threads > 1024) {
    return absl::InvalidArgumentError("config: hsm.threads must be 1..1024");
  }
  if (call_timeout < 100 || call_timeout > 60000) {
    return absl::InvalidArgumentError("config: hsm.call_timeout_ms must be 100..60000");
  }
  if (stuck < 0 || stuck > 1024) {
    return absl::InvalidArgumentError("config: hsm.max_stuck_calls must be 0..1024");
  }
  if (c.hsm_hang_limit_ms != 0 &&
      (c.hsm_hang_limit_ms < call_timeout || c.hsm_hang_limit_ms > 86'400'000)) {
    return absl::InvalidArgumentError(
        "config: hsm.hang_limit_ms must be 0 (never) or hsm.call_timeout_ms..86400000");
  }
  // Unset, the lease grows with a raised call timeout rather than refusing it.
  c.hsm_instance_lease_ms = std::max(c.hsm_instance_lease_ms, (5 * call_timeout + 1) / 2);
  CUSTOS_RETURN_IF_ERROR(settings.Read("hsm", "instance_lease_ms", &c.hsm_instance_lease_ms));
  // Renewed every fifth of a lease, a claim's read and write (each answered within
  // call_timeout_ms) land within the remaining four fifths.
  if (c.hsm_instance_lease_ms < 1000 || c.hsm_instance_lease_ms > 600'000 ||
      c.hsm_instance_lease_ms * 4 / 5 < 2 * call_timeout) {
    return absl::InvalidArgumentError(
        "config: hsm.instance_lease_ms must be 1000..600000 and at least 2.5 * "
        "hsm.call_timeout_ms (a renewal's read and write land within the lease)");
  }
  c.hsm_call_timeout_ms = static_cast<int>(call_timeout);
  c.hsm_max_stuck_calls = static_cast<int>(stuck);
  c.hsm_threads = static_cast<int>(hsm_threads);
  CUSTOS_RETURN_IF_ERROR(settings.RefuseUnknown("dual_control"));

  const fs::path base = fs::absolute(path).parent_path();
  for (std::string* p : {&c.tls_cert, &c.tls_key, &c.client_ca, &c.crl_dir, &c.hsm_pin_file,
                         &c.storage_path, &c.policy_file, &c.audit_archive_dir}) {
    *p = Resolve(base, *p);
  }
  if (c.audit_archive_dir.empty() && !c.storage_path.empty()) {
    c.audit_archive_dir = (fs::path(c.storage_path).parent_path() / "audit-archive").string();
  }
  CUSTOS_RETURN_IF_ERROR(Require(c.tls_cert, "tls.cert"));
  CUSTOS_RETURN_IF_ERROR(Require(c.tls_key, "tls.key"));
  CUSTOS_RETURN_IF_ERROR(Require(c.client_ca, "tls.client_ca"));
  CUSTOS_RETURN_IF_ERROR(Require(c.hsm_module, "hsm.module"));
  CUSTOS_RETURN_IF_ERROR(Require(c.hsm_token_label, "hsm.token_label"));
  CUSTOS_RETURN_IF_ERROR(Require(c.storage_path, "storage.path"));
  CUSTOS_RETURN_IF_ERROR(Require(c.policy_file, "policy.file"));
  if (c.hsm_pin_file.empty() == c.hsm_pin_env.empty()) {
    return absl::InvalidArgumentError("config: set exactly one of hsm.pin_file and hsm.pin_env");
  }
  return c;
}

}  // namespace

absl::StatusOr<SecureBytes> ReadHsmPin(const Config& config) {
  if (!config.hsm_pin_env.empty()) {
    char* pin = std::getenv(config.hsm_pin_env.c_str());
    if (pin == nullptr || *pin == '\0') {
      return absl::NotFoundError(
          StrCat("environment variable ", config.hsm_pin_env, " (hsm.pin_env) is unset"));
    }
    SecureBytes copy = SecureBytes::FromString(pin);
    // Leave no copy in the environment, where /proc/<pid>/environ would show it.
    OPENSSL_cleanse(pin, std::strlen(pin));
    unsetenv(config.hsm_pin_env.c_str());
    return copy;
  }
  // O_NOFOLLOW and fstat on the open descriptor: the file checked is the file read.
  const int fd = open(config.hsm_pin_file.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(
        StrCat("cannot open PIN file ", config.hsm_pin_file, ": ",
               errno == ELOOP ? "a symbolic link is refused" : std::strerror(errno)));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > 4096) {
    close(fd);
    return absl::InvalidArgumentError(
        StrCat("PIN file ", config.hsm_pin_file, " is not a small regular file"));
  }
  // Unreadable by its owner (0000) reads as root only: refused too, for every user alike.
  if ((st.st_mode & 077) != 0 || (st.st_mode & 0400) == 0 || st.st_uid != geteuid()) {
    close(fd);
    return absl::PermissionDeniedError(
        StrCat("PIN file ", config.hsm_pin_file, " must belong to this user and be mode 0600"));
  }
  SecureBytes pin(static_cast<size_t>(st.st_size));
  const ssize_t n = read(fd, pin.data(), pin.size());  // read() into the wiping buffer
  close(fd);
  if (n != static_cast<ssize_t>(pin.size())) {
    return absl::UnavailableError(StrCat("cannot read PIN file ", config.hsm_pin_file));
  }
  size_t size = pin.size();
  while (size > 0 && (pin.data()[size - 1] == '\n' || pin.data()[size - 1] == '\r')) --size;
  pin.Truncate(size);
  if (pin.empty())
    return absl::NotFoundError(StrCat("PIN file ", config.hsm_pin_file, " is empty"));
  return pin;
}

}  // namespace custos::server
