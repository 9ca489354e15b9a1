// SecureBytes: a byte buffer for secrets (plaintext data keys, PINs, decrypted payloads).
//
// Its memory is wiped with OPENSSL_cleanse when it is destroyed, cleared or reassigned, and it
// cannot be copied by accident: copies must be spelled out with Clone(). Not thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace custos {

using Bytes = std::vector<uint8_t>;

class SecureBytes {
 public:
  SecureBytes() = default;
  explicit SecureBytes(size_t size) : data_(size) {}
  explicit SecureBytes(std::span<const uint8_t> bytes) : data_(bytes.begin(), bytes.end()) {}
  static SecureBytes FromString(std::string_view s);
  ~SecureBytes() { Wipe(); }

  SecureBytes(SecureBytes&& other) noexcept;
  SecureBytes& operator=(SecureBytes&& other) noexcept;
  SecureBytes(const SecureBytes&) = delete;  // Secrets are never copied implicitly.
  SecureBytes& operator=(const SecureBytes&) = delete;

  SecureBytes Clone() const { return SecureBytes(span()); }

  uint8_t* data() { return data_.data(); }
  const uint8_t* data() const { return data_.data(); }
  size_t size() const { return data_.size(); }
  bool empty() const { return data_.empty(); }
  std::span<const uint8_t> span() const { return {data_.data(), data_.size()}; }
  std::string_view view() const {
    return {reinterpret_cast<const char*>(data_.data()), data_.size()};
  }

  // Shrinks to `size` bytes, wiping the cut-off tail.
  void Truncate(size_t size);
  // Wipes and empties the buffer.
  void Wipe();

 private:
  std::vector<uint8_t> data_;
};

}  // namespace custos
