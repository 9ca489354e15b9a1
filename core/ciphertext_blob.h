// The ciphertext blob: what callers store in place of their data key or secret.
//
// Envelope encryption: a data key (or a small secret) is encrypted inside the HSM with
// AES-256-GCM under one version of a master key; the blob names that key and version, so
// Decrypt needs nothing but the blob and the encryption context.
//
//   offset  size  field
//   0       1     format            0x01
//   1       16    key id            UUID bytes
//   17      4     key version       u32 big-endian
//   21      12    IV                random, from the HSM
//   33      n     ciphertext        same length as the plaintext
//   33+n    16    GCM tag
//
// AAD = bytes [0, 21) (the header) || canonical encryption context, so every header bit, the
// context and the ciphertext are authenticated; the IV is authenticated by GCM itself.
// This file is the only place that builds or parses blobs.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "core/encryption_context.h"
#include "core/key_id.h"

namespace custos::core {

inline constexpr uint8_t kBlobFormatV1 = 0x01;
inline constexpr size_t kBlobHeaderBytes = 1 + 16 + 4;
inline constexpr size_t kBlobIvBytes = 12;
inline constexpr size_t kBlobTagBytes = 16;
inline constexpr size_t kBlobMinBytes = kBlobHeaderBytes + kBlobIvBytes + kBlobTagBytes;
// The most a blob seals (Encrypt's limit; data keys are 32 bytes), so no blob is longer than
// kBlobMaxBytes: a longer one is refused before it costs a context HMAC or an HSM buffer.
inline constexpr size_t kBlobMaxPlaintextBytes = 4096;
inline constexpr size_t kBlobMaxBytes = kBlobMinBytes + kBlobMaxPlaintextBytes;

struct BlobHeader {
  KeyIdBytes key_id{};
  uint32_t key_version = 0;
};

// A parsed blob; its spans point into the buffer that was parsed.
struct ParsedBlob {
  BlobHeader header;
  std::span<const uint8_t> iv;
  std::span<const uint8_t> ciphertext_and_tag;
};

// The associated data for a blob with `header` and `context` (whose values it holds: wiped
// when freed).
WipedBytes BlobAad(const BlobHeader& header, const EncryptionContext& context);

// Concatenates header, IV and ciphertext||tag into a blob.
Bytes BuildBlob(const BlobHeader& header, std::span<const uint8_t> iv,
                std::span<const uint8_t> ciphertext_and_tag);

// Splits a blob; INVALID_ARGUMENT if it is empty, truncated or of an unknown format.
absl::StatusOr<ParsedBlob> ParseBlob(std::span<const uint8_t> blob);

}  // namespace custos::core
