// The audit log's keys: an HMAC key for encryption contexts and an ECDSA P-256 key pair for
// checkpoints, both held in a real SoftHSM2 token; the public key checked with OpenSSL, both
// in-process and with the `openssl` command an auditor would run.
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "hsm/faulty_hsm.h"
#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"
#include "tests/support/temp_dir.h"

namespace custos::testing {
namespace {

constexpr char kHmac[] = "audit-hmac";
constexpr char kSigning[] = "audit-signing";
const std::vector<uint8_t> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                          0xce, 0x3d, 0x03, 0x01, 0x07};

// Token objects of every class this application can see (it is logged in as the user).
size_t CountTokenObjects(RawToken& raw) {
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE match[] = {{CKA_TOKEN, &yes, sizeof yes}};
  REQUIRE(raw.api()->C_FindObjectsInit(raw.session(), match, 1) == CKR_OK);
  std::vector<CK_OBJECT_HANDLE> found(10000);
  CK_ULONG count = 0;
  REQUIRE(raw.api()->C_FindObjects(raw.session(), found.data(), found.size(), &count) == CKR_OK);
  REQUIRE(raw.api()->C_FindObjectsFinal(raw.session()) == CKR_OK);
  return count;
}

// The one object of `object_class` labelled `label`, or CK_INVALID_HANDLE.
CK_OBJECT_HANDLE FindObject(RawToken& raw, CK_OBJECT_CLASS object_class, const std::string& label) {
  CK_ATTRIBUTE match[] = {{CKA_CLASS, &object_class, sizeof object_class},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  REQUIRE(raw.api()->C_FindObjectsInit(raw.session(), match, 2) == CKR_OK);
  CK_OBJECT_HANDLE found[2];
  CK_ULONG count = 0;
  REQUIRE(raw.api()->C_FindObjects(raw.session(), found, 2, &count) == CKR_OK);
  REQUIRE(raw.api()->C_FindObjectsFinal(raw.session()) == CKR_OK);
  REQUIRE(count <= 1);
  return count == 1 ? found[0] : CK_INVALID_HANDLE;
}

std::vector<uint8_t> ReadBytes(RawToken& raw, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attribute{type, nullptr, 0};
  REQUIRE(raw.api()->C_GetAttributeValue(raw.session(), object, &attribute, 1) == CKR_OK);
  std::vector<uint8_t> value(attribute.ulValueLen);
  attribute.pValue = value.data();
  REQUIRE(raw.api()->C_GetAttributeValue(raw.session(), object, &attribute, 1) == CKR_OK);
  return value;
}

void CheckBools(RawToken& raw, CK_OBJECT_HANDLE object,
                const std::vector<std::pair<CK_ATTRIBUTE_TYPE, bool>>& expected) {
  for (const auto& [type, value] : expected) {
    bool actual = !value;
    INFO("attribute 0x" << std::hex << type);
    CHECK(raw.ReadBool(object, type, &actual) == CKR_OK);
    CHECK(actual == value);
  }
}

// A generic secret token key made outside the Hsm, with the attributes asked for.
void CreateRawSecret(RawToken& raw, const std::string& label, bool sensitive, bool extractable,
                     CK_ULONG length = 32) {
  CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
  CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL sens = sensitive ? CK_TRUE : CK_FALSE;
  CK_BBOOL extract = extractable ? CK_TRUE : CK_FALSE;
  CK_ATTRIBUTE key[] = {{CKA_CLASS, &secret, sizeof secret},
                        {CKA_KEY_TYPE, &generic, sizeof generic},
                        {CKA_VALUE_LEN, &length, sizeof length},
                        {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
                        {CKA_TOKEN, &yes, sizeof yes},
                        {CKA_PRIVATE, &yes, sizeof yes},
                        {CKA_SENSITIVE, &sens, sizeof sens},
                        {CKA_EXTRACTABLE, &extract, sizeof extract},
                        {CKA_SIGN, &yes, sizeof yes}};
  CK_MECHANISM generate{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  REQUIRE(raw.api()->C_GenerateKey(raw.session(), &generate, key, std::size(key), &handle) ==
          CKR_OK);
}

// An EC key pair made outside the Hsm: each half labelled and identified as asked, kept on
// the token or not, with the private half extractable or not.
struct RawPair {
  std::string public_label;
  std::string public_id = "id";
  bool public_on_token = true;
  std::string private_label;
  std::string private_id = "id";
  bool private_on_token = true;
  bool extractable = false;
};

void CreateRawPair(RawToken& raw, const RawPair& pair) {
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL pub_token = pair.public_on_token ? CK_TRUE : CK_FALSE;
  CK_BBOOL priv_token = pair.private_on_token ? CK_TRUE : CK_FALSE;
  CK_BBOOL extract = pair.extractable ? CK_TRUE : CK_FALSE;
  std::vector<uint8_t> params = kP256Params;
  CK_ATTRIBUTE public_key[] = {
      {CKA_EC_PARAMS, params.data(), params.size()},
      {CKA_LABEL, const_cast<char*>(pair.public_label.data()), pair.public_label.size()},
      {CKA_ID, const_cast<char*>(pair.public_id.data()), pair.public_id.size()},
      {CKA_TOKEN, &pub_token, sizeof pub_token},
      {CKA_VERIFY, &yes, sizeof yes}};
  CK_ATTRIBUTE private_key[] = {
      {CKA_LABEL, const_cast<char*>(pair.private_label.data()), pair.private_label.size()},
      {CKA_ID, const_cast<char*>(pair.private_id.data()), pair.private_id.size()},
      {CKA_TOKEN, &priv_token, sizeof priv_token},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &extract, sizeof extract},
      {CKA_SIGN, &yes, sizeof yes}};
  CK_MECHANISM generate{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE priv = CK_INVALID_HANDLE;
  REQUIRE(raw.api()->C_GenerateKeyPair(raw.session(), &generate, public_key, std::size(public_key),
                                       private_key, std::size(private_key), &pub, &priv) == CKR_OK);
}

struct PkeyFree {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;

PkeyPtr ParsePem(const std::string& pem) {
  std::unique_ptr<BIO, int (*)(BIO*)> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())),
                                          BIO_free);
  REQUIRE(bio != nullptr);
  PkeyPtr key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  REQUIRE(key != nullptr);
  return key;
}

// OpenSSL's own verdict on `signature` (DER) over SHA-256(`message`). No Catch2 assertions
// here: worker threads call it.
bool Verifies(EVP_PKEY* key, std::span<const uint8_t> message, std::span<const uint8_t> signature) {
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> context(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  return context != nullptr &&
         EVP_DigestVerifyInit(context.get(), nullptr, EVP_sha256(), nullptr, key) == 1 &&
         EVP_DigestVerify(context.get(), signature.data(), signature.size(), message.data(),
                          message.size()) == 1;
}

void WriteFile(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

// The exit status of `openssl dgst -sha256 -verify` run as an auditor would.
int OpensslVerify(const TempDir& dir, const std::string& message_file) {
  const std::string command = "openssl dgst -sha256 -verify '" + dir.File("pub.pem") +
                              "' -signature '" + dir.File("sig.der") + "' '" + message_file +
                              "' >/dev/null 2>&1";
  const int status = std::system(command.c_str());
  REQUIRE(status != -1);
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

TEST_CASE("an HMAC key is created once, inside the HSM, and cannot leave it") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  const size_t before = CountTokenObjects(raw);

  auto missing = hsm->HmacSha256(kHmac, AsBytes("x"));
  CHECK(absl::IsFailedPrecondition(missing.status()));
  CHECK(missing.status().message() == "the HSM token has no HMAC key labelled 'audit-hmac'");

  REQUIRE(hsm->CreateHmacKey(kHmac).ok());
  CHECK(CountTokenObjects(raw) == before + 1);
  absl::Status again = hsm->CreateHmacKey(kHmac);
  CHECK(absl::IsAlreadyExists(again));
  CHECK(again.message() == "the HSM token already has a secret key labelled 'audit-hmac'");
  CHECK(absl::IsAlreadyExists(hsm->CreateHmacKey(kRoot)));  // Secret key labels are shared.
  CHECK(CountTokenObjects(raw) == before + 1);

  CK_OBJECT_HANDLE key = raw.FindKey(kHmac);
  REQUIRE(key != CK_INVALID_HANDLE);
  CheckBools(raw, key,
             {{CKA_TOKEN, true},
              {CKA_PRIVATE, true},
              {CKA_SENSITIVE, true},
              {CKA_EXTRACTABLE, false},
              {CKA_SIGN, true},
              {CKA_VERIFY, true},
              {CKA_ENCRYPT, false},
              {CKA_DECRYPT, false},
              {CKA_WRAP, false},
              {CKA_UNWRAP, false},
              {CKA_DERIVE, false},
              {CKA_MODIFIABLE, false},
              {CKA_ALWAYS_SENSITIVE, true},
              {CKA_NEVER_EXTRACTABLE, true},
              {CKA_LOCAL, true}});
  CHECK(raw.TryReadValue(key) == CKR_ATTRIBUTE_SENSITIVE);
}

TEST_CASE("HmacSha256 is a deterministic 32-byte MAC under the HSM's key") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  REQUIRE(hsm->CreateHmacKey(kHmac).ok());
  REQUIRE(hsm->CreateHmacKey("other-hmac").ok());

  auto a = hsm->HmacSha256(kHmac, AsBytes("tenant=a,app=b"));
  auto a_again = hsm->HmacSha256(kHmac, AsBytes("tenant=a,app=b"));
  auto b = hsm->HmacSha256(kHmac, AsBytes("tenant=a,app=c"));
  auto empty = hsm->HmacSha256(kHmac, {});
  auto other_key = hsm->HmacSha256("other-hmac", AsBytes("tenant=a,app=b"));
  REQUIRE((a.ok() && a_again.ok() && b.ok() && empty.ok() && other_key.ok()));
  CHECK(a->size() == hsm::kHmacSha256Bytes);
  CHECK(empty->size() == hsm::kHmacSha256Bytes);
  CHECK(*a == *a_again);
  CHECK(*a != *b);
  CHECK(*a != *empty);
  CHECK(*a != *other_key);
  auto large = hsm->HmacSha256(kHmac, std::vector<uint8_t>(100000, 0x5a));
  REQUIRE(large.ok());
  CHECK(large->size() == hsm::kHmacSha256Bytes);

  // The token itself agrees that it is the HMAC-SHA256 of the data under that key.
  RawToken raw(token);
  CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};
  REQUIRE(raw.api()->C_VerifyInit(raw.session(), &hmac, raw.FindKey(kHmac)) == CKR_OK);
  std::string data = "tenant=a,app=b";
  CHECK(raw.api()->C_Verify(raw.session(), reinterpret_cast<CK_BYTE_PTR>(data.data()), data.size(),
                            a->data(), a->size()) == CKR_OK);

  // A restarted server gets the same MACs: the key lives on the token.
  hsm.reset();
  auto reopened = OpenHsm(token);
  auto after = reopened->HmacSha256(kHmac, AsBytes("tenant=a,app=b"));
  REQUIRE(after.ok());
  CHECK(*after == *a);
}

TEST_CASE("a signing key pair is created once; its private half cannot leave the HSM") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  const size_t before = CountTokenObjects(raw);

  for (const absl::Status& missing :
       {hsm->SignSha256(kSigning, AsBytes("x")).status(), hsm->PublicKeyPem(kSigning).status()}) {
    CHECK(absl::IsFailedPrecondition(missing));
    CHECK(missing.message() == "the HSM token has no signing key labelled 'audit-signing'");
  }

  REQUIRE(hsm->CreateSigningKey(kSigning).ok());
  CHECK(CountTokenObjects(raw) == before + 2);
  absl::Status again = hsm->CreateSigningKey(kSigning);
  CHECK(absl::IsAlreadyExists(again));
  CHECK(again.message() == "the HSM token already has a key pair labelled 'audit-signing'");
  CHECK(CountTokenObjects(raw) == before + 2);

  CK_OBJECT_HANDLE private_key = FindObject(raw, CKO_PRIVATE_KEY, kSigning);
  CK_OBJECT_HANDLE public_key = FindObject(raw, CKO_PUBLIC_KEY, kSigning);
  REQUIRE(private_key != CK_INVALID_HANDLE);
  REQUIRE(public_key != CK_INVALID_HANDLE);
  CheckBools(raw, private_key,
             {{CKA_TOKEN, true},
              {CKA_PRIVATE, true},
              {CKA_SENSITIVE, true},
              {CKA_EXTRACTABLE, false},
              {CKA_SIGN, true},
              {CKA_DECRYPT, false},
              {CKA_UNWRAP, false},
              {CKA_DERIVE, false},
              {CKA_MODIFIABLE, false},
              {CKA_ALWAYS_SENSITIVE, true},
              {CKA_NEVER_EXTRACTABLE, true},
              {CKA_LOCAL, true}});
  CheckBools(raw, public_key, {{CKA_TOKEN, true}, {CKA_VERIFY, true}, {CKA_ENCRYPT, false}});
  CHECK(raw.TryReadValue(private_key) == CKR_ATTRIBUTE_SENSITIVE);
  CHECK(ReadBytes(raw, private_key, CKA_EC_PARAMS) == kP256Params);
  CHECK(ReadBytes(raw, public_key, CKA_EC_PARAMS) == kP256Params);
  const std::vector<uint8_t> id = ReadBytes(raw, private_key, CKA_ID);
  CHECK(id.size() == 16);
  CHECK(ReadBytes(raw, public_key, CKA_ID) == id);
}

TEST_CASE("checkpoint signatures verify with the exported PEM, in OpenSSL and in `openssl`") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  REQUIRE(hsm->CreateSigningKey(kSigning).ok());
  auto pem = hsm->PublicKeyPem(kSigning);
  INFO(pem.status().ToString());
  REQUIRE(pem.ok());
  CHECK(pem->starts_with("-----BEGIN PUBLIC KEY-----\n"));
  CHECK(pem->ends_with("-----END PUBLIC KEY-----\n"));
  PkeyPtr key = ParsePem(*pem);
  CHECK(EVP_PKEY_is_a(key.get(), "EC"));
  char group[64] = {};
  REQUIRE(EVP_PKEY_get_group_name(key.get(), group, sizeof group, nullptr) == 1);
  CHECK(std::string(group) == "prime256v1");

  const std::string message = "checkpoint seq=1000 hash=00112233445566778899aabbccddeeff";
  auto signature = hsm->SignSha256(kSigning, AsBytes(message));
  REQUIRE(signature.ok());
  CHECK(signature->size() >= 8);
  CHECK(signature->size() <= 72);  // DER of two integers of at most 33 bytes.
  CHECK((*signature)[0] == 0x30);  // SEQUENCE
  CHECK(Verifies(key.get(), AsBytes(message), *signature));

  for (size_t at : {size_t{0}, message.size() / 2, message.size() - 1}) {
    std::string tampered = message;
    tampered[at] ^= 0x01;
    CHECK_FALSE(Verifies(key.get(), AsBytes(tampered), *signature));
  }
  Bytes bad_signature = *signature;
  bad_signature[bad_signature.size() - 1] ^= 0x01;
  CHECK_FALSE(Verifies(key.get(), AsBytes(message), bad_signature));

  // ECDSA draws a fresh nonce each time; both signatures verify.
  auto second = hsm->SignSha256(kSigning, AsBytes(message));
  REQUIRE(second.ok());
  CHECK(*second != *signature);
  CHECK(Verifies(key.get(), AsBytes(message), *second));
  auto empty = hsm->SignSha256(kSigning, {});
  REQUIRE(empty.ok());
  CHECK(Verifies(key.get(), {}, *empty));
  const std::vector<uint8_t> large(1 << 20, 0xa5);
  auto large_signature = hsm->SignSha256(kSigning, large);
  REQUIRE(large_signature.ok());
  CHECK(Verifies(key.get(), large, *large_signature));

  // What an auditor does, with no project code: plain `openssl dgst`.
  TempDir dir;
  WriteFile(dir.File("pub.pem"), AsBytes(*pem));
  WriteFile(dir.File("sig.der"), *signature);
  WriteFile(dir.File("msg"), AsBytes(message));
  std::string tampered = message;
  tampered.back() ^= 0x01;
  WriteFile(dir.File("tampered"), AsBytes(tampered));
  CHECK(OpensslVerify(dir, dir.File("msg")) == 0);
  CHECK(OpensslVerify(dir, dir.File("tampered")) != 0);

  // The key survives a restart: same public key, old signatures still verify.
  hsm.reset();
  auto reopened = OpenHsm(token);
  auto pem_again = reopened->PublicKeyPem(kSigning);
  REQUIRE(pem_again.ok());
  CHECK(*pem_again == *pem);
  auto after = reopened->SignSha256(kSigning, AsBytes(message));
  REQUIRE(after.ok());
  CHECK(Verifies(key.get(), AsBytes(message), *after));
}

TEST_CASE("audit keys that are missing, misused or could leak are refused") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);

  SECTION("empty labels") {
    CHECK(absl::IsInvalidArgument(hsm->CreateHmacKey("")));
    CHECK(absl::IsInvalidArgument(hsm->HmacSha256("", AsBytes("x")).status()));
    CHECK(absl::IsInvalidArgument(hsm->CreateSigningKey("")));
    CHECK(absl::IsInvalidArgument(hsm->SignSha256("", AsBytes("x")).status()));
    CHECK(absl::IsInvalidArgument(hsm->PublicKeyPem("").status()));
  }
  SECTION("keys of the wrong kind") {
    REQUIRE(hsm->CreateHmacKey(kHmac).ok());
    REQUIRE(hsm->CreateSigningKey(kSigning).ok());
    auto root_as_hmac = hsm->HmacSha256(kRoot, AsBytes("x"));
    CHECK(absl::IsFailedPrecondition(root_as_hmac.status()));
    CHECK(root_as_hmac.status().message() ==
          "HMAC key 'custos-root' is not a private, sensitive, non-extractable 32-byte generic "
          "secret signing key; refusing to use it");
    CHECK(hsm->HmacSha256(kSigning, AsBytes("x")).status().message() ==
          "the HSM token has no HMAC key labelled 'audit-signing'");
    CHECK(hsm->SignSha256(kHmac, AsBytes("x")).status().message() ==
          "the HSM token has no signing key labelled 'audit-hmac'");
    // Nothing of the real keys was harmed.
    CHECK(hsm->HmacSha256(kHmac, AsBytes("x")).ok());
    CHECK(hsm->SignSha256(kSigning, AsBytes("x")).ok());
    CHECK(hsm->CheckRootKey(kRoot).ok());
  }
  SECTION("an extractable or non-sensitive HMAC key") {
    CreateRawSecret(raw, "extractable", /*sensitive=*/true, /*extractable=*/true);
    CreateRawSecret(raw, "readable", /*sensitive=*/false, /*extractable=*/false);
    CreateRawSecret(raw, "short", /*sensitive=*/true, /*extractable=*/false, /*length=*/16);
    for (const std::string label : {"extractable", "readable", "short"}) {
      auto refused = hsm->HmacSha256(label, AsBytes("x"));
      CHECK(absl::IsFailedPrecondition(refused.status()));
      CHECK(refused.status().message() ==
            "HMAC key '" + label +
                "' is not a private, sensitive, non-extractable 32-byte generic secret signing "
                "key; refusing to use it");
    }
  }
  SECTION("an HMAC key imported with a known value") {
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    std::vector<CK_BYTE> value(32, 0x42);
    const std::string label = "imported";
    CK_ATTRIBUTE key[] = {{CKA_CLASS, &secret, sizeof secret},
                          {CKA_KEY_TYPE, &generic, sizeof generic},
                          {CKA_VALUE, value.data(), value.size()},
                          {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
                          {CKA_TOKEN, &yes, sizeof yes},
                          {CKA_PRIVATE, &yes, sizeof yes},
                          {CKA_SENSITIVE, &yes, sizeof yes},
                          {CKA_EXTRACTABLE, &no, sizeof no},
                          {CKA_SIGN, &yes, sizeof yes}};
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    REQUIRE(raw.api()->C_CreateObject(raw.session(), key, std::size(key), &handle) == CKR_OK);
    auto refused = hsm->HmacSha256(label, AsBytes("x"));
    CHECK(absl::IsFailedPrecondition(refused.status()));
    CHECK(refused.status().message() ==
          "HMAC key 'imported' was not generated inside the HSM and kept there (CKA_LOCAL=false, "
          "CKA_ALWAYS_SENSITIVE=false, CKA_NEVER_EXTRACTABLE=false): its value was known outside "
          "the token; refusing to use it (custosd init generates it on the token)");
  }
  SECTION("several HMAC keys under one label") {
    CreateRawSecret(raw, kHmac, true, false);
    CreateRawSecret(raw, kHmac, true, false);
    CHECK(hsm->HmacSha256(kHmac, AsBytes("x")).status().message() ==
          "the HSM token has several secret keys labelled 'audit-hmac'; expected exactly one HMAC "
          "key");
  }
  SECTION("an extractable private signing key") {
    CreateRawPair(raw, {.public_label = "loose", .private_label = "loose", .extractable = true});
    for (const absl::Status& refused :
         {hsm->SignSha256("loose", AsBytes("x")).status(), hsm->PublicKeyPem("loose").status()}) {
      CHECK(absl::IsFailedPrecondition(refused));
      CHECK(refused.message() ==
            "signing key 'loose' is not a private, sensitive, non-extractable ECDSA P-256 "
            "signing key; refusing to use it");
    }
  }
  SECTION("a private signing key without its public key") {
    CreateRawPair(raw, {.public_label = "half", .public_on_token = false, .private_label = "half"});
    CHECK(hsm->SignSha256("half", AsBytes("x")).ok());
    auto pem = hsm->PublicKeyPem("half");
    CHECK(absl::IsFailedPrecondition(pem.status()));
    CHECK(pem.status().message() == "the HSM token has no public key labelled 'half'");
    CHECK(absl::IsAlreadyExists(hsm->CreateSigningKey("half")));
  }
  SECTION("a public key whose CKA_ID differs from the private key's") {
    CreateRawPair(
        raw,
        {.public_label = "ids", .public_id = "one", .private_label = "ids", .private_id = "two"});
    auto pem = hsm->PublicKeyPem("ids");
    CHECK(absl::IsFailedPrecondition(pem.status()));
    CHECK(pem.status().message() ==
          "the public key labelled 'ids' is not the pair of signing key 'ids' (their CKA_IDs "
          "differ)");
  }
  SECTION("a public key from another pair, relabelled to match") {
    CreateRawPair(raw,
                  {.public_label = "mixed", .public_on_token = false, .private_label = "mixed"});
    CreateRawPair(raw,
                  {.public_label = "mixed", .private_label = "mixed", .private_on_token = false});
    CHECK(hsm->SignSha256("mixed", AsBytes("x")).ok());
    auto pem = hsm->PublicKeyPem("mixed");
    CHECK(absl::IsFailedPrecondition(pem.status()));
    CHECK(pem.status().message() ==
          "the public key labelled 'mixed' does not verify what signing key 'mixed' signs; "
          "refusing to export it");
  }
}

TEST_CASE("audit key calls recover from lost sessions and a lost login") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  REQUIRE(hsm->CreateHmacKey(kHmac).ok());
  REQUIRE(hsm->CreateSigningKey(kSigning).ok());
  const Bytes mac = hsm->HmacSha256(kHmac, AsBytes("ctx")).value();
  PkeyPtr key = ParsePem(hsm->PublicKeyPem(kSigning).value());
  RawToken raw(token);

  for (int round = 0; round < 3; ++round) {
    raw.CloseAllSessions();  // Cached handles and sessions are stale, as after reinsertion.
    auto again = hsm->HmacSha256(kHmac, AsBytes("ctx"));
    INFO(again.status().ToString());
    REQUIRE(again.ok());
    CHECK(*again == mac);
    raw.CloseAllSessions();
    auto signature = hsm->SignSha256(kSigning, AsBytes("checkpoint"));
    REQUIRE(signature.ok());
    CHECK(Verifies(key.get(), AsBytes("checkpoint"), *signature));
    raw.CloseAllSessions();
    CHECK(hsm->PublicKeyPem(kSigning).ok());
  }
  raw.Logout();  // The Hsm's last call logged the application in again.
  CHECK(hsm->HmacSha256(kHmac, AsBytes("ctx")).value() == mac);
  raw.Logout();
  CHECK(hsm->SignSha256(kSigning, AsBytes("checkpoint")).ok());
  raw.Logout();
  CHECK(absl::IsAlreadyExists(hsm->CreateSigningKey(kSigning)));  // Not "missing" when logged out.
  raw.Logout();
  CHECK(absl::IsAlreadyExists(hsm->CreateHmacKey(kHmac)));
}

TEST_CASE("4 threads x 50 HMACs and signatures share a pool of 2 sessions") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token, /*pool_size=*/2);
  REQUIRE(hsm->CreateHmacKey(kHmac).ok());
  REQUIRE(hsm->CreateSigningKey(kSigning).ok());
  const Bytes mac = hsm->HmacSha256(kHmac, AsBytes("ctx")).value();
  PkeyPtr key = ParsePem(hsm->PublicKeyPem(kSigning).value());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        auto again = hsm->HmacSha256(kHmac, AsBytes("ctx"));
        if (!again.ok() || *again != mac) ++failures;
        const std::string message =
            "thread " + std::to_string(t) + " checkpoint " + std::to_string(i);
        auto signature = hsm->SignSha256(kSigning, AsBytes(message));
        if (!signature.ok() || !Verifies(key.get(), AsBytes(message), *signature)) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
}

TEST_CASE("FaultyHsm forwards and fails the audit key calls") {
  SoftHsmToken token;
  std::unique_ptr<hsm::Hsm> real = OpenHsm(token);
  hsm::FaultyHsm faulty(real.get());

  faulty.FailNext(2, absl::AbortedError("injected"));
  CHECK(absl::IsAborted(faulty.CreateHmacKey(kHmac)));
  CHECK(absl::IsAborted(faulty.CreateSigningKey(kSigning)));
  // The failed calls never reached the HSM.
  CHECK(absl::IsFailedPrecondition(real->HmacSha256(kHmac, AsBytes("x")).status()));
  CHECK(absl::IsFailedPrecondition(real->PublicKeyPem(kSigning).status()));

  REQUIRE(faulty.CreateHmacKey(kHmac).ok());
  REQUIRE(faulty.CreateSigningKey(kSigning).ok());
  auto mac = faulty.HmacSha256(kHmac, AsBytes("ctx"));
  auto signature = faulty.SignSha256(kSigning, AsBytes("msg"));
  auto pem = faulty.PublicKeyPem(kSigning);
  REQUIRE((mac.ok() && signature.ok() && pem.ok()));
  CHECK(*mac == real->HmacSha256(kHmac, AsBytes("ctx")).value());
  CHECK(Verifies(ParsePem(*pem).get(), AsBytes("msg"), *signature));
  CHECK(absl::IsAlreadyExists(faulty.CreateHmacKey(kHmac)));  // The HSM's own errors pass.

  faulty.FailNext(3, absl::DeadlineExceededError("slow"));
  CHECK(absl::IsDeadlineExceeded(faulty.HmacSha256(kHmac, AsBytes("ctx")).status()));
  CHECK(absl::IsDeadlineExceeded(faulty.SignSha256(kSigning, AsBytes("msg")).status()));
  CHECK(absl::IsDeadlineExceeded(faulty.PublicKeyPem(kSigning).status()));

  faulty.SetDown(true);
  CHECK(absl::IsUnavailable(faulty.CreateHmacKey("another")));
  CHECK(absl::IsUnavailable(faulty.HmacSha256(kHmac, AsBytes("ctx")).status()));
  CHECK(absl::IsUnavailable(faulty.CreateSigningKey("another")));
  CHECK(absl::IsUnavailable(faulty.SignSha256(kSigning, AsBytes("msg")).status()));
  CHECK(absl::IsUnavailable(faulty.PublicKeyPem(kSigning).status()));
  faulty.SetDown(false);
  CHECK(faulty.HmacSha256(kHmac, AsBytes("ctx")).ok());
  CHECK(faulty.calls() == 17);
}

}  // namespace
}  // namespace custos::testing
