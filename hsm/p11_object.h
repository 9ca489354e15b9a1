// Small typed helpers over PKCS#11 objects: attribute templates, object search, attribute
// reads, and a guard that destroys a temporary object. Used by the rest of hsm/ so that no
// code builds CK_ATTRIBUTE arrays by hand. Not thread-safe per instance; the functions are.
#pragma once

#include <p11-kit/pkcs11.h>

#include <deque>
#include <list>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "hsm/pkcs11_module.h"

namespace custos::hsm {

// A CK_ATTRIBUTE array that owns the values it points to.
class AttributeTemplate {
 public:
  AttributeTemplate() = default;
  // Copying would leave the copy's pointers aimed at the original's storage.
  AttributeTemplate(const AttributeTemplate&) = delete;
  AttributeTemplate& operator=(const AttributeTemplate&) = delete;

  AttributeTemplate& Bool(CK_ATTRIBUTE_TYPE type, bool value);
  AttributeTemplate& Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value);
  AttributeTemplate& String(CK_ATTRIBUTE_TYPE type, std::string_view value);
  // A CK_MECHANISM_TYPE array (CKA_ALLOWED_MECHANISMS).
  AttributeTemplate& Mechanisms(CK_ATTRIBUTE_TYPE type, std::vector<CK_MECHANISM_TYPE> value);
  // An attribute array attribute (CKA_UNWRAP_TEMPLATE): a template of its own, filled by `fill`.
  template <typename Fill>
  AttributeTemplate& Nested(CK_ATTRIBUTE_TYPE type, Fill fill) {
    AttributeTemplate& inner = nested_.emplace_back();
    fill(inner);
    Add(type, inner.data(), inner.size() * sizeof(CK_ATTRIBUTE));
    return *this;
  }

  CK_ATTRIBUTE* data() { return attributes_.data(); }
  CK_ULONG size() const { return attributes_.size(); }

 private:
  void Add(CK_ATTRIBUTE_TYPE type, void* value, CK_ULONG length);

  // Deques never move their elements on push_back, so the pointers stay valid.
  std::deque<CK_BBOOL> bools_;
  std::deque<CK_ULONG> ulongs_;
  std::deque<std::string> strings_;
  std::deque<std::vector<CK_MECHANISM_TYPE>> mechanisms_;
  std::list<AttributeTemplate> nested_;  // list: may hold its own (incomplete) type
  std::vector<CK_ATTRIBUTE> attributes_;
};

// Handles of at most `max_count` objects matching `match`, visible to `session`.
absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(const Pkcs11Module& module,
                                                          CK_SESSION_HANDLE session,
                                                          AttributeTemplate& match,
                                                          size_t max_count);

// Reads a CK_BBOOL or CK_ULONG attribute of an object.
absl::StatusOr<bool> GetBool(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                             CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);
absl::StatusOr<CK_ULONG> GetUlong(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                  CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type);

// OK if `key` was generated on the token (CKA_LOCAL) and its value never left it in the clear
// (CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE). A key made with C_CreateObject or
// C_UnwrapKey has a value someone outside the token held, who could then unwrap or forge
// whatever it protects offline, PIN or no PIN: FAILED_PRECONDITION, naming `what`.
absl::Status CheckGeneratedInside(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                  CK_OBJECT_HANDLE key, const std::string& what);

// An attribute array attribute of an object (CKA_UNWRAP_TEMPLATE) as type -> value bytes;
// empty if the object has none (or the module does not know the attribute).
absl::StatusOr<std::map<CK_ATTRIBUTE_TYPE, std::string>> GetTemplate(const Pkcs11Module& module,
                                                                     CK_SESSION_HANDLE session,
                                                                     CK_OBJECT_HANDLE object,
                                                                     CK_ATTRIBUTE_TYPE type);
// The same for a template built here, to compare with what GetTemplate read.
std::map<CK_ATTRIBUTE_TYPE, std::string> TemplateValues(AttributeTemplate& attributes);

// Destroys a (temporary, session) object when it goes out of scope, whatever happens between.
class ObjectGuard {
 public:
  ObjectGuard(const Pkcs11Module& module, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object)
      : module_(module), session_(session), object_(object) {}
  ~ObjectGuard();
  ObjectGuard(const ObjectGuard&) = delete;
  ObjectGuard& operator=(const ObjectGuard&) = delete;

 private:
  const Pkcs11Module& module_;
  CK_SESSION_HANDLE session_;
  CK_OBJECT_HANDLE object_;
};

}  // namespace custos::hsm
