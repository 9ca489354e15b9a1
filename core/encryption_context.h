// EncryptionContext: the caller's string map bound to a ciphertext as AES-GCM associated data.
//
// Canonical encoding (frozen: changing it makes every stored blob undecryptable):
//   u32 entry count, then for each entry in byte-wise key order:
//   u32 key length, key bytes, u32 value length, value bytes      (all u32 big-endian)
// Values may be sensitive (a patient id, say): they are never logged or stored.
#pragma once

#include <map>
#include <string>

#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::core {

// A string map whose values are wiped when it goes or is assigned over: each copy of a
// context (the one services.cc makes of a request's, any later one) wipes its own. Only that:
// erase, clear, swap or overwriting one value free the old bytes unwiped (nothing does so).
class EncryptionContext : public std::map<std::string, std::string> {
 public:
  using Base = std::map<std::string, std::string>;
  using Base::Base;
  EncryptionContext() = default;
  EncryptionContext(const EncryptionContext&) = default;
  EncryptionContext(EncryptionContext&&) noexcept = default;
  EncryptionContext& operator=(const EncryptionContext& other) {
    if (this != &other) {
      Wipe();
      Base::operator=(other);
    }
    return *this;
  }
  EncryptionContext& operator=(EncryptionContext&& other) noexcept {
    if (this != &other) {
      Wipe();
      Base::operator=(std::move(other));
    }
    return *this;
  }
  ~EncryptionContext() { Wipe(); }

 private:
  void Wipe() {
    for (auto& entry : *this) WipeString(entry.second);
  }
};

inline constexpr size_t kMaxContextEntries = 64;
inline constexpr size_t kMaxContextKeyBytes = 256;
inline constexpr size_t kMaxContextBytes = 8192;  // keys and values together

// INVALID_ARGUMENT naming the limit broken (too many entries, an empty or oversized key, or
// too many bytes in all). The message names no value.
absl::Status ValidateContext(const EncryptionContext& context);

// Appends the canonical encoding of `context` to `out`, a buffer that wipes what it frees: the
// encoding holds the context's values.
void AppendCanonicalContext(const EncryptionContext& context, WipedBytes& out);

}  // namespace custos::core
