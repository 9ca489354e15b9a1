#include "server/config.h"

#include <sys/stat.h>

#include <toml++/toml.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "common/strings.h"

namespace custos::server {
namespace {

namespace fs = std::filesystem;

std::string Resolve(const fs::path& base, const std::string& value) {
  if (value.empty()) return value;
  fs::path p(value);
  return p.is_absolute() ? value : (base / p).lexically_normal().string();
}

// Copies table[key] into *out if present; INVALID_ARGUMENT if it has the wrong type.
template <typename T>
absl::Status Read(const toml::table& root, std::string_view section, std::string_view key, T* out) {
  const toml::node_view<const toml::node> node = root[section][key];
  if (!node) return absl::OkStatus();
  std::optional<T> value = node.value<T>();
  if (!value) {
    return absl::InvalidArgumentError(StrCat("config: ", section, ".", key, " has the wrong type"));
  }
  *out = *value;
  return absl::OkStatus();
}

absl::Status Require(const std::string& value, std::string_view name) {
  if (!value.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(StrCat("config: ", name, " is required"));
}

}  // namespace

absl::StatusOr<Config> LoadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(StrCat("cannot read config file ", path));
  std::stringstream text;
  text << in.rdbuf();
  toml::table root;
  try {
    root = toml::parse(text.str(), path);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(
        StrCat("config ", path, ":", e.source().begin.line, ": ", e.description()));
  }
  static const std::set<std::string_view> kSections = {"server",  "tls",    "hsm",
                                                       "storage", "policy", "log"};
  for (const auto& [name, node] : root) {
    if (!kSections.count(name.str()) || !node.is_table()) {
      return absl::InvalidArgumentError(StrCat("config: unknown section '", name.str(), "'"));
    }
  }
  Config c;
  int64_t threads = c.worker_threads, cache = static_cast<int64_t>(c.key_cache_capacity);
  CUSTOS_RETURN_IF_ERROR(Read(root, "server", "listen", &c.listen));
  CUSTOS_RETURN_IF_ERROR(Read(root, "server", "worker_threads", &threads));
  CUSTOS_RETURN_IF_ERROR(Read(root, "tls", "cert", &c.tls_cert));
  CUSTOS_RETURN_IF_ERROR(Read(root, "tls", "key", &c.tls_key));
  CUSTOS_RETURN_IF_ERROR(Read(root, "tls", "client_ca", &c.client_ca));
  CUSTOS_RETURN_IF_ERROR(Read(root, "tls", "crl_dir", &c.crl_dir));
  CUSTOS_RETURN_IF_ERROR(Read(root, "hsm", "module", &c.hsm_module));
  CUSTOS_RETURN_IF_ERROR(Read(root, "hsm", "token_label", &c.hsm_token_label));
  CUSTOS_RETURN_IF_ERROR(Read(root, "hsm", "pin_file", &c.hsm_pin_file));
  CUSTOS_RETURN_IF_ERROR(Read(root, "hsm", "pin_env", &c.hsm_pin_env));
  CUSTOS_RETURN_IF_ERROR(Read(root, "hsm", "root_key_label", &c.root_key_label));
  CUSTOS_RETURN_IF_ERROR(Read(root, "hsm", "key_cache", &cache));
  CUSTOS_RETURN_IF_ERROR(Read(root, "storage", "path", &c.storage_path));
  CUSTOS_RETURN_IF_ERROR(Read(root, "policy", "file", &c.policy_file));
  CUSTOS_RETURN_IF_ERROR(Read(root, "log", "level", &c.log_level));
  if (threads < 1 || threads > 1024) {
    return absl::InvalidArgumentError("config: server.worker_threads must be 1..1024");
  }
  if (cache < 1) return absl::InvalidArgumentError("config: hsm.key_cache must be at least 1");
  c.worker_threads = static_cast<int>(threads);
  c.key_cache_capacity = static_cast<size_t>(cache);

  const fs::path base = fs::absolute(path).parent_path();
  for (std::string* p : {&c.tls_cert, &c.tls_key, &c.client_ca, &c.crl_dir, &c.hsm_pin_file,
                         &c.storage_path, &c.policy_file}) {
    *p = Resolve(base, *p);
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

absl::StatusOr<SecureBytes> ReadHsmPin(const Config& config) {
  if (!config.hsm_pin_env.empty()) {
    const char* pin = std::getenv(config.hsm_pin_env.c_str());
    if (pin == nullptr || *pin == '\0') {
      return absl::NotFoundError(
          StrCat("environment variable ", config.hsm_pin_env, " (hsm.pin_env) is unset"));
    }
    return SecureBytes::FromString(pin);
  }
  struct stat st {};
  if (stat(config.hsm_pin_file.c_str(), &st) != 0) {
    return absl::NotFoundError(StrCat("cannot read PIN file ", config.hsm_pin_file));
  }
  if ((st.st_mode & 077) != 0) {
    return absl::PermissionDeniedError(
        StrCat("PIN file ", config.hsm_pin_file, " is readable by others; chmod 600 it"));
  }
  std::ifstream in(config.hsm_pin_file, std::ios::binary);
  SecureBytes pin(static_cast<size_t>(st.st_size));
  in.read(reinterpret_cast<char*>(pin.data()), static_cast<std::streamsize>(pin.size()));
  if (!in) return absl::NotFoundError(StrCat("cannot read PIN file ", config.hsm_pin_file));
  size_t n = pin.size();
  while (n > 0 && (pin.data()[n - 1] == '\n' || pin.data()[n - 1] == '\r')) --n;
  pin.Truncate(n);
  if (pin.empty()) return absl::NotFoundError("PIN file is empty");
  return pin;
}

}  // namespace custos::server
