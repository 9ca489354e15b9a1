// Hsm: everything Custos asks of a hardware security module, behind one small interface.
//
// Master keys never leave the HSM in plaintext. The root key is a non-extractable token
// object; key versions are generated inside the HSM, handed out only wrapped under the root
// (AES key wrap with padding, RFC 5649), and unwrapped back into the HSM as sensitive,
// non-extractable session objects when they are used. Callers hold only wrapped bytes.
//
// Implementations are thread-safe: any number of threads may call any method at once.
// Errors:
//  - UNAVAILABLE when the HSM cannot be reached or a session is lost (retrying later may
//    succeed), and when the HSM refuses the configured PIN on a re-login while running (an
//    operator must fix the PIN and restart; PERMISSION_DENIED comes only from OpenPkcs11Hsm);
//  - INVALID_ARGUMENT when a ciphertext fails authentication or an IV, a ciphertext or a
//    label is malformed: the caller's input, never stored key material;
//  - DATA_LOSS when a stored key version (WrappedKey::wrapped) is malformed or does not
//    unwrap under its root key: a damaged database or a root that is not the one it was
//    wrapped under, never the client's mistake;
//  - FAILED_PRECONDITION when the token lacks the root key, or has one that is unsafe to use;
//  - INTERNAL for anything else.
// Messages from a failed PKCS#11 call name the function and the CKR_ code; none carries key
// material or the PIN.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "absl/strings/cord.h"
#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::hsm {

// Carried by the UNAVAILABLE an HSM call is refused with before it was started, because the
// HSM layer's threads are stuck in the module ("HSM busy"). Its value says so without the
// counts, the same for every refusal of one kind, so that a caller can coalesce repeats (a
// client retrying at once would otherwise write one audit record per attempt).
inline constexpr char kBusyPayload[] = "custos/hsm-busy";

// UNAVAILABLE `message`, carrying kBusyPayload with value `kind`.
inline absl::Status BusyError(const std::string& kind, const std::string& message) {
  absl::Status busy = absl::UnavailableError(message);
  busy.SetPayload(kBusyPayload, absl::Cord(kind));
  return busy;
}

// A key version as the HSM sees it: its wrapped form, the label of the root key that wrapped
// it, and a stable name under which an unwrapped handle may be cached (for example
// "<key id>/<version>"). `wrapped` is a view: the bytes must outlive the call.
struct WrappedKey {
  std::string cache_id;
  std::span<const uint8_t> wrapped;
  std::string root_key_label;
};

// AES-256-GCM output: a 96-bit IV chosen by the HSM's RNG and the ciphertext with its
// 128-bit tag appended.
struct GcmCiphertext {
  Bytes iv;
  Bytes ciphertext_and_tag;
};

// A fresh data key and its encryption (GenerateDataKey).
struct SealedDataKey {
  SecureBytes plaintext;
  GcmCiphertext sealed;
};

inline constexpr size_t kGcmIvBytes = 12;
inline constexpr size_t kGcmTagBytes = 16;
inline constexpr size_t kAes256KeyBytes = 32;
inline constexpr size_t kHmacSha256Bytes = 32;  // HmacSha256() output

class Hsm {
 public:
  virtual ~Hsm() = default;

  // Root keys are AES-256 token objects (private, sensitive, non-extractable, usable only to
  // wrap and unwrap), named by label. Several may exist during a root rotation; which one new
  // versions are wrapped under is the caller's choice, recorded beside each version.

  // Creates root key `label`. ALREADY_EXISTS if the token holds one with that label.
  virtual absl::Status CreateRootKey(const std::string& label) = 0;

  // OK if root key `label` is present and usable; FAILED_PRECONDITION if it is missing, or if
  // the key so labelled is public or may do more than wrap and unwrap (made by another tool).
  virtual absl::Status CheckRootKey(const std::string& label) = 0;

  // True if root key `label` confines what it unwraps (see hsm/root_key.h): no version
  // unwrapped under it can ever leave the HSM. False for a legacy root, which custosd uses
  // with a warning until a root rotation moves its versions off it. Errors as CheckRootKey.
  virtual absl::StatusOr<bool> RootKeyConfinesVersions(const std::string& label) = 0;

  // Destroys root key `label` on the token. NOT_FOUND if there is none. Every version still
  // wrapped under it becomes unusable, for good: callers re-wrap first.
  virtual absl::Status DestroyRootKey(const std::string& label) = 0;

  // Generates a fresh AES-256 key version inside the HSM and returns it wrapped under root
  // key `root_key_label`. The unwrapped object is destroyed before this returns.
  virtual absl::StatusOr<Bytes> GenerateWrappedKey(const std::string& root_key_label) = 0;

  // Unwraps `key` under its root and wraps it again under root `new_root_key_label`, inside
  // the HSM; the transient unwrapped copy is destroyed before this returns. Only from a legacy
  // root: FAILED_PRECONDITION if `key`'s root confines what it unwraps (nothing can re-wrap
  // its versions, by design). DATA_LOSS if `key` does not unwrap.
  virtual absl::StatusOr<Bytes> RewrapKey(const WrappedKey& key,
                                          const std::string& new_root_key_label) = 0;

  // AES-256-GCM encryption under a key version, binding `aad`. DATA_LOSS if the version does
  // not unwrap.
  virtual absl::StatusOr<GcmCiphertext> Encrypt(const WrappedKey& key,
                                                std::span<const uint8_t> plaintext,
                                                std::span<const uint8_t> aad) = 0;

  // AES-256-GCM decryption; INVALID_ARGUMENT if the tag does not verify (wrong key, wrong
  // AAD or a modified ciphertext) or the IV or ciphertext has the wrong length; DATA_LOSS if
  // the version itself does not unwrap. Never returns unauthenticated plaintext.
  virtual absl::StatusOr<SecureBytes> Decrypt(const WrappedKey& key, std::span<const uint8_t> iv,
                                              std::span<const uint8_t> ciphertext_and_tag,
                                              std::span<const uint8_t> aad) = 0;

  // `count` bytes from the HSM's random number generator.
  virtual absl::StatusOr<SecureBytes> GenerateRandom(size_t count) = 0;

  // A data key of `key_bytes` random bytes and its AES-256-GCM encryption under `key`, binding
  // `aad`; errors as Encrypt. One call for the hot path of GenerateDataKey: an HSM draws the
  // key and the IV at once. This default (what a decorator that injects faults keeps, so that
  // faults named GenerateRandom and Encrypt still reach it) asks for them one after the other.
  virtual absl::StatusOr<SealedDataKey> GenerateDataKey(const WrappedKey& key, size_t key_bytes,
                                                        std::span<const uint8_t> aad) {
    CUSTOS_ASSIGN_OR_RETURN(SecureBytes plaintext, GenerateRandom(key_bytes));
    CUSTOS_ASSIGN_OR_RETURN(GcmCiphertext sealed, Encrypt(key, plaintext.span(), aad));
    return SealedDataKey{std::move(plaintext), std::move(sealed)};
  }

  // Destroys any cached unwrapped copy of `cache_id` (used when a version is destroyed).
  virtual void Forget(const std::string& cache_id) = 0;

  // Audit log keys (see hsm/audit_keys.h), token objects named by label like the root keys.
  // An HMAC key is a 32-byte generic secret (private, sensitive, non-extractable, usable only
  // to sign and verify); a signing key is an ECDSA P-256 key pair whose private half is
  // private, sensitive, non-extractable and usable only to sign. FAILED_PRECONDITION if the
  // key is missing or its attributes would let its value out.

  // Creates HMAC key `label`. ALREADY_EXISTS if the token holds a secret key so labelled.
  virtual absl::Status CreateHmacKey(const std::string& label) = 0;

  // HMAC-SHA256 of `data` under HMAC key `label`: 32 bytes.
  virtual absl::StatusOr<Bytes> HmacSha256(const std::string& label,
                                           std::span<const uint8_t> data) = 0;

  // Creates signing key pair `label`. ALREADY_EXISTS if the token holds a key so labelled.
  virtual absl::Status CreateSigningKey(const std::string& label) = 0;

  // ECDSA P-256 signature of SHA-256(`message`) by signing key `label`, DER-encoded
  // (ECDSA-Sig-Value), as `openssl dgst -sha256 -verify pub.pem -signature sig msg` takes it.
  virtual absl::StatusOr<Bytes> SignSha256(const std::string& label,
                                           std::span<const uint8_t> message) = 0;

  // The public key of signing key `label` as PEM ("-----BEGIN PUBLIC KEY-----", X.509
  // SubjectPublicKeyInfo), checked to verify what the private key signs.
  virtual absl::StatusOr<std::string> PublicKeyPem(const std::string& label) = 0;

  // Small private token objects (CKO_DATA) named by `label`, for state that must live where
  // only the PIN holder can change it (the audit log's last signed head): the values of those
  // the token holds (none, one, or more than one if a replacement was cut short).
  virtual absl::StatusOr<std::vector<std::string>> ReadTokenData(const std::string& label) = 0;
  // Stores `value` under `label`: a new object first, then the older ones are destroyed (a
  // data object's value cannot be changed in place on every module), so a crash in between
  // leaves both, never neither.
  virtual absl::Status WriteTokenData(const std::string& label, std::string_view value) = 0;
  // As WriteTokenData, if the objects under `label` hold exactly `expected` (in any order) when
  // looked at, in the same call, just before the write; FAILED_PRECONDITION, writing nothing,
  // otherwise. Not a compare-and-swap (PKCS#11 has none): another process may still write
  // between the look and the write (more so if this call stalls inside the module), but no
  // queue of this process comes between them. Finding `value` beside nothing but some of
  // `expected` (its own first write, looked at again by a retry after a lost session), it
  // destroys those and succeeds: values must be unique to their writer.
  virtual absl::Status ReplaceTokenData(const std::string& label,
                                        const std::vector<std::string>& expected,
                                        std::string_view value) = 0;
};

// True if `status` is the module's own failure (CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED). Met
// using a key, it can mean the key's stored value is unusable: SoftHSM2 says so of a key
// whose generation was cut short before its value was stored.
bool IsModuleFailure(const absl::Status& status);
// True if `status` is the HSM refusing the PIN at login (CKR_PIN_INCORRECT, _INVALID, _LOCKED,
// _EXPIRED or _LEN_RANGE): trying again with the same PIN would only count more failed logins.
bool IsPinRefused(const absl::Status& status);

}  // namespace custos::hsm
