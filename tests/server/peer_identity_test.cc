// PrincipalFromPem and ParsePeerCertificate over self-signed certificates built here with
// OpenSSL's C API, so every combination of subject CNs, subjectAltName entries and extended
// key usage can be tried.
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <catch2/catch.hpp>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "server/peer_identity.h"

namespace custos::server {
namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* c) const { EVP_PKEY_CTX_free(c); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct NamesFree {
  void operator()(GENERAL_NAMES* n) const { GENERAL_NAMES_free(n); }
};

void Check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("OpenSSL failed: ") + what);
}

// One P-256 key signs every test certificate: the key does not matter to PrincipalFromPem.
EVP_PKEY* TestKey() {
  static const std::unique_ptr<EVP_PKEY, PkeyFree> key = [] {
    std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_EC, nullptr));
    Check(ctx != nullptr, "EVP_PKEY_CTX_new_id");
    Check(EVP_PKEY_keygen_init(ctx.get()) == 1, "EVP_PKEY_keygen_init");
    Check(EVP_PKEY_CTX_set_ec_paramgen_curve_nid(ctx.get(), NID_X9_62_prime256v1) == 1,
          "EVP_PKEY_CTX_set_ec_paramgen_curve_nid");
    EVP_PKEY* raw = nullptr;
    Check(EVP_PKEY_keygen(ctx.get(), &raw) == 1, "EVP_PKEY_keygen");
    return std::unique_ptr<EVP_PKEY, PkeyFree>(raw);
  }();
  return key.get();
}

// A subjectAltName entry: GEN_URI or GEN_DNS, with its raw bytes.
using San = std::pair<int, std::string>;

// A PEM self-signed certificate with subject CN `cn` (none if nullopt; a second CN
// `second_cn` if given) and, if `sans` is not empty, one subjectAltName extension holding them
// in order; extendedKeyUsage `eku` (openssl.cnf syntax; none if empty).
std::string MakeCert(const std::optional<std::string>& cn, const std::vector<San>& sans,
                     const std::string& eku = "clientAuth",
                     const std::optional<std::string>& second_cn = std::nullopt) {
  std::unique_ptr<X509, X509Free> cert(X509_new());
  Check(cert != nullptr, "X509_new");
  Check(X509_set_version(cert.get(), 2) == 1, "X509_set_version");
  Check(ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1) == 1, "ASN1_INTEGER_set");
  Check(X509_gmtime_adj(X509_getm_notBefore(cert.get()), 0) != nullptr, "notBefore");
  Check(X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600) != nullptr, "notAfter");
  X509_NAME* name = X509_get_subject_name(cert.get());
  // Every certificate gets an O, so "no CN" still leaves a non-empty subject.
  Check(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                   reinterpret_cast<const unsigned char*>("Custos tests"), -1, -1,
                                   0) == 1,
        "add O");
  if (cn) {
    // A plain UTF8String, not MBSTRING_UTF8: that would refuse the empty CN tested below.
    Check(X509_NAME_add_entry_by_NID(name, NID_commonName, V_ASN1_UTF8STRING,
                                     reinterpret_cast<const unsigned char*>(cn->data()),
                                     static_cast<int>(cn->size()), -1, 0) == 1,
          "add CN");
  }
  if (second_cn) {
    Check(X509_NAME_add_entry_by_NID(name, NID_commonName, V_ASN1_UTF8STRING,
                                     reinterpret_cast<const unsigned char*>(second_cn->data()),
                                     static_cast<int>(second_cn->size()), -1, 0) == 1,
          "add second CN");
  }
  Check(X509_set_issuer_name(cert.get(), name) == 1, "X509_set_issuer_name");
  Check(X509_set_pubkey(cert.get(), TestKey()) == 1, "X509_set_pubkey");
  if (!sans.empty()) {
    std::unique_ptr<GENERAL_NAMES, NamesFree> names(GENERAL_NAMES_new());
    Check(names != nullptr, "GENERAL_NAMES_new");
    for (const auto& [type, value] : sans) {
      ASN1_IA5STRING* ia5 = ASN1_IA5STRING_new();
      Check(ia5 != nullptr, "ASN1_IA5STRING_new");
      Check(ASN1_STRING_set(ia5, value.data(), static_cast<int>(value.size())) == 1,
            "ASN1_STRING_set");
      GENERAL_NAME* general = GENERAL_NAME_new();
      Check(general != nullptr, "GENERAL_NAME_new");
      GENERAL_NAME_set0_value(general, type, ia5);
      Check(sk_GENERAL_NAME_push(names.get(), general) > 0, "sk_GENERAL_NAME_push");
    }
    Check(X509_add1_ext_i2d(cert.get(), NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT) ==
              1,
          "X509_add1_ext_i2d");
  }
  if (!eku.empty()) {
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, NID_ext_key_usage, eku.c_str());
    Check(ext != nullptr, "X509V3_EXT_conf_nid");
    Check(X509_add_ext(cert.get(), ext, -1) == 1, "X509_add_ext");
    X509_EXTENSION_free(ext);
  }
  Check(X509_sign(cert.get(), TestKey(), EVP_sha256()) > 0, "X509_sign");
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
  Check(bio != nullptr, "BIO_new");
  Check(PEM_write_bio_X509(bio.get(), cert.get()) == 1, "PEM_write_bio_X509");
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  Check(size > 0, "BIO_get_mem_data");
  return std::string(data, static_cast<size_t>(size));
}

San Uri(std::string value) { return {GEN_URI, std::move(value)}; }
San Dns(std::string value) { return {GEN_DNS, std::move(value)}; }

constexpr char kBilling[] = "spiffe://custos.local/app/billing";

void RequireInvalid(const absl::StatusOr<std::string>& principal, const std::string& message) {
  INFO(principal.status().ToString());
  REQUIRE_FALSE(principal.ok());
  CHECK(principal.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(principal.status().message() == message);
}

TEST_CASE("A URI SAN alone names the principal", "[peer_identity]") {
  const absl::StatusOr<std::string> principal = PrincipalFromPem(MakeCert({}, {Uri(kBilling)}));
  INFO(principal.status().ToString());
  REQUIRE(principal.ok());
  CHECK(*principal == kBilling);
}

TEST_CASE("Without a SAN the common name is the principal", "[peer_identity]") {
  const absl::StatusOr<std::string> principal = PrincipalFromPem(MakeCert("billing-app", {}));
  INFO(principal.status().ToString());
  REQUIRE(principal.ok());
  CHECK(*principal == "billing-app");
}

TEST_CASE("A URI SAN wins over the common name", "[peer_identity]") {
  absl::StatusOr<std::string> principal =
      PrincipalFromPem(MakeCert("billing-app", {Uri(kBilling)}));
  INFO(principal.status().ToString());
  REQUIRE(principal.ok());
  CHECK(*principal == kBilling);

  // Also when the CN itself looks like a URI: the URI SAN is what names the principal.
  principal = PrincipalFromPem(MakeCert("spiffe://custos.local/officer/eve", {Uri(kBilling)}));
  REQUIRE(principal.ok());
  CHECK(*principal == kBilling);
}

TEST_CASE("A URI SAN wins over DNS SANs beside it", "[peer_identity]") {
  const absl::StatusOr<std::string> principal = PrincipalFromPem(
      MakeCert("billing-app", {Dns("billing.example"), Uri(kBilling), Dns("other.example")}));
  INFO(principal.status().ToString());
  REQUIRE(principal.ok());
  CHECK(*principal == kBilling);
}

TEST_CASE("Two URI SANs are refused", "[peer_identity]") {
  RequireInvalid(
      PrincipalFromPem(MakeCert("billing-app", {Uri(kBilling), Uri("spiffe://custos.local/x")})),
      "client certificate names several URI SANs; Custos needs exactly one");
}

TEST_CASE("DNS SANs are not principals: the common name is", "[peer_identity]") {
  const absl::StatusOr<std::string> principal =
      PrincipalFromPem(MakeCert("billing-app", {Dns("billing.example")}));
  INFO(principal.status().ToString());
  REQUIRE(principal.ok());
  CHECK(*principal == "billing-app");
}

TEST_CASE("A URI-like common name without a URI SAN is refused", "[peer_identity]") {
  const std::string message = "client certificate has a URI-like common name but no URI SAN";
  RequireInvalid(PrincipalFromPem(MakeCert("spiffe://x/officer/y", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("spiffe://x/officer/y", {Dns("x.example")})), message);
}

TEST_CASE("A certificate naming neither a URI SAN nor a CN is refused", "[peer_identity]") {
  const std::string message = "client certificate names no URI SAN and no common name";
  RequireInvalid(PrincipalFromPem(MakeCert(std::nullopt, {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert(std::nullopt, {Dns("x.example")})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("", {})), message);
}

TEST_CASE("A principal outside printable ASCII is refused", "[peer_identity]") {
  const std::string message =
      "client certificate identity has a character outside printable ASCII (a space, a control "
      "or a non-ASCII character)";
  RequireInvalid(PrincipalFromPem(MakeCert("billing\napp", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("billing\rapp", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("billing\tapp", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("billing\x1b[31mapp", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("billing\x7f", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert(std::string("billing\0app", 11), {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("spiffe://custos.local/app/a\nb")})), message);
  // Spaces: "billing app" and "billing  app" would look alike in a log.
  RequireInvalid(PrincipalFromPem(MakeCert("billing app", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert(" billing", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("spiffe://custos.local/app/a b")})), message);
  // Non-ASCII: an accented letter, a Cyrillic look-alike of "o" in "officer1", a right-to-left
  // override (U+202E) and a zero-width space (U+200B).
  RequireInvalid(PrincipalFromPem(MakeCert("caf\xc3\xa9", {})), message);
  RequireInvalid(PrincipalFromPem(MakeCert("\xd0\xbe"
                                           "fficer1",
                                           {})),
                 message);
  RequireInvalid(PrincipalFromPem(MakeCert("app\xe2\x80\xae"
                                           "1reciffo",
                                           {})),
                 message);
  RequireInvalid(PrincipalFromPem(MakeCert("officer\xe2\x80\x8b"
                                           "1",
                                           {})),
                 message);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("spiffe://custos.local/officer/\xd0\xbe"
                                                    "fficer1")})),
                 message);
}

// The cached refusal: ParsePeerCertificate's message and the certificate's fingerprint.
std::string Refusal(const std::string& message, const std::string& pem) {
  return message + " (certificate sha256 " + CertificateSha256(pem) + ")";
}

TEST_CASE("The principal cache answers as ParsePeerCertificate does, within its capacity",
          "[peer_identity]") {
  PrincipalCache cache(3);
  const std::string billing = MakeCert({}, {Uri(kBilling)});
  const std::string refused = MakeCert("spiffe://x/officer/y", {});
  for (int round = 0; round < 2; ++round) {  // parsed, then cached
    const PrincipalCache::Entry entry = cache.Get(billing);
    REQUIRE(entry.ok());
    CHECK((*entry)->principal == kBilling);
    CHECK((*entry)->sha256 == CertificateSha256(billing));
    CHECK(cache.Get(refused).status().message() ==
          Refusal("client certificate has a URI-like common name but no URI SAN", refused));
    CHECK(cache.Get("not a certificate").status().message() ==
          "client certificate does not parse (certificate sha256 )");
    CHECK(cache.size() == 3);
  }
  // The same answer object while cached: nothing is parsed again.
  CHECK(cache.Get(billing).value().get() == cache.Get(billing).value().get());
  // Full: it starts over rather than growing.
  CHECK(cache.Get(MakeCert("billing-app", {})).value()->principal == "billing-app");
  CHECK(cache.size() == 1);
  CHECK(cache.Get(billing).value()->principal == kBilling);
}

TEST_CASE("URI and CN principals live in separate namespaces", "[peer_identity]") {
  // A URI SAN must be a URI: a bare name would pass for the CN principal of that name.
  const std::string no_scheme =
      "client certificate URI SAN has no scheme (such as spiffe:// or urn:)";
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("officer1")})), no_scheme);
  RequireInvalid(PrincipalFromPem(MakeCert("officer1", {Uri("officer1")})), no_scheme);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("//custos.local/officer/1")})), no_scheme);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("1spiffe://custos.local/x")})), no_scheme);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("spi_ffe://custos.local/x")})), no_scheme);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("spiffe:")})), no_scheme);
  RequireInvalid(PrincipalFromPem(MakeCert({}, {Uri("")})), no_scheme);
  // Any RFC 3986 scheme makes a URI principal, "://" or not.
  for (const char* uri : {"urn:custos:officer1", "spiffe://custos.local/officer/officer1",
                          "x-custom+v1.2:officer1"}) {
    INFO(uri);
    CHECK(PrincipalFromPem(MakeCert("officer1", {Uri(uri)})).value() == uri);
  }
  // A CN never holds ':', so it can never carry a URI principal's name.
  RequireInvalid(PrincipalFromPem(MakeCert("urn:x", {})),
                 "client certificate has a URI-like common name but no URI SAN");
  RequireInvalid(PrincipalFromPem(MakeCert("spiffe:custos.local", {})),
                 "client certificate has a URI-like common name but no URI SAN");
  RequireInvalid(PrincipalFromPem(MakeCert("officer1:", {})),
                 "client certificate has a URI-like common name but no URI SAN");
  const std::string colon =
      "client certificate common name has ':', which only URI principals (URI SANs) hold";
  RequireInvalid(PrincipalFromPem(MakeCert("1:officer", {})), colon);
  RequireInvalid(PrincipalFromPem(MakeCert("_officer:1", {})), colon);
  RequireInvalid(PrincipalFromPem(MakeCert(":officer1", {})), colon);
  // Printable ASCII without ':' is a CN principal.
  CHECK(PrincipalFromPem(MakeCert("billing-app_2.example/x@y", {})).value() ==
        "billing-app_2.example/x@y");
}

TEST_CASE("A certificate with two common names and no URI SAN is refused", "[peer_identity]") {
  RequireInvalid(PrincipalFromPem(MakeCert("app", {}, "clientAuth", "officer1")),
                 "client certificate names several common names; Custos needs exactly one");
  // With a URI SAN, the CNs do not matter.
  CHECK(PrincipalFromPem(MakeCert("app", {Uri(kBilling)}, "clientAuth", "officer1")).value() ==
        kBilling);
}

TEST_CASE("A client certificate needs the clientAuth extended key usage", "[peer_identity]") {
  RequireInvalid(PrincipalFromPem(MakeCert("billing-app", {Uri(kBilling)}, "")),
                 "client certificate has no extended key usage; Custos needs clientAuth "
                 "(extendedKeyUsage = clientAuth)");
  for (const char* eku : {"serverAuth", "emailProtection,codeSigning", "anyExtendedKeyUsage"}) {
    INFO(eku);
    RequireInvalid(PrincipalFromPem(MakeCert("billing-app", {Uri(kBilling)}, eku)),
                   "client certificate's extended key usage lacks clientAuth");
  }
  for (const char* eku : {"clientAuth", "serverAuth,clientAuth", "critical,clientAuth"}) {
    INFO(eku);
    CHECK(PrincipalFromPem(MakeCert("billing-app", {Uri(kBilling)}, eku)).value() == kBilling);
  }
}

TEST_CASE("ParsePeerCertificate keeps what the per-call checks need", "[peer_identity]") {
  const std::string pem = MakeCert("billing-app", {});
  const absl::StatusOr<PeerCertificate> cert = ParsePeerCertificate(pem);
  INFO(cert.status().ToString());
  REQUIRE(cert.ok());
  CHECK(cert->principal == "billing-app");
  CHECK(cert->serial == "01");
  CHECK_FALSE(cert->issuer_der.empty());
  CHECK(cert->not_after - cert->not_before == 3600);
  CHECK(cert->sha256 == CertificateSha256(pem));
  CHECK(cert->sha256.size() == 64);
}

TEST_CASE("A PEM that is not a certificate does not parse", "[peer_identity]") {
  const std::string message = "client certificate does not parse";
  RequireInvalid(PrincipalFromPem(""), message);
  RequireInvalid(PrincipalFromPem("not a certificate"), message);
  RequireInvalid(PrincipalFromPem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                 message);
  // A good certificate cut short.
  const std::string pem = MakeCert("billing-app", {});
  RequireInvalid(PrincipalFromPem(pem.substr(0, pem.size() / 2)), message);
}

}  // namespace
}  // namespace custos::server
