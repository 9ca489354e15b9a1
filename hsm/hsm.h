// Hsm: everything Custos asks of a hardware security module, behind one small interface.
//
// Master keys never leave the HSM in plaintext. The root key is a non-extractable token
// object; key versions are generated inside the HSM, handed out only wrapped under the root
// (AES key wrap with padding, RFC 5649), and unwrapped back into the HSM as sensitive,
// non-extractable session objects when they are used. Callers hold only wrapped bytes.
//
// Implementations are thread-safe: any number of threads may call any method at once.
// Errors: UNAVAILABLE when the HSM cannot be reached or a session is lost (retrying later may
// succeed); INVALID_ARGUMENT when a ciphertext fails authentication or input is malformed;
// FAILED_PRECONDITION when the token lacks the root key; INTERNAL for anything else. Every
// message names the PKCS#11 function and the CKR_ code, never key material or the PIN.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::hsm {

// A key version as the HSM sees it: its wrapped form plus a stable name under which an
// unwrapped handle may be cached (for example "<key id>/<version>").
struct WrappedKey {
  std::string cache_id;
  std::span<const uint8_t> wrapped;
};

// AES-256-GCM output: a 96-bit IV chosen by the HSM's RNG and the ciphertext with its
// 128-bit tag appended.
struct GcmCiphertext {
  Bytes iv;
  Bytes ciphertext_and_tag;
};

inline constexpr size_t kGcmIvBytes = 12;
inline constexpr size_t kGcmTagBytes = 16;
inline constexpr size_t kAes256KeyBytes = 32;

class Hsm {
 public:
  virtual ~Hsm() = default;

  // Creates the root key (AES-256 token object; private, sensitive, non-extractable, usable
  // only to wrap and unwrap). ALREADY_EXISTS if the token holds one already.
  virtual absl::Status CreateRootKey() = 0;

  // OK if the root key is present and usable; FAILED_PRECONDITION if it is missing.
  virtual absl::Status CheckRootKey() = 0;

  // The label of the root key that GenerateWrappedKey wraps under; stored beside each
  // wrapped version so that a later root rotation knows what to re-wrap.
  virtual std::string RootKeyLabel() const = 0;

  // Generates a fresh AES-256 key version inside the HSM and returns it wrapped under the
  // root key. The unwrapped object is destroyed before this returns.
  virtual absl::StatusOr<Bytes> GenerateWrappedKey() = 0;

  // AES-256-GCM encryption under a key version, binding `aad`.
  virtual absl::StatusOr<GcmCiphertext> Encrypt(const WrappedKey& key,
                                                std::span<const uint8_t> plaintext,
                                                std::span<const uint8_t> aad) = 0;

  // AES-256-GCM decryption; INVALID_ARGUMENT if the tag does not verify (wrong key, wrong
  // AAD or a modified ciphertext). Never returns unauthenticated plaintext.
  virtual absl::StatusOr<SecureBytes> Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                              std::span<const uint8_t> ciphertext_and_tag,
                                              std::span<const uint8_t> aad) = 0;

  // `count` bytes from the HSM's random number generator.
  virtual absl::StatusOr<SecureBytes> GenerateRandom(size_t count) = 0;

  // Destroys any cached unwrapped copy of `cache_id` (used when a version is destroyed).
  virtual void Forget(const std::string& cache_id) = 0;
};

}  // namespace custos::hsm
