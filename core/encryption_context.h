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

using EncryptionContext = std::map<std::string, std::string>;

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
