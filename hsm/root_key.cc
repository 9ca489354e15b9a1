#include "hsm/root_key.h"

#include <string_view>

#include "hsm/ck_error.h"
#include "hsm/hsm.h"
#include "hsm/p11_object.h"

namespace custos::hsm {
namespace {

absl::Status CheckLabel(const std::string& label) {
  if (label.empty()) return absl::InvalidArgumentError("a root key label must not be empty");
  return absl::OkStatus();
}

std::string Missing(const std::string& label) {
  return "the HSM token has no root key labelled '" + label + "'";
}

// Why root key `label` is refused: `attribute` ("CKA_DECRYPT=true") and what it would allow.
absl::Status Unsafe(const std::string& label, std::string_view attribute, std::string_view why) {
  return absl::FailedPreconditionError("root key '" + label + "' has " + std::string(attribute) +
                                       " (" + std::string(why) + "); refusing to use it");
}

absl::Status Public(const std::string& label) {
  return Unsafe(label, "CKA_PRIVATE=false",
                "anyone with access to the token can use it without the PIN");
}

}  // namespace

void AddConfinedVersionAttributes(AttributeTemplate& attributes) {
  attributes.Bool(CKA_SENSITIVE, true)
      .Bool(CKA_TOKEN, false)
      .Bool(CKA_DERIVE, false)  // a derived key's value could be read
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_EXTRACTABLE, false)
      .Mechanisms(CKA_ALLOWED_MECHANISMS, {CKM_AES_GCM});
}

absl::StatusOr<RootKeys::Entry> RootKeys::Lookup(CK_SESSION_HANDLE session,
                                                 const std::string& label) {
  {
    std::lock_guard lock(mu_);
    if (auto it = handles_.find(label); it != handles_.end()) return it->second;
  }
  return Load(session, label);
}

absl::StatusOr<RootKeys::Entry> RootKeys::Load(CK_SESSION_HANDLE session,
                                               const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label));
  const uint64_t before = generation();
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, Find(session, label));
  Entry entry;
  CUSTOS_ASSIGN_OR_RETURN(entry.handle, Verify(session, label, found));
  CUSTOS_ASSIGN_OR_RETURN(entry.confines, CheckAttributes(session, label, entry.handle));
  Remember(label, entry, before);
  return entry;
}

absl::StatusOr<CK_OBJECT_HANDLE> RootKeys::Get(CK_SESSION_HANDLE session,
                                               const std::string& label) {
  CUSTOS_ASSIGN_OR_RETURN(Entry entry, Lookup(session, label));
  return entry.handle;
}

absl::StatusOr<CK_OBJECT_HANDLE> RootKeys::Refresh(CK_SESSION_HANDLE session,
                                                   const std::string& label) {
  CUSTOS_ASSIGN_OR_RETURN(Entry entry, Load(session, label));
  return entry.handle;
}

absl::StatusOr<bool> RootKeys::Confines(CK_SESSION_HANDLE session, const std::string& label) {
  CUSTOS_ASSIGN_OR_RETURN(Entry entry, Lookup(session, label));
  return entry.confines;
}

absl::Status RootKeys::Create(CK_SESSION_HANDLE session, const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label));
  std::lock_guard admin(admin_mu_);  // Two creators must not both find nothing and generate.
  const uint64_t before = generation();
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, Find(session, label));
  if (!found.empty()) {
    return absl::AlreadyExistsError("the HSM token already has a root key labelled '" + label +
                                    "'");
  }
  AttributeTemplate root;
  root.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, kAes256KeyBytes)
      .String(CKA_LABEL, label)
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
      .Bool(CKA_COPYABLE, false)
      .Mechanisms(CKA_ALLOWED_MECHANISMS, {CKM_AES_KEY_WRAP_PAD})
      .Nested(CKA_UNWRAP_TEMPLATE, AddConfinedVersionAttributes);
  CK_MECHANISM generate{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  CK_RV rv =
      pool_->module()->api()->C_GenerateKey(session, &generate, root.data(), root.size(), &handle);
  if (rv != CKR_OK) return CkError("C_GenerateKey", rv);
  // Read back rather than assumed: a module that ignored the template must not pass for one
  // that enforces it. Such a key is not left under the label, where the next attempt would
  // find it.
  absl::StatusOr<bool> confines = CheckAttributes(session, label, handle);
  if (!confines.ok()) {
    (void)pool_->module()->api()->C_DestroyObject(session, handle);
    return confines.status();
  }
  Remember(label, Entry{handle, *confines}, before);
  return absl::OkStatus();
}

absl::StatusOr<CK_OBJECT_HANDLE> RootKeys::Destroy(CK_SESSION_HANDLE session,
                                                   const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label));
  std::lock_guard admin(admin_mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found, Find(session, label));
  if (found.empty()) {
    if (WasFound(label)) {  // Not gone: out of sight with its token's store.
      return TokenLostError("root key '" + label +
                            "' was on the HSM token and is not any more: taken for a token that "
                            "was removed or lost its store");
    }
    CUSTOS_RETURN_IF_ERROR(RefusePublic(session, label));  // Not ours to destroy.
    return absl::NotFoundError(Missing(label));
  }
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE root, Verify(session, label, found));
  CUSTOS_RETURN_IF_ERROR(CheckAttributes(session, label, root).status());
  CK_RV rv = pool_->module()->api()->C_DestroyObject(session, root);
  if (rv != CKR_OK) return CkError("C_DestroyObject", rv);
  // Only now: a lookup that found the key before it was destroyed must not cache its handle.
  std::lock_guard lock(mu_);
  handles_.erase(label);
  found_.erase(label);
  ++generation_;
  return root;
}

void RootKeys::ForgetFound() {
  std::lock_guard lock(mu_);
  found_.clear();
}

bool RootKeys::WasFound(const std::string& label) {
  std::lock_guard lock(mu_);
  return found_.contains(label);
}

void RootKeys::Reset() {
  std::lock_guard lock(mu_);
  handles_.clear();
  ++generation_;
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> RootKeys::Find(CK_SESSION_HANDLE session,
                                                             const std::string& label) {
  // Private objects are invisible without a login: a lost login must not look like "no root".
  CUSTOS_RETURN_IF_ERROR(pool_->EnsureLoggedIn(session));
  // Only private objects: a public one can be used, or planted, by anyone with access to the
  // token, without the PIN. RefusePublic() says so when such a key is all there is.
  AttributeTemplate match;
  match.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .String(CKA_LABEL, label);
  return FindObjects(*pool_->module(), session, match, /*max_count=*/2);
}

absl::Status RootKeys::RefusePublic(CK_SESSION_HANDLE session, const std::string& label) {
  AttributeTemplate match;
  match.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)
      .String(CKA_LABEL, label);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                          FindObjects(*pool_->module(), session, match, /*max_count=*/1));
  return found.empty() ? absl::OkStatus() : Public(label);
}

absl::StatusOr<CK_OBJECT_HANDLE> RootKeys::Verify(CK_SESSION_HANDLE session,
                                                  const std::string& label,
                                                  const std::vector<CK_OBJECT_HANDLE>& found) {
  if (found.empty()) {
    if (WasFound(label)) {
      return TokenLostError("root key '" + label +
                            "' was on the HSM token and is not any more: taken for a token that "
                            "was removed or lost its store");
    }
    CUSTOS_RETURN_IF_ERROR(RefusePublic(session, label));
    return absl::FailedPreconditionError(Missing(label));
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError("the HSM token has several keys labelled '" + label +
                                         "'; expected exactly one root key");
  }
  return found.front();
}

absl::StatusOr<bool> RootKeys::CheckAttributes(CK_SESSION_HANDLE session, const std::string& label,
                                               CK_OBJECT_HANDLE root) {
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
        "root key '" + label +
        "' is not a sensitive, non-extractable AES-256 wrapping key; refusing to use it");
  }
  // Find() asked for a private key; checked again in case a module ignores that in a search.
  CUSTOS_ASSIGN_OR_RETURN(bool is_private, GetBool(module, session, root, CKA_PRIVATE));
  if (!is_private) return Public(label);
  CUSTOS_RETURN_IF_ERROR(CheckGeneratedInside(module, session, root, "root key '" + label + "'"));
  CUSTOS_ASSIGN_OR_RETURN(bool decrypt, GetBool(module, session, root, CKA_DECRYPT));
  if (decrypt) {
    return Unsafe(label, "CKA_DECRYPT=true",
                  "decrypting a wrapped key version with it would reveal the version's key");
  }
  CUSTOS_ASSIGN_OR_RETURN(bool encrypt, GetBool(module, session, root, CKA_ENCRYPT));
  if (encrypt) return Unsafe(label, "CKA_ENCRYPT=true", "a root key must only wrap and unwrap");
  CUSTOS_ASSIGN_OR_RETURN(bool modifiable, GetBool(module, session, root, CKA_MODIFIABLE));
  if (modifiable) {
    return Unsafe(label, "CKA_MODIFIABLE=true", "its use could later be widened to decryption");
  }
  // Confining: its unwrap template is exactly ours (a weaker one confines nothing worth the
  // name, and is treated as no template at all).
  CUSTOS_ASSIGN_OR_RETURN(const auto unwrap_template,
                          GetTemplate(module, session, root, CKA_UNWRAP_TEMPLATE));
  AttributeTemplate confined;
  AddConfinedVersionAttributes(confined);
  return unwrap_template == TemplateValues(confined);
}

void RootKeys::Remember(const std::string& label, Entry entry, uint64_t generation) {
  std::lock_guard lock(mu_);
  if (generation != generation_) return;
  handles_[label] = entry;
  found_.insert(label);
}

uint64_t RootKeys::generation() {
  std::lock_guard lock(mu_);
  return generation_;
}

}  // namespace custos::hsm
