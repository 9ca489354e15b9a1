#include "hsm/p11_object.h"

#include "absl/strings/str_cat.h"
#include "hsm/ck_error.h"

#include <utility>
#include "spdlog/spdlog.h"

namespace custos::hsm {

AttributeTemplate& AttributeTemplate::Bool(CK_ATTRIBUTE_TYPE type, bool value) {
  bools_.push_back(value ? CK_TRUE : CK_FALSE);
  Add(type, &bools_.back(), sizeof(CK_BBOOL));
  return *this;
}

AttributeTemplate& AttributeTemplate::Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value) {
  ulongs_.push_back(value);
  Add(type, &ulongs_.back(), sizeof(CK_ULONG));
  return *this;
}

AttributeTemplate& AttributeTemplate::String(CK_ATTRIBUTE_TYPE type, std::string_view value) {
  strings_.emplace_back(value);
  Add(type, strings_.back().data(), strings_.back().size());
  return *this;
}

AttributeTemplate& AttributeTemplate::Mechanisms(CK_ATTRIBUTE_TYPE type,
                                                 std::vector<CK_MECHANISM_TYPE> value) {
  mechanisms_.push_back(std::move(value));
  Add(type, mechanisms_.back().data(), mechanisms_.back().size() * sizeof(CK_MECHANISM_TYPE));
  return *this;
}

void AttributeTemplate::Add(CK_ATTRIBUTE_TYPE type, void* value, CK_ULONG length) {
  attributes_.push_back(CK_ATTRIBUTE{type, value, length});
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(const Pkcs11Module& module,
                                                          CK_SESSION_HANDLE session,
                                                          AttributeTemplate& match,
                                                          size_t max_count) {
  CK_FUNCTION_LIST* api = module.api();
  CK_RV rv = api->C_FindObjectsInit(session, match.data(), match.size());
  if (rv != CKR_OK) return CkError("C_FindObjectsInit", rv);
  std::vector<CK_OBJECT_HANDLE> found(max_count);
  CK_ULONG count = 0;
  rv = api->C_FindObjects(session, found.data(), found.size(), &count);
  // Always end the search, or the session refuses the next one (CKR_OPERATION_ACTIVE).
  CK_RV final_rv = api->C_FindObjectsFinal(session);
  if (rv != CKR_OK) return CkError("C_FindObjects", rv);
  if (final_rv != CKR_OK) return CkError("C_FindObjectsFinal", final_rv);
  found.resize(count);
  return found;
}

namespace {

template <typename T>
absl::StatusOr<T> GetScalar(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                            CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  T value{};
  CK_ATTRIBUTE attribute{type, &value, sizeof value};
  CK_RV rv = module.api()->C_GetAttributeValue(session, object, &attribute, 1);
  if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
  if (attribute.ulValueLen != sizeof value) {
    return absl::InternalError("PKCS#11 attribute has an unexpected size");
  }
  return value;
}

}  // namespace

absl::StatusOr<bool> GetBool(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                             CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CUSTOS_ASSIGN_OR_RETURN(CK_BBOOL value, GetScalar<CK_BBOOL>(module, session, object, type));
  return value != CK_FALSE;
}

absl::StatusOr<CK_ULONG> GetUlong(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                  CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  return GetScalar<CK_ULONG>(module, session, object, type);
}

absl::Status CheckGeneratedInside(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                  CK_OBJECT_HANDLE key, const std::string& what) {
  CUSTOS_ASSIGN_OR_RETURN(const bool local, GetBool(module, session, key, CKA_LOCAL));
  CUSTOS_ASSIGN_OR_RETURN(const bool always_sensitive,
                          GetBool(module, session, key, CKA_ALWAYS_SENSITIVE));
  CUSTOS_ASSIGN_OR_RETURN(const bool never_extractable,
                          GetBool(module, session, key, CKA_NEVER_EXTRACTABLE));
  if (local && always_sensitive && never_extractable) return absl::OkStatus();
  const auto flag = [](bool value) { return value ? "true" : "false"; };
  return absl::FailedPreconditionError(absl::StrCat(
      what, " was not generated inside the HSM and kept there (CKA_LOCAL=", flag(local),
      ", CKA_ALWAYS_SENSITIVE=", flag(always_sensitive),
      ", CKA_NEVER_EXTRACTABLE=", flag(never_extractable),
      "): its value was known outside the token; refusing to use it (custosd init generates it "
      "on the token)"));
}

absl::StatusOr<std::map<CK_ATTRIBUTE_TYPE, std::string>> GetTemplate(const Pkcs11Module& module,
                                                                     CK_SESSION_HANDLE session,
                                                                     CK_OBJECT_HANDLE object,
                                                                     CK_ATTRIBUTE_TYPE type) {
  CK_FUNCTION_LIST* api = module.api();
  std::map<CK_ATTRIBUTE_TYPE, std::string> values;
  // Three calls, as PKCS#11 asks for arrays of attributes: the number of entries, their
  // types and lengths, then their values.
  CK_ATTRIBUTE outer{type, nullptr, 0};
  CK_RV rv = api->C_GetAttributeValue(session, object, &outer, 1);
  if (rv == CKR_ATTRIBUTE_TYPE_INVALID || (rv == CKR_OK && outer.ulValueLen == 0)) return values;
  if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
  if (outer.ulValueLen == CK_UNAVAILABLE_INFORMATION || outer.ulValueLen % sizeof(CK_ATTRIBUTE)) {
    return absl::InternalError("PKCS#11 attribute template has an unexpected size");
  }
  std::vector<CK_ATTRIBUTE> entries(outer.ulValueLen / sizeof(CK_ATTRIBUTE));
  outer.pValue = entries.data();
  rv = api->C_GetAttributeValue(session, object, &outer, 1);
  if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
  std::vector<std::string> buffers(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    buffers[i].resize(entries[i].ulValueLen);
    entries[i].pValue = buffers[i].data();
  }
  rv = api->C_GetAttributeValue(session, object, &outer, 1);
  if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
  for (size_t i = 0; i < entries.size(); ++i) {
    buffers[i].resize(entries[i].ulValueLen);
    values[entries[i].type] = std::move(buffers[i]);
  }
  return values;
}

std::map<CK_ATTRIBUTE_TYPE, std::string> TemplateValues(AttributeTemplate& attributes) {
  std::map<CK_ATTRIBUTE_TYPE, std::string> values;
  for (CK_ULONG i = 0; i < attributes.size(); ++i) {
    const CK_ATTRIBUTE& a = attributes.data()[i];
    values[a.type] = std::string(static_cast<const char*>(a.pValue), a.ulValueLen);
  }
  return values;
}

ObjectGuard::~ObjectGuard() {
  CK_RV rv = module_.api()->C_DestroyObject(session_, object_);
  // If the session died the object died with it; anything else is worth knowing about.
  if (rv != CKR_OK && !IsSessionDead(rv) && !IsHandleStale(rv)) {
    spdlog::error("PKCS#11 C_DestroyObject of a temporary key failed: {}", CkrName(rv));
  }
}

}  // namespace custos::hsm
