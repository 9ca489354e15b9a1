// RootKeys: finds, checks, creates, destroys and remembers the root keys, the token objects
// that wrap key versions (see "Key hierarchy" in the design). A root key is an AES-256 secret
// key named by its label: private, sensitive, non-extractable, unmodifiable, not copyable,
// usable only to wrap and unwrap (and only with CKM_AES_KEY_WRAP_PAD).
//
// A root made here *confines* what it unwraps: its CKA_UNWRAP_TEMPLATE (see
// AddConfinedVersionAttributes) makes the module refuse any C_UnwrapKey whose template does
// not ask for exactly those attributes, so a key version unwrapped under it is always
// sensitive, non-extractable, not derivable, unable to wrap or unwrap, a session object, and
// usable only for AES-GCM. Whoever holds the PIN can use versions through the HSM, but can
// never get one out of it: not in the clear, not under a key of their own. The template cannot
// be changed after generation. Roots made before this (or by another tool) without that
// template are "legacy": still used, but a PIN holder could unwrap their versions as
// extractable; a root rotation moves their versions to a confining root and destroys them.
// Several roots coexist after a rotation: versions under a confining root cannot be re-wrapped
// (that is the point), so they stay under it until their keys are destroyed.
//
// A key made by another tool is used only if it has every one of those attributes: a public
// key can be used without the PIN, and one that may decrypt (or could be modified to) would
// reveal every key version through CKM_AES_KEY_WRAP_PAD decryption. Public keys are never
// even looked at as roots; such a key under a root's label is reported, never used.
//
// Handles are looked up once per label and cached; Reset() forgets them all after a token
// loss, since a reinserted token may number its objects differently. Destroy() forgets the
// destroyed root's handle, and a lookup that raced with it never caches the dead handle.
// A root destroyed by another process is noticed only when the HSM reports the cached handle
// stale (versions already in the KeyCache are not unwrapped again, so they keep working until
// evicted or restart): destroy roots through the Hsm that uses them.
// Thread-safe.
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "hsm/session_pool.h"

namespace custos::hsm {

class AttributeTemplate;

// Adds to `attributes` what every key version unwrapped under a confining root must have (and
// what its CKA_UNWRAP_TEMPLATE fixes): CKA_SENSITIVE, CKA_TOKEN=false, CKA_DERIVE=false,
// CKA_WRAP=false, CKA_UNWRAP=false, CKA_EXTRACTABLE=false, CKA_ALLOWED_MECHANISMS={AES-GCM}.
void AddConfinedVersionAttributes(AttributeTemplate& attributes);

class RootKeys {
 public:
  // `pool` must outlive this object.
  explicit RootKeys(SessionPool* pool) : pool_(pool) {}

  // The handle of root key `label`. INVALID_ARGUMENT if `label` is empty; FAILED_PRECONDITION
  // if the token has no private key so labelled, several, only a public one, or one whose
  // attributes would let its value out or allow more than wrapping and unwrapping (the message
  // names the label and the offending attribute). UNAVAILABLE (TokenLostError) if it has none
  // but had one before: the token was lost, not the key.
  absl::StatusOr<CK_OBJECT_HANDLE> Get(CK_SESSION_HANDLE session, const std::string& label);

  // Like Get(), but always asks the token (a health check must not trust the cached handle).
  absl::StatusOr<CK_OBJECT_HANDLE> Refresh(CK_SESSION_HANDLE session, const std::string& label);

  // True if root `label` confines what it unwraps; false for a legacy root. Errors as Get().
  absl::StatusOr<bool> Confines(CK_SESSION_HANDLE session, const std::string& label);

  // Generates root key `label` inside the HSM. ALREADY_EXISTS if the token has a private key
  // so labelled (a public one is not a root key and does not count).
  absl::Status Create(CK_SESSION_HANDLE session, const std::string& label);

  // Destroys root key `label` on the token (`session` must be read/write) and returns the
  // handle it had, so that copies unwrapped under it can be dropped. NOT_FOUND if the token
  // has no key so labelled; FAILED_PRECONDITION if the key so labelled is not one Get() would
  // use (several, public, or wrong attributes): only a verified root key is ever destroyed.
  absl::StatusOr<CK_OBJECT_HANDLE> Destroy(CK_SESSION_HANDLE session, const std::string& label);

  // Forgets every cached handle.
  void Reset();

  // Forgets which roots were found before (the token was found again after a loss: a root
  // missing now is missing for good).
  void ForgetFound();

 private:
  // Private secret token keys labelled `label` (at most two); public ones are never roots.
  absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> Find(CK_SESSION_HANDLE session,
                                                     const std::string& label);
  // FAILED_PRECONDITION if the token has a public secret key labelled `label`, which Find()
  // passes over: said instead of "no root key" when no private one is found.
  absl::Status RefusePublic(CK_SESSION_HANDLE session, const std::string& label);
  // The one usable root key among `found`, or why there is none.
  absl::StatusOr<CK_OBJECT_HANDLE> Verify(CK_SESSION_HANDLE session, const std::string& label,
                                          const std::vector<CK_OBJECT_HANDLE>& found);
  // OK if `root` may be used; then whether it confines what it unwraps.
  absl::StatusOr<bool> CheckAttributes(CK_SESSION_HANDLE session, const std::string& label,
                                       CK_OBJECT_HANDLE root);
  struct Entry {
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    bool confines = false;
  };
  absl::StatusOr<Entry> Lookup(CK_SESSION_HANDLE session, const std::string& label);
  absl::StatusOr<Entry> Load(CK_SESSION_HANDLE session, const std::string& label);
  // Caches `entry` for `label` unless a Reset() or Destroy() came after `generation`.
  void Remember(const std::string& label, Entry entry, uint64_t generation);
  uint64_t generation();
  // True if root `label` was found on the token before and not destroyed here since.
  bool WasFound(const std::string& label);

  SessionPool* const pool_;

  std::mutex admin_mu_;  // Serialises Create() and Destroy(); taken before mu_.

  std::mutex mu_;  // Guards the two below; never held while calling the HSM.
  std::map<std::string, Entry> handles_;
  // Roots found so far, kept across Reset(): one that goes missing later means the token was
  // lost (UNAVAILABLE, recovered from), not that the root never existed (FAILED_PRECONDITION).
  std::set<std::string> found_;
  uint64_t generation_ = 0;  // Bumped by Reset() and Destroy().
};

}  // namespace custos::hsm
