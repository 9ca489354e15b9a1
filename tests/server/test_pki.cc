#include "tests/server/test_pki.h"

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <fstream>
#include <stdexcept>

namespace custos::server::testing {
namespace {

struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* c) const { EVP_PKEY_CTX_free(c); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct CrlFree {
  void operator()(X509_CRL* c) const { X509_CRL_free(c); }
};
struct TimeFree {
  void operator()(ASN1_TIME* t) const { ASN1_TIME_free(t); }
};

void Check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("OpenSSL failed: ") + what);
}

std::unique_ptr<ASN1_TIME, TimeFree> Time(int64_t seconds) {
  std::unique_ptr<ASN1_TIME, TimeFree> t(ASN1_TIME_set(nullptr, static_cast<time_t>(seconds)));
  Check(t != nullptr, "ASN1_TIME_set");
  return t;
}

// Adds extension `nid` = `value` (openssl.cnf syntax) to `cert`, with `issuer` as the CA.
void AddExt(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  Check(ext != nullptr, "X509V3_EXT_conf_nid");
  Check(X509_add_ext(cert, ext, -1) == 1, "X509_add_ext");
  X509_EXTENSION_free(ext);
}

std::string Pem(X509* cert) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
  Check(bio && PEM_write_bio_X509(bio.get(), cert) == 1, "PEM_write_bio_X509");
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(size));
}

void SetName(X509_NAME* name, const std::string& cn) {
  Check(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                   reinterpret_cast<const unsigned char*>("Custos tests"), -1, -1,
                                   0) == 1,
        "add O");
  Check(X509_NAME_add_entry_by_NID(name, NID_commonName, V_ASN1_UTF8STRING,
                                   reinterpret_cast<const unsigned char*>(cn.data()),
                                   static_cast<int>(cn.size()), -1, 0) == 1,
        "add CN");
}

std::unique_ptr<X509_CRL, CrlFree> MakeCrl(X509* ca, EVP_PKEY* key, const CrlSpec& spec) {
  std::unique_ptr<X509_CRL, CrlFree> crl(X509_CRL_new());
  Check(crl != nullptr, "X509_CRL_new");
  Check(X509_CRL_set_version(crl.get(), 1) == 1, "X509_CRL_set_version");
  Check(X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(ca)) == 1, "issuer");
  Check(X509_CRL_set1_lastUpdate(crl.get(), Time(spec.this_update).get()) == 1, "lastUpdate");
  if (spec.next_update) {
    Check(X509_CRL_set1_nextUpdate(crl.get(), Time(*spec.next_update).get()) == 1, "nextUpdate");
  }
  for (long serial : spec.revoked) {
    X509_REVOKED* entry = X509_REVOKED_new();
    ASN1_INTEGER* number = ASN1_INTEGER_new();
    Check(entry && number && ASN1_INTEGER_set(number, serial) == 1, "serial");
    Check(X509_REVOKED_set_serialNumber(entry, number) == 1, "X509_REVOKED_set_serialNumber");
    ASN1_INTEGER_free(number);
    Check(X509_REVOKED_set_revocationDate(entry, Time(spec.this_update).get()) == 1, "date");
    Check(X509_CRL_add0_revoked(crl.get(), entry) == 1, "X509_CRL_add0_revoked");
  }
  if (spec.delta) {
    ASN1_INTEGER* base = ASN1_INTEGER_new();
    Check(base && ASN1_INTEGER_set(base, 1) == 1, "delta base");
    Check(X509_CRL_add1_ext_i2d(crl.get(), NID_delta_crl, base, 1, 0) == 1, "delta");
    ASN1_INTEGER_free(base);
  }
  Check(X509_CRL_sort(crl.get()) == 1, "X509_CRL_sort");
  Check(X509_CRL_sign(crl.get(), key, EVP_sha256()) > 0, "X509_CRL_sign");
  return crl;
}

}  // namespace

std::unique_ptr<EVP_PKEY, PkeyFree> NewKey() {
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_EC, nullptr));
  Check(ctx != nullptr, "EVP_PKEY_CTX_new_id");
  Check(EVP_PKEY_keygen_init(ctx.get()) == 1, "EVP_PKEY_keygen_init");
  Check(EVP_PKEY_CTX_set_ec_paramgen_curve_nid(ctx.get(), NID_X9_62_prime256v1) == 1, "curve");
  EVP_PKEY* raw = nullptr;
  Check(EVP_PKEY_keygen(ctx.get(), &raw) == 1, "EVP_PKEY_keygen");
  return std::unique_ptr<EVP_PKEY, PkeyFree>(raw);
}

TestCa::TestCa(const std::string& cn, int64_t not_before, int64_t not_after, const TestCa* parent,
               long serial)
    : key_(NewKey()), cert_(X509_new()) {
  X509* cert = cert_.get();
  Check(cert != nullptr, "X509_new");
  Check(X509_set_version(cert, 2) == 1, "X509_set_version");
  Check(ASN1_INTEGER_set(X509_get_serialNumber(cert), serial) == 1, "serial");
  Check(X509_set1_notBefore(cert, Time(not_before).get()) == 1, "notBefore");
  Check(X509_set1_notAfter(cert, Time(not_after).get()) == 1, "notAfter");
  SetName(X509_get_subject_name(cert), cn);
  X509* issuer = parent ? parent->cert_.get() : cert;
  Check(X509_set_issuer_name(cert, X509_get_subject_name(issuer)) == 1, "issuer");
  Check(X509_set_pubkey(cert, key_.get()) == 1, "X509_set_pubkey");
  AddExt(cert, issuer, NID_basic_constraints, "critical,CA:TRUE");
  AddExt(cert, issuer, NID_key_usage, "critical,keyCertSign,cRLSign");
  AddExt(cert, issuer, NID_subject_key_identifier, "hash");
  if (parent) AddExt(cert, issuer, NID_authority_key_identifier, "keyid");
  EVP_PKEY* signer = parent ? parent->key_.get() : key_.get();
  Check(X509_sign(cert, signer, EVP_sha256()) > 0, "X509_sign");
}

std::string TestCa::CertPem() const { return Pem(cert_.get()); }

std::string TestCa::Issue(const LeafSpec& spec, std::string* key_pem) const {
  std::unique_ptr<EVP_PKEY, PkeyFree> key = NewKey();
  std::unique_ptr<X509, X509Free> cert(X509_new());
  Check(cert != nullptr, "X509_new");
  Check(X509_set_version(cert.get(), 2) == 1, "X509_set_version");
  Check(ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), spec.serial) == 1, "serial");
  Check(X509_set1_notBefore(cert.get(), Time(spec.not_before).get()) == 1, "notBefore");
  Check(X509_set1_notAfter(cert.get(), Time(spec.not_after).get()) == 1, "notAfter");
  X509_NAME* name = X509_get_subject_name(cert.get());
  if (spec.cn) {
    SetName(name, *spec.cn);
  } else {
    Check(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                     reinterpret_cast<const unsigned char*>("Custos tests"), -1, -1,
                                     0) == 1,
          "add O");
  }
  Check(X509_set_issuer_name(cert.get(), X509_get_subject_name(cert_.get())) == 1, "issuer");
  Check(X509_set_pubkey(cert.get(), key.get()) == 1, "X509_set_pubkey");
  AddExt(cert.get(), cert_.get(), NID_basic_constraints, "critical,CA:FALSE");
  AddExt(cert.get(), cert_.get(), NID_authority_key_identifier, "keyid");
  if (!spec.eku.empty()) AddExt(cert.get(), cert_.get(), NID_ext_key_usage, spec.eku);
  std::string sans;
  for (const std::string& uri : spec.uri_sans) sans += (sans.empty() ? "URI:" : ",URI:") + uri;
  if (!sans.empty()) AddExt(cert.get(), cert_.get(), NID_subject_alt_name, sans);
  Check(X509_sign(cert.get(), key_.get(), EVP_sha256()) > 0, "X509_sign");
  if (key_pem != nullptr) {
    std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
    Check(bio && PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr,
                                          nullptr) == 1,
          "PEM_write_bio_PrivateKey");
    char* data = nullptr;
    const long size = BIO_get_mem_data(bio.get(), &data);
    key_pem->assign(data, static_cast<size_t>(size));
  }
  return Pem(cert.get());
}

std::string TestCa::Crl(const CrlSpec& spec) const {
  std::unique_ptr<X509_CRL, CrlFree> crl = MakeCrl(cert_.get(), key_.get(), spec);
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
  Check(bio && PEM_write_bio_X509_CRL(bio.get(), crl.get()) == 1, "PEM_write_bio_X509_CRL");
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(size));
}

std::string TestCa::CrlDer(const CrlSpec& spec) const {
  std::unique_ptr<X509_CRL, CrlFree> crl = MakeCrl(cert_.get(), key_.get(), spec);
  unsigned char* der = nullptr;
  const int size = i2d_X509_CRL(crl.get(), &der);
  Check(size > 0, "i2d_X509_CRL");
  std::string out(reinterpret_cast<const char*>(der), static_cast<size_t>(size));
  OPENSSL_free(der);
  return out;
}

void WriteFile(const std::string& path, const std::string& content, unsigned mode) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << content;
    if (!out) throw std::runtime_error("cannot write " + path);
  }
  if (chmod(path.c_str(), static_cast<mode_t>(mode)) != 0) {
    throw std::runtime_error("cannot chmod " + path);
  }
}

}  // namespace custos::server::testing
