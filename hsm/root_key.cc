#include "hsm/root_key.h"

#include "hsm/ck_error.h"
#include "hsm/hsm.h"
#include "hsm/p11_object.h"

namespace custos::hsm {

absl::StatusOr<CK_OBJECT_HANDLE> RootKey::Get(CK_SESSION_HANDLE session) {
  {
    std::lock_guard lock(mu_);
    if (handle_ != CK_INVALID_HANDLE) return handle_;
  }
  return Refresh(session);
}

absl::StatusOr<CK_OBJECT_HANDLE> RootKey::Refresh(CK_SESSION_HANDLE session) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, Find(session));
  if (found.empty()) {
    return absl::FailedPreconditionError("the HSM token has no root key labelled '" + label_ +
                                         "'; create it first (key ceremony)");
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError("the HSM token has several keys labelled '" + label_ +
                                         "'; expected exactly one root key");
  }
  CUSTOS_RETURN_IF_ERROR(CheckAttributes(session, found.front()));
  std::lock_guard lock(mu_);
  handle_ = found.front();
  return handle_;
}

absl::Status RootKey::Create(CK_SESSION_HANDLE session) {
  std::lock_guard lock(mu_);  // Two creators must not both find nothing and both generate.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, Find(session));
  if (!found.empty()) {
    return absl::AlreadyExistsError("the HSM token already has a root key labelled '" + label_ +
                                    "'");
  }
  AttributeTemplate root;
  root.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, kAes256KeyBytes)
      .String(CKA_LABEL, label_)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)  // Usable only after login.
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_WRAP, true)
      .Bool(CKA_UNWRAP, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_SIGN, false)
      .Bool(CKA_VERIFY, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false)  // Nobody can later allow encrypt/decrypt with it.
      .Bool(CKA_COPYABLE, false);
  CK_MECHANISM generate{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  CK_RV rv =
      pool_->module()->api()->C_GenerateKey(session, &generate, root.data(), root.size(), &handle);
  if (rv != CKR_OK) return CkError("C_GenerateKey", rv);
  handle_ = handle;
  return absl::OkStatus();
}

void RootKey::Reset() {
  std::lock_guard lock(mu_);
  handle_ = CK_INVALID_HANDLE;
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> RootKey::Find(CK_SESSION_HANDLE session) {
  // Private objects are invisible without a login: a lost login must not look like "no root".
  CUSTOS_RETURN_IF_ERROR(pool_->EnsureLoggedIn(session));
  AttributeTemplate match;
  match.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bool(CKA_TOKEN, true).String(CKA_LABEL, label_);
  return FindObjects(*pool_->module(), session, match, /*max_count=*/2);
}

absl::Status RootKey::CheckAttributes(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE root) {
  const Pkcs11Module& module = *pool_->module();
  CUSTOS_ASSIGN_OR_RETURN(CK_ULONG type, GetUlong(module, session, root, CKA_KEY_TYPE));
  CUSTOS_ASSIGN_OR_RETURN(CK_ULONG length, GetUlong(module, session, root, CKA_VALUE_LEN));
  CUSTOS_ASSIGN_OR_RETURN(bool sensitive, GetBool(module, session, root, CKA_SENSITIVE));
  CUSTOS_ASSIGN_OR_RETURN(bool extractable, GetBool(module, session, root, CKA_EXTRACTABLE));
  CUSTOS_ASSIGN_OR_RETURN(bool wrap, GetBool(module, session, root, CKA_WRAP));
  CUSTOS_ASSIGN_OR_RETURN(bool unwrap, GetBool(module, session, root, CKA_UNWRAP));
  if (type != CKK_AES || length != kAes256KeyBytes || !sensitive || extractable || !wrap ||
      !unwrap) {
    return absl::FailedPreconditionError(
        "root key '" + label_ +
        "' is not a sensitive, non-extractable AES-256 wrapping key; refusing to use it");
  }
  return absl::OkStatus();
}

}  // namespace custos::hsm
