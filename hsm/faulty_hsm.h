// FaultyHsm: an Hsm that forwards to a real one and fails on command, for tests.
//
// Like Tink's FailingAead, it is a real implementation rather than a mock: wrap the HSM a test
// uses, then FailNext(n, status) to make the next n calls fail with `status`, or SetDown(true)
// to make every call fail with UNAVAILABLE (as if the HSM were unplugged) until SetDown(false),
// or BeforeNextCall(hook) to run something while the caller is inside the HSM (a race made
// deterministic). Forget() always forwards: it has no way to report a failure.
//
// Thread-safe, if the wrapped Hsm is.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/hsm.h"

namespace custos::hsm {

class FaultyHsm final : public Hsm {
 public:
  // Wraps `inner`, which must outlive this object.
  explicit FaultyHsm(Hsm* inner) : inner_(inner) {}
  // Wraps and owns `inner`.
  explicit FaultyHsm(std::unique_ptr<Hsm> inner) : owned_(std::move(inner)), inner_(owned_.get()) {}

  // The next `n` calls (any method but Forget) fail with `status`, which must not be OK.
  void FailNext(int n, absl::Status status);
  // While down, every call (but Forget) fails with UNAVAILABLE.
  void SetDown(bool down);
  // Runs `hook` once, at the start of the next call (any method but Forget), before that call
  // is forwarded; calls the hook makes itself are forwarded as usual.
  void BeforeNextCall(std::function<void()> hook);
  // The same for the next call to `method` (e.g. "RewrapKey", or "Forget") only, whichever
  // thread makes it.
  void BeforeNextCallTo(std::string method, std::function<void()> hook);
  // Calls made so far (but Forget), failed or not.
  int64_t calls() const;
  // The cache ids Forget was called with so far, in order (once its hook, if any, returned).
  std::vector<std::string> forgotten() const;

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
  // One call, forwarded as one: the wrapped Hsm's own (a single PKCS#11 sequence in
  // Pkcs11Hsm), not the base class's GenerateRandom then Encrypt.
  absl::StatusOr<SealedDataKey> GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                std::span<const uint8_t> aad) override;
  void Forget(const std::string& cache_id) override;
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
  // The failure to inject into the call being made, or OK to forward it.
  absl::Status NextFault(std::string_view method);

  std::unique_ptr<Hsm> owned_;
  Hsm* const inner_;

  mutable std::mutex mu_;  // Guards the fields below.
  bool down_ = false;
  int fail_next_ = 0;
  absl::Status fail_status_;
  int64_t calls_ = 0;
  std::vector<std::string> forgotten_;
  std::function<void()> before_next_;
  std::map<std::string, std::function<void()>, std::less<>> before_method_;
};

}  // namespace custos::hsm
