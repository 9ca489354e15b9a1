#include "common/secure_bytes.h"

#include <openssl/crypto.h>

#include <algorithm>
#include <utility>

#include "common/secure_memory.h"

namespace custos {

SecureBytes::SecureBytes(size_t size) : size_(size) {
  // SecureMemory's blocks come zeroed.
  if (size > 0) data_ = SecureMemory::Global().Allocate(size, &capacity_);
}

SecureBytes::SecureBytes(std::span<const uint8_t> bytes) : SecureBytes(bytes.size()) {
  std::copy(bytes.begin(), bytes.end(), data_);
}

SecureBytes SecureBytes::FromString(std::string_view s) {
  return SecureBytes(std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

SecureBytes::SecureBytes(SecureBytes&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)) {}

SecureBytes& SecureBytes::operator=(SecureBytes&& other) noexcept {
  if (this != &other) {
    Wipe();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

void SecureBytes::Truncate(size_t size) {
  if (size >= size_) return;
  OPENSSL_cleanse(data_ + size, size_ - size);
  size_ = size;
}

void SecureBytes::Wipe() {
  if (data_ == nullptr) return;
  // Past size_ the block is still zero, or wiped by Truncate.
  SecureMemory::Global().Free(data_, capacity_, size_);
  data_ = nullptr;
  size_ = 0;
  capacity_ = 0;
}

}  // namespace custos
