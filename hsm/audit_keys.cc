#include "hsm/audit_keys.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string_view>

#include "hsm/ck_error.h"
#include "hsm/p11_object.h"

namespace custos::hsm {
namespace {

// FAILED_PRECONDITION for a key the token does not have at all, marked so (kNoKeyPayload) that
// a key seen before and gone now can be told from one that is there but refused.
constexpr char kNoKeyPayload[] = "type.custos.dev/hsm.no_key";

absl::Status NoKey(const std::string& message) {
  absl::Status status = absl::FailedPreconditionError(message);
  status.SetPayload(kNoKeyPayload, absl::Cord("1"));
  return status;
}

bool IsNoKey(const absl::Status& status) {
  return absl::IsFailedPrecondition(status) && status.GetPayload(kNoKeyPayload).has_value();
}

// DER of the OID 1.2.840.10045.3.1.7 (prime256v1, secp256r1, NIST P-256): the CKA_EC_PARAMS
// of every signing key.
constexpr std::array<uint8_t, 10> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                                 0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr size_t kP256FieldBytes = 32;
constexpr size_t kP256PointBytes = 1 + 2 * kP256FieldBytes;  // 0x04 || X || Y
constexpr size_t kKeyIdBytes = 16;

template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const { Free(p); }
};
void FreeOsslParams(OSSL_PARAM* p) { OSSL_PARAM_free(p); }
void FreeBio(BIO* p) { BIO_free(p); }
using BnPtr = std::unique_ptr<BIGNUM, Deleter<BIGNUM, BN_free>>;
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, Deleter<ECDSA_SIG, ECDSA_SIG_free>>;
using ParamBldPtr = std::unique_ptr<OSSL_PARAM_BLD, Deleter<OSSL_PARAM_BLD, OSSL_PARAM_BLD_free>>;
using ParamsPtr = std::unique_ptr<OSSL_PARAM, Deleter<OSSL_PARAM, FreeOsslParams>>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX, EVP_PKEY_CTX_free>>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO, FreeBio>>;
using OctetStringPtr =
    std::unique_ptr<ASN1_OCTET_STRING, Deleter<ASN1_OCTET_STRING, ASN1_OCTET_STRING_free>>;

// PKCS#11 takes input buffers as non-const pointers but does not write them. An empty span
// may have a null data(), which some modules reject, so it points at a dummy byte instead.
CK_BYTE_PTR In(std::span<const uint8_t> bytes) {
  static const CK_BYTE kEmpty = 0;
  return const_cast<CK_BYTE_PTR>(bytes.empty() ? &kEmpty : bytes.data());
}

std::string_view AsChars(std::span<const uint8_t> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

absl::Status CheckLabel(const std::string& label, const char* what) {
  if (label.empty()) {
    return absl::InvalidArgumentError(std::string(what) + " label must not be empty");
  }
  return absl::OkStatus();
}

// A variable-length attribute (CKA_EC_PARAMS, CKA_EC_POINT, CKA_ID).
absl::StatusOr<Bytes> GetBytes(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                               CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attribute{type, nullptr, 0};
  CK_RV rv = module.api()->C_GetAttributeValue(session, object, &attribute, 1);
  if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
  if (attribute.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return absl::InternalError("PKCS#11 attribute is unavailable");
  }
  Bytes value(attribute.ulValueLen);
  attribute.pValue = value.data();
  rv = module.api()->C_GetAttributeValue(session, object, &attribute, 1);
  if (rv != CKR_OK) return CkError("C_GetAttributeValue", rv);
  value.resize(attribute.ulValueLen);
  return value;
}

bool IsP256(const Bytes& params) {
  return std::equal(params.begin(), params.end(), kP256Params.begin(), kP256Params.end());
}

std::string Quoted(const std::string& label) { return "'" + label + "'"; }

// The uncompressed point in a CKA_EC_POINT: PKCS#11 says a DER OCTET STRING wrapping it, but
// some modules give the bare point.
absl::StatusOr<Bytes> DecodeEcPoint(const Bytes& attribute, const std::string& label) {
  const unsigned char* next = attribute.data();
  OctetStringPtr wrapped(d2i_ASN1_OCTET_STRING(nullptr, &next, attribute.size()));
  Bytes point;
  if (wrapped && next == attribute.data() + attribute.size()) {
    const unsigned char* data = ASN1_STRING_get0_data(wrapped.get());
    point.assign(data, data + ASN1_STRING_length(wrapped.get()));
  } else {
    point = attribute;
  }
  if (point.size() != kP256PointBytes || point[0] != 0x04) {
    return absl::FailedPreconditionError("public key " + Quoted(label) +
                                         " has no uncompressed P-256 point in CKA_EC_POINT");
  }
  return point;
}

// The raw r || s an HSM returns for CKM_ECDSA, as a DER ECDSA-Sig-Value.
absl::StatusOr<Bytes> EcdsaSigToDer(std::span<const uint8_t> raw) {
  const size_t half = raw.size() / 2;
  BnPtr r(BN_bin2bn(raw.data(), static_cast<int>(half), nullptr));
  BnPtr s(BN_bin2bn(raw.data() + half, static_cast<int>(half), nullptr));
  EcdsaSigPtr sig(ECDSA_SIG_new());
  if (!r || !s || !sig || ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) {
    return absl::InternalError("OpenSSL could not build an ECDSA signature");
  }
  (void)r.release();  // Owned by `sig` now.
  (void)s.release();
  const int length = i2d_ECDSA_SIG(sig.get(), nullptr);
  if (length <= 0) return absl::InternalError("OpenSSL could not encode an ECDSA signature");
  Bytes der(static_cast<size_t>(length));
  unsigned char* out = der.data();
  if (i2d_ECDSA_SIG(sig.get(), &out) != length) {
    return absl::InternalError("OpenSSL could not encode an ECDSA signature");
  }
  return der;
}

absl::StatusOr<std::array<uint8_t, SHA256_DIGEST_LENGTH>> Sha256(std::span<const uint8_t> message) {
  std::array<uint8_t, SHA256_DIGEST_LENGTH> digest{};
  unsigned int length = 0;
  if (EVP_Digest(message.data(), message.size(), digest.data(), &length, EVP_sha256(), nullptr) !=
          1 ||
      length != digest.size()) {
    return absl::InternalError("OpenSSL could not compute SHA-256");
  }
  return digest;
}

// An OpenSSL EC public key on P-256 from an uncompressed point (checked to be on the curve).
absl::StatusOr<PkeyPtr> P256PublicKey(const Bytes& point, const std::string& label) {
  ParamBldPtr builder(OSSL_PARAM_BLD_new());
  if (!builder ||
      OSSL_PARAM_BLD_push_utf8_string(builder.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) !=
          1 ||
      OSSL_PARAM_BLD_push_octet_string(builder.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                       point.size()) != 1) {
    return absl::InternalError("OpenSSL could not build EC key parameters");
  }
  ParamsPtr params(OSSL_PARAM_BLD_to_param(builder.get()));
  PkeyCtxPtr context(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  if (!params || !context || EVP_PKEY_fromdata_init(context.get()) != 1) {
    return absl::InternalError("OpenSSL could not set up an EC key");
  }
  EVP_PKEY* raw = nullptr;
  if (EVP_PKEY_fromdata(context.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    return absl::FailedPreconditionError("public key " + Quoted(label) +
                                         " is not a valid P-256 point");
  }
  return PkeyPtr(raw);
}

bool VerifyDigest(EVP_PKEY* key, std::span<const uint8_t> digest, std::span<const uint8_t> der) {
  PkeyCtxPtr context(EVP_PKEY_CTX_new(key, nullptr));
  return context && EVP_PKEY_verify_init(context.get()) == 1 &&
         EVP_PKEY_verify(context.get(), der.data(), der.size(), digest.data(), digest.size()) == 1;
}

absl::StatusOr<std::string> ToPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), key) != 1) {
    return absl::InternalError("OpenSSL could not write a public key as PEM");
  }
  char* data = nullptr;
  const long length = BIO_get_mem_data(bio.get(), &data);
  if (length <= 0 || data == nullptr) {
    return absl::InternalError("OpenSSL could not write a public key as PEM");
  }
  return std::string(data, static_cast<size_t>(length));
}

// Signs `digest` (32 bytes) with CKM_ECDSA under `key`, a verified P-256 private key.
absl::StatusOr<Bytes> SignDigest(const Pkcs11Module& module, CK_SESSION_HANDLE session,
                                 CK_OBJECT_HANDLE key, std::span<const uint8_t> digest) {
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  CK_RV rv = module.api()->C_SignInit(session, &ecdsa, key);
  if (rv != CKR_OK) return CkError("C_SignInit", rv);
  // Exactly r || s for P-256: a buffer too small would leave the operation active.
  Bytes raw(2 * kP256FieldBytes);
  CK_ULONG length = raw.size();
  rv = module.api()->C_Sign(session, In(digest), digest.size(), raw.data(), &length);
  if (rv != CKR_OK) return CkError("C_Sign", rv);
  if (length != raw.size()) return absl::InternalError("C_Sign: unexpected ECDSA output length");
  return EcdsaSigToDer(raw);
}

}  // namespace

absl::Status AuditKeys::CreateHmacKey(CK_SESSION_HANDLE session, const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label, "an HMAC key"));
  std::lock_guard admin(admin_mu_);  // Two creators must not both find nothing and generate.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                          Find(session, CKO_SECRET_KEY, label));
  if (!found.empty()) {
    return absl::AlreadyExistsError("the HSM token already has a secret key labelled " +
                                    Quoted(label));
  }
  uint64_t before;
  {
    std::lock_guard lock(mu_);
    before = generation_;
  }
  AttributeTemplate key;
  key.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
      .Ulong(CKA_VALUE_LEN, kHmacKeyBytes)
      .String(CKA_LABEL, label)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)  // Usable only after login.
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_SIGN, true)
      .Bool(CKA_VERIFY, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false)  // Nobody can later widen its use.
      .Bool(CKA_COPYABLE, false)
      .Mechanisms(CKA_ALLOWED_MECHANISMS, {CKM_SHA256_HMAC});
  CK_MECHANISM generate{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  CK_RV rv =
      pool_->module()->api()->C_GenerateKey(session, &generate, key.data(), key.size(), &handle);
  if (rv != CKR_OK) return CkError("C_GenerateKey", rv);
  std::lock_guard lock(mu_);
  if (generation_ == before) handles_[{Kind::kHmac, label}] = handle;
  return absl::OkStatus();
}

absl::StatusOr<Bytes> AuditKeys::HmacSha256(CK_SESSION_HANDLE session, const std::string& label,
                                            std::span<const uint8_t> data) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label, "an HMAC key"));
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE key, Get(session, Kind::kHmac, label));
  CK_FUNCTION_LIST* api = pool_->module()->api();
  CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};
  CK_RV rv = api->C_SignInit(session, &hmac, key);
  if (rv != CKR_OK) return CkError("C_SignInit", rv);
  Bytes mac(kHmacSha256Bytes);  // Exactly: a buffer too small would leave the operation active.
  CK_ULONG length = mac.size();
  rv = api->C_Sign(session, In(data), data.size(), mac.data(), &length);
  if (rv != CKR_OK) return CkError("C_Sign", rv);
  if (length != mac.size()) return absl::InternalError("C_Sign: unexpected HMAC output length");
  return mac;
}

absl::Status AuditKeys::CreateSigningKey(CK_SESSION_HANDLE session, const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label, "a signing key"));
  std::lock_guard admin(admin_mu_);
  for (CK_OBJECT_CLASS object_class : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                            Find(session, object_class, label));
    if (!found.empty()) {
      return absl::AlreadyExistsError("the HSM token already has a key pair labelled " +
                                      Quoted(label));
    }
  }
  uint64_t before;
  {
    std::lock_guard lock(mu_);
    before = generation_;
  }
  CK_FUNCTION_LIST* api = pool_->module()->api();
  // A random CKA_ID ties the two halves together (the label alone could be reused).
  Bytes id(kKeyIdBytes);
  CK_RV rv = api->C_GenerateRandom(session, id.data(), id.size());
  if (rv != CKR_OK) return CkError("C_GenerateRandom", rv);

  AttributeTemplate public_key;
  public_key.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .String(CKA_EC_PARAMS, AsChars(kP256Params))
      .String(CKA_LABEL, label)
      .String(CKA_ID, AsChars(id))
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)  // Anyone may read a public key.
      .Bool(CKA_VERIFY, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false);
  AttributeTemplate private_key;
  private_key.Ulong(CKA_CLASS, CKO_PRIVATE_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .String(CKA_LABEL, label)
      .String(CKA_ID, AsChars(id))
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_SIGN, true)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_COPYABLE, false)
      .Mechanisms(CKA_ALLOWED_MECHANISMS, {CKM_ECDSA});
  CK_MECHANISM generate{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE public_handle = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_handle = CK_INVALID_HANDLE;
  rv = api->C_GenerateKeyPair(session, &generate, public_key.data(), public_key.size(),
                              private_key.data(), private_key.size(), &public_handle,
                              &private_handle);
  if (rv != CKR_OK) return CkError("C_GenerateKeyPair", rv);
  std::lock_guard lock(mu_);
  if (generation_ == before) handles_[{Kind::kSigning, label}] = private_handle;
  return absl::OkStatus();
}

absl::StatusOr<Bytes> AuditKeys::SignSha256(CK_SESSION_HANDLE session, const std::string& label,
                                            std::span<const uint8_t> message) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label, "a signing key"));
  CUSTOS_ASSIGN_OR_RETURN(auto digest, Sha256(message));
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE key, Get(session, Kind::kSigning, label));
  return SignDigest(*pool_->module(), session, key, digest);
}

absl::StatusOr<std::string> AuditKeys::PublicKeyPem(CK_SESSION_HANDLE session,
                                                    const std::string& label) {
  CUSTOS_RETURN_IF_ERROR(CheckLabel(label, "a signing key"));
  const Pkcs11Module& module = *pool_->module();
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE private_key,
                          Found(Kind::kSigning, label, FindPrivateKey(session, label)));
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE public_key, FindPublicKey(session, label, private_key));
  CUSTOS_ASSIGN_OR_RETURN(Bytes encoded, GetBytes(module, session, public_key, CKA_EC_POINT));
  CUSTOS_ASSIGN_OR_RETURN(Bytes point, DecodeEcPoint(encoded, label));
  CUSTOS_ASSIGN_OR_RETURN(PkeyPtr key, P256PublicKey(point, label));
  // Auditors will trust this key with the whole log: prove it verifies what the private key
  // signs before handing it out.
  static constexpr char kProbe[] = "custos: public key export self-check";
  CUSTOS_ASSIGN_OR_RETURN(auto digest,
                          Sha256({reinterpret_cast<const uint8_t*>(kProbe), sizeof kProbe - 1}));
  CUSTOS_ASSIGN_OR_RETURN(Bytes signature, SignDigest(module, session, private_key, digest));
  if (!VerifyDigest(key.get(), digest, signature)) {
    return absl::FailedPreconditionError("the public key labelled " + Quoted(label) +
                                         " does not verify what signing key " + Quoted(label) +
                                         " signs; refusing to export it");
  }
  return ToPem(key.get());
}

void AuditKeys::ForgetFound() {
  std::lock_guard lock(mu_);
  found_.clear();
}

void AuditKeys::Reset() {
  std::lock_guard lock(mu_);
  handles_.clear();
  ++generation_;
}

absl::StatusOr<CK_OBJECT_HANDLE> AuditKeys::Get(CK_SESSION_HANDLE session, Kind kind,
                                                const std::string& label) {
  uint64_t before;
  {
    std::lock_guard lock(mu_);
    if (auto it = handles_.find({kind, label}); it != handles_.end()) return it->second;
    before = generation_;
  }
  absl::StatusOr<CK_OBJECT_HANDLE> found =
      Found(kind, label,
            kind == Kind::kHmac ? FindHmacKey(session, label) : FindPrivateKey(session, label));
  if (found.ok()) {
    std::lock_guard lock(mu_);  // Not if a Reset() came meanwhile: the handle may be stale.
    if (generation_ == before) handles_[{kind, label}] = *found;
  }
  return found;
}

absl::StatusOr<CK_OBJECT_HANDLE> AuditKeys::Found(Kind kind, const std::string& label,
                                                  absl::StatusOr<CK_OBJECT_HANDLE> found) {
  std::lock_guard lock(mu_);
  if (found.ok()) {
    found_.insert({kind, label});
  } else if (IsNoKey(found.status()) && found_.contains({kind, label})) {
    // Audit keys are never destroyed: one that was there and is gone went with its token.
    return TokenLostError("audit key " + Quoted(label) +
                          " was on the HSM token and is not any more: taken for a token that "
                          "was removed or lost its store");
  }
  return found;
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> AuditKeys::Find(CK_SESSION_HANDLE session,
                                                              CK_OBJECT_CLASS object_class,
                                                              const std::string& label) {
  // Private objects are invisible without a login: a lost login must not look like "no key".
  CUSTOS_RETURN_IF_ERROR(pool_->EnsureLoggedIn(session));
  AttributeTemplate match;
  match.Ulong(CKA_CLASS, object_class).Bool(CKA_TOKEN, true).String(CKA_LABEL, label);
  return FindObjects(*pool_->module(), session, match, /*max_count=*/2);
}

absl::StatusOr<CK_OBJECT_HANDLE> AuditKeys::FindHmacKey(CK_SESSION_HANDLE session,
                                                        const std::string& label) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                          Find(session, CKO_SECRET_KEY, label));
  if (found.empty()) {
    return NoKey("the HSM token has no HMAC key labelled " + Quoted(label));
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError("the HSM token has several secret keys labelled " +
                                         Quoted(label) + "; expected exactly one HMAC key");
  }
  const Pkcs11Module& module = *pool_->module();
  const CK_OBJECT_HANDLE key = found.front();
  CUSTOS_ASSIGN_OR_RETURN(CK_ULONG type, GetUlong(module, session, key, CKA_KEY_TYPE));
  CUSTOS_ASSIGN_OR_RETURN(CK_ULONG length, GetUlong(module, session, key, CKA_VALUE_LEN));
  CUSTOS_ASSIGN_OR_RETURN(bool is_private, GetBool(module, session, key, CKA_PRIVATE));
  CUSTOS_ASSIGN_OR_RETURN(bool sensitive, GetBool(module, session, key, CKA_SENSITIVE));
  CUSTOS_ASSIGN_OR_RETURN(bool extractable, GetBool(module, session, key, CKA_EXTRACTABLE));
  CUSTOS_ASSIGN_OR_RETURN(bool sign, GetBool(module, session, key, CKA_SIGN));
  if (type != CKK_GENERIC_SECRET || length != kHmacKeyBytes || !is_private || !sensitive ||
      extractable || !sign) {
    return absl::FailedPreconditionError(
        "HMAC key " + Quoted(label) +
        " is not a private, sensitive, non-extractable 32-byte generic secret signing key; "
        "refusing to use it");
  }
  CUSTOS_RETURN_IF_ERROR(CheckGeneratedInside(module, session, key, "HMAC key " + Quoted(label)));
  return key;
}

absl::StatusOr<CK_OBJECT_HANDLE> AuditKeys::FindPrivateKey(CK_SESSION_HANDLE session,
                                                           const std::string& label) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                          Find(session, CKO_PRIVATE_KEY, label));
  if (found.empty()) {
    return NoKey("the HSM token has no signing key labelled " + Quoted(label));
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError("the HSM token has several private keys labelled " +
                                         Quoted(label) + "; expected exactly one signing key");
  }
  const Pkcs11Module& module = *pool_->module();
  const CK_OBJECT_HANDLE key = found.front();
  CUSTOS_ASSIGN_OR_RETURN(CK_ULONG type, GetUlong(module, session, key, CKA_KEY_TYPE));
  CUSTOS_ASSIGN_OR_RETURN(bool is_private, GetBool(module, session, key, CKA_PRIVATE));
  CUSTOS_ASSIGN_OR_RETURN(bool sensitive, GetBool(module, session, key, CKA_SENSITIVE));
  CUSTOS_ASSIGN_OR_RETURN(bool extractable, GetBool(module, session, key, CKA_EXTRACTABLE));
  CUSTOS_ASSIGN_OR_RETURN(bool sign, GetBool(module, session, key, CKA_SIGN));
  bool p256 = false;
  if (type == CKK_EC) {
    CUSTOS_ASSIGN_OR_RETURN(Bytes params, GetBytes(module, session, key, CKA_EC_PARAMS));
    p256 = IsP256(params);
  }
  if (!p256 || !is_private || !sensitive || extractable || !sign) {
    return absl::FailedPreconditionError(
        "signing key " + Quoted(label) +
        " is not a private, sensitive, non-extractable ECDSA P-256 signing key; refusing to use "
        "it");
  }
  CUSTOS_RETURN_IF_ERROR(
      CheckGeneratedInside(module, session, key, "signing key " + Quoted(label)));
  return key;
}

absl::StatusOr<CK_OBJECT_HANDLE> AuditKeys::FindPublicKey(CK_SESSION_HANDLE session,
                                                          const std::string& label,
                                                          CK_OBJECT_HANDLE private_key) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                          Find(session, CKO_PUBLIC_KEY, label));
  if (found.empty()) {
    return absl::FailedPreconditionError("the HSM token has no public key labelled " +
                                         Quoted(label));
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError("the HSM token has several public keys labelled " +
                                         Quoted(label));
  }
  const Pkcs11Module& module = *pool_->module();
  const CK_OBJECT_HANDLE key = found.front();
  CUSTOS_ASSIGN_OR_RETURN(CK_ULONG type, GetUlong(module, session, key, CKA_KEY_TYPE));
  bool p256 = false;
  if (type == CKK_EC) {
    CUSTOS_ASSIGN_OR_RETURN(Bytes params, GetBytes(module, session, key, CKA_EC_PARAMS));
    p256 = IsP256(params);
  }
  if (!p256) {
    return absl::FailedPreconditionError("public key " + Quoted(label) +
                                         " is not an ECDSA P-256 key; refusing to export it");
  }
  CUSTOS_ASSIGN_OR_RETURN(Bytes public_id, GetBytes(module, session, key, CKA_ID));
  CUSTOS_ASSIGN_OR_RETURN(Bytes private_id, GetBytes(module, session, private_key, CKA_ID));
  if (public_id != private_id) {
    return absl::FailedPreconditionError("the public key labelled " + Quoted(label) +
                                         " is not the pair of signing key " + Quoted(label) +
                                         " (their CKA_IDs differ)");
  }
  return key;
}

}  // namespace custos::hsm
