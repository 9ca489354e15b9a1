// Small OpenSSL helpers shared by peer_identity.cc and revocation.cc: owners for OpenSSL
// objects and the conversions by which a certificate and a CRL are compared (issuer names as
// DER, serials as hex, times as seconds since the epoch). Internal to server/; header-only.
#pragma once

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdint>
#include <ctime>
#include <memory>
#include <optional>
#include <string>

namespace custos::server::x509 {

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct CrlFree {
  void operator()(X509_CRL* c) const { X509_CRL_free(c); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;
using CrlPtr = std::unique_ptr<X509_CRL, CrlFree>;

// A name's DER encoding: equal names (as OpenSSL compares them in a chain) have equal DER.
inline std::string NameDer(const X509_NAME* name) {
  const unsigned char* der = nullptr;
  size_t size = 0;
  if (name == nullptr || X509_NAME_get0_der(const_cast<X509_NAME*>(name), &der, &size) != 1) {
    return "";
  }
  return std::string(reinterpret_cast<const char*>(der), size);
}

// A name as RFC 2253 text, non-ASCII escaped: safe to put in a log line.
inline std::string NameText(const X509_NAME* name) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || name == nullptr || X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253) < 0) {
    return "";
  }
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  return size > 0 ? std::string(data, static_cast<size_t>(size)) : "";
}

// A serial number in upper-case hex without separators, as `openssl x509 -serial` prints it.
inline std::string SerialHex(const ASN1_INTEGER* serial) {
  BIGNUM* bn = serial ? ASN1_INTEGER_to_BN(serial, nullptr) : nullptr;
  if (bn == nullptr) return "";
  char* hex = BN_bn2hex(bn);
  BN_free(bn);
  if (hex == nullptr) return "";
  std::string out(hex);
  OPENSSL_free(hex);
  return out;
}

// An ASN.1 time as seconds since the epoch; nullopt if it does not convert.
inline std::optional<int64_t> EpochSeconds(const ASN1_TIME* time) {
  struct tm tm {};
  if (time == nullptr || ASN1_TIME_to_tm(time, &tm) != 1) return std::nullopt;
  return static_cast<int64_t>(timegm(&tm));
}

// The raw bytes of an octet string (a key identifier); "" for nullptr.
inline std::string OctetBytes(const ASN1_OCTET_STRING* octets) {
  if (octets == nullptr) return "";
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(octets)),
                     static_cast<size_t>(ASN1_STRING_length(octets)));
}

}  // namespace custos::server::x509
