#include "hsm/faulty_hsm.h"

#include <utility>

namespace custos::hsm {

void FaultyHsm::FailNext(int n, absl::Status status) {
  if (status.ok()) status = absl::InternalError("FaultyHsm: injected failure");
  std::lock_guard lock(mu_);
  fail_next_ = n;
  fail_status_ = std::move(status);
}

void FaultyHsm::SetDown(bool down) {
  std::lock_guard lock(mu_);
  down_ = down;
}

std::vector<std::string> FaultyHsm::forgotten() const {
  std::lock_guard lock(mu_);
  return forgotten_;
}

void FaultyHsm::Forget(const std::string& cache_id) {
  std::function<void()> hook;
  {
    std::lock_guard lock(mu_);
    if (auto it = before_method_.find("Forget"); it != before_method_.end()) {
      hook = std::move(it->second);
      before_method_.erase(it);
    }
  }
  if (hook) hook();
  {
    std::lock_guard lock(mu_);
    forgotten_.push_back(cache_id);
  }
  inner_->Forget(cache_id);
}

int64_t FaultyHsm::calls() const {
  std::lock_guard lock(mu_);
  return calls_;
}

void FaultyHsm::BeforeNextCall(std::function<void()> hook) {
  std::lock_guard lock(mu_);
  before_next_ = std::move(hook);
}

void FaultyHsm::BeforeNextCallTo(std::string method, std::function<void()> hook) {
  std::lock_guard lock(mu_);
  before_method_[std::move(method)] = std::move(hook);
}

absl::Status FaultyHsm::NextFault(std::string_view method) {
  std::function<void()> hook, method_hook;
  {
    std::lock_guard lock(mu_);
    hook = std::exchange(before_next_, nullptr);
    if (auto it = before_method_.find(method); it != before_method_.end()) {
      method_hook = std::move(it->second);
      before_method_.erase(it);
    }
  }
  // Without the lock: they may call this HSM themselves.
  if (hook) hook();
  if (method_hook) method_hook();
  std::lock_guard lock(mu_);
  ++calls_;
  if (down_) return absl::UnavailableError("HSM is down (FaultyHsm)");
  if (fail_next_ > 0) {
    --fail_next_;
    return fail_status_;
  }
  return absl::OkStatus();
}

absl::Status FaultyHsm::CreateRootKey(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("CreateRootKey"));
  return inner_->CreateRootKey(label);
}

absl::Status FaultyHsm::CheckRootKey(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("CheckRootKey"));
  return inner_->CheckRootKey(label);
}

absl::StatusOr<bool> FaultyHsm::RootKeyConfinesVersions(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("RootKeyConfinesVersions"));
  return inner_->RootKeyConfinesVersions(label);
}

absl::Status FaultyHsm::DestroyRootKey(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("DestroyRootKey"));
  return inner_->DestroyRootKey(label);
}

absl::StatusOr<Bytes> FaultyHsm::GenerateWrappedKey(const std::string& root_key_label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("GenerateWrappedKey"));
  return inner_->GenerateWrappedKey(root_key_label);
}

absl::StatusOr<Bytes> FaultyHsm::RewrapKey(const WrappedKey& key,
                                           const std::string& new_root_key_label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("RewrapKey"));
  return inner_->RewrapKey(key, new_root_key_label);
}

absl::StatusOr<GcmCiphertext> FaultyHsm::Encrypt(const WrappedKey& key,
                                                 std::span<const uint8_t> plaintext,
                                                 std::span<const uint8_t> aad) {
  CUSTOS_RETURN_IF_ERROR(NextFault("Encrypt"));
  return inner_->Encrypt(key, plaintext, aad);
}

absl::StatusOr<SecureBytes> FaultyHsm::Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                               std::span<const uint8_t> ciphertext_and_tag,
                                               std::span<const uint8_t> aad) {
  CUSTOS_RETURN_IF_ERROR(NextFault("Decrypt"));
  return inner_->Decrypt(key, iv, ciphertext_and_tag, aad);
}

absl::StatusOr<SecureBytes> FaultyHsm::GenerateRandom(size_t count) {
  CUSTOS_RETURN_IF_ERROR(NextFault("GenerateRandom"));
  return inner_->GenerateRandom(count);
}

absl::StatusOr<SealedDataKey> FaultyHsm::GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                         std::span<const uint8_t> aad) {
  CUSTOS_RETURN_IF_ERROR(NextFault("GenerateDataKey"));
  return inner_->GenerateDataKey(key, key_bytes, aad);
}

absl::Status FaultyHsm::CreateHmacKey(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("CreateHmacKey"));
  return inner_->CreateHmacKey(label);
}

absl::StatusOr<Bytes> FaultyHsm::HmacSha256(const std::string& label,
                                            std::span<const uint8_t> data) {
  CUSTOS_RETURN_IF_ERROR(NextFault("HmacSha256"));
  return inner_->HmacSha256(label, data);
}

absl::Status FaultyHsm::CreateSigningKey(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("CreateSigningKey"));
  return inner_->CreateSigningKey(label);
}

absl::StatusOr<Bytes> FaultyHsm::SignSha256(const std::string& label,
                                            std::span<const uint8_t> message) {
  CUSTOS_RETURN_IF_ERROR(NextFault("SignSha256"));
  return inner_->SignSha256(label, message);
}

absl::StatusOr<std::string> FaultyHsm::PublicKeyPem(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("PublicKeyPem"));
  return inner_->PublicKeyPem(label);
}

absl::StatusOr<std::vector<std::string>> FaultyHsm::ReadTokenData(const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(NextFault("ReadTokenData"));
  return inner_->ReadTokenData(label);
}

absl::Status FaultyHsm::WriteTokenData(const std::string& label, std::string_view value) {
  CUSTOS_RETURN_IF_ERROR(NextFault("WriteTokenData"));
  return inner_->WriteTokenData(label, value);
}

absl::Status FaultyHsm::ReplaceTokenData(const std::string& label,
                                         const std::vector<std::string>& expected,
                                         std::string_view value) {
  CUSTOS_RETURN_IF_ERROR(NextFault("ReplaceTokenData"));
  return inner_->ReplaceTokenData(label, expected, value);
}

}  // namespace custos::hsm
