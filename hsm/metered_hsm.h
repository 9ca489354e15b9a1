// MeteredHsm: an Hsm that times every call of the one it wraps and counts its failures, for
// custosd's metrics (custos_hsm_call_duration_seconds{operation},
// custos_hsm_call_errors_total{operation,code}). Nothing else changes: each call is passed on
// as it is, and answered as the wrapped HSM answers it.
#pragma once

#include <array>
#include <memory>

#include "common/metrics.h"
#include "hsm/hsm.h"

namespace custos::hsm {

class MeteredHsm final : public Hsm {
 public:
  // `registry` must outlive this object.
  MeteredHsm(std::unique_ptr<Hsm> inner, metrics::Registry* registry);

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
  enum Operation {
    kCreateRootKey,
    kCheckRootKey,
    kRootKeyConfinesVersions,
    kDestroyRootKey,
    kGenerateWrappedKey,
    kRewrapKey,
    kEncrypt,
    kDecrypt,
    kGenerateRandom,
    kGenerateDataKey,
    kCreateHmacKey,
    kHmacSha256,
    kCreateSigningKey,
    kSignSha256,
    kPublicKeyPem,
    kReadTokenData,
    kWriteTokenData,
    kReplaceTokenData,
    kOperationCount
  };
  template <typename Call>
  auto Measure(Operation operation, Call call);

  const std::unique_ptr<Hsm> inner_;
  metrics::Registry* const registry_;
  std::array<metrics::Histogram*, kOperationCount> latency_{};
};

}  // namespace custos::hsm
