#include "hsm/deadline_hsm.h"

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "spdlog/spdlog.h"

namespace custos::hsm {
namespace {

// A WrappedKey whose bytes it owns, for a call that may outlive its caller.
struct OwnedKey {
  explicit OwnedKey(const WrappedKey& key)
      : cache_id(key.cache_id),
        wrapped(key.wrapped.begin(), key.wrapped.end()),
        root_key_label(key.root_key_label) {}
  WrappedKey view() const { return WrappedKey{cache_id, wrapped, root_key_label}; }

  std::string cache_id;
  Bytes wrapped;
  std::string root_key_label;
};

// A call's GCM associated data, which holds its encryption context's values: kept as a secret
// (HmacSha256's inputs too), as long as the call and its set-aside thread need it.
std::shared_ptr<const SecureBytes> Context(std::span<const uint8_t> aad) {
  return std::make_shared<const SecureBytes>(aad);
}

class DeadlineHsm final : public Hsm {
 public:
  DeadlineHsm(std::unique_ptr<Hsm> inner, std::unique_ptr<CallExecutor> executor)
      : inner_(std::move(inner)), executor_(std::move(executor)) {}
  ~DeadlineHsm() override {
    {
      std::lock_guard lock(forget_mu_);
      stopping_ = true;
    }
    forget_wake_.notify_all();
    if (forget_retrier_.joinable()) forget_retrier_.join();
  }
  DeadlineHsm(const DeadlineHsm&) = delete;
  DeadlineHsm& operator=(const DeadlineHsm&) = delete;

  absl::Status CreateRootKey(const std::string& label) override {
    return CallStatus("CreateRootKey", label, [=, this] { return inner_->CreateRootKey(label); });
  }
  absl::Status CheckRootKey(const std::string& label) override {
    return CallStatus("CheckRootKey", label, [=, this] { return inner_->CheckRootKey(label); });
  }
  absl::StatusOr<bool> RootKeyConfinesVersions(const std::string& label) override {
    return Call<bool>("RootKeyConfinesVersions", label,
                      [=, this] { return inner_->RootKeyConfinesVersions(label); });
  }
  absl::Status DestroyRootKey(const std::string& label) override {
    return CallStatus("DestroyRootKey", label, [=, this] { return inner_->DestroyRootKey(label); });
  }
  absl::StatusOr<Bytes> GenerateWrappedKey(const std::string& root_key_label) override {
    return Call<Bytes>("GenerateWrappedKey", root_key_label,
                       [=, this] { return inner_->GenerateWrappedKey(root_key_label); });
  }
  absl::StatusOr<Bytes> RewrapKey(const WrappedKey& key,
                                  const std::string& new_root_key_label) override {
    return Call<Bytes>("RewrapKey", key.cache_id, [=, this, owned = OwnedKey(key)] {
      return inner_->RewrapKey(owned.view(), new_root_key_label);
    });
  }
  absl::StatusOr<GcmCiphertext> Encrypt(const WrappedKey& key, std::span<const uint8_t> plaintext,
                                        std::span<const uint8_t> aad) override {
    auto in = std::make_shared<const SecureBytes>(plaintext);
    return Call<GcmCiphertext>("Encrypt", key.cache_id,
                               [this, owned = OwnedKey(key), in, context = Context(aad)] {
                                 return inner_->Encrypt(owned.view(), in->span(), context->span());
                               });
  }
  absl::StatusOr<SecureBytes> Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                      std::span<const uint8_t> ciphertext_and_tag,
                                      std::span<const uint8_t> aad) override {
    return Call<SecureBytes>(
        "Decrypt", key.cache_id,
        [this, owned = OwnedKey(key), iv = Bytes(iv.begin(), iv.end()),
         in = Bytes(ciphertext_and_tag.begin(), ciphertext_and_tag.end()), context = Context(aad)] {
          return inner_->Decrypt(owned.view(), iv, in, context->span());
        });
  }
  absl::StatusOr<SecureBytes> GenerateRandom(size_t count) override {
    return Call<SecureBytes>("GenerateRandom", "",
                             [=, this] { return inner_->GenerateRandom(count); });
  }
  absl::StatusOr<SealedDataKey> GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                std::span<const uint8_t> aad) override {
    return Call<SealedDataKey>("GenerateDataKey", key.cache_id,
                               [this, owned = OwnedKey(key), key_bytes, context = Context(aad)] {
                                 return inner_->GenerateDataKey(owned.view(), key_bytes,
                                                                context->span());
                               });
  }
  // A drop the executor could not start (the module busy or hung) is retried in the background
  // until it starts: a destroyed version's unwrapped copy must not stay in the module. One that
  // started and was set aside finishes when the module lets it go.
  void Forget(const std::string& cache_id) override {
    std::vector<std::string> ids = {cache_id};
    {
      std::lock_guard lock(forget_mu_);
      if (stopping_) return;
      if (forget_retrier_.joinable() && (retrying_ || !to_forget_.empty())) {
        Pend(ids);  // the module is behind: not tried now
        return;
      }
      // With any the retrier never took (its thread could not start).
      ids.insert(ids.end(), to_forget_.begin(), to_forget_.end());
      to_forget_.clear();
    }
    const absl::Status done = RunForget(ids);
    if (!NotStarted(done)) return;
    spdlog::warn("dropping cached key version {} (retried in the background until it starts): {}",
                 cache_id, done.ToString());
    std::lock_guard lock(forget_mu_);
    if (!stopping_) Pend(ids);
  }
  absl::Status CreateHmacKey(const std::string& label) override {
    return CallStatus("CreateHmacKey", label, [=, this] { return inner_->CreateHmacKey(label); });
  }
  absl::StatusOr<Bytes> HmacSha256(const std::string& label,
                                   std::span<const uint8_t> data) override {
    // HMAC inputs are encryption contexts and catalogue rows: kept only as long as the call.
    auto in = std::make_shared<const SecureBytes>(data);
    return Call<Bytes>("HmacSha256", label,
                       [=, this] { return inner_->HmacSha256(label, in->span()); });
  }
  absl::Status CreateSigningKey(const std::string& label) override {
    return CallStatus("CreateSigningKey", label,
                      [=, this] { return inner_->CreateSigningKey(label); });
  }
  absl::StatusOr<Bytes> SignSha256(const std::string& label,
                                   std::span<const uint8_t> message) override {
    return Call<Bytes>("SignSha256", label, [=, this, in = Bytes(message.begin(), message.end())] {
      return inner_->SignSha256(label, in);
    });
  }
  absl::StatusOr<std::string> PublicKeyPem(const std::string& label) override {
    return Call<std::string>("PublicKeyPem", label,
                             [=, this] { return inner_->PublicKeyPem(label); });
  }
  absl::StatusOr<std::vector<std::string>> ReadTokenData(const std::string& label) override {
    return Call<std::vector<std::string>>("ReadTokenData", label,
                                          [=, this] { return inner_->ReadTokenData(label); });
  }
  absl::Status WriteTokenData(const std::string& label, std::string_view value) override {
    return CallStatus("WriteTokenData", label, [=, this, in = std::string(value)] {
      return inner_->WriteTokenData(label, in);
    });
  }
  absl::Status ReplaceTokenData(const std::string& label, const std::vector<std::string>& expected,
                                std::string_view value) override {
    return CallStatus("ReplaceTokenData", label, [=, this, in = std::string(value)] {
      return inner_->ReplaceTokenData(label, expected, in);
    });
  }

 private:
  // Runs `fn` (which owns its inputs), call `what` on HSM object `object`, on the executor;
  // its result, or UNAVAILABLE in time.
  template <typename T, typename Fn>
  absl::StatusOr<T> Call(const char* what, std::string_view object, Fn fn) {
    // Shared with the task: if it is set aside, the late result is dropped (and wiped, for
    // SecureBytes) when the task ends, not when the caller leaves.
    auto result = std::make_shared<std::optional<absl::StatusOr<T>>>();
    CUSTOS_RETURN_IF_ERROR(
        executor_->Run(what, object, [result, fn = std::move(fn)] { *result = fn(); }));
    return *std::move(*result);
  }
  template <typename Fn>
  absl::Status CallStatus(const char* what, std::string_view object, Fn fn) {
    auto result = std::make_shared<absl::Status>();
    CUSTOS_RETURN_IF_ERROR(
        executor_->Run(what, object, [result, fn = std::move(fn)] { *result = fn(); }));
    return *result;
  }

  // One kind of call for every drop: once some are stuck in the module (C_DestroyObject hung;
  // half of hsm.max_stuck_calls), the executor refuses the next at once, left to the retrier,
  // rather than set aside a thread for each. A call set aside midway leaves the rest of its
  // drops to the retrier: made on a set-aside thread, each would retire the (healthy) cache
  // session it touched.
  absl::Status RunForget(std::vector<std::string> cache_ids) {
    return CallStatus("Forget", "", [this, ids = std::move(cache_ids)] {
      for (auto id = ids.begin(); id != ids.end(); ++id) {
        if (CallExecutor::SetAside()) {
          std::lock_guard lock(forget_mu_);
          if (stopping_) break;  // the module's sessions close with it, and their objects
          spdlog::warn(
              "{} cached key version drop(s) left to the retrier: their call was set aside",
              ids.end() - id);
          Pend(std::vector<std::string>(id, ids.end()));
          break;
        }
        inner_->Forget(*id);
      }
      return absl::OkStatus();
    });
  }
  // Refused before it started (busy), rather than done or set aside while running.
  static bool NotStarted(const absl::Status& status) {
    return status.GetPayload(kBusyPayload).has_value();
  }

  // Leaves `cache_ids` to the retrier, started if need be. With forget_mu_ held.
  void Pend(const std::vector<std::string>& cache_ids) {
    to_forget_.insert(cache_ids.begin(), cache_ids.end());
    forget_wake_.notify_all();
    if (forget_retrier_.joinable()) return;
    try {
      forget_retrier_ = std::thread([this] { RetryForgets(); });
    } catch (const std::exception& error) {  // the next drop is tried at once, with these
      spdlog::error("cannot start the thread that retries dropping cached key versions: {}",
                    error.what());
    }
  }

  // Until the Hsm goes: a second after drops are left to it (the module was busy a moment ago),
  // all of them in one call, again and again until it starts.
  void RetryForgets() {
    std::unique_lock lock(forget_mu_);
    for (;;) {
      forget_wake_.wait(lock, [this] { return stopping_ || !to_forget_.empty(); });
      if (forget_wake_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; })) {
        return;
      }
      std::vector<std::string> ids(to_forget_.begin(), to_forget_.end());
      to_forget_.clear();
      retrying_ = true;
      lock.unlock();
      const absl::Status done = RunForget(ids);
      lock.lock();
      retrying_ = false;
      if (NotStarted(done)) {
        to_forget_.insert(ids.begin(), ids.end());
      } else if (done.ok()) {
        spdlog::info("{} cached key version(s) dropped, as retried", ids.size());
      }
    }
  }

  const std::unique_ptr<Hsm> inner_;
  // Drops left to the retrier. A stop waits for a retry under way (at most hsm.call_timeout_ms).
  std::mutex forget_mu_;                 // guards the four below the condition variable
  std::condition_variable forget_wake_;  // notified when to_forget_ grows or stopping_ is set
  std::set<std::string> to_forget_;      // drops left to the retrier, not started yet
  bool retrying_ = false;                // the retrier is running some
  bool stopping_ = false;
  std::thread forget_retrier_;  // started at the first drop left to it
  // Last: stopped first, waiting for set-aside calls, which may still use the members above.
  const std::unique_ptr<CallExecutor> executor_;
};

}  // namespace

std::unique_ptr<Hsm> WithDeadlines(std::unique_ptr<Hsm> inner,
                                   std::unique_ptr<CallExecutor> executor) {
  return std::make_unique<DeadlineHsm>(std::move(inner), std::move(executor));
}

}  // namespace custos::hsm
