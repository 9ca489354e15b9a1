// RootKey: finds, checks, creates and remembers the root key, the token object that wraps
// every key version (see "Key hierarchy" in the design). It is an AES-256 secret key labelled
// `label`: private, sensitive, non-extractable, unmodifiable, usable only to wrap and unwrap.
//
// Its handle is looked up once and cached; Reset() forgets it after a token loss, since a
// reinserted token may number its objects differently. Thread-safe.
#pragma once

#include <p11-kit/pkcs11.h>

#include <mutex>
#include <string>
#include <vector>

#include "common/status.h"
#include "hsm/session_pool.h"

namespace custos::hsm {

class RootKey {
 public:
  // `pool` must outlive this object.
  RootKey(SessionPool* pool, std::string label) : pool_(pool), label_(std::move(label)) {}

  const std::string& label() const { return label_; }

  // The root key's handle. FAILED_PRECONDITION if the token has none, several, or one whose
  // attributes would let its value out.
  absl::StatusOr<CK_OBJECT_HANDLE> Get(CK_SESSION_HANDLE session);

  // Like Get(), but always asks the token (a health check must not trust the cached handle).
  absl::StatusOr<CK_OBJECT_HANDLE> Refresh(CK_SESSION_HANDLE session);

  // Generates the root key inside the HSM. ALREADY_EXISTS if the token has one.
  absl::Status Create(CK_SESSION_HANDLE session);

  void Reset();

 private:
  absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> Find(CK_SESSION_HANDLE session);
  absl::Status CheckAttributes(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE root);

  SessionPool* const pool_;
  const std::string label_;

  std::mutex mu_;  // Guards handle_; serialises Create().
  CK_OBJECT_HANDLE handle_ = CK_INVALID_HANDLE;
};

}  // namespace custos::hsm
