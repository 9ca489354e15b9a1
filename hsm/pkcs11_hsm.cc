// Pkcs11Hsm: the Hsm interface over a PKCS#11 module (see hsm.h for the key hierarchy).
//
// Every operation borrows a pooled session and runs once; if the HSM says the session, the
// login or a handle was lost (token pulled, sessions closed), it drops what is stale and runs
// once more on a fresh session, so callers see a token that came back as never gone.
//
// The recovery ladder's last rung: after a device or token error (or a key the token held
// vanishing with its store), operations answer UNAVAILABLE until the module has been
// finalised and initialised again. That happens on the next operation that finds no other
// inside the module (C_Finalize during a call is undefined): it finds the token again by
// label, logs in, and the handles of the keys and the cache of unwrapped versions are rebuilt
// as operations need them. Failed attempts are repeated at most every 200 ms.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "common/failure_log.h"
#include "hsm/audit_keys.h"
#include "hsm/call_executor.h"
#include "hsm/ck_error.h"
#include "hsm/deadline_hsm.h"
#include "hsm/key_cache.h"
#include "hsm/p11_object.h"
#include "hsm/pkcs11_hsm.h"
#include "hsm/pkcs11_module.h"
#include "hsm/root_key.h"
#include "hsm/session_pool.h"
#include "spdlog/spdlog.h"

namespace custos::hsm {
namespace {

// Failed attempts at re-initialising the module are at least this far apart.
constexpr std::chrono::milliseconds kReinitializeInterval{200};
// How long a call that would re-initialise the module waits for the calls inside it, and how
// many such waits it spends behind other callers re-initialising.
constexpr std::chrono::milliseconds kReinitializeWait{250};
constexpr int kReinitializeWaits = 4;

// RFC 5649 output for a 32-byte key: 8-byte integrity block + the key, padded to 8 bytes.
constexpr size_t kWrappedAes256Bytes = 40;

// PKCS#11 takes input buffers as non-const pointers but does not write them. An empty span
// may have a null data(), which some modules reject, so it points at a dummy byte instead.
CK_BYTE_PTR In(std::span<const uint8_t> bytes) {
  static const CK_BYTE kEmpty = 0;
  return const_cast<CK_BYTE_PTR>(bytes.empty() ? &kEmpty : bytes.data());
}

// True if `values` but the one at `skip` are some of `wanted` (sorted), each at most as often.
bool IsLeftOf(const std::vector<std::string>& values, size_t skip,
              const std::vector<std::string>& wanted) {
  std::vector<std::string> rest;
  for (size_t i = 0; i < values.size(); ++i) {
    if (i != skip) rest.push_back(values[i]);
  }
  std::sort(rest.begin(), rest.end());
  return std::includes(wanted.begin(), wanted.end(), rest.begin(), rest.end());
}

// Wrapped key versions come from the caller's store, not from its clients: one that is
// malformed or does not unwrap means a damaged database or a root key that is not the one the
// version was wrapped under. DATA_LOSS says so, never INVALID_ARGUMENT, which callers may
// report to clients as their own mistake.
absl::Status CheckWrappedSize(const WrappedKey& key) {
  if (key.wrapped.size() == kWrappedAes256Bytes) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat(
      "stored key version '", key.cache_id, "' is ", key.wrapped.size(), " bytes, not the ",
      kWrappedAes256Bytes, " of a wrapped key (damaged database)"));
}

absl::Status DoesNotUnwrap(const WrappedKey& key) {
  return absl::DataLossError(absl::StrCat("stored key version '", key.cache_id,
                                          "' does not unwrap under root key '", key.root_key_label,
                                          "' (damaged database or wrong root)"));
}

CK_GCM_PARAMS GcmParams(std::span<const uint8_t> iv, std::span<const uint8_t> aad) {
  CK_GCM_PARAMS params{};
  params.iv_ptr = In(iv);
  params.iv_len = iv.size();
  params.iv_bits = iv.size() * 8;
  params.aad_ptr = aad.empty() ? nullptr : In(aad);
  params.aad_len = aad.size();
  params.tag_bits = kGcmTagBytes * 8;
  return params;
}

// Watches for PKCS#11 calls that do not return (PKCS#11 has no timeout), from a thread of its
// own since the stalled callers cannot report themselves: a call under way for longer than
// `stall_after` is logged once, then every 30 s while the stall lasts, and its end once.
class StallWatch {
 public:
  StallWatch(const SessionPool* pool, std::chrono::milliseconds stall_after)
      : pool_(pool), stall_after_(stall_after), thread_([this] { Run(); }) {}
  ~StallWatch() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void Run() {
    using std::chrono::duration_cast;
    using std::chrono::seconds;
    std::chrono::steady_clock::time_point stalled_since, reported;
    bool stalled = false;
    std::unique_lock lock(mu_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(250), [this] { return stop_; })) {
      const auto longest = pool_->LongestLease();
      const auto now = std::chrono::steady_clock::now();
      if (longest >= stall_after_ && !stalled) {
        stalled = true;
        stalled_since = reported = now;
        spdlog::error(
            "HSM stalled: a PKCS#11 call has not returned for {} s; calls that need "
            "the HSM wait behind it",
            duration_cast<seconds>(longest).count());
      } else if (longest >= stall_after_ && now - reported >= seconds(30)) {
        reported = now;
        spdlog::error("HSM still stalled: the oldest PKCS#11 call has been under way for {} s",
                      duration_cast<seconds>(longest).count());
      } else if (longest < stall_after_ && stalled) {
        stalled = false;
        spdlog::info("HSM stall over after {} s",
                     duration_cast<seconds>(now - stalled_since + stall_after_).count());
      }
    }
  }

  const SessionPool* const pool_;
  const std::chrono::milliseconds stall_after_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the rest is ready
};

class Pkcs11Hsm final : public Hsm {
 public:
  Pkcs11Hsm(std::unique_ptr<SessionPool> pool, std::unique_ptr<KeyCache> cache)
      : pool_(std::move(pool)),
        cache_(std::move(cache)),
        api_(pool_->module()->api()),
        roots_(pool_.get()),
        audit_keys_(pool_.get()),
        stall_watch_(pool_.get(), std::chrono::seconds(2)) {}

  absl::Status CreateRootKey(const std::string& label) override;
  absl::Status CheckRootKey(const std::string& label) override;
  absl::StatusOr<bool> RootKeyConfinesVersions(const std::string& label) override;
  absl::Status DestroyRootKey(const std::string& label) override;
  absl::StatusOr<Bytes> GenerateWrappedKey(const std::string& root_key_label) override;
  absl::StatusOr<Bytes> RewrapKey(const WrappedKey& key,
                                  const std::string& new_root_key_label) override;
  absl::StatusOr<GcmCiphertext> Encrypt(const WrappedKey& key, std::span<const uint8_t> plaintext,
                                        std::span<const uint8_t> aad) override;
  absl::StatusOr<SecureBytes> Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                      std::span<const uint8_t> ciphertext_and_tag,
                                      std::span<const uint8_t> aad) override;
  absl::StatusOr<SecureBytes> GenerateRandom(size_t count) override;
  absl::StatusOr<SealedDataKey> GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                std::span<const uint8_t> aad) override;
  void Forget(const std::string& cache_id) override {
    std::shared_lock gate(gate_);  // Dropping a copy may destroy its object in the module.
    cache_->Forget(cache_id);
  }
  absl::Status CreateHmacKey(const std::string& label) override;
  absl::StatusOr<Bytes> HmacSha256(const std::string& label,
                                   std::span<const uint8_t> data) override;
  absl::Status CreateSigningKey(const std::string& label) override;
  absl::StatusOr<Bytes> SignSha256(const std::string& label,
                                   std::span<const uint8_t> message) override;
  absl::StatusOr<std::string> PublicKeyPem(const std::string& label) override;
  absl::StatusOr<std::vector<std::string>> ReadTokenData(const std::string& label) override;
  absl::Status WriteTokenData(const std::string& label, std::string_view value) override;
  absl::Status ReplaceTokenData(const std::string& label, const std::vector<std::string>& expected,
                                std::string_view value) override;

 private:
  // The private data objects labelled `label`.
  absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindData(CK_SESSION_HANDLE session,
                                                         const std::string& label);
  // The values of data objects `objects`.
  absl::StatusOr<std::vector<std::string>> ValuesOf(CK_SESSION_HANDLE session,
                                                    const std::vector<CK_OBJECT_HANDLE>& objects);
  // Stores `value` under `label` as a new object, then destroys `older`.
  absl::Status StoreData(CK_SESSION_HANDLE session, const std::string& label,
                         std::string_view value, const std::vector<CK_OBJECT_HANDLE>& older);
  // Destroys `older`, the objects a new one under `label` replaces.
  absl::Status DestroyData(CK_SESSION_HANDLE session, const std::string& label,
                           const std::vector<CK_OBJECT_HANDLE>& older);
  // Runs `op` on a pooled session, once more after recovering from a lost session, login or
  // handle; logs the HSM failing and recovering (failures_).
  template <typename T>
  absl::StatusOr<T> Run(absl::FunctionRef<absl::StatusOr<T>(CK_SESSION_HANDLE)> op);
  template <typename T>
  absl::StatusOr<T> RunOnce(absl::FunctionRef<absl::StatusOr<T>(CK_SESSION_HANDLE)> op);
  bool Recover(const absl::Status& error, SessionPool::Lease& lease);
  // Holds `gate` (shared) for an operation, re-initialising the module first if that is due;
  // UNAVAILABLE while it is due and cannot be done yet, or fails.
  absl::Status Enter(std::shared_lock<std::shared_timed_mutex>& gate);
  // `error` came from the module or token itself: operations stop until it is re-initialised.
  absl::Status NeedReinitialize(const absl::Status& error);
  // The ladder's last rung; with gate_ held exclusively.
  absl::Status Reinitialize();

  absl::StatusOr<KeyCache::Ref> Unwrapped(CK_SESSION_HANDLE session, const WrappedKey& key);
  // AES-256-GCM of `plaintext` under `version` with `iv`, binding `aad`: ciphertext and tag.
  absl::StatusOr<Bytes> Seal(CK_SESSION_HANDLE session, const KeyCache::Ref& version,
                             std::span<const uint8_t> iv, std::span<const uint8_t> plaintext,
                             std::span<const uint8_t> aad);
  // Wraps `key` (an extractable session object) under `root` with CKM_AES_KEY_WRAP_PAD.
  absl::StatusOr<Bytes> Wrap(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE root,
                             CK_OBJECT_HANDLE key);

  // True if `error` is one a module may give for bad input (a GCM tag or an RFC 5649 check
  // that fails) and the HSM still answers on `session`, so the data is to blame, not the HSM.
  // PKCS#11 names no code for a bad tag: SoftHSM2 says CKR_GENERAL_ERROR, others
  // CKR_ENCRYPTED_DATA_INVALID or CKR_FUNCTION_FAILED.
  bool BlameData(CK_SESSION_HANDLE session, const absl::Status& error);
  // `error`, from unwrapping `key`, as DATA_LOSS if the wrapped bytes are to blame (they are
  // stored material); as it is if the HSM is.
  absl::Status UnwrapError(CK_SESSION_HANDLE session, const WrappedKey& key,
                           const absl::Status& error);

  // Declared in this order so that the cache's session closes before the pool's, and the
  // module (owned by both) goes last.
  const std::unique_ptr<SessionPool> pool_;
  const std::unique_ptr<KeyCache> cache_;
  CK_FUNCTION_LIST* const api_;
  RootKeys roots_;
  AuditKeys audit_keys_;
  FailureLog failures_{"HSM"};
  std::atomic<uint64_t> recoveries_{0};      // Recover() calls so far (see RunOnce)
  std::atomic<int> token_info_failures_{0};  // CheckRootKey rounds in a row C_GetTokenInfo failed
  // Held shared by every operation, exclusively while the module is re-initialised.
  std::shared_timed_mutex gate_;
  std::atomic<int> inside_{0};  // Calls holding gate_ shared: inside the module, or about to be.
  std::atomic<bool> reinitialize_{false};  // Due: set on a module or token error.
  // Until when (steady clock ticks) callers do not wait for gate_: a wait just timed out.
  std::atomic<int64_t> gate_busy_until_{0};
  std::mutex reinit_mu_;  // Guards the two below.
  std::chrono::steady_clock::time_point last_reinit_;
  absl::Status last_reinit_error_;
  StallWatch stall_watch_;  // last: stopped first
};

template <typename T>
absl::StatusOr<T> Pkcs11Hsm::Run(absl::FunctionRef<absl::StatusOr<T>(CK_SESSION_HANDLE)> op) {
  absl::StatusOr<T> result = RunOnce(op);
  // Only the HSM's own failures; a tag that does not verify is the caller's data.
  if (absl::IsUnavailable(result.status()) || absl::IsInternal(result.status())) {
    failures_.Failed(result.status());
  } else {
    failures_.Succeeded();
  }
  return result;
}

template <typename T>
absl::StatusOr<T> Pkcs11Hsm::RunOnce(absl::FunctionRef<absl::StatusOr<T>(CK_SESSION_HANDLE)> op) {
  std::shared_lock gate(gate_, std::defer_lock);
  CUSTOS_RETURN_IF_ERROR(Enter(gate));
  absl::Cleanup left = [&] {
    if (gate.owns_lock()) --inside_;
  };
  bool reinitialized = false;
  for (int attempt = 0;; ++attempt) {
    absl::Status failed;  // The module's or token's own failure, after the lease is returned.
    {
      absl::StatusOr<SessionPool::Lease> acquired = pool_->Acquire();
      if (!acquired.ok()) {
        failed = acquired.status();
      } else {
        SessionPool::Lease lease = *std::move(acquired);
        const uint64_t recoveries = recoveries_.load();
        absl::StatusOr<T> result = op(lease.handle());
        if (result.ok()) return result;
        failed = result.status();
        if (std::optional<CK_RV> rv = CkrOf(failed); !rv || !NeedsReinitialize(*rv)) {
          // Threads that meet one disruption together each recover, and a retry can meet the
          // handles another thread's recovery just cleared: such a retry gets another (up to
          // four attempts).
          const bool others_recovered = recoveries_.load() != recoveries;
          if (!Recover(failed, lease)) return result;
          if (attempt > 0 && !(others_recovered && attempt < 3)) {
            // Still disrupted (the token is not back yet): worth a later retry.
            return absl::UnavailableError(failed.message());
          }
          continue;
        }
        lease.MarkBroken();
      }
    }
    const absl::Status unavailable = NeedReinitialize(failed);
    if (reinitialized || unavailable.code() != absl::StatusCode::kUnavailable || !CkrOf(failed)) {
      return unavailable;
    }
    // One retry, if this call can re-initialise the module now (no other call is inside it):
    // a single device error then costs the caller nothing.
    --inside_;
    gate.unlock();
    if (!Enter(gate).ok()) return unavailable;
    reinitialized = true;
  }
}

absl::Status Pkcs11Hsm::NeedReinitialize(const absl::Status& error) {
  std::optional<CK_RV> rv = CkrOf(error);
  if (!rv || !NeedsReinitialize(*rv)) return error;
  if (!reinitialize_.exchange(true)) {
    spdlog::warn("HSM {}; re-initialising the PKCS#11 module once no call is inside it",
                 std::string(error.message()));
  }
  return absl::UnavailableError(error.message());
}

absl::Status Pkcs11Hsm::Enter(std::shared_lock<std::shared_timed_mutex>& gate) {
  if (!reinitialize_.load()) {
    gate.lock();
    ++inside_;
    return absl::OkStatus();
  }
  // Calls inside the module are given a moment to return (a health probe, say); new ones
  // wait here rather than enter, so they drain. If that did not do last time (a call stuck in
  // the module), only one caller a second waits again; the others are answered at once.
  // Other callers re-initialising ahead of this one (each attempt spaced out) are waited for:
  // the first call after an outage ends succeeds.
  std::unique_lock exclusive(gate_, std::defer_lock);
  if (std::chrono::steady_clock::now().time_since_epoch().count() >= gate_busy_until_.load()) {
    for (int wait = 0; !exclusive.try_lock_for(kReinitializeWait); ++wait) {
      if (inside_.load() > 0 || wait == kReinitializeWaits - 1) {
        gate_busy_until_ =
            (std::chrono::steady_clock::now() + std::chrono::seconds(1)).time_since_epoch().count();
        break;
      }
    }
  }
  if (!exclusive.owns_lock()) {
    return absl::UnavailableError(
        "the HSM is recovering: the PKCS#11 module is re-initialised once the calls still "
        "inside it return");
  }
  if (reinitialize_.load()) CUSTOS_RETURN_IF_ERROR(Reinitialize());
  exclusive.unlock();
  gate.lock();
  ++inside_;
  return absl::OkStatus();
}

absl::Status Pkcs11Hsm::Reinitialize() {
  std::lock_guard lock(reinit_mu_);
  // Attempts are spaced out (the module is reloaded each time), but the caller waits out the
  // rest of the interval rather than fail: the first call after an outage ends succeeds.
  if (!last_reinit_error_.ok()) {
    std::this_thread::sleep_until(last_reinit_ + kReinitializeInterval);
  }
  last_reinit_ = std::chrono::steady_clock::now();
  // Everything the module had is about to go: forget it without asking the module.
  cache_->Abandon();
  pool_->Abandon();
  roots_.Reset();
  audit_keys_.Reset();
  absl::Status done = pool_->module()->Reinitialize();
  if (done.ok()) done = pool_->Reconnect();
  if (!done.ok()) {
    last_reinit_error_ = absl::UnavailableError(
        absl::StrCat("the HSM is recovering: re-initialising the PKCS#11 module failed (",
                     done.message(), "); retrying"));
    return last_reinit_error_;
  }
  last_reinit_error_ = absl::OkStatus();
  // The token is back: a key it still lacks was removed from it, for good (FAILED_PRECONDITION
  // from now on), not lost with it.
  roots_.ForgetFound();
  audit_keys_.ForgetFound();
  reinitialize_ = false;
  ++recoveries_;
  spdlog::info("HSM recovered: PKCS#11 module re-initialised, token found and logged in again");
  return absl::OkStatus();
}

bool Pkcs11Hsm::Recover(const absl::Status& error, SessionPool::Lease& lease) {
  std::optional<CK_RV> rv = CkrOf(error);
  if (!rv) return false;
  if (IsSessionDead(*rv)) {
    lease.MarkBroken();
    pool_->DiscardAll();  // Its siblings are most likely dead too.
  } else if (IsLoginLost(*rv) || IsHandleStale(*rv)) {
    // Some modules report objects hidden by a lost login as invalid handles. The retry gets a
    // fresh session: an operation the failed call began may still be active on this one.
    lease.MarkBroken();
    // A stale handle is also what a call on another session (the key cache's) meets once the
    // token was lost and is back: if this session died with it, its idle siblings did too.
    const std::optional<CK_RV> session_rv = CkrOf(pool_->EnsureLoggedIn(lease.handle()));
    if (session_rv && IsSessionDead(*session_rv)) pool_->DiscardAll();
  } else {
    return false;
  }
  ++recoveries_;
  spdlog::warn("HSM {}; recovering with fresh sessions and handles", std::string(error.message()));
  roots_.Reset();
  audit_keys_.Reset();
  cache_->Clear();
  return true;
}

absl::Status Pkcs11Hsm::CreateRootKey(const std::string& label) {
  return Run<bool>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<bool> {
           CUSTOS_RETURN_IF_ERROR(roots_.Create(session, label));
           return true;
         })
      .status();
}

absl::Status Pkcs11Hsm::CheckRootKey(const std::string& label) {
  return Run<CK_OBJECT_HANDLE>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<CK_OBJECT_HANDLE> {
           // SoftHSM2 (2.6) can lose track of its token's files for good, after a moment
           // without file descriptors or reading its index mid-rewrite: from then on every
           // token object it creates fails with CKR_GENERAL_ERROR, and so does C_GetTokenInfo,
           // until the module is initialised again. Asked here, each health round, and taken
           // for the lost token it is when two rounds in a row meet it (a module that fails
           // once is not re-initialised under load): the module is re-initialised.
           CK_SESSION_INFO session_info{};
           CK_RV rv = api_->C_GetSessionInfo(session, &session_info);
           if (rv != CKR_OK) return CkError("C_GetSessionInfo", rv);
           CK_TOKEN_INFO token_info{};
           rv = api_->C_GetTokenInfo(session_info.slotID, &token_info);
           if (rv == CKR_GENERAL_ERROR) {
             if (token_info_failures_.fetch_add(1) > 0) {
               token_info_failures_ = 0;
               return TokenLostError(
                   "PKCS#11 C_GetTokenInfo failed: CKR_GENERAL_ERROR (the module lost track of "
                   "its token)");
             }
           } else if (rv != CKR_OK) {
             return CkError("C_GetTokenInfo", rv);
           } else {
             token_info_failures_ = 0;
           }
           return roots_.Refresh(session, label);
         })
      .status();
}

absl::StatusOr<bool> Pkcs11Hsm::RootKeyConfinesVersions(const std::string& label) {
  return Run<bool>([&](CK_SESSION_HANDLE session) { return roots_.Confines(session, label); });
}

absl::Status Pkcs11Hsm::DestroyRootKey(const std::string& label) {
  // Pool sessions are read/write, as destroying a token object requires.
  absl::StatusOr<CK_OBJECT_HANDLE> destroyed =
      Run<CK_OBJECT_HANDLE>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<CK_OBJECT_HANDLE> {
        CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE root, roots_.Destroy(session, label));
        // Copies unwrapped under it would otherwise live on in the HSM until evicted (they are
        // no longer served in any case: every use looks the root up first). Inside the
        // operation, so that no re-initialisation can renumber the handles meanwhile.
        cache_->ForgetRoot(root);
        return root;
      });
  if (!destroyed.ok()) return destroyed.status();
  spdlog::info("destroyed root key '{}'", label);
  return absl::OkStatus();
}

absl::StatusOr<Bytes> Pkcs11Hsm::GenerateWrappedKey(const std::string& root_key_label) {
  return Run<Bytes>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<Bytes> {
    CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE root, roots_.Get(session, root_key_label));
    AttributeTemplate version;
    version.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .Ulong(CKA_VALUE_LEN, kAes256KeyBytes)
        .Bool(CKA_TOKEN, false)
        .Bool(CKA_PRIVATE, true)
        .Bool(CKA_SENSITIVE, true)
        .Bool(CKA_EXTRACTABLE, true);  // Only so it can be wrapped, in the next call.
    CK_MECHANISM generate{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    CK_RV rv = api_->C_GenerateKey(session, &generate, version.data(), version.size(), &handle);
    if (rv != CKR_OK) return CkError("C_GenerateKey", rv);
    ObjectGuard destroy(*pool_->module(), session, handle);  // The token must not gain objects.
    return Wrap(session, root, handle);
  });
}

absl::StatusOr<Bytes> Pkcs11Hsm::RewrapKey(const WrappedKey& key,
                                           const std::string& new_root_key_label) {
  CUSTOS_RETURN_IF_ERROR(CheckWrappedSize(key));
  return Run<Bytes>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<Bytes> {
    CUSTOS_ASSIGN_OR_RETURN(const bool confined, roots_.Confines(session, key.root_key_label));
    if (confined) {
      return absl::FailedPreconditionError(absl::StrCat(
          "stored key version '", key.cache_id, "' is wrapped under root key '", key.root_key_label,
          "', which confines what it unwraps: it cannot be re-wrapped"));
    }
    CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE old_root, roots_.Get(session, key.root_key_label));
    CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE new_root, roots_.Get(session, new_root_key_label));
    // Not the cache's copy: that one is non-extractable, as it must be. This one is
    // extractable only so it can be wrapped again, and lives only until this returns; a legacy
    // root (no unwrap template) is the only kind that allows it.
    AttributeTemplate transient;
    transient.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .Bool(CKA_TOKEN, false)
        .Bool(CKA_PRIVATE, true)
        .Bool(CKA_SENSITIVE, true)
        .Bool(CKA_EXTRACTABLE, true)
        .Bool(CKA_ENCRYPT, false)
        .Bool(CKA_DECRYPT, false)
        .Bool(CKA_WRAP, false)
        .Bool(CKA_UNWRAP, false);
    CK_MECHANISM unwrap{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    CK_RV rv = api_->C_UnwrapKey(session, &unwrap, old_root, In(key.wrapped), key.wrapped.size(),
                                 transient.data(), transient.size(), &handle);
    if (rv != CKR_OK) return UnwrapError(session, key, CkError("C_UnwrapKey", rv));
    ObjectGuard destroy(*pool_->module(), session, handle);  // The token must not gain objects.
    return Wrap(session, new_root, handle);
  });
}

absl::StatusOr<Bytes> Pkcs11Hsm::Wrap(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE root,
                                      CK_OBJECT_HANDLE key) {
  CK_MECHANISM wrap{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  Bytes wrapped(kWrappedAes256Bytes);
  CK_ULONG length = wrapped.size();
  CK_RV rv = api_->C_WrapKey(session, &wrap, root, key, wrapped.data(), &length);
  if (rv != CKR_OK) return CkError("C_WrapKey", rv);
  if (length != kWrappedAes256Bytes) return absl::InternalError("C_WrapKey: unexpected length");
  return wrapped;
}

absl::StatusOr<KeyCache::Ref> Pkcs11Hsm::Unwrapped(CK_SESSION_HANDLE session,
                                                   const WrappedKey& key) {
  CUSTOS_RETURN_IF_ERROR(CheckWrappedSize(key));
  // Looked up first, even on a cache hit: no version is served once its root is destroyed,
  // nor under a label other than the one it was unwrapped under.
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE root, roots_.Get(session, key.root_key_label));
  absl::StatusOr<KeyCache::Ref> unwrapped = cache_->Get(key.cache_id, key.wrapped, root);
  if (!unwrapped.ok()) return UnwrapError(session, key, unwrapped.status());
  return unwrapped;
}

absl::Status Pkcs11Hsm::UnwrapError(CK_SESSION_HANDLE session, const WrappedKey& key,
                                    const absl::Status& error) {
  // INVALID_ARGUMENT from CkError means CKR_WRAPPED_KEY_INVALID and the like: about the data
  // even if the session then died.
  if ((CkrOf(error) && absl::IsInvalidArgument(error)) || BlameData(session, error)) {
    return DoesNotUnwrap(key);
  }
  return error;
}

absl::StatusOr<Bytes> Pkcs11Hsm::Seal(CK_SESSION_HANDLE session, const KeyCache::Ref& version,
                                      std::span<const uint8_t> iv,
                                      std::span<const uint8_t> plaintext,
                                      std::span<const uint8_t> aad) {
  CK_GCM_PARAMS params = GcmParams(iv, aad);
  CK_MECHANISM gcm{CKM_AES_GCM, &params, sizeof params};
  CK_RV rv = api_->C_EncryptInit(session, &gcm, version->handle());
  if (rv != CKR_OK) return CkError("C_EncryptInit", rv);
  Bytes out(plaintext.size() + kGcmTagBytes);
  CK_ULONG length = out.size();
  rv = api_->C_Encrypt(session, In(plaintext), plaintext.size(), out.data(), &length);
  if (rv != CKR_OK) return CkError("C_Encrypt", rv);
  if (length != out.size())
    return absl::InternalError("C_Encrypt: unexpected AES-GCM output length");
  return out;
}

absl::StatusOr<GcmCiphertext> Pkcs11Hsm::Encrypt(const WrappedKey& key,
                                                 std::span<const uint8_t> plaintext,
                                                 std::span<const uint8_t> aad) {
  return Run<GcmCiphertext>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<GcmCiphertext> {
    CUSTOS_ASSIGN_OR_RETURN(KeyCache::Ref version, Unwrapped(session, key));
    GcmCiphertext out;
    out.iv.resize(kGcmIvBytes);
    CK_RV rv = api_->C_GenerateRandom(session, out.iv.data(), out.iv.size());
    if (rv != CKR_OK) return CkError("C_GenerateRandom", rv);
    CUSTOS_ASSIGN_OR_RETURN(out.ciphertext_and_tag, Seal(session, version, out.iv, plaintext, aad));
    return out;
  });
}

absl::StatusOr<SealedDataKey> Pkcs11Hsm::GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                         std::span<const uint8_t> aad) {
  return Run<SealedDataKey>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<SealedDataKey> {
    CUSTOS_ASSIGN_OR_RETURN(KeyCache::Ref version, Unwrapped(session, key));
    // One draw for the data key and the IV behind it.
    SealedDataKey out{SecureBytes(key_bytes + kGcmIvBytes), {}};
    CK_RV rv = api_->C_GenerateRandom(session, out.plaintext.data(), out.plaintext.size());
    if (rv != CKR_OK) return CkError("C_GenerateRandom", rv);
    out.sealed.iv.assign(out.plaintext.data() + key_bytes,
                         out.plaintext.data() + out.plaintext.size());
    out.plaintext.Truncate(key_bytes);  // wipes the IV's copy
    CUSTOS_ASSIGN_OR_RETURN(out.sealed.ciphertext_and_tag,
                            Seal(session, version, out.sealed.iv, out.plaintext.span(), aad));
    return out;
  });
}

absl::StatusOr<SecureBytes> Pkcs11Hsm::Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                               std::span<const uint8_t> ciphertext_and_tag,
                                               std::span<const uint8_t> aad) {
  if (iv.size() != kGcmIvBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("AES-GCM IV must be ", kGcmIvBytes, " bytes, not ", iv.size()));
  }
  if (ciphertext_and_tag.size() < kGcmTagBytes) {
    return absl::InvalidArgumentError("AES-GCM ciphertext is shorter than its 16-byte tag");
  }
  return Run<SecureBytes>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<SecureBytes> {
    CUSTOS_ASSIGN_OR_RETURN(KeyCache::Ref version, Unwrapped(session, key));
    CK_GCM_PARAMS params = GcmParams(iv, aad);
    CK_MECHANISM gcm{CKM_AES_GCM, &params, sizeof params};
    CK_RV rv = api_->C_DecryptInit(session, &gcm, version->handle());
    if (rv != CKR_OK) return CkError("C_DecryptInit", rv);
    // Some modules want room for the tag too; on failure the buffer is wiped, never returned.
    SecureBytes plaintext(ciphertext_and_tag.size());
    CK_ULONG length = plaintext.size();
    rv = api_->C_Decrypt(session, In(ciphertext_and_tag), ciphertext_and_tag.size(),
                         plaintext.data(), &length);
    if (rv != CKR_OK) {
      absl::Status error = CkError("C_Decrypt", rv);
      if (BlameData(session, error)) {
        return absl::InvalidArgumentError("ciphertext failed authentication");
      }
      return error;
    }
    if (length != ciphertext_and_tag.size() - kGcmTagBytes) {
      return absl::InternalError("C_Decrypt: unexpected AES-GCM output length");
    }
    plaintext.Truncate(length);
    return plaintext;
  });
}

bool Pkcs11Hsm::BlameData(CK_SESSION_HANDLE session, const absl::Status& error) {
  std::optional<CK_RV> rv = CkrOf(error);
  if (!rv ||
      !(*rv == CKR_ENCRYPTED_DATA_INVALID || *rv == CKR_ENCRYPTED_DATA_LEN_RANGE ||
        *rv == CKR_WRAPPED_KEY_INVALID || *rv == CKR_GENERAL_ERROR || *rv == CKR_FUNCTION_FAILED)) {
    return false;
  }
  CK_SESSION_INFO info{};
  return api_->C_GetSessionInfo(session, &info) == CKR_OK;
}

absl::StatusOr<SecureBytes> Pkcs11Hsm::GenerateRandom(size_t count) {
  if (count == 0) return SecureBytes();
  return Run<SecureBytes>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<SecureBytes> {
    SecureBytes random(count);
    CK_RV rv = api_->C_GenerateRandom(session, random.data(), random.size());
    if (rv != CKR_OK) return CkError("C_GenerateRandom", rv);
    return random;
  });
}

absl::Status Pkcs11Hsm::CreateHmacKey(const std::string& label) {
  return Run<bool>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<bool> {
           CUSTOS_RETURN_IF_ERROR(audit_keys_.CreateHmacKey(session, label));
           return true;
         })
      .status();
}

absl::StatusOr<Bytes> Pkcs11Hsm::HmacSha256(const std::string& label,
                                            std::span<const uint8_t> data) {
  return Run<Bytes>(
      [&](CK_SESSION_HANDLE session) { return audit_keys_.HmacSha256(session, label, data); });
}

absl::Status Pkcs11Hsm::CreateSigningKey(const std::string& label) {
  return Run<bool>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<bool> {
           CUSTOS_RETURN_IF_ERROR(audit_keys_.CreateSigningKey(session, label));
           return true;
         })
      .status();
}

absl::StatusOr<Bytes> Pkcs11Hsm::SignSha256(const std::string& label,
                                            std::span<const uint8_t> message) {
  return Run<Bytes>(
      [&](CK_SESSION_HANDLE session) { return audit_keys_.SignSha256(session, label, message); });
}

absl::StatusOr<std::string> Pkcs11Hsm::PublicKeyPem(const std::string& label) {
  return Run<std::string>(
      [&](CK_SESSION_HANDLE session) { return audit_keys_.PublicKeyPem(session, label); });
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> Pkcs11Hsm::FindData(CK_SESSION_HANDLE session,
                                                                  const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(pool_->EnsureLoggedIn(session));  // private objects need the login
  AttributeTemplate match;
  match.Ulong(CKA_CLASS, CKO_DATA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .String(CKA_LABEL, label);
  return FindObjects(*pool_->module(), session, match, /*max_count=*/16);
}

absl::StatusOr<std::vector<std::string>> Pkcs11Hsm::ValuesOf(
    CK_SESSION_HANDLE session, const std::vector<CK_OBJECT_HANDLE>& objects) {
  std::vector<std::string> values;
  for (CK_OBJECT_HANDLE object : objects) {
    CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
    CK_RV rv = api_->C_GetAttributeValue(session, object, &value, 1);
    if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
    std::string bytes(value.ulValueLen, '\0');
    value.pValue = bytes.data();
    rv = api_->C_GetAttributeValue(session, object, &value, 1);
    if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
    bytes.resize(value.ulValueLen);
    values.push_back(std::move(bytes));
  }
  return values;
}

absl::Status Pkcs11Hsm::StoreData(CK_SESSION_HANDLE session, const std::string& label,
                                  std::string_view value,
                                  const std::vector<CK_OBJECT_HANDLE>& older) {
  AttributeTemplate data;
  data.Ulong(CKA_CLASS, CKO_DATA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)  // only the PIN holder reads or changes it
      .String(CKA_LABEL, label)
      .String(CKA_APPLICATION, "custos")
      .String(CKA_VALUE, value);
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  const CK_RV rv = api_->C_CreateObject(session, data.data(), data.size(), &handle);
  if (rv != CKR_OK) return CkError("C_CreateObject", rv);
  return DestroyData(session, label, older);
}

absl::Status Pkcs11Hsm::DestroyData(CK_SESSION_HANDLE session, const std::string& label,
                                    const std::vector<CK_OBJECT_HANDLE>& older) {
  for (CK_OBJECT_HANDLE object : older) {
    const CK_RV rv = api_->C_DestroyObject(session, object);
    // Another process may have destroyed it first: SoftHSM2 then fails to remove its file
    // (CKR_FUNCTION_FAILED). One left behind is an older value, which every reader of several
    // passes over.
    if (rv == CKR_FUNCTION_FAILED) {
      spdlog::warn(
          "HSM: an older '{}' object could not be destroyed (PKCS#11 C_DestroyObject: "
          "CKR_FUNCTION_FAILED); gone already, or left beside the new one",
          label);
    } else if (rv != CKR_OK && !IsHandleStale(rv)) {
      return CkError("C_DestroyObject", rv);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> Pkcs11Hsm::ReadTokenData(const std::string& label) {
  return Run<std::vector<std::string>>(
      [&](CK_SESSION_HANDLE session) -> absl::StatusOr<std::vector<std::string>> {
        CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, FindData(session, label));
        return ValuesOf(session, found);
      });
}

absl::Status Pkcs11Hsm::WriteTokenData(const std::string& label, std::string_view value) {
  return Run<bool>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<bool> {
           CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> older, FindData(session, label));
           CUSTOS_RETURN_IF_ERROR(StoreData(session, label, value, older));
           return true;
         })
      .status();
}

absl::Status Pkcs11Hsm::ReplaceTokenData(const std::string& label,
                                         const std::vector<std::string>& expected,
                                         std::string_view value) {
  std::vector<std::string> wanted = expected;
  std::sort(wanted.begin(), wanted.end());
  return Run<bool>([&](CK_SESSION_HANDLE session) -> absl::StatusOr<bool> {
           CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> older, FindData(session, label));
           CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> values, ValuesOf(session, older));
           std::vector<std::string> sorted = values;
           std::sort(sorted.begin(), sorted.end());
           if (sorted == wanted) {
             CUSTOS_RETURN_IF_ERROR(StoreData(session, label, value, older));
             return true;
           }
           // A retry (after a lost session) finds its own first write: `value` beside what
           // is left of the values read. It finishes that write's clean-up.
           const auto own = std::find(values.begin(), values.end(), value);
           if (own == values.end() || !IsLeftOf(values, own - values.begin(), wanted)) {
             return absl::FailedPreconditionError(
                 absl::StrCat("the token's '", label,
                              "' objects changed since they were read; nothing written"));
           }
           older.erase(older.begin() + (own - values.begin()));
           CUSTOS_RETURN_IF_ERROR(DestroyData(session, label, older));
           return true;
         })
      .status();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Hsm>> OpenPkcs11Hsm(Pkcs11Options options) {
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Pkcs11Module> module,
                          Pkcs11Module::Load(options.module_path));
  SessionPool::Options pool_options;
  pool_options.size = options.session_pool_size;
  pool_options.wait_timeout = options.call_timeout;
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<SessionPool> pool,
                          SessionPool::Create(std::move(module), options.token_label,
                                              std::move(options.pin), pool_options));
  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<KeyCache> cache,
      KeyCache::Create(pool.get(), options.key_cache_capacity, options.call_timeout / 2));
  SessionPool* const sessions = pool.get();  // Owned by the Hsm, which outlives the executor.
  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<CallExecutor> executor,
      CallExecutor::Create({.threads = options.session_pool_size,
                            .call_timeout = options.call_timeout,
                            .max_set_aside = options.max_stuck_calls,
                            .hang_limit = options.hang_limit,
                            .on_set_aside = [sessions](int delta) { sessions->AddSpare(delta); },
                            .on_hang_limit = std::move(options.on_hang_limit)}));
  // Registered last: no failure below can leave the reader pointing at a freed cache.
  if (options.metrics != nullptr) {
    const KeyCache* counted = cache.get();
    options.metrics->AddCounterReader(
        "custos_hsm_key_cache_lookups_total",
        "Key versions looked up in the HSM session's cache of unwrapped keys, by result",
        [counted]() -> std::vector<std::pair<metrics::Labels, double>> {
          return {{{{"result", "hit"}}, static_cast<double>(counted->hits())},
                  {{{"result", "miss"}}, static_cast<double>(counted->misses())}};
        });
  }
  return WithDeadlines(std::make_unique<Pkcs11Hsm>(std::move(pool), std::move(cache)),
                       std::move(executor));
}

}  // namespace custos::hsm
