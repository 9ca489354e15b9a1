#include "common/secure_bytes.h"

#include <openssl/crypto.h>

namespace custos {

SecureBytes SecureBytes::FromString(std::string_view s) {
  return SecureBytes(std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

SecureBytes::SecureBytes(SecureBytes&& other) noexcept : data_(std::move(other.data_)) {
  other.data_.clear();
}

SecureBytes& SecureBytes::operator=(SecureBytes&& other) noexcept {
  if (this != &other) {
    Wipe();
    data_ = std::move(other.data_);
    other.data_.clear();
  }
  return *this;
}

void SecureBytes::Truncate(size_t size) {
  if (size >= data_.size()) return;
  OPENSSL_cleanse(data_.data() + size, data_.size() - size);
  data_.resize(size);
}

void SecureBytes::Wipe() {
  // The vector never reallocates behind our back (no push_back), so this reaches every copy.
  if (!data_.empty()) OPENSSL_cleanse(data_.data(), data_.size());
  data_.clear();
}

}  // namespace custos
