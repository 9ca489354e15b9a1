// TestCa: a certificate authority built in memory with OpenSSL's C API, for tests that need
// client certificates and CRLs with exact contents and times (expired, not yet valid, signed
// by the wrong key, revoking given serials). Throws std::runtime_error if OpenSSL fails.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace custos::server::testing {

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};

// A fresh P-256 key.
std::unique_ptr<EVP_PKEY, PkeyFree> NewKey();

// What a leaf certificate holds. Times are seconds since the epoch.
struct LeafSpec {
  std::optional<std::string> cn;
  std::vector<std::string> uri_sans;
  std::string eku = "clientAuth";  // an extendedKeyUsage value; "" for no such extension
  long serial = 1;
  int64_t not_before = 0;
  int64_t not_after = 0;
};

// What a CRL holds.
struct CrlSpec {
  std::vector<long> revoked;  // serials
  int64_t this_update = 0;
  std::optional<int64_t> next_update;  // none: the CRL has no nextUpdate
  bool delta = false;                  // adds a deltaCRLIndicator
};

class TestCa {
 public:
  // A self-signed root named CN=`cn`, or, with `parent`, an intermediate CA it signs with
  // serial `serial`. Valid from `not_before` to `not_after`.
  TestCa(const std::string& cn, int64_t not_before, int64_t not_after,
         const TestCa* parent = nullptr, long serial = 1);

  std::string CertPem() const;
  // A PEM leaf certificate signed by this CA (authorityKeyIdentifier = this CA's key id);
  // its private key (PKCS#8 PEM) in `*key_pem` if given.
  std::string Issue(const LeafSpec& spec, std::string* key_pem = nullptr) const;
  // A PEM CRL signed by this CA.
  std::string Crl(const CrlSpec& spec) const;
  // The same as DER.
  std::string CrlDer(const CrlSpec& spec) const;

 private:
  std::unique_ptr<EVP_PKEY, PkeyFree> key_;
  std::unique_ptr<X509, X509Free> cert_;
};

// Writes `content` to `path` (replacing it) with mode exactly `mode`; throws on failure.
void WriteFile(const std::string& path, const std::string& content, unsigned mode = 0644);

}  // namespace custos::server::testing
