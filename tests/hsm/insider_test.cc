// What someone holding the HSM PIN can do with raw PKCS#11, outside custosd: use keys, but
// never get a key version, the audit HMAC key or the checkpoint signing key out of the HSM.
// The attacks are the ones an insider would try (the first one succeeded before roots
// confined what they unwrap); each must be refused by the module itself.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

// A template of booleans and one mechanism list, as an attacker would write it.
struct Template {
  std::vector<CK_ATTRIBUTE> attributes;
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_KEY_TYPE aes = CKK_AES;
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_MECHANISM_TYPE gcm = CKM_AES_GCM;

  Template() {
    attributes.push_back({CKA_CLASS, &secret, sizeof secret});
    attributes.push_back({CKA_KEY_TYPE, &aes, sizeof aes});
  }
  Template& Set(CK_ATTRIBUTE_TYPE type, bool value) {
    attributes.push_back({type, value ? &yes : &no, sizeof(CK_BBOOL)});
    return *this;
  }
  Template& OnlyGcm() {
    attributes.push_back({CKA_ALLOWED_MECHANISMS, &gcm, sizeof gcm});
    return *this;
  }
  // Everything a confining root demands of what it unwraps.
  Template& Confined() {
    return Set(CKA_SENSITIVE, true)
        .Set(CKA_TOKEN, false)
        .Set(CKA_DERIVE, false)
        .Set(CKA_WRAP, false)
        .Set(CKA_UNWRAP, false)
        .Set(CKA_EXTRACTABLE, false)
        .OnlyGcm();
  }
  CK_ATTRIBUTE* data() { return attributes.data(); }
  CK_ULONG size() const { return attributes.size(); }
};

CK_RV Unwrap(RawToken& raw, CK_OBJECT_HANDLE root, const Bytes& wrapped, Template& form,
             CK_OBJECT_HANDLE* out) {
  CK_MECHANISM kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  return raw.api()->C_UnwrapKey(raw.session(), &kwp, root, const_cast<CK_BYTE*>(wrapped.data()),
                                wrapped.size(), form.data(), form.size(), out);
}

// An AES key of the attacker's own, able to wrap, unwrap and decrypt, value readable.
CK_OBJECT_HANDLE AttackerKey(RawToken& raw) {
  Template form;
  CK_ULONG length = 32;
  form.attributes.push_back({CKA_VALUE_LEN, &length, sizeof length});
  form.Set(CKA_TOKEN, false)
      .Set(CKA_WRAP, true)
      .Set(CKA_UNWRAP, true)
      .Set(CKA_DECRYPT, true)
      .Set(CKA_SENSITIVE, false)
      .Set(CKA_EXTRACTABLE, true);
  CK_MECHANISM generate{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE(raw.api()->C_GenerateKey(raw.session(), &generate, form.data(), form.size(), &key) ==
          CKR_OK);
  return key;
}

TEST_CASE("With the PIN, a stored key version still cannot be unwrapped out of the HSM",
          "[insider]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);  // makes kRoot as `custosd init` does
  REQUIRE(*hsm->RootKeyConfinesVersions(kRoot));
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();  // a row of custos.db
  const hsm::WrappedKey version{"k/1", wrapped, kRoot};
  auto sealed = hsm->Encrypt(version, AsBytes("patient record key"), {});
  REQUIRE(sealed.ok());

  RawToken raw(token);  // the insider: the user PIN, raw PKCS#11
  const CK_OBJECT_HANDLE root = raw.FindKey(kRoot);
  REQUIRE(root != CK_INVALID_HANDLE);
  CK_OBJECT_HANDLE out = CK_INVALID_HANDLE;

  // The attack that worked: unwrap as not sensitive and extractable, then read CKA_VALUE.
  Template leaky;
  leaky.Set(CKA_SENSITIVE, false).Set(CKA_EXTRACTABLE, true);
  CHECK(Unwrap(raw, root, wrapped, leaky, &out) == CKR_TEMPLATE_INCONSISTENT);
  // Omitting the attributes (the module's defaults), or any one of them different, fails too.
  Template bare;
  CHECK(Unwrap(raw, root, wrapped, bare, &out) == CKR_TEMPLATE_INCONSISTENT);
  for (CK_ATTRIBUTE_TYPE loosened :
       {CKA_SENSITIVE, CKA_TOKEN, CKA_DERIVE, CKA_WRAP, CKA_UNWRAP, CKA_EXTRACTABLE}) {
    INFO("attribute 0x" << std::hex << loosened);
    Template almost;
    almost.Confined();
    for (CK_ATTRIBUTE& a : almost.attributes) {
      if (a.type == loosened)
        a.pValue = *static_cast<CK_BBOOL*>(a.pValue) ? &almost.no : &almost.yes;
    }
    CHECK(Unwrap(raw, root, wrapped, almost, &out) == CKR_TEMPLATE_INCONSISTENT);
  }
  Template no_mechanism_limit;
  no_mechanism_limit.Set(CKA_SENSITIVE, true)
      .Set(CKA_TOKEN, false)
      .Set(CKA_DERIVE, false)
      .Set(CKA_WRAP, false)
      .Set(CKA_UNWRAP, false)
      .Set(CKA_EXTRACTABLE, false);
  CHECK(Unwrap(raw, root, wrapped, no_mechanism_limit, &out) == CKR_TEMPLATE_INCONSISTENT);

  // What the root allows is a key usable through the HSM, and only that.
  Template confined;
  confined.Confined().Set(CKA_ENCRYPT, true).Set(CKA_DECRYPT, true);
  REQUIRE(Unwrap(raw, root, wrapped, confined, &out) == CKR_OK);
  CK_FUNCTION_LIST* api = raw.api();
  CK_SESSION_HANDLE session = raw.session();
  CHECK(raw.TryReadValue(out) == CKR_ATTRIBUTE_SENSITIVE);
  const CK_OBJECT_HANDLE mine = AttackerKey(raw);
  CK_MECHANISM kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_MECHANISM ecb{CKM_AES_ECB, nullptr, 0};
  CK_BYTE exported[64];
  CK_ULONG exported_length = sizeof exported;
  CHECK(api->C_WrapKey(session, &kwp, mine, out, exported, &exported_length) ==
        CKR_KEY_UNEXTRACTABLE);
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ATTRIBUTE make_extractable{CKA_EXTRACTABLE, &yes, sizeof yes};
  CHECK(api->C_SetAttributeValue(session, out, &make_extractable, 1) == CKR_ATTRIBUTE_READ_ONLY);
  CK_ATTRIBUTE make_readable{CKA_SENSITIVE, &no, sizeof no};
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  CHECK(api->C_CopyObject(session, out, &make_readable, 1, &copy) == CKR_ATTRIBUTE_READ_ONLY);
  // A key derived from it would have a readable value: not derivable.
  CK_BYTE data[32] = {};
  CK_KEY_DERIVATION_STRING_DATA derivation{data, sizeof data};
  CK_MECHANISM derive{CKM_AES_ECB_ENCRYPT_DATA, &derivation, sizeof derivation};
  Template derived;
  CK_ULONG length = 32;
  derived.attributes.push_back({CKA_VALUE_LEN, &length, sizeof length});
  derived.Set(CKA_SENSITIVE, false).Set(CKA_EXTRACTABLE, true);
  CK_OBJECT_HANDLE child = CK_INVALID_HANDLE;
  CHECK(api->C_DeriveKey(session, &derive, out, derived.data(), derived.size(), &child) ==
        CKR_KEY_FUNCTION_NOT_PERMITTED);
  // AES-GCM only: no ECB or CBC oracle on the raw key.
  CHECK(api->C_EncryptInit(session, &ecb, out) == CKR_MECHANISM_INVALID);
  CK_BYTE iv[16] = {};
  CK_MECHANISM cbc{CKM_AES_CBC, iv, sizeof iv};
  CHECK(api->C_EncryptInit(session, &cbc, out) == CKR_MECHANISM_INVALID);
  // Using it through the HSM works: that is what the PIN gives, and only custosd audits it.
  CK_GCM_PARAMS params{sealed->iv.data(), 12, 96, nullptr, 0, 128};
  CK_MECHANISM gcm{CKM_AES_GCM, &params, sizeof params};
  REQUIRE(api->C_DecryptInit(session, &gcm, out) == CKR_OK);
  CK_BYTE plain[64];
  CK_ULONG plain_length = sizeof plain;
  CHECK(api->C_Decrypt(session, sealed->ciphertext_and_tag.data(),
                       sealed->ciphertext_and_tag.size(), plain, &plain_length) == CKR_OK);

  // The root itself: its template cannot be replaced, it cannot be copied (with a weaker
  // template or at all), it cannot decrypt, and it wraps only with RFC 5649.
  Template weaker;
  CK_ATTRIBUTE replace{CKA_UNWRAP_TEMPLATE, weaker.data(), weaker.size() * sizeof(CK_ATTRIBUTE)};
  CHECK(api->C_SetAttributeValue(session, root, &replace, 1) != CKR_OK);
  CHECK(api->C_CopyObject(session, root, &replace, 1, &copy) != CKR_OK);
  CHECK(api->C_CopyObject(session, root, &make_readable, 0, &copy) == CKR_ACTION_PROHIBITED);
  CHECK(api->C_DecryptInit(session, &ecb, root) == CKR_KEY_FUNCTION_NOT_PERMITTED);
  CHECK(api->C_UnwrapKey(session, &ecb, root, const_cast<CK_BYTE*>(wrapped.data()), wrapped.size(),
                         leaky.data(), leaky.size(), &out) == CKR_MECHANISM_INVALID);
}

TEST_CASE("With the PIN, the audit HMAC and signing keys cannot leave the HSM", "[insider]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  REQUIRE(hsm->CreateHmacKey("custos-audit-hmac").ok());
  REQUIRE(hsm->CreateSigningKey("custos-audit-signing").ok());
  RawToken raw(token);
  CK_FUNCTION_LIST* api = raw.api();
  CK_SESSION_HANDLE session = raw.session();
  const CK_OBJECT_HANDLE hmac = raw.FindKey("custos-audit-hmac");
  REQUIRE(hmac != CK_INVALID_HANDLE);
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  const std::string label = "custos-audit-signing";
  CK_ATTRIBUTE match[] = {{CKA_CLASS, &private_class, sizeof private_class},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  REQUIRE(api->C_FindObjectsInit(session, match, 2) == CKR_OK);
  CK_OBJECT_HANDLE signing = CK_INVALID_HANDLE;
  CK_ULONG found = 0;
  REQUIRE(api->C_FindObjects(session, &signing, 1, &found) == CKR_OK);
  REQUIRE(api->C_FindObjectsFinal(session) == CKR_OK);
  REQUIRE(found == 1);

  const CK_OBJECT_HANDLE mine = AttackerKey(raw);
  CK_MECHANISM kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_BBOOL no = CK_FALSE;
  CK_ATTRIBUTE make_readable{CKA_SENSITIVE, &no, sizeof no};
  for (CK_OBJECT_HANDLE key : {hmac, signing}) {
    INFO("key " << (key == hmac ? "hmac" : "signing"));
    CHECK(raw.TryReadValue(key) == CKR_ATTRIBUTE_SENSITIVE);
    CK_BYTE exported[256];
    CK_ULONG length = sizeof exported;
    CHECK(api->C_WrapKey(session, &kwp, mine, key, exported, &length) == CKR_KEY_UNEXTRACTABLE);
    CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
    CHECK(api->C_CopyObject(session, key, &make_readable, 1, &copy) == CKR_ACTION_PROHIBITED);
    CHECK(api->C_SetAttributeValue(session, key, &make_readable, 1) == CKR_ACTION_PROHIBITED);
  }
  // The HMAC key computes HMAC-SHA256 and nothing else (no derivation of a readable key).
  CK_BYTE data[32] = {};
  CK_KEY_DERIVATION_STRING_DATA derivation{data, sizeof data};
  CK_MECHANISM derive{CKM_CONCATENATE_DATA_AND_BASE, &derivation, sizeof derivation};
  Template derived;
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
  derived.attributes = {{CKA_CLASS, &secret, sizeof secret},
                        {CKA_KEY_TYPE, &generic, sizeof generic}};
  derived.Set(CKA_SENSITIVE, false).Set(CKA_EXTRACTABLE, true);
  CK_OBJECT_HANDLE child = CK_INVALID_HANDLE;
  CHECK(api->C_DeriveKey(session, &derive, hmac, derived.data(), derived.size(), &child) != CKR_OK);
  CK_MECHANISM sha1_hmac{CKM_SHA_1_HMAC, nullptr, 0};
  CHECK(api->C_SignInit(session, &sha1_hmac, hmac) == CKR_MECHANISM_INVALID);
}

}  // namespace
}  // namespace custos::testing
