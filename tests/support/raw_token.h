// RawToken: direct PKCS#11 access to a test token, to check from outside what the Hsm did
// (objects left behind, attributes of the root key) and to break things under it (close all
// sessions, log out). Shares the process's module instance with any open Hsm, logs in as
// the user (a no-op if the Hsm already did: login state is per application) and never logs
// out unless asked. Failures abort the test (Catch2 REQUIRE). Not thread-safe.
#pragma once

#include <p11-kit/pkcs11.h>

#include <memory>
#include <optional>
#include <string>

#include "hsm/pkcs11_module.h"
#include "tests/support/softhsm_token.h"

namespace custos::testing {

class RawToken {
 public:
  explicit RawToken(const SoftHsmToken& token);
  // Any SoftHSM2 token of the configuration SOFTHSM2_CONF names, by label and user PIN.
  RawToken(const std::string& token_label, std::string pin);
  ~RawToken();
  RawToken(const RawToken&) = delete;
  RawToken& operator=(const RawToken&) = delete;

  CK_FUNCTION_LIST* api() const { return module_->api(); }
  CK_SESSION_HANDLE session() const { return session_; }
  CK_SLOT_ID slot() const { return slot_; }

  // Secret keys this application can see: token objects, or session objects of any of its
  // sessions (the Hsm's cached key versions).
  size_t CountSecretKeys(bool token_objects);
  // The one secret key labelled `label`, or CK_INVALID_HANDLE.
  CK_OBJECT_HANDLE FindKey(const std::string& label);
  // A CK_BBOOL attribute, or the CK_RV if it cannot be read.
  CK_RV ReadBool(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type, bool* value);
  // The CK_RV of reading CKA_VALUE (the key's secret bytes) into a scratch buffer.
  CK_RV TryReadValue(CK_OBJECT_HANDLE object);
  // Generates a private AES-256 token key labelled `label`, usable to wrap and unwrap, made
  // outside the Hsm (as a careless operator might); `extractable` as asked, and the module's
  // defaults for the rest (SoftHSM2: may encrypt and decrypt, modifiable).
  CK_OBJECT_HANDLE CreateAesKey(const std::string& label, bool extractable);

  // Attributes of a sensitive AES-256 wrap/unwrap token key made by another tool. The defaults
  // are those of a safe root key, as the Hsm makes it.
  struct AesKeyAttributes {
    bool is_private = true;
    bool extractable = false;
    bool encrypt = false;
    bool decrypt = false;
    bool modifiable = false;
    // Made with C_CreateObject from a value known outside the token, not generated on it.
    bool imported = false;
  };
  CK_OBJECT_HANDLE CreateAesKey(const std::string& label, const AesKeyAttributes& attributes);
  // A legacy root: every attribute of a safe root but no unwrap template, as Custos made roots
  // before they confined what they unwrap (its versions can still be re-wrapped).
  CK_OBJECT_HANDLE CreateLegacyRoot(const std::string& label) {
    return CreateAesKey(label, AesKeyAttributes{});
  }

  // A private data token object labelled `label` holding `value`, added beside any others of
  // that label (Hsm::WriteTokenData would replace them): a write another process made at the
  // same moment, or one that landed late.
  CK_OBJECT_HANDLE CreateData(const std::string& label, const std::string& value);

  // Closes every session of this application with the token, as a token removal would; the
  // raw session is reopened (logged out).
  void CloseAllSessions();
  // Logs this application out of the token (every session, the Hsm's included).
  void Logout();

 private:
  void Open();

  std::shared_ptr<const hsm::Pkcs11Module> module_;
  std::string pin_;
  CK_SLOT_ID slot_ = 0;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
};

}  // namespace custos::testing
