// AuditKeys: the two kinds of token object the audit log uses, besides the root keys.
//
// An HMAC key is a 32-byte generic secret (private, sensitive, non-extractable, unmodifiable,
// usable only to sign and verify with CKM_SHA256_HMAC): the log records the HMAC of each
// encryption context in place of its values. A signing key is an ECDSA P-256 key pair: the
// private key (private, sensitive, non-extractable, unmodifiable, usable only to sign) signs
// the log's checkpoints; the public key (same CKA_LABEL, same random CKA_ID, usable only to
// verify) is exported as PEM so that auditors can check checkpoints with plain `openssl`.
//
// Found objects are checked before use: one whose attributes would let its value out, or of
// the wrong type, is refused with FAILED_PRECONDITION, as is a label held by several objects.
// The handles of HMAC keys and private signing keys are cached per label; Reset() forgets them
// after a token loss, like RootKeys::Reset(). Thread-safe.
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "hsm/hsm.h"
#include "hsm/session_pool.h"

namespace custos::hsm {

inline constexpr size_t kHmacKeyBytes = 32;

class AuditKeys {
 public:
  // `pool` must outlive this object.
  explicit AuditKeys(SessionPool* pool) : pool_(pool) {}

  // Generates HMAC key `label` (CKM_GENERIC_SECRET_KEY_GEN). ALREADY_EXISTS if the token has a
  // secret key so labelled; INVALID_ARGUMENT if `label` is empty.
  absl::Status CreateHmacKey(CK_SESSION_HANDLE session, const std::string& label);

  // HMAC-SHA256 of `data` under HMAC key `label` (32 bytes). FAILED_PRECONDITION if the token
  // has no usable HMAC key so labelled.
  absl::StatusOr<Bytes> HmacSha256(CK_SESSION_HANDLE session, const std::string& label,
                                   std::span<const uint8_t> data);

  // Generates ECDSA P-256 key pair `label` (CKM_EC_KEY_PAIR_GEN). ALREADY_EXISTS if the token
  // has a private or public key so labelled; INVALID_ARGUMENT if `label` is empty.
  absl::Status CreateSigningKey(CK_SESSION_HANDLE session, const std::string& label);

  // The ECDSA signature of SHA-256(`message`) (hashed here, signed in the HSM with
  // CKM_ECDSA) as a DER ECDSA-Sig-Value, the form `openssl dgst -sha256 -verify` takes.
  // FAILED_PRECONDITION if the token has no usable private key so labelled.
  absl::StatusOr<Bytes> SignSha256(CK_SESSION_HANDLE session, const std::string& label,
                                   std::span<const uint8_t> message);

  // The public key of signing key `label` as a SubjectPublicKeyInfo PEM ("-----BEGIN PUBLIC
  // KEY-----"). FAILED_PRECONDITION if the token lacks the private or the public key, or they
  // do not share a CKA_ID; always asks the token.
  absl::StatusOr<std::string> PublicKeyPem(CK_SESSION_HANDLE session, const std::string& label);

  // Forgets every cached handle.
  void Reset();

  // Forgets which keys were found before (the token was found again after a loss: a key
  // missing now is missing for good).
  void ForgetFound();

 private:
  enum class Kind { kHmac, kSigning };

  // The handle of the verified HMAC key or private signing key `label`, cached or found.
  absl::StatusOr<CK_OBJECT_HANDLE> Get(CK_SESSION_HANDLE session, Kind kind,
                                       const std::string& label);
  // `found` as it is, noting the key as seen if found; TokenLostError instead of
  // FAILED_PRECONDITION if the key was seen before.
  absl::StatusOr<CK_OBJECT_HANDLE> Found(Kind kind, const std::string& label,
                                         absl::StatusOr<CK_OBJECT_HANDLE> found);
  // Finds and verifies, without the cache.
  absl::StatusOr<CK_OBJECT_HANDLE> FindHmacKey(CK_SESSION_HANDLE session, const std::string& label);
  absl::StatusOr<CK_OBJECT_HANDLE> FindPrivateKey(CK_SESSION_HANDLE session,
                                                  const std::string& label);
  absl::StatusOr<CK_OBJECT_HANDLE> FindPublicKey(CK_SESSION_HANDLE session,
                                                 const std::string& label,
                                                 CK_OBJECT_HANDLE private_key);
  // At most two token objects of `object_class` labelled `label` (after making sure of the
  // login: private objects are invisible without one).
  absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> Find(CK_SESSION_HANDLE session,
                                                     CK_OBJECT_CLASS object_class,
                                                     const std::string& label);

  SessionPool* const pool_;

  std::mutex admin_mu_;  // Serialises the Create*() calls; taken before mu_.

  std::mutex mu_;  // Guards the fields below; never held while calling the HSM.
  std::map<std::pair<Kind, std::string>, CK_OBJECT_HANDLE> handles_;
  // Keys found so far, kept across Reset(): one missing later means a lost token.
  std::set<std::pair<Kind, std::string>> found_;
  uint64_t generation_ = 0;  // Bumped by Reset().
};

}  // namespace custos::hsm
