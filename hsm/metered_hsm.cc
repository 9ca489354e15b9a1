#include "hsm/metered_hsm.h"

#include <chrono>

namespace custos::hsm {
namespace {

constexpr const char* kOperationNames[] = {"CreateRootKey",
                                           "CheckRootKey",
                                           "RootKeyConfinesVersions",
                                           "DestroyRootKey",
                                           "GenerateWrappedKey",
                                           "RewrapKey",
                                           "Encrypt",
                                           "Decrypt",
                                           "GenerateRandom",
                                           "GenerateDataKey",
                                           "CreateHmacKey",
                                           "HmacSha256",
                                           "CreateSigningKey",
                                           "SignSha256",
                                           "PublicKeyPem",
                                           "ReadTokenData",
                                           "WriteTokenData",
                                           "ReplaceTokenData"};

const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& result) {
  return result.status();
}

}  // namespace

MeteredHsm::MeteredHsm(std::unique_ptr<Hsm> inner, metrics::Registry* registry)
    : inner_(std::move(inner)), registry_(registry) {
  static_assert(std::size(kOperationNames) == kOperationCount);
  for (int op = 0; op < kOperationCount; ++op) {
    latency_[op] = &registry_->GetHistogram(
        "custos_hsm_call_duration_seconds",
        "HSM calls by operation, from the caller's side (queueing for a session included)",
        {{"operation", kOperationNames[op]}});
  }
}

template <typename Call>
auto MeteredHsm::Measure(Operation operation, Call call) {
  const auto start = std::chrono::steady_clock::now();
  auto result = call();
  latency_[operation]->Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  if (const absl::Status& status = StatusOf(result); !status.ok()) {
    registry_
        ->GetCounter("custos_hsm_call_errors_total", "HSM calls that failed, by operation and code",
                     {{"operation", kOperationNames[operation]},
                      {"code", absl::StatusCodeToString(status.code())}})
        .Add();
  }
  return result;
}

absl::Status MeteredHsm::CreateRootKey(const std::string& label) {
  return Measure(kCreateRootKey, [&] { return inner_->CreateRootKey(label); });
}
absl::Status MeteredHsm::CheckRootKey(const std::string& label) {
  return Measure(kCheckRootKey, [&] { return inner_->CheckRootKey(label); });
}
absl::StatusOr<bool> MeteredHsm::RootKeyConfinesVersions(const std::string& label) {
  return Measure(kRootKeyConfinesVersions, [&] { return inner_->RootKeyConfinesVersions(label); });
}
absl::Status MeteredHsm::DestroyRootKey(const std::string& label) {
  return Measure(kDestroyRootKey, [&] { return inner_->DestroyRootKey(label); });
}
absl::StatusOr<Bytes> MeteredHsm::GenerateWrappedKey(const std::string& root_key_label) {
  return Measure(kGenerateWrappedKey, [&] { return inner_->GenerateWrappedKey(root_key_label); });
}
absl::StatusOr<Bytes> MeteredHsm::RewrapKey(const WrappedKey& key,
                                            const std::string& new_root_key_label) {
  return Measure(kRewrapKey, [&] { return inner_->RewrapKey(key, new_root_key_label); });
}
absl::StatusOr<GcmCiphertext> MeteredHsm::Encrypt(const WrappedKey& key,
                                                  std::span<const uint8_t> plaintext,
                                                  std::span<const uint8_t> aad) {
  return Measure(kEncrypt, [&] { return inner_->Encrypt(key, plaintext, aad); });
}
absl::StatusOr<SecureBytes> MeteredHsm::Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                                std::span<const uint8_t> ciphertext_and_tag,
                                                std::span<const uint8_t> aad) {
  return Measure(kDecrypt, [&] { return inner_->Decrypt(key, iv, ciphertext_and_tag, aad); });
}
absl::StatusOr<SecureBytes> MeteredHsm::GenerateRandom(size_t count) {
  return Measure(kGenerateRandom, [&] { return inner_->GenerateRandom(count); });
}
absl::StatusOr<SealedDataKey> MeteredHsm::GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                          std::span<const uint8_t> aad) {
  return Measure(kGenerateDataKey, [&] { return inner_->GenerateDataKey(key, key_bytes, aad); });
}
void MeteredHsm::Forget(const std::string& cache_id) { inner_->Forget(cache_id); }
absl::Status MeteredHsm::CreateHmacKey(const std::string& label) {
  return Measure(kCreateHmacKey, [&] { return inner_->CreateHmacKey(label); });
}
absl::StatusOr<Bytes> MeteredHsm::HmacSha256(const std::string& label,
                                             std::span<const uint8_t> data) {
  return Measure(kHmacSha256, [&] { return inner_->HmacSha256(label, data); });
}
absl::Status MeteredHsm::CreateSigningKey(const std::string& label) {
  return Measure(kCreateSigningKey, [&] { return inner_->CreateSigningKey(label); });
}
absl::StatusOr<Bytes> MeteredHsm::SignSha256(const std::string& label,
                                             std::span<const uint8_t> message) {
  return Measure(kSignSha256, [&] { return inner_->SignSha256(label, message); });
}
absl::StatusOr<std::string> MeteredHsm::PublicKeyPem(const std::string& label) {
  return Measure(kPublicKeyPem, [&] { return inner_->PublicKeyPem(label); });
}
absl::StatusOr<std::vector<std::string>> MeteredHsm::ReadTokenData(const std::string& label) {
  return Measure(kReadTokenData, [&] { return inner_->ReadTokenData(label); });
}
absl::Status MeteredHsm::WriteTokenData(const std::string& label, std::string_view value) {
  return Measure(kWriteTokenData, [&] { return inner_->WriteTokenData(label, value); });
}

absl::Status MeteredHsm::ReplaceTokenData(const std::string& label,
                                          const std::vector<std::string>& expected,
                                          std::string_view value) {
  return Measure(kReplaceTokenData,
                 [&] { return inner_->ReplaceTokenData(label, expected, value); });
}

}  // namespace custos::hsm
