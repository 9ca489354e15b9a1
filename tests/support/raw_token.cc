#include "tests/support/raw_token.h"

#include <catch2/catch.hpp>

#include <iterator>
#include <vector>

namespace custos::testing {

RawToken::RawToken(const SoftHsmToken& token) : RawToken(token.label(), token.pin()) {}

RawToken::RawToken(const std::string& token_label, std::string pin) : pin_(std::move(pin)) {
  auto module = hsm::Pkcs11Module::Load(kSoftHsmModule);
  REQUIRE(module.ok());
  module_ = *module;
  auto slot = module_->FindSlot(token_label);
  REQUIRE(slot.ok());
  slot_ = *slot;
  Open();
}

RawToken::~RawToken() {
  if (session_ != CK_INVALID_HANDLE) api()->C_CloseSession(session_);
}

void RawToken::Open() {
  REQUIRE(api()->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                               &session_) == CKR_OK);
  CK_RV rv =
      api()->C_Login(session_, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin_.data()), pin_.size());
  REQUIRE((rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN));
}

size_t RawToken::CountSecretKeys(bool token_objects) {
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_BBOOL token = token_objects ? CK_TRUE : CK_FALSE;
  CK_ATTRIBUTE match[] = {{CKA_CLASS, &secret, sizeof secret}, {CKA_TOKEN, &token, sizeof token}};
  REQUIRE(api()->C_FindObjectsInit(session_, match, 2) == CKR_OK);
  std::vector<CK_OBJECT_HANDLE> found(10000);
  CK_ULONG count = 0;
  REQUIRE(api()->C_FindObjects(session_, found.data(), found.size(), &count) == CKR_OK);
  REQUIRE(api()->C_FindObjectsFinal(session_) == CKR_OK);
  return count;
}

CK_OBJECT_HANDLE RawToken::FindKey(const std::string& label) {
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_ATTRIBUTE match[] = {{CKA_CLASS, &secret, sizeof secret},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  REQUIRE(api()->C_FindObjectsInit(session_, match, 2) == CKR_OK);
  CK_OBJECT_HANDLE found[2];
  CK_ULONG count = 0;
  REQUIRE(api()->C_FindObjects(session_, found, 2, &count) == CKR_OK);
  REQUIRE(api()->C_FindObjectsFinal(session_) == CKR_OK);
  REQUIRE(count <= 1);
  return count == 1 ? found[0] : CK_INVALID_HANDLE;
}

CK_RV RawToken::ReadBool(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type, bool* value) {
  CK_BBOOL raw = CK_FALSE;
  CK_ATTRIBUTE attribute{type, &raw, sizeof raw};
  CK_RV rv = api()->C_GetAttributeValue(session_, object, &attribute, 1);
  *value = raw != CK_FALSE;
  return rv;
}

CK_RV RawToken::TryReadValue(CK_OBJECT_HANDLE object) {
  std::vector<CK_BYTE> value(64);
  CK_ATTRIBUTE attribute{CKA_VALUE, value.data(), value.size()};
  return api()->C_GetAttributeValue(session_, object, &attribute, 1);
}

CK_OBJECT_HANDLE RawToken::CreateData(const std::string& label, const std::string& value) {
  CK_OBJECT_CLASS data = CKO_DATA;
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE object[] = {{CKA_CLASS, &data, sizeof data},
                           {CKA_TOKEN, &yes, sizeof yes},
                           {CKA_PRIVATE, &yes, sizeof yes},
                           {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
                           {CKA_VALUE, const_cast<char*>(value.data()), value.size()}};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  REQUIRE(api()->C_CreateObject(session_, object, std::size(object), &handle) == CKR_OK);
  return handle;
}

CK_OBJECT_HANDLE RawToken::CreateAesKey(const std::string& label, bool extractable) {
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_KEY_TYPE aes = CKK_AES;
  CK_ULONG length = 32;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL extract = extractable ? CK_TRUE : CK_FALSE;
  CK_ATTRIBUTE key[] = {{CKA_CLASS, &secret, sizeof secret},
                        {CKA_KEY_TYPE, &aes, sizeof aes},
                        {CKA_VALUE_LEN, &length, sizeof length},
                        {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
                        {CKA_TOKEN, &yes, sizeof yes},
                        {CKA_PRIVATE, &yes, sizeof yes},
                        {CKA_SENSITIVE, &yes, sizeof yes},
                        {CKA_EXTRACTABLE, &extract, sizeof extract},
                        {CKA_WRAP, &yes, sizeof yes},
                        {CKA_UNWRAP, &yes, sizeof yes}};
  CK_MECHANISM generate{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  REQUIRE(api()->C_GenerateKey(session_, &generate, key, std::size(key), &handle) == CKR_OK);
  return handle;
}

CK_OBJECT_HANDLE RawToken::CreateAesKey(const std::string& label,
                                        const AesKeyAttributes& attributes) {
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_KEY_TYPE aes = CKK_AES;
  CK_ULONG length = 32;
  CK_BBOOL yes = CK_TRUE;
  auto flag = [](bool value) -> CK_BBOOL { return value ? CK_TRUE : CK_FALSE; };
  CK_BBOOL is_private = flag(attributes.is_private);
  CK_BBOOL extractable = flag(attributes.extractable);
  CK_BBOOL encrypt = flag(attributes.encrypt);
  CK_BBOOL decrypt = flag(attributes.decrypt);
  CK_BBOOL modifiable = flag(attributes.modifiable);
  CK_ATTRIBUTE key[] = {{CKA_CLASS, &secret, sizeof secret},
                        {CKA_KEY_TYPE, &aes, sizeof aes},
                        {CKA_VALUE_LEN, &length, sizeof length},
                        {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
                        {CKA_TOKEN, &yes, sizeof yes},
                        {CKA_PRIVATE, &is_private, sizeof is_private},
                        {CKA_SENSITIVE, &yes, sizeof yes},
                        {CKA_EXTRACTABLE, &extractable, sizeof extractable},
                        {CKA_WRAP, &yes, sizeof yes},
                        {CKA_UNWRAP, &yes, sizeof yes},
                        {CKA_ENCRYPT, &encrypt, sizeof encrypt},
                        {CKA_DECRYPT, &decrypt, sizeof decrypt},
                        {CKA_MODIFIABLE, &modifiable, sizeof modifiable}};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  if (attributes.imported) {
    std::vector<CK_ATTRIBUTE> with_value(std::begin(key), std::end(key));
    std::erase_if(with_value, [](const CK_ATTRIBUTE& a) { return a.type == CKA_VALUE_LEN; });
    std::vector<CK_BYTE> value(length, 0x42);  // known to whoever imported it
    with_value.push_back({CKA_VALUE, value.data(), value.size()});
    CK_RV rv = api()->C_CreateObject(session_, with_value.data(), with_value.size(), &handle);
    INFO("C_CreateObject of '" << label << "': 0x" << std::hex << rv);
    REQUIRE(rv == CKR_OK);
    return handle;
  }
  CK_MECHANISM generate{CKM_AES_KEY_GEN, nullptr, 0};
  CK_RV rv = api()->C_GenerateKey(session_, &generate, key, std::size(key), &handle);
  INFO("C_GenerateKey of '" << label << "': 0x" << std::hex << rv);
  REQUIRE(rv == CKR_OK);
  return handle;
}

void RawToken::CloseAllSessions() {
  REQUIRE(api()->C_CloseAllSessions(slot_) == CKR_OK);
  session_ = CK_INVALID_HANDLE;
  REQUIRE(api()->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                               &session_) == CKR_OK);
}

void RawToken::Logout() { REQUIRE(api()->C_Logout(session_) == CKR_OK); }

}  // namespace custos::testing
