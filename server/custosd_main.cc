// custosd: the Custos key management server.
//
//   custosd --config custosd.toml init     create the root key in the HSM (key ceremony)
//   custosd --config custosd.toml --check-config
//                                          check config, policy, TLS files and PIN, then exit
//   custosd --config custosd.toml          serve until SIGTERM/SIGINT; SIGHUP reloads the
//                                          client CRLs and the policy; SIGUSR1 logs
//                                          group-commit counts
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#endif
#include <optional>

#include <absl/synchronization/mutex.h>
#include <google/protobuf/stubs/logging.h>
#include <grpc/support/log.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string_view>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "audit/log_sink.h"
#include "audit/record.h"
#include "common/log_lines.h"
#include "common/metrics.h"
#include "common/strings.h"
#include "core/hsm_row_authenticator.h"
#include "core/kms.h"
#include "hsm/metered_hsm.h"
#include "hsm/pkcs11_hsm.h"
#include "hsm/token_lease.h"
#include "policy/dual_control.h"
#include "policy/policy.h"
#include "server/config.h"
#include "server/health.h"
#include "server/kv_gateway.h"
#include "server/malformed_requests.h"
#include "server/metrics_endpoint.h"
#include "server/services.h"
#include "server/tls.h"
#include "storage/key_store.h"

namespace custos::server {
namespace {

// Exit status when an HSM call never returned within hsm.hang_limit_ms (EX_SOFTWARE).
constexpr int kExitHsmHung = 70;
// Another server took the HSM token over (hsm/token_lease.h).
constexpr int kExitTokenTaken = 71;
// Not started: another server holds the HSM token, or the one that held it last had written
// more of the audit log than this state holds. A supervisor restarting it changes neither.
constexpr int kExitTokenRefused = 72;
// Not started: the HSM refused the PIN. Tried again and again, a wrong PIN would lock the
// token's user PIN (many HSMs do after a few failed logins), which only its security officer
// can unlock.
constexpr int kExitPinRefused = 73;

// The audit log's head as each renewal of the claim states it: "<seq> <hash hex>". A renewal
// must not wait for a commit (one held up by another connection's lock would let the claim
// lapse): while the store is busy, the head stated last.
std::function<std::string()> AuditHeadState(storage::KeyStore& store) {
  return [&store, stated = std::make_shared<std::string>()] {
    if (const auto head = store.AuditHeadIfIdle()) {
      *stated = StrCat(head->first, " ", audit::ToHex(head->second));
    }
    return *stated;
  };
}

// Before a claim left by a holder that did not release it is taken over: that holder's last
// renewal said how far its audit log went. A state that does not hold that record is an older copy
// of the holder's (or one that forked from it); serving from it would fork the log.
absl::Status CheckReachesLastHolder(storage::KeyStore& store, const std::string& holder,
                                    const std::string& state) {
  const size_t space = state.find(' ');
  uint64_t seq = 0;
  if (space == std::string::npos || !absl::SimpleAtoi(state.substr(0, space), &seq)) {
    return absl::OkStatus();  // nothing said (a claim from before states were kept)
  }
  const std::string hash = state.substr(space + 1);
  CUSTOS_ASSIGN_OR_RETURN(const storage::AuditFloor floor, store.AuditLogFloor());
  if (seq < floor.seq || (seq == floor.seq && audit::ToHex(floor.hash) == hash)) {
    return absl::OkStatus();  // archived: the floor's checkpoint vouches for it
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Record> records, store.ReadAudit(seq, 1));
  if (seq == 0 ||
      (!records.empty() && records[0].seq == seq && audit::ToHex(records[0].hash) == hash)) {
    return absl::OkStatus();
  }
  CUSTOS_ASSIGN_OR_RETURN(const auto head, store.AuditHead());
  return absl::FailedPreconditionError(
      StrCat("the HSM token's last holder (", holder, ") had written the audit log to record ", seq,
             ", which this database ",
             head.first < seq ? StrCat("does not reach (it ends at record ", head.first, ")")
                              : std::string("holds with another hash"),
             ": it is an older copy of that server's state, or one that forked from it. Start that "
             "server's own state, or restore it here"));
}

// Lost, the claim on the token is another server's: this one exits at once, writing nothing
// more (no stop record, no head), since anything it wrote now would fork the log.
void ExitIfTokenTaken(const absl::Status& status) {
  if (!absl::IsAborted(status)) return;
  spdlog::critical("{}; exiting (code {}) without writing to the token again",
                   std::string(status.message()), kExitTokenTaken);
  spdlog::default_logger()->flush();
  std::_Exit(kExitTokenTaken);
}

// This server's claim on the token, confirmed before it signs or writes the audit head and
// in every health round.
absl::Status ConfirmClaim(hsm::TokenLease& lease) {
  absl::Status confirmed = lease.Confirm();
  ExitIfTokenTaken(confirmed);
  return confirmed;
}

// Secrets pass through this process: it must never write them to a core dump, and nothing
// else running as the same user may ptrace it.
void HardenProcess() {
  rlimit none{0, 0};
  setrlimit(RLIMIT_CORE, &none);
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

// Runs Kms::RunMaintenance (request expiry, due destructions, automatic rotation) every
// `maintenance` and Kms::Checkpoint every `checkpoint` interval, and both whenever woken (a
// key wants rotating, or checkpoint_every records were added), until destroyed. A failure is
// logged and retried at the next turn.
class Maintenance {
 public:
  Maintenance(std::chrono::seconds maintenance, std::chrono::seconds checkpoint)
      : maintenance_(maintenance), checkpoint_(checkpoint) {}
  ~Maintenance() { Stop(); }
  // Waits for the current turn, if any, and ends the thread. Call before the Kms goes.
  void Stop() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  void Start(core::Kms* kms) {
    thread_ = std::thread([this, kms] {
      using Clock = std::chrono::steady_clock;
      Clock::time_point next_maintenance, next_checkpoint;  // both due at once
      // A checkpoint that failed (the HSM did not answer) is tried again soon, not only at the
      // next interval: records keep coming, and the commits that crossed checkpoint_every
      // have woken this thread already.
      std::chrono::seconds checkpoint_retry{1};
      std::unique_lock lock(mu_);
      while (!stop_) {
        const bool woken = std::exchange(woken_, false);
        lock.unlock();
        const Clock::time_point now = Clock::now();
        if (woken || now >= next_maintenance) {
          LogFailure("maintenance", kms->RunMaintenance());
          next_maintenance = now + maintenance_;
        }
        if (woken || now >= next_checkpoint) {
          const absl::Status signed_head = kms->Checkpoint();
          LogFailure("audit checkpoint", signed_head);
          if (signed_head.ok()) {
            next_checkpoint = now + checkpoint_;
            checkpoint_retry = std::chrono::seconds(1);
          } else {
            next_checkpoint = now + std::min(checkpoint_retry, checkpoint_);
            checkpoint_retry = std::min(2 * checkpoint_retry, checkpoint_);
          }
        }
        lock.lock();
        cv_.wait_until(lock, std::min(next_maintenance, next_checkpoint),
                       [this] { return stop_ || woken_; });
      }
    });
  }
  void Wake() {
    {
      std::lock_guard lock(mu_);
      woken_ = true;
    }
    cv_.notify_all();
  }

 private:
  static void LogFailure(std::string_view what, const absl::Status& status) {
    if (!status.ok()) spdlog::error("{}: {}", what, status.ToString());
  }

  const std::chrono::seconds maintenance_;
  const std::chrono::seconds checkpoint_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool woken_ = false;
  std::thread thread_;
};

// server.reflection = false: linking gRPC's reflection library registers its plugin with every
// ServerBuilder; this option takes it out again.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    std::erase_if(*plugins, [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
      return plugin->name() == "proto_server_reflection";
    });
  }
};

// The group commits' sizes and times, into `registry`.
void MeasureCommits(metrics::Registry& registry, storage::KeyStore& store) {
  metrics::Histogram& batches = registry.GetHistogram(
      "custos_audit_commit_batch_size",
      "Calls (each with its audit records) made durable by one group commit, one fsync", {},
      metrics::kSizeBuckets);
  metrics::Histogram& seconds =
      registry.GetHistogram("custos_audit_commit_duration_seconds",
                            "Group commits, from the transaction's begin to its durable commit");
  store.ObserveCommits([&batches, &seconds](size_t count, std::chrono::nanoseconds took) {
    batches.Observe(static_cast<double>(count));
    seconds.Observe(std::chrono::duration<double>(took).count());
  });
}

// The claim on the HSM token, once taken: a start that fails after taking it releases it, so
// the next start does not wait out a lease.
hsm::TokenLease* claim_to_release = nullptr;

// Releases the claim on the HSM token, saying so if it could not.
void ReleaseClaim(hsm::TokenLease& lease) {
  if (absl::Status released = lease.Release(); !released.ok()) {
    spdlog::error("releasing the HSM token (the next start waits hsm.instance_lease_ms): {}",
                  released.ToString());
  }
}

// Ends the process without exit()'s handlers, at the end of a run as on a failed start.
// Among them is OpenSSL's cleanup (libssl registers it as it loads, before main, so it cannot
// be declined), which frees OpenSSL's global state while threads left to their work may still
// use it: the gateway leaves connections that slow clients hold at the stop to their threads.
[[noreturn]] void EndProcess(int exit_code) {
  spdlog::default_logger()->flush();
  std::fflush(nullptr);
#if defined(__SANITIZE_ADDRESS__)
  __lsan_do_leak_check();  // what exit() would have run: every run is checked for leaks
#endif
  std::_Exit(exit_code);
}

// Ends a start that cannot go on. At once: an HSM call still stuck in the module (see
// hsm.call_timeout_ms) would otherwise hold the exit in the HSM layer's teardown until
// hsm.hang_limit_ms. Nothing is lost: every commit made so far is durable already. The claim
// is released first (each HSM call answered within hsm.call_timeout_ms).
int Fail(const absl::Status& status, int exit_code = 1) {
  spdlog::critical("{}", status.ToString());
  if (claim_to_release != nullptr) ReleaseClaim(*claim_to_release);
  EndProcess(exit_code);
}

// Claims the HSM token (hsm/token_lease.h) before anything is written to it, by a start or by
// init: while another server holds it (a copy of this state started by mistake, a standby),
// FAILED_PRECONDITION naming it; exit kExitTokenRefused. Renewed until released; the caller
// names it in claim_to_release, for Fail.
absl::StatusOr<std::unique_ptr<hsm::TokenLease>> ClaimToken(const Config& config, hsm::Hsm& hsm,
                                                            storage::KeyStore& store) {
  hsm::TokenLease::Options options{
      .label = config.instance_label,
      .lease = std::chrono::milliseconds(config.hsm_instance_lease_ms),
      .state = AuditHeadState(store),
      .may_take_over = [&store](const std::string& holder, const std::string& state) {
        return CheckReachesLastHolder(store, holder, state);
      }};
  absl::StatusOr<std::unique_ptr<hsm::TokenLease>> lease =
      hsm::TokenLease::Acquire(&hsm, std::move(options));
  if (lease.ok()) (*lease)->KeepRenewed(ExitIfTokenTaken);
  return lease;
}  // NOLINT(clang-analyzer-cplusplus.NewDeleteLeaks): loses track of the std::function moved

int FailToClaim(const absl::Status& status) {
  return Fail(status, absl::IsFailedPrecondition(status) ? kExitTokenRefused : 1);
}

// The HSM could not be opened: kExitPinRefused if it refused the PIN.
int FailToOpenHsm(const absl::Status& status) {
  return Fail(status, hsm::IsPinRefused(status) ? kExitPinRefused : 1);
}

// A key custosd needs could not be used: the advice to run init fits a key that is missing,
// not an HSM that did not answer (UNAVAILABLE: start again once it does) nor anything else.
absl::Status KeyMissing(const absl::Status& status, std::string_view advice) {
  if (!absl::IsNotFound(status) && !absl::IsFailedPrecondition(status)) return status;
  return absl::FailedPreconditionError(StrCat(status.message(), "; ", advice));
}

// The HSM, timed and counted into `registry` if given (hsm/metered_hsm.h).
absl::StatusOr<std::unique_ptr<hsm::Hsm>> OpenHsm(const Config& config,
                                                  metrics::Registry* registry = nullptr) {
  CUSTOS_ASSIGN_OR_RETURN(SecureBytes pin, ReadHsmPin(config));
  hsm::Pkcs11Options options;
  options.module_path = config.hsm_module;
  options.token_label = config.hsm_token_label;
  options.pin = std::move(pin);
  options.session_pool_size = static_cast<size_t>(config.hsm_threads);
  options.key_cache_capacity = config.key_cache_capacity;
  options.call_timeout = std::chrono::milliseconds(config.hsm_call_timeout_ms);
  options.max_stuck_calls = static_cast<size_t>(config.hsm_max_stuck_calls);
  options.hang_limit = std::chrono::milliseconds(config.hsm_hang_limit_ms);
  options.on_hang_limit = [](const std::string& message) {
    // Nothing short of a new process gets a thread back from a module that never answers:
    // exit for the supervisor to restart custosd, without running destructors that would
    // wait for the stuck call.
    spdlog::critical("{}; exiting (code {}) so that a supervisor restarts custosd", message,
                     kExitHsmHung);
    spdlog::default_logger()->flush();  // not shutdown(): other threads may still be logging
    std::_Exit(kExitHsmHung);
  };
  options.metrics = registry;
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<hsm::Hsm> opened, hsm::OpenPkcs11Hsm(std::move(options)));
  if (registry == nullptr) return opened;
  return std::make_unique<hsm::MeteredHsm>(std::move(opened), registry);
}

// protobuf logs a line for every malformed message a client sends (a string field that is not
// UTF-8), and gRPC then refuses the call. Through spdlog (escaped, JSON when asked) and at most
// one line per 10 s, saying how many were left out, so that no client can flood the log.
void LogProtobufMessage(google::protobuf::LogLevel level, const char* filename, int line,
                        const std::string& message) {
  if (level == google::protobuf::LOGLEVEL_FATAL) {
    spdlog::critical("protobuf {}:{}: {}", filename, line, message);
    return;
  }
  static std::mutex mu;
  static std::chrono::steady_clock::time_point next;
  static uint64_t left_out = 0;
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard lock(mu);
  if (now < next) {
    ++left_out;
    return;
  }
  next = now + std::chrono::seconds(10);
  spdlog::warn("protobuf {}:{}: {}{}", filename, line, message,
               left_out == 0 ? "" : StrCat(" (", left_out, " more such lines left out before it)"));
  left_out = 0;
}

// Creates one HSM key if missing; logs what it did. ALREADY_EXISTS is success here.
absl::Status Ensure(const absl::Status& created, std::string_view what, const Config& config) {
  if (absl::IsAlreadyExists(created)) {
    spdlog::info("{} already exists on token '{}'; nothing to do", what, config.hsm_token_label);
    return absl::OkStatus();
  }
  CUSTOS_RETURN_IF_ERROR(created);
  spdlog::info("created {} on token '{}'", what, config.hsm_token_label);
  return absl::OkStatus();
}

// A root rotation recorded `root`, and the token does not hold it: creating a new one would
// not bring back a single version wrapped under it.
absl::Status MissingRotatedRoot(const std::string& root, const absl::Status& checked) {
  return absl::FailedPreconditionError(
      StrCat(checked.message(), "; the last root rotation recorded root key '", root,
             "' in the key database, so every key version is wrapped under it: restore the HSM "
             "token (or the database) from a backup of the same root epoch"));
}

// A key generation cut short (SoftHSM2 stores a generated key's value in a second transaction,
// after its label and attributes) leaves a key that fails every use with the module's own
// error: `used`, the first use of a key at start or init, then says so, what failed
// (`failed`), and what to do (`remedy`), instead of failing every call custosd would serve.
absl::Status CutShortHint(const absl::Status& used, std::string_view failed,
                          std::string_view remedy) {
  if (used.ok() || !hsm::IsModuleFailure(used)) return used;  // the HSM, not this key
  return absl::Status(used.code(),
                      StrCat(failed, ": ", used.message(),
                             "; it may be left by a key generation cut short. ", remedy));
}

// What to do about the catalogue and audit keys: nothing was ever made with a key whose value
// was never stored, so it can go; one that worked once and fails now is the token's fault.
constexpr std::string_view kRecreateKey =
    "If init never finished with it (custosd never served), delete it and run init again; "
    "otherwise restore the HSM token from a backup";

// HMAC key `label` (`what`: the catalogue's, the audit log's) used once: NOT_FOUND if missing,
// CutShortHint's message if it fails its use.
absl::Status CheckHmacKey(hsm::Hsm& hsm, const std::string& label, std::string_view what) {
  return CutShortHint(hsm.HmacSha256(label, {}).status(),
                      StrCat(what, " '", label, "' is on the token but could not compute an HMAC"),
                      kRecreateKey);
}

// The audit signing key used once (exporting its public key signs and verifies a probe).
absl::Status CheckSigningKey(hsm::Hsm& hsm, const std::string& label) {
  return CutShortHint(hsm.PublicKeyPem(label).status(),
                      StrCat("audit signing key '", label, "' is on the token but could not sign"),
                      kRecreateKey);
}

// OK if root `label`, found on the token with safe attributes, also wraps (CutShortHint). The
// probe wraps a throwaway key the HSM makes and destroys at once. `configured`: the label is
// the configured one, which init makes, not one a root rotation made.
absl::Status CheckRootWraps(hsm::Hsm& hsm, const std::string& label, bool configured) {
  return CutShortHint(hsm.GenerateWrappedKey(label).status(),
                      StrCat("root key '", label, "' is on the token but could not wrap a new key"),
                      configured ? "If no stored key version is wrapped under it (custosctl "
                                   "backup lists them by root), delete it and run init again"
                                 : "Restore the HSM token from a backup of this root epoch");
}

// The root key new versions are wrapped under: the store's record of the last root rotation,
// else the configured label.
absl::StatusOr<std::string> CurrentRootLabel(const Config& config, storage::KeyStore& store) {
  CUSTOS_ASSIGN_OR_RETURN(std::optional<std::string> rotated,
                          store.GetSetting(core::kRootKeySetting));
  return rotated.value_or(config.root_key_label);
}

// The key ceremony: the root key, the audit log's HMAC key and its checkpoint signing key,
// each created inside the HSM once. Running it again changes nothing. Once a root rotation
// has named another root, init never creates a root under the configured label again: every
// version is wrapped under the rotated one.
int Init(const Config& config) {
  core::HsmRowAuthenticator rows(config.catalog_hmac_key_label);
  absl::StatusOr<std::unique_ptr<storage::KeyStore>> store =
      storage::KeyStore::Open(config.storage_path, &rows);
  if (!store.ok()) return Fail(store.status());
  absl::StatusOr<std::unique_ptr<hsm::Hsm>> hsm = OpenHsm(config);
  if (!hsm.ok()) return FailToOpenHsm(hsm.status());
  // As at a start: a server using the token is not written under.
  absl::StatusOr<std::unique_ptr<hsm::TokenLease>> lease = ClaimToken(config, **hsm, **store);
  if (!lease.ok()) return FailToClaim(lease.status());
  claim_to_release = lease->get();
  // The catalogue key first: reading the store's settings checks them with it.
  absl::Status catalog =
      Ensure((*hsm)->CreateHmacKey(config.catalog_hmac_key_label),
             StrCat("catalogue HMAC key '", config.catalog_hmac_key_label, "'"), config);
  if (catalog.ok())
    catalog = CheckHmacKey(**hsm, config.catalog_hmac_key_label, "catalogue HMAC key");
  if (!catalog.ok()) return Fail(catalog);
  rows.Bind(hsm->get());
  absl::StatusOr<std::string> root = CurrentRootLabel(config, **store);
  if (!root.ok()) return Fail(root.status());
  absl::Status root_done;
  if (*root == config.root_key_label) {
    root_done = Ensure((*hsm)->CreateRootKey(*root), StrCat("root key '", *root, "'"), config);
  } else {
    root_done = (*hsm)->CheckRootKey(*root);
    if (root_done.ok()) {
      spdlog::info("root key '{}' (named by the last root rotation) is present; nothing to do",
                   *root);
    } else {
      root_done = MissingRotatedRoot(*root, root_done);
    }
  }
  if (root_done.ok()) root_done = CheckRootWraps(**hsm, *root, *root == config.root_key_label);
  for (const absl::Status& done :
       {root_done,
        Ensure((*hsm)->CreateHmacKey(config.audit_hmac_key_label),
               StrCat("audit HMAC key '", config.audit_hmac_key_label, "'"), config),
        Ensure((*hsm)->CreateSigningKey(config.audit_signing_key_label),
               StrCat("audit signing key '", config.audit_signing_key_label, "'"), config)}) {
    if (!done.ok()) return Fail(done);
  }
  // A key init adopted (made by an earlier init) may be one whose generation was cut short.
  if (absl::Status works = CheckHmacKey(**hsm, config.audit_hmac_key_label, "audit HMAC key");
      !works.ok()) {
    return Fail(works);
  }
  if (absl::Status works = CheckSigningKey(**hsm, config.audit_signing_key_label); !works.ok()) {
    return Fail(works);
  }
  ReleaseClaim(**lease);
  claim_to_release = nullptr;
  return 0;
}

// custosd --check-config: the config, the policy it names (with every dual-control quorum
// reachable), the TLS files and the PIN's source, as a start would check them, without opening
// the HSM or the key database. 0 and a summary if all is well, else 1 and the first problem.
int CheckConfig(const std::string& config_path, const Config& config) {
  absl::StatusOr<std::shared_ptr<const policy::Policy>> policy =
      policy::Policy::LoadFile(config.policy_file);
  absl::Status checked = policy.status();
  if (checked.ok()) checked = policy::CheckQuorumsReachable(config.dual_control, **policy);
  if (checked.ok()) checked = CheckTlsFiles(config);
  if (checked.ok()) checked = ReadHsmPin(config).status();
  if (!checked.ok()) {
    std::fprintf(stderr, "custosd: %s\n", checked.ToString().c_str());
    return 1;
  }
  std::printf("config %s: OK\npolicy %s: OK, %zu principals, sha256 %s\n", config_path.c_str(),
              config.policy_file.c_str(), (*policy)->principal_count(),
              (*policy)->sha256_hex().c_str());
  return 0;
}

int Serve(const Config& config, const std::string& port_file, bool allow_re_anchor) {
  // Signals are taken synchronously by this thread; block them before gRPC starts threads.
  sigset_t signals;
  sigemptyset(&signals);
  for (int s : {SIGINT, SIGTERM, SIGHUP, SIGUSR1}) sigaddset(&signals, s);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A client gone mid-write (TLS writes through write(2)) must cost its connection, not
  // custosd: gRPC ignores SIGPIPE as it starts, and custosd does not rely on it.
  signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<std::shared_ptr<const policy::Policy>> policy =
      policy::Policy::LoadFile(config.policy_file);
  if (!policy.ok()) return Fail(policy.status());
  if (absl::Status reachable = policy::CheckQuorumsReachable(config.dual_control, **policy);
      !reachable.ok()) {
    return Fail(reachable);
  }
  // Before everything it measures, so that it goes last.
  metrics::Registry registry;
  // First, so that a second custosd on this state stops here, before it touches anything.
  core::HsmRowAuthenticator rows(config.catalog_hmac_key_label);
  absl::StatusOr<std::unique_ptr<storage::KeyStore>> store =
      storage::KeyStore::Open(config.storage_path, &rows);
  if (!store.ok()) return Fail(store.status());
  MeasureCommits(registry, **store);
  if (absl::Status wal = (*store)->WarnWalAbove(static_cast<uint64_t>(config.wal_warn_mb) << 20);
      !wal.ok()) {
    return Fail(wal);
  }
  absl::StatusOr<std::unique_ptr<hsm::Hsm>> hsm = OpenHsm(config, &registry);
  if (!hsm.ok()) return FailToOpenHsm(hsm.status());
  // Before anything is written to the token: no other server uses it.
  absl::StatusOr<std::unique_ptr<hsm::TokenLease>> lease = ClaimToken(config, **hsm, **store);
  if (!lease.ok()) return FailToClaim(lease.status());
  claim_to_release = lease->get();
  // Every row read from the store from here on is checked with this HSM key.
  if (absl::Status catalog =
          CheckHmacKey(**hsm, config.catalog_hmac_key_label, "catalogue HMAC key");
      !catalog.ok()) {
    return Fail(
        KeyMissing(catalog, "run `custosd --config <file> init` to create the catalogue key"));
  }
  rows.Bind(hsm->get());
  absl::StatusOr<std::string> root_key_label = CurrentRootLabel(config, **store);
  if (!root_key_label.ok()) return Fail(root_key_label.status());
  if (absl::Status root = (*hsm)->CheckRootKey(*root_key_label); !root.ok()) {
    if (absl::IsUnavailable(root)) return Fail(root);
    if (*root_key_label != config.root_key_label) {
      return Fail(MissingRotatedRoot(*root_key_label, root));
    }
    return Fail(KeyMissing(root, "run `custosd --config <file> init` once to create it"));
  }
  if (absl::Status wraps =
          CheckRootWraps(**hsm, *root_key_label, *root_key_label == config.root_key_label);
      !wraps.ok()) {
    return Fail(wraps);
  }
  absl::StatusOr<bool> confines = (*hsm)->RootKeyConfinesVersions(*root_key_label);
  if (!confines.ok()) return Fail(confines.status());
  if (!*confines) {
    spdlog::warn(
        "root key '{}' is a legacy root: it does not confine what it unwraps, so anyone holding "
        "the HSM PIN can unwrap its key versions as extractable and read them outside custosd. "
        "Migrate now: two officers run a root rotation (custosctl propose rotate-root-key), "
        "which moves every key version under a new, confining root and destroys this one",
        *root_key_label);
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MutualTlsCredentials(config);
  if (!credentials.ok()) return Fail(credentials.status());
  if (const std::shared_ptr<const RevocationList> crls = ProcessAuthenticator().revocation_list()) {
    spdlog::info("client CRLs loaded: {}", crls->Describe());
  } else {
    spdlog::info(
        "no tls.crl_dir: client certificates are not checked for revocation (expiry is checked "
        "at every call)");
  }
  // The audit log needs its HMAC key before the first record (older state: run init again).
  if (absl::Status hmac = CheckHmacKey(**hsm, config.audit_hmac_key_label, "audit HMAC key");
      !hmac.ok()) {
    return Fail(KeyMissing(hmac, "run `custosd --config <file> init` to create the audit keys"));
  }
  if (absl::Status signing = CheckSigningKey(**hsm, config.audit_signing_key_label);
      !signing.ok()) {
    return Fail(KeyMissing(signing, "run `custosd --config <file> init` to create the audit keys"));
  }
  audit::LogSink audit_sink;
  SystemClock clock;
  Maintenance maintenance(std::chrono::seconds(config.maintenance_interval_seconds),
                          std::chrono::seconds(config.checkpoint_interval_seconds));
  core::Kms kms({.hsm = hsm->get(),
                 .store = store->get(),
                 .audit = config.audit_mirror ? &audit_sink : nullptr,
                 .clock = &clock,
                 .policy = *policy,
                 .dual_control = config.dual_control,
                 .root_key_label = *root_key_label,
                 .usage_limits = config.usage_limits,
                 .audit_hmac_key_label = config.audit_hmac_key_label,
                 .audit_signing_key_label = config.audit_signing_key_label,
                 .audit_head_label = config.audit_head_label,
                 .checkpoint_every = config.checkpoint_every,
                 .audit_archive_dir = config.audit_archive_dir,
                 .context_hmac_cache = static_cast<size_t>(config.context_hmac_cache),
                 .wake_maintenance = [&maintenance] { maintenance.Wake(); },
                 .confirm_token_claim = [&lease] { return ConfirmClaim(**lease); }});
  spdlog::info("policy loaded: {} principals, sha256 {}", (*policy)->principal_count(),
               (*policy)->sha256_hex());
  // As a reload would refuse it: a policy edited while custosd was stopped that makes an
  // officer or auditor of a principal some key grants use to.
  if (absl::Status fits = kms.GrantsFit(**policy); !fits.ok()) return Fail(fits);
  // Nothing is served from a log somebody rewrote while custosd was stopped.
  if (absl::Status anchored = kms.VerifyAuditLog(config.verify_full_chain_at_start);
      !anchored.ok()) {
    // Only a log that failed the check can be re-anchored; an HSM or disk that could not be
    // read is a failure to retry, never a reason to accept the log as it is.
    if (!absl::IsFailedPrecondition(anchored)) return Fail(anchored);
    if (!allow_re_anchor) {
      return Fail(absl::FailedPreconditionError(
          StrCat(anchored.message(),
                 ". If this database was restored from a backup on purpose, start custosd with "
                 "--allow-re-anchor and have officers approve a re-anchor-audit-log request")));
    }
    spdlog::error(
        "audit log check failed: {}; serving nothing but the approval of a "
        "ReAnchorAuditLog request (started with --allow-re-anchor)",
        std::string(anchored.message()));
    kms.RequireReAnchoring(std::string(anchored.message()));
    // Only here: a request left pending through a sound run cannot execute there (its quorum
    // finds no problem), and reading every pending request would walk the log back to the
    // oldest at each start.
    if (absl::Status expired = kms.ExpireEarlierReAnchorings(); !expired.ok()) {
      return Fail(expired);
    }
  } else if (absl::StatusOr<uint64_t> sealed = kms.SealCatalog(); !sealed.ok()) {
    return Fail(sealed.status());
  } else if (*sealed > 0) {
    spdlog::warn(
        "sealed {} catalogue rows written before rows carried MACs (each recorded as "
        "SealCatalogRow); from now on a row changed outside Custos is refused",
        *sealed);
  }
  RefusalRecorder refusals(&kms, &clock);
  kms.SetRefusalCounter([&refusals](const audit::Event& record, std::string_view reason) {
    return refusals.CountRepeat(record.action, record.principal, record.peer, record.outcome,
                                reason);
  });
  std::optional<RateLimiter> per_peer, per_principal;  // off unless configured
  if (config.rate_limit_per_peer > 0) per_peer.emplace(config.rate_limit_per_peer);
  if (config.rate_limit_per_principal > 0) per_principal.emplace(config.rate_limit_per_principal);
  auto runner = std::make_unique<CallRunner>(
      &kms, &refusals,
      CallRunner::Threads{.data = static_cast<size_t>(config.worker_threads),
                          .admin = static_cast<size_t>(config.admin_worker_threads)},
      config.max_waiting_calls);
  runner->LimitRates(per_peer ? &*per_peer : nullptr, per_principal ? &*per_principal : nullptr);
  runner->Measure(&registry);
  AddServerGauges(registry, **store, kms, config.storage_path, *runner, clock);
  KeyServiceImpl key_service(runner.get());
  AdminServiceImpl admin_service(runner.get());
  DatabaseServiceImpl database_service(runner.get());
  AuditServiceImpl audit_service(
      runner.get(), &refusals,
      {.max_streams = static_cast<size_t>(config.audit_max_streams),
       .stall_limit = std::chrono::seconds(config.audit_stream_stall_seconds)});

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!config.reflection) builder.SetOption(std::make_unique<WithoutReflection>());
  // Reflection is gRPC 1.51's one synchronous service here: a small capped pool of its own, so
  // that a flood of reflection streams cannot take threads from anything else.
  grpc::ResourceQuota sync_threads("custosd-sync-services");
  sync_threads.SetMaxThreads(4);
  builder.SetResourceQuota(sync_threads);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 2);
  int port = 0;
  builder.AddListeningPort(config.listen, *credentials, &port);
  builder.RegisterService(&key_service);
  builder.RegisterService(&admin_service);
  builder.RegisterService(&audit_service);
  builder.RegisterService(&database_service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MalformedRequestRefusals(&refusals));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  // Never share the port with another process: the kernel would split callers between them.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // A backstop to the per-call checks: no connection outlives tls.max_connection_age_seconds.
  if (absl::Status age = LimitConnectionAge(builder, config.max_connection_age_seconds);
      !age.ok()) {
    return Fail(age);
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return Fail(absl::UnavailableError(StrCat("cannot listen on ", config.listen)));
  }
  // grpc.health.v1 answers SERVING only while the HSM answers and the database commits; true
  // from the first answer, since the first round runs before the port is announced. Until
  // then (the port listens already) NOT_SERVING, not gRPC's default SERVING.
  server->GetHealthCheckService()->SetServingStatus(false);
  HealthMonitor health(
      {.interval = std::chrono::milliseconds(config.health_interval_ms),
       .probe_timeout = std::chrono::milliseconds(config.health_probe_timeout_ms),
       // The RNG, and the current root looked up on the token rather than through a cached
       // handle: a token whose store went away (a module may go on serving what it holds in
       // memory) shows here.
       .probes = {{"HSM",
                   [&hsm, &kms, &lease] {
                     CUSTOS_RETURN_IF_ERROR((*hsm)->GenerateRandom(1).status());
                     CUSTOS_RETURN_IF_ERROR((*hsm)->CheckRootKey(kms.CurrentRoot()));
                     return ConfirmClaim(**lease);
                   }},
                  // Half the deadline for another connection's lock, so that a lock held
                  // elsewhere is reported as such rather than as no answer.
                  {"key database",
                   [&store, &config] {
                     return (*store)->ProbeCommit(
                         std::chrono::milliseconds(config.health_probe_timeout_ms / 2));
                   }}},
       .refusal = [&kms]() -> std::string {
         const std::string problem = kms.AnchorProblem();
         return problem.empty() ? "" : StrCat("the audit log awaits re-anchoring: ", problem);
       }},
      server->GetHealthCheckService(),
      {custos::v1::KeyService::service_full_name(), custos::v1::AdminService::service_full_name(),
       custos::v1::AuditService::service_full_name(),
       custos::v1::DatabaseService::service_full_name()});
  health.Start();
  // The key/value gateway for databases, if configured (docs/TDE.md).
  std::unique_ptr<KvGateway> gateway;
  if (!config.gateway_listen.empty()) {
    absl::StatusOr<std::unique_ptr<KvGateway>> started = KvGateway::Start(
        &kms,
        {.listen = config.gateway_listen,
         .cert = config.tls_cert,
         .key = config.tls_key,
         .connections_per_address = static_cast<size_t>(config.gateway_connections_per_address)},
        &registry);
    if (!started.ok()) return Fail(started.status());
    gateway = *std::move(started);
    spdlog::info("key/value gateway listening on {} (port {})", config.gateway_listen,
                 gateway->port());
  }
  // The Prometheus endpoint, if configured (loopback only).
  std::unique_ptr<MetricsEndpoint> metrics_endpoint;
  if (!config.metrics_listen.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsEndpoint>> started =
        MetricsEndpoint::Start(&registry, config.metrics_listen);
    if (!started.ok()) return Fail(started.status());
    metrics_endpoint = *std::move(started);
    spdlog::info("metrics on http://{}/metrics (port {})", config.metrics_listen,
                 metrics_endpoint->port());
  }
  // The gRPC port, then the gateway's and the metrics endpoint's (0 if off), one per line.
  if (!port_file.empty()) {
    std::ofstream(port_file) << port << "\n"
                             << (gateway ? gateway->port() : 0) << "\n"
                             << (metrics_endpoint ? metrics_endpoint->port() : 0) << "\n";
  }
  spdlog::info("custosd listening on {} (port {})", config.listen, port);
  if (absl::Status started = kms.RecordServerStart(); !started.ok()) return Fail(started);
  maintenance.Start(&kms);

  for (;;) {
    int signal = 0;
    sigwait(&signals, &signal);
    if (signal == SIGUSR1) {
      const storage::CommitStats stats = (*store)->GetCommitStats();
      spdlog::info("group commit: {} batches in {} transactions since start", stats.batches,
                   stats.transactions);
      const CallRunner::Counts calls = runner->counts();
      using Lane = CallRunner::Lane;
      spdlog::info(
          "calls: {} waiting now, {} of them officers' and {} auditors'; {} refused (queue "
          "full), {} over a rate limit and {} abandoned by their clients before they ran, since "
          "start",
          runner->waiting(Lane::kData) + runner->waiting(Lane::kOfficer) +
              runner->waiting(Lane::kAuditor),
          runner->waiting(Lane::kOfficer), runner->waiting(Lane::kAuditor), calls.refused,
          calls.rate_limited, calls.abandoned);
      continue;
    }
    if (signal != SIGHUP) break;
    // The CRLs first, and whatever becomes of the policy: a revocation must not wait for it.
    if (absl::StatusOr<std::string> crls = ReloadClientCrls(config); crls.ok()) {
      spdlog::info("client CRLs reloaded: {}", *crls);
    } else {
      spdlog::error("client CRL reload refused, keeping the current CRLs: {}",
                    crls.status().ToString());
    }
    absl::StatusOr<std::shared_ptr<const policy::Policy>> reloaded =
        policy::Policy::LoadFile(config.policy_file);
    if (!reloaded.ok()) {
      spdlog::error("policy reload refused, keeping the current policy: {}",
                    reloaded.status().ToString());
      continue;
    }
    if (absl::Status replaced = kms.ReplacePolicy(*reloaded); !replaced.ok()) {
      spdlog::error("policy reload refused, keeping the current policy: {}", replaced.ToString());
      continue;
    }
    spdlog::info("policy reloaded: {} principals, sha256 {}", (*reloaded)->principal_count(),
                 (*reloaded)->sha256_hex());
  }
  spdlog::info("shutting down");
  // NOT_SERVING for good, first: Server::Shutdown refuses new calls but leaves the health
  // statuses as they were, and a balancer watching them should stop sending calls before that.
  server->GetHealthCheckService()->Shutdown();
  gateway.reset();           // stops listening, waits for its calls in progress
  metrics_endpoint.reset();  // before what its gauges read goes
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  health.Stop();   // after the drain: a probe hung in the HSM must not hold it up
  runner.reset();  // Shutdown waited for every call to finish: the queue is empty
  refusals.Stop();
  maintenance.Stop();
  kms.StopBackgroundWork();  // a root rotation's re-wrapping resumes at the next start
  if (absl::Status stopped = kms.RecordServerStop(); !stopped.ok()) {
    spdlog::error("{}", stopped.ToString());
  }
  // A last signed checkpoint, covering the stop record, and the HSM told that nothing follows.
  if (absl::Status closed = kms.CloseAuditLog(); !closed.ok()) {
    spdlog::error("audit checkpoint at stop: {}", closed.ToString());
  }
  ReleaseClaim(**lease);
  return 0;
}

}  // namespace
}  // namespace custos::server

static int Run(int argc, char** argv) {
  using namespace custos::server;
  HardenProcess();
  // gRPC's absl mutexes check every lock order for cycles unless told not to: a few per cent
  // of every call's CPU, for a check that belongs in gRPC's own tests.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  CLI::App app{"custosd: the Custos key management server"};
  std::string config_path;
  std::string port_file;
  bool allow_re_anchor = false;
  app.add_option("-c,--config", config_path, "server configuration (TOML)")->required();
  app.add_option("--port-file", port_file, "write the bound port here once listening");
  app.add_flag("--allow-re-anchor", allow_re_anchor,
               "if the audit log fails its start-up check (a restored backup), wait for officers "
               "to approve re-anchoring it instead of exiting");
  bool check_config = false;
  app.add_flag("--check-config", check_config,
               "check the config, the policy, the TLS files and the PIN's source, then exit "
               "(0 if all is well); touches neither the HSM nor the database");
  CLI::App* init = app.add_subcommand("init", "create the root key in the HSM if missing");
  CLI11_PARSE(app, argc, argv);

  google::protobuf::SetLogHandler(&LogProtobufMessage);
  absl::StatusOr<Config> config = LoadConfig(config_path);
  if (check_config) {
    if (config.ok()) return CheckConfig(config_path, *config);
    std::fprintf(stderr, "custosd: %s\n", config.status().ToString().c_str());
    return 1;
  }
  if (!config.ok()) return Fail(config.status());
  spdlog::set_level(spdlog::level::from_str(config->log_level));
  if (config->log_format != "json") {
    custos::UseTextLogLines();
  } else {
    custos::UseJsonLogLines();
  }
  // gRPC's own messages too, so that every line of the log has one format and is escaped.
  gpr_set_log_function([](gpr_log_func_args* args) {
    const spdlog::level::level_enum level =
        args->severity == GPR_LOG_SEVERITY_ERROR  ? spdlog::level::err
        : args->severity == GPR_LOG_SEVERITY_INFO ? spdlog::level::info
                                                  : spdlog::level::debug;
    spdlog::log(level, "grpc {}:{}: {}", args->file, args->line, args->message);
  });
  return init->parsed() ? Init(*config) : Serve(*config, port_file, allow_re_anchor);
}

int main(int argc, char** argv) {
  int exit_code = 1;
  try {
    exit_code = Run(argc, argv);
  } catch (const std::exception& e) {  // e.g. out of memory: said, never a crash dump
    std::fprintf(stderr, "custosd: %s\n", e.what());
  }
  custos::server::EndProcess(exit_code);
}
