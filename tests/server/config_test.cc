// LoadConfig over TOML files written to a temporary folder: defaults, path resolution, and
// every setting that must keep a bad config from loading.
#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "policy/policy.h"
#include "server/config.h"
#include "tests/support/temp_dir.h"

namespace custos::server {
namespace {

using policy::Operation;
using testing::TempDir;

struct Entry {
  std::string section;
  std::string key;
  std::string value;  // a TOML literal
};

// The smallest config that loads, with absolute paths under /srv/custos.
std::vector<Entry> Minimal() {
  return {
      {"tls", "cert", R"("/srv/custos/tls/server.pem")"},
      {"tls", "key", R"("/srv/custos/tls/server.key")"},
      {"tls", "client_ca", R"("/srv/custos/tls/ca.pem")"},
      {"hsm", "module", R"("/usr/lib/softhsm/libsofthsm2.so")"},
      {"hsm", "token_label", R"("custos")"},
      {"hsm", "pin_file", R"("/srv/custos/hsm.pin")"},
      {"storage", "path", R"("/srv/custos/custos.db")"},
      {"policy", "file", R"("/srv/custos/policy.json")"},
  };
}

// TOML text of `entries` (grouped by section, in order of first appearance), then `extra`.
std::string Render(const std::vector<Entry>& entries, const std::string& extra = "") {
  std::vector<std::string> sections;
  for (const Entry& e : entries) {
    if (std::find(sections.begin(), sections.end(), e.section) == sections.end()) {
      sections.push_back(e.section);
    }
  }
  std::string text;
  for (const std::string& section : sections) {
    text += "[" + section + "]\n";
    for (const Entry& e : entries) {
      if (e.section == section) text += e.key + " = " + e.value + "\n";
    }
    text += "\n";
  }
  return text + extra;
}

std::vector<Entry> Without(std::vector<Entry> entries, const std::string& section,
                           const std::string& key) {
  std::erase_if(entries, [&](const Entry& e) { return e.section == section && e.key == key; });
  return entries;
}

class ConfigFiles {
 public:
  // Writes `text` to custos.toml in the temporary folder and loads it.
  absl::StatusOr<Config> Load(const std::string& text) {
    {
      std::ofstream out(path());
      out << text;
    }
    return LoadConfig(path());
  }
  std::string path() const { return dir_.File("custos.toml"); }
  const std::string& dir() const { return dir_.path(); }

 private:
  TempDir dir_;
};

Config RequireLoads(ConfigFiles& files, const std::string& text) {
  absl::StatusOr<Config> config = files.Load(text);
  INFO(text);
  INFO(config.status().ToString());
  REQUIRE(config.ok());
  return *std::move(config);
}

// REQUIREs that `text` does not load, with INVALID_ARGUMENT and a message containing `part`.
void RequireRefused(ConfigFiles& files, const std::string& text, const std::string& part) {
  const absl::StatusOr<Config> config = files.Load(text);
  INFO(text);
  INFO(config.status().ToString());
  REQUIRE_FALSE(config.ok());
  CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(config.status().message()), Catch::Contains(part));
}

void CheckApprovals(const Config& config, int create_key, int others) {
  for (Operation operation : policy::kAllOperations) {
    INFO(policy::OperationName(operation));
    CHECK(config.dual_control.ApprovalsFor(operation) ==
          (operation == Operation::kCreateKey ? create_key : others));
  }
}

TEST_CASE("A minimal config loads with the documented defaults", "[config]") {
  ConfigFiles files;
  const Config c = RequireLoads(files, Render(Minimal()));
  CHECK(c.tls_cert == "/srv/custos/tls/server.pem");
  CHECK(c.tls_key == "/srv/custos/tls/server.key");
  CHECK(c.client_ca == "/srv/custos/tls/ca.pem");
  CHECK(c.crl_dir.empty());
  CHECK(c.hsm_module == "/usr/lib/softhsm/libsofthsm2.so");
  CHECK(c.hsm_token_label == "custos");
  CHECK(c.hsm_pin_file == "/srv/custos/hsm.pin");
  CHECK(c.hsm_pin_env.empty());
  CHECK(c.storage_path == "/srv/custos/custos.db");
  CHECK(c.policy_file == "/srv/custos/policy.json");

  CHECK(c.listen == "127.0.0.1:7443");
  CHECK(c.worker_threads == 16);
  CHECK(c.admin_worker_threads == 4);
  CHECK(c.max_message_bytes == 262144);
  CHECK(c.max_waiting_calls == 4096);
  CHECK(c.rate_limit_per_peer == 0);  // off
  CHECK(c.rate_limit_per_principal == 0);
  CHECK_FALSE(c.audit_mirror);
  CHECK(c.context_hmac_cache == 65536);
  CHECK(c.wal_warn_mb == 256);
  CHECK(c.root_key_label == "custos-root");
  CHECK(c.key_cache_capacity == 4096);
  CHECK(c.hsm_threads == 16);
  CHECK(c.log_level == "info");
  CHECK(c.maintenance_interval_seconds == 60);
  CHECK(c.health_interval_ms == 1000);
  CHECK(c.health_probe_timeout_ms == 2000);
  CHECK(c.checkpoint_interval_seconds == 60);
  CHECK(c.checkpoint_every == 1000);

  CheckApprovals(c, 0, 2);
  CHECK(c.dual_control.request_ttl_seconds == 24 * 3600);
  CHECK(c.dual_control.deletion_waiting_seconds == 30 * policy::kDay);

  CHECK(c.usage_limits.max_encryptions == uint64_t{1} << 32);
  CHECK(c.usage_limits.rotate_at == (uint64_t{1} << 32) / 4 * 3);
  CHECK(c.usage_limits.reservation_block == 10000);
  CHECK(c.usage_limits.tracked_keys == 100000);
}

TEST_CASE("Settings in the file override the defaults", "[config]") {
  ConfigFiles files;
  std::vector<Entry> entries = Minimal();
  entries.push_back({"server", "listen", R"("0.0.0.0:9443")"});
  entries.push_back({"server", "worker_threads", "4"});
  entries.push_back({"server", "admin_worker_threads", "2"});
  entries.push_back({"server", "max_waiting_calls", "100"});
  entries.push_back({"server", "rate_limit_per_peer", "500"});
  entries.push_back({"server", "rate_limit_per_principal", "200"});
  entries.push_back({"server", "max_message_bytes", "1048576"});
  entries.push_back({"server", "maintenance_interval_seconds", "5"});
  entries.push_back({"server", "health_interval_ms", "250"});
  entries.push_back({"server", "health_probe_timeout_ms", "500"});
  entries.push_back({"hsm", "root_key_label", R"("root-2")"});
  entries.push_back({"hsm", "key_cache", "10"});
  entries.push_back({"hsm", "threads", "32"});
  entries.push_back({"log", "level", R"("debug")"});
  entries.push_back({"log", "audit_mirror", "true"});
  entries.push_back({"audit", "context_hmac_cache", "0"});
  entries.push_back({"storage", "wal_warn_mb", "16"});
  entries.push_back({"keys", "encryption_limit", "1000"});
  entries.push_back({"keys", "rotate_at_percent", "50"});
  entries.push_back({"keys", "reservation_block", "7"});
  entries.push_back({"keys", "usage_cache", "3"});
  entries.push_back({"dual_control", "request_ttl_hours", "2"});
  entries.push_back({"dual_control", "deletion_waiting_days", "7"});
  entries.push_back({"audit", "checkpoint_interval_seconds", "300"});
  entries.push_back({"audit", "checkpoint_every", "50"});
  const Config c = RequireLoads(files, Render(entries));
  CHECK(c.checkpoint_interval_seconds == 300);
  CHECK(c.checkpoint_every == 50);
  CHECK(c.listen == "0.0.0.0:9443");
  CHECK(c.worker_threads == 4);
  CHECK(c.admin_worker_threads == 2);
  CHECK(c.max_waiting_calls == 100);
  CHECK(c.rate_limit_per_peer == 500);
  CHECK(c.rate_limit_per_principal == 200);
  CHECK(c.max_message_bytes == 1048576);
  CHECK(c.maintenance_interval_seconds == 5);
  CHECK(c.health_interval_ms == 250);
  CHECK(c.health_probe_timeout_ms == 500);
  CHECK(c.root_key_label == "root-2");
  CHECK(c.key_cache_capacity == 10);
  CHECK(c.hsm_threads == 32);
  CHECK(c.worker_threads == 4);  // set apart: HSM threads no longer follow the workers
  CHECK(c.log_level == "debug");
  CHECK(c.audit_mirror);
  CHECK(c.context_hmac_cache == 0);
  CHECK(c.wal_warn_mb == 16);
  CHECK(c.usage_limits.max_encryptions == 1000);
  CHECK(c.usage_limits.rotate_at == 500);
  CHECK(c.usage_limits.reservation_block == 7);
  CHECK(c.usage_limits.tracked_keys == 3);
  CHECK(c.dual_control.request_ttl_seconds == 2 * 3600);
  CHECK(c.dual_control.deletion_waiting_seconds == 7 * policy::kDay);
}

TEST_CASE("Relative paths resolve against the config file's folder", "[config]") {
  ConfigFiles files;
  const std::vector<Entry> entries = {
      {"tls", "cert", R"("tls/server.pem")"},
      {"tls", "key", R"("./tls/server.key")"},
      {"tls", "client_ca", R"("/etc/custos/ca.pem")"},  // absolute: kept as written
      {"tls", "crl_dir", R"("crl")"},
      {"hsm", "module", R"("/usr/lib/softhsm/libsofthsm2.so")"},
      {"hsm", "token_label", R"("custos")"},
      {"hsm", "pin_file", R"("secrets/../hsm.pin")"},
      {"storage", "path", R"("custos.db")"},
      {"policy", "file", R"("../shared/policy.json")"},
  };
  const Config c = RequireLoads(files, Render(entries));
  const std::string& dir = files.dir();
  CHECK(c.tls_cert == dir + "/tls/server.pem");
  CHECK(c.tls_key == dir + "/tls/server.key");
  CHECK(c.client_ca == "/etc/custos/ca.pem");
  CHECK(c.crl_dir == dir + "/crl");
  CHECK(c.hsm_pin_file == dir + "/hsm.pin");
  CHECK(c.storage_path == dir + "/custos.db");
  const std::string parent = dir.substr(0, dir.rfind('/'));
  CHECK(c.policy_file == parent + "/shared/policy.json");
}

TEST_CASE("Unknown sections and settings are refused", "[config]") {
  ConfigFiles files;
  RequireRefused(files, Render(Minimal(), "[bogus]\nx = 1\n"), "unknown section 'bogus'");
  // A top-level key is not a section either.
  RequireRefused(files, "listen = \"0.0.0.0:1\"\n" + Render(Minimal()), "unknown section 'listen'");
  RequireRefused(files, Render(Minimal(), "[dual_control]\nrequest_ttl = 2\n"),
                 "unknown setting dual_control.request_ttl");
  // A misspelt setting would otherwise leave its default in force unnoticed.
  RequireRefused(files, Render(Minimal(), "[server]\nworker_thread = 4\n"),
                 "unknown setting server.worker_thread");
  RequireRefused(files, Render(Minimal(), "[audit]\ncheckpoint_interval = 5\n"),
                 "unknown setting audit.checkpoint_interval");
  RequireRefused(files, Render(Minimal(), "[dual_control.approvals]\nFrobnicateKey = 2\n"),
                 "dual_control.approvals.FrobnicateKey is not an operation");
}

TEST_CASE("A setting of the wrong type is refused", "[config]") {
  ConfigFiles files;
  std::vector<Entry> entries = Minimal();
  entries.push_back({"server", "worker_threads", R"("many")"});
  RequireRefused(files, Render(entries), "server.worker_threads has the wrong type");
  RequireRefused(files, Render(Minimal(), "[dual_control]\napprovals = 2\n"),
                 "dual_control.approvals must be a table");
  RequireRefused(files, Render(Minimal(), "[dual_control.approvals]\nRotateKey = \"two\"\n"),
                 "dual_control.approvals.RotateKey must be a whole number");
  RequireRefused(files, Render(Minimal(), "[dual_control]\nrequest_ttl_hours = \"1\"\n"),
                 "dual_control.request_ttl_hours must be a whole number");
}

// Found by fuzz/config_fuzz.cc: toml++ 3.3.0 converts a float to an integer when asked, and its
// cast of one beyond the int64 range is undefined behaviour; whole numbers must be integers.
TEST_CASE("A float is refused for a whole-number setting", "[config]") {
  ConfigFiles files;
  for (const char* value : {"1e300", "-1e300", "16.0", "nan", "inf"}) {
    INFO(value);
    std::vector<Entry> entries = Minimal();
    entries.push_back({"keys", "encryption_limit", value});
    RequireRefused(files, Render(entries), "keys.encryption_limit has the wrong type");
    RequireRefused(files,
                   Render(Minimal(), std::string("[dual_control]\ndefault_approvals = ") + value),
                   "dual_control.default_approvals must be a whole number");
    RequireRefused(files,
                   Render(Minimal(), std::string("[dual_control.approvals]\nRotateKey = ") + value),
                   "dual_control.approvals.RotateKey must be a whole number");
    RequireRefused(files,
                   Render(Minimal(), std::string("[dual_control]\nrequest_ttl_hours = ") + value),
                   "dual_control.request_ttl_hours must be a whole number");
  }
}

TEST_CASE("Dual control never fails open", "[config]") {
  ConfigFiles files;
  RequireRefused(files, Render(Minimal(), "[dual_control.approvals]\nRotateKey = 0\n"),
                 "RotateKey needs at least 1 approval besides the proposer; got 0");
  RequireRefused(files, Render(Minimal(), "[dual_control.approvals]\nRotateRootKey = -1\n"),
                 "RotateRootKey needs at least 1 approval");
  RequireRefused(files, Render(Minimal(), "[dual_control.approvals]\nCreateKey = -1\n"),
                 "CreateKey needs at least 0 approvals");
  RequireRefused(files, Render(Minimal(), "[dual_control]\ndefault_approvals = 0\n"),
                 "needs at least 1 approval");
  // An out-of-range count must not wrap around into a valid one.
  RequireRefused(files, Render(Minimal(), "[dual_control.approvals]\nRotateKey = 4294967297\n"),
                 "dual_control.approvals.RotateKey must be a whole number");
}

TEST_CASE("default_approvals sets every operation but CreateKey; entries override it", "[config]") {
  ConfigFiles files;
  Config c = RequireLoads(files, Render(Minimal(),
                                        "[dual_control]\ndefault_approvals = 1\n\n"
                                        "[dual_control.approvals]\nRotateKey = 3\n"));
  for (Operation operation : policy::kAllOperations) {
    INFO(policy::OperationName(operation));
    const int expected = operation == Operation::kCreateKey   ? 0
                         : operation == Operation::kRotateKey ? 3
                                                              : 1;
    CHECK(c.dual_control.ApprovalsFor(operation) == expected);
  }

  // The override holds wherever it stands relative to default_approvals.
  c = RequireLoads(files, Render(Minimal(),
                                 "[dual_control]\napprovals.RotateKey = 3\n"
                                 "default_approvals = 1\n"));
  CHECK(c.dual_control.ApprovalsFor(Operation::kRotateKey) == 3);
  CHECK(c.dual_control.ApprovalsFor(Operation::kDisableKey) == 1);
  CHECK(c.dual_control.ApprovalsFor(Operation::kCreateKey) == 0);

  c = RequireLoads(files, Render(Minimal(), "[dual_control.approvals]\nCreateKey = 1\n"));
  CheckApprovals(c, 1, 2);
}

TEST_CASE("Request TTL and deletion waiting period are range-checked", "[config]") {
  ConfigFiles files;
  RequireRefused(files, Render(Minimal(), "[dual_control]\ndeletion_waiting_days = 6\n"),
                 "deletion_waiting_days must be between 7 and 30");
  RequireRefused(files, Render(Minimal(), "[dual_control]\ndeletion_waiting_days = 31\n"),
                 "deletion_waiting_days must be between 7 and 30");
  RequireRefused(files, Render(Minimal(), "[dual_control]\nrequest_ttl_hours = 0\n"),
                 "request_ttl_hours must be between 1 minute and 30 days");
  RequireRefused(files, Render(Minimal(), "[dual_control]\nrequest_ttl_hours = 721\n"),
                 "request_ttl_hours must be between 1 minute and 30 days");

  Config c = RequireLoads(files, Render(Minimal(),
                                        "[dual_control]\nrequest_ttl_hours = 720\n"
                                        "deletion_waiting_days = 30\n"));
  CHECK(c.dual_control.request_ttl_seconds == 720 * 3600);
  CHECK(c.dual_control.deletion_waiting_seconds == 30 * policy::kDay);

  // Huge values must not overflow into the valid range: 3600 * (2^60 + 24) and
  // 86400 * (2^57 + 7) wrap to exactly 24 hours and 7 days in 64 bits.
  RequireRefused(files,
                 Render(Minimal(), "[dual_control]\nrequest_ttl_hours = 1152921504606847000\n"),
                 "dual_control.request_ttl_hours");
  RequireRefused(files,
                 Render(Minimal(), "[dual_control]\ndeletion_waiting_days = 144115188075855879\n"),
                 "dual_control.deletion_waiting_days");
}

TEST_CASE("The key usage limits are range-checked", "[config]") {
  ConfigFiles files;
  RequireRefused(files, Render(Minimal(), "[keys]\nencryption_limit = 0\n"),
                 "keys.encryption_limit must be 1..2^32");
  RequireRefused(files, Render(Minimal(), "[keys]\nencryption_limit = 4294967297\n"),
                 "keys.encryption_limit must be 1..2^32");
  RequireRefused(files, Render(Minimal(), "[keys]\nrotate_at_percent = 101\n"),
                 "keys.rotate_at_percent must be 1..100");
  RequireRefused(files, Render(Minimal(), "[keys]\nrotate_at_percent = 0\n"),
                 "keys.rotate_at_percent must be 1..100");
  RequireRefused(files, Render(Minimal(), "[keys]\nreservation_block = 0\n"),
                 "keys.reservation_block at least 1");
  RequireRefused(files, Render(Minimal(), "[keys]\nusage_cache = 0\n"),
                 "keys.usage_cache must be 1..100000000");

  const Config c = RequireLoads(
      files, Render(Minimal(), "[keys]\nencryption_limit = 4294967296\nrotate_at_percent = 100\n"));
  CHECK(c.usage_limits.max_encryptions == uint64_t{1} << 32);
  CHECK(c.usage_limits.rotate_at == uint64_t{1} << 32);
}

TEST_CASE("Server settings are range-checked", "[config]") {
  ConfigFiles files;
  RequireRefused(files, Render(Minimal(), "[server]\nworker_threads = 0\n"),
                 "server.worker_threads must be 1..1024");
  RequireRefused(files, Render(Minimal(), "[server]\nworker_threads = 1025\n"),
                 "server.worker_threads must be 1..1024");
  RequireRefused(files, Render(Minimal(), "[server]\nadmin_worker_threads = 0\n"),
                 "server.admin_worker_threads must be 1..64");
  RequireRefused(files, Render(Minimal(), "[server]\nadmin_worker_threads = 65\n"),
                 "server.admin_worker_threads must be 1..64");
  RequireRefused(files, Render(Minimal(), "[audit]\ncontext_hmac_cache = -1\n"),
                 "audit.context_hmac_cache must be 0..10000000");
  for (const char* size : {"15", "1048577"}) {
    std::vector<Entry> entries = Minimal();
    entries.push_back({"storage", "wal_warn_mb", size});
    RequireRefused(files, Render(entries), "storage.wal_warn_mb must be 16..1048576");
  }
  RequireRefused(files, Render(Minimal(), "[server]\nrate_limit_per_peer = -1\n"),
                 "server.rate_limit_per_peer must be 0 (no limit)..1000000 calls a second");
  RequireRefused(files, Render(Minimal(), "[server]\nrate_limit_per_principal = 1000001\n"),
                 "server.rate_limit_per_principal must be 0 (no limit)..1000000 calls a second");
  RequireRefused(files, Render(Minimal(), "[server]\nmax_waiting_calls = 0\n"),
                 "server.max_waiting_calls must be 1..1000000");
  RequireRefused(files, Render(Minimal(), "[server]\nmax_waiting_calls = 1000001\n"),
                 "server.max_waiting_calls must be 1..1000000");
  RequireRefused(files, Render(Minimal(), "[server]\nmax_message_bytes = 4095\n"),
                 "server.max_message_bytes must be 4096..16777216 (16 MiB)");
  RequireRefused(files, Render(Minimal(), "[server]\nmax_message_bytes = 16777217\n"),
                 "server.max_message_bytes must be 4096..16777216 (16 MiB)");
  RequireRefused(files, Render(Minimal(), "[server]\nmaintenance_interval_seconds = 0\n"),
                 "server.maintenance_interval_seconds must be 1..3600");
  RequireRefused(files, Render(Minimal(), "[server]\nhealth_interval_ms = 99\n"),
                 "server.health_interval_ms must be 100..60000");
  RequireRefused(files, Render(Minimal(), "[server]\nhealth_interval_ms = 60001\n"),
                 "server.health_interval_ms must be 100..60000");
  RequireRefused(files, Render(Minimal(), "[server]\nhealth_probe_timeout_ms = 0\n"),
                 "server.health_probe_timeout_ms must be 100..60000");
  RequireRefused(files, Render(Minimal(), "[server]\nhealth_probe_timeout_ms = 60001\n"),
                 "server.health_probe_timeout_ms must be 100..60000");
  RequireRefused(files, Render(Minimal(), "[audit]\ncheckpoint_interval_seconds = 0\n"),
                 "audit.checkpoint_interval_seconds must be 1..86400");
  RequireRefused(files, Render(Minimal(), "[audit]\ncheckpoint_interval_seconds = 86401\n"),
                 "audit.checkpoint_interval_seconds must be 1..86400");
  RequireRefused(files, Render(Minimal(), "[audit]\ncheckpoint_every = 0\n"),
                 "audit.checkpoint_every must be 1..1000000");
  RequireRefused(files, Render(Minimal(), "[audit]\ncheckpoint_every = -5\n"),
                 "audit.checkpoint_every must be 1..1000000");
  std::vector<Entry> entries = Minimal();
  entries.push_back({"hsm", "key_cache", "0"});
  RequireRefused(files, Render(entries), "hsm.key_cache must be at least 1");
}

TEST_CASE("The token claim's lease leaves room for a renewal's read and write", "[config]") {
  ConfigFiles files;
  const std::string refused =
      "hsm.instance_lease_ms must be 1000..600000 and at least 2.5 * hsm.call_timeout_ms";
  std::vector<Entry> entries = Minimal();
  entries.push_back({"hsm", "instance_lease_ms", "999"});
  entries.push_back({"hsm", "call_timeout_ms", "100"});
  RequireRefused(files, Render(entries), refused);
  entries = Minimal();
  entries.push_back({"hsm", "instance_lease_ms", "4999"});  // the default call_timeout_ms: 2000
  RequireRefused(files, Render(entries), refused);
  entries = Minimal();
  entries.push_back({"hsm", "instance_lease_ms", "10000"});
  entries.push_back({"hsm", "call_timeout_ms", "4001"});
  RequireRefused(files, Render(entries), refused);
  entries.back() = {"hsm", "call_timeout_ms", "4000"};
  CHECK(RequireLoads(files, Render(entries)).hsm_instance_lease_ms == 10000);
  CHECK(RequireLoads(files, Render(Minimal())).hsm_instance_lease_ms == 5000);
  entries = Minimal();  // unset, it follows a raised call timeout
  entries.push_back({"hsm", "call_timeout_ms", "4001"});
  CHECK(RequireLoads(files, Render(entries)).hsm_instance_lease_ms == 10003);
}

TEST_CASE("Exactly one of pin_file and pin_env is set", "[config]") {
  ConfigFiles files;
  std::vector<Entry> both = Minimal();
  both.push_back({"hsm", "pin_env", R"("CUSTOS_PIN")"});
  RequireRefused(files, Render(both), "set exactly one of hsm.pin_file and hsm.pin_env");
  RequireRefused(files, Render(Without(Minimal(), "hsm", "pin_file")),
                 "set exactly one of hsm.pin_file and hsm.pin_env");

  std::vector<Entry> env = Without(Minimal(), "hsm", "pin_file");
  env.push_back({"hsm", "pin_env", R"("CUSTOS_PIN")"});
  const Config c = RequireLoads(files, Render(env));
  CHECK(c.hsm_pin_env == "CUSTOS_PIN");
  CHECK(c.hsm_pin_file.empty());
}

TEST_CASE("A refused setting is named with its file and line", "[config]") {
  ConfigFiles files;
  // Minimal(): [tls] on lines 1-4, [hsm] on 6-9 (module, token_label, pin_file), then
  // [storage] and [policy]: 16 lines in all.
  const std::string text = Render(Minimal());
  REQUIRE(std::count(text.begin(), text.end(), '\n') == 16);
  const std::string at = "config " + files.path() + ":";
  // Each appended to `text`, and the start of the message it must give.
  const std::pair<std::string, std::string> refused[] = {
      {"[server]\nworker_threads = 0\n", "18: server.worker_threads must be 1..1024"},
      {"[audit]\n\nmax_streams = \"many\"\n", "19: audit.max_streams has the wrong type"},
      {"[server]\nworker_thread = 4\n", "18: unknown setting server.worker_thread"},
      {"[dual_control]\nrequest_ttl_hours = 0\n", "18: dual_control.request_ttl_hours must be"},
      {"[bogus]\nx = 1\n", "17: unknown section 'bogus'"},
      {"[log]\nlevel = \"verbose\"\n",
       "18: log.level must be trace, debug, info, warn, error or critical"},
      {"[log]\nformat = \"xml\"\n", "18: log.format must be \"text\" or \"json\""},
      {"[metrics]\nlisten = \"0.0.0.0:9464\"\n",
       "18: metrics.listen must be on a loopback address"},
      {"[metrics]\nlisten = \"[127.0.0.1]:9464\"\n",
       "18: metrics.listen must be on a loopback address"},
      {"[gateway]\nlisten = \"[::]\"\n", "18: gateway.listen must be host:port"},
      {"[gateway]\nconnections_per_address = 17\n",
       "18: gateway.connections_per_address must be 0 (no limit) or 1..16"},
      {"[gateway]\nconnections_per_address = -1\n",
       "18: gateway.connections_per_address must be 0 (no limit) or 1..16"},
  };
  for (const auto& [extra, message] : refused) RequireRefused(files, text + extra, at + message);
  CHECK(RequireLoads(files, text + "[metrics]\nlisten = \"127.0.0.1:9464\"\n[log]\nformat = "
                                   "\"json\"\n[server]\nreflection = false\n")
            .metrics_listen == "127.0.0.1:9464");
  CHECK(RequireLoads(files, text).gateway_connections_per_address == 8);
  CHECK(RequireLoads(files, text + "[gateway]\nconnections_per_address = 0\n")
            .gateway_connections_per_address == 0);
  std::vector<Entry> entries = Minimal();
  entries.push_back({"hsm", "call_timeout_ms", "5"});
  RequireRefused(files, Render(entries), at + "10: hsm.call_timeout_ms must be 100..60000");
  for (const char* threads : {"0", "1025"}) {
    entries.back() = {"hsm", "threads", threads};
    RequireRefused(files, Render(entries), at + "10: hsm.threads must be 1..1024");
  }
  // Both PIN sources: the line of the first one named.
  entries.back() = {"hsm", "pin_env", R"("PIN")"};
  RequireRefused(files, Render(entries), at + "9: set exactly one of hsm.pin_file and hsm.pin_env");
}

TEST_CASE("A listen setting is host:port, an IPv6 host bare or in brackets", "[config]") {
  const std::pair<std::string, ListenAddress> parsed[] = {
      {"127.0.0.1:8200", {"127.0.0.1", 8200}},
      {"localhost:0", {"localhost", 0}},
      {"[::]:8200", {"::", 8200}},
      {"[::1]:65535", {"::1", 65535}},
      {"::1:9464", {"::1", 9464}},
      {"[fe80::1%eth0]:8200", {"fe80::1%eth0", 8200}},
      {"0.0.0.0:00080", {"0.0.0.0", 80}},
  };
  for (const auto& [listen, address] : parsed) {
    INFO(listen);
    const std::optional<ListenAddress> got = ParseListen(listen);
    REQUIRE(got);
    CHECK(got->host == address.host);
    CHECK(got->port == address.port);
  }
  for (const char* listen :
       {"",          "8200",       ":8200",       "host",          "host:",         "host:-1",
        "host:+80",  "host:65536", "host:123456", "host:80x",      "[::]",          "[::]8200",
        "[::1:8200", "::1]:8200",  "[]:80",       "[a]:80",        "[[::]]:80",     "::8200",
        "[:::1]:80", "[1:2]:80",   "a:b:80",      "[fe80::1%]:80", "127.0.0.1%x:80"}) {
    INFO(listen);
    CHECK_FALSE(ParseListen(listen));
  }
}

TEST_CASE("A missing required setting is named", "[config]") {
  ConfigFiles files;
  const std::vector<std::pair<std::string, std::string>> required = {
      {"tls", "cert"},        {"tls", "key"},      {"tls", "client_ca"}, {"hsm", "module"},
      {"hsm", "token_label"}, {"storage", "path"}, {"policy", "file"}};
  for (const auto& [section, key] : required) {
    const std::string name = section + "." + key;
    SECTION(name) {
      RequireRefused(files, Render(Without(Minimal(), section, key)),
                     "config " + files.path() + ": " + name + " is required");
    }
  }
}

TEST_CASE("A TOML syntax error is reported with its line", "[config]") {
  ConfigFiles files;
  const std::string text = "[tls]\ncert = \"/a\"\nkey = = \"/b\"\n";
  const absl::StatusOr<Config> config = files.Load(text);
  INFO(config.status().ToString());
  REQUIRE_FALSE(config.ok());
  CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(config.status().message()),
             Catch::StartsWith("config " + files.path() + ":3: "));
}

// Found by fuzz/config_fuzz.cc: Debian's toml++ 3.3.0 reaches undefined behaviour when it asks
// whether such a character is whitespace (common/toml_text.h), so the file is refused first.
TEST_CASE("A character the TOML parser cannot classify is refused with its line", "[config]") {
  ConfigFiles files;
  RequireRefused(files, "j\xef\xbb\xbc", "config " + files.path() + ":1: a character in");
  const std::string minimal = Render(Minimal());
  const auto log_level_line = std::count(minimal.begin(), minimal.end(), '\n') + 2;
  RequireRefused(files, minimal + "[log]\nlevel = \"info\" \xc3\xa9\n",
                 files.path() + ":" + std::to_string(log_level_line) + ": a character in");
  // A comment line may hold any character, and a string the same character as an escape.
  const Config config = RequireLoads(
      files, "# caf\xc3\xa9\n" + Render(Minimal()) + "[server]\nlisten = \"caf\\u00e9\"\n");
  CHECK(config.listen == "caf\xc3\xa9");
}

TEST_CASE("The example config and policy load, and every quorum is reachable", "[config]") {
  const absl::StatusOr<Config> config = LoadConfig(EXAMPLE_CONFIG);
  INFO(config.status().ToString());
  REQUIRE(config.ok());
  CHECK(config->reflection);
  CHECK(config->metrics_listen.empty());
  CHECK(config->log_format == "text");
  const auto policy = policy::Policy::LoadFile(EXAMPLE_POLICY);
  INFO(policy.status().ToString());
  REQUIRE(policy.ok());
  const absl::Status reachable = policy::CheckQuorumsReachable(config->dual_control, **policy);
  INFO(reachable.ToString());
  CHECK(reachable.ok());
}

TEST_CASE("A config file that cannot be read is NOT_FOUND", "[config]") {
  TempDir dir;
  const absl::StatusOr<Config> config = LoadConfig(dir.File("absent.toml"));
  REQUIRE_FALSE(config.ok());
  CHECK(config.status().code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace custos::server

namespace custos::server {
namespace {

TEST_CASE("tls.max_connection_age_seconds defaults to an hour and takes 1..86400", "[config]") {
  ConfigFiles files;
  CHECK(RequireLoads(files, Render(Minimal())).max_connection_age_seconds == 3600);
  std::vector<Entry> entries = Minimal();
  entries.push_back({"tls", "max_connection_age_seconds", "600"});
  CHECK(RequireLoads(files, Render(entries)).max_connection_age_seconds == 600);
  for (const char* bad : {"0", "-5", "86401", R"("1h")"}) {
    INFO(bad);
    entries = Minimal();
    entries.push_back({"tls", "max_connection_age_seconds", bad});
    RequireRefused(files, Render(entries), "tls.max_connection_age_seconds");
  }
}

}  // namespace
}  // namespace custos::server
