#include "server/peer_identity.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <memory>
#include <vector>

#include "audit/record.h"
#include "common/strings.h"

namespace custos::server {
namespace {

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct NamesFree {
  void operator()(GENERAL_NAMES* n) const { GENERAL_NAMES_free(n); }
};

std::vector<std::string> UriSans(X509* cert) {
  std::vector<std::string> uris;
  std::unique_ptr<GENERAL_NAMES, NamesFree> names(
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr)));
  if (!names) return uris;
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
    if (name->type != GEN_URI) continue;
    const ASN1_IA5STRING* uri = name->d.uniformResourceIdentifier;
    uris.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(uri)),
                      static_cast<size_t>(ASN1_STRING_length(uri)));
  }
  return uris;
}

// Principals appear in logs and the audit record: no control characters, no NUL.
bool Printable(std::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

std::string CommonName(X509* cert) {
  X509_NAME* subject = X509_get_subject_name(cert);
  const int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (index < 0) return "";
  const ASN1_STRING* cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index));
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(cn)),
                     static_cast<size_t>(ASN1_STRING_length(cn)));
}

}  // namespace

absl::StatusOr<std::string> PrincipalFromPem(std::string_view pem) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::unique_ptr<X509, X509Free> cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)
                                           : nullptr);
  if (!cert) return absl::InvalidArgumentError("client certificate does not parse");
  const std::vector<std::string> uris = UriSans(cert.get());
  if (uris.size() > 1) {
    return absl::InvalidArgumentError(
        "client certificate names several URI SANs; Custos needs exactly one");
  }
  std::string principal;
  if (uris.size() == 1) {
    principal = uris.front();
  } else {
    principal = CommonName(cert.get());
    // A CN must not pass for a URI principal such as spiffe://.../officer/x.
    if (principal.find("://") != std::string::npos) {
      return absl::InvalidArgumentError(
          "client certificate has a URI-like common name but no URI SAN");
    }
  }
  if (principal.empty()) {
    return absl::InvalidArgumentError("client certificate names no URI SAN and no common name");
  }
  if (!Printable(principal)) {
    return absl::InvalidArgumentError("client certificate identity has control characters");
  }
  return principal;
}

std::string CertificateSha256(std::string_view pem) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::unique_ptr<X509, X509Free> cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)
                                           : nullptr);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (!cert || X509_digest(cert.get(), EVP_sha256(), digest, &size) != 1) return "";
  return audit::ToHex(std::span<const uint8_t>(digest, size));
}

absl::StatusOr<std::string> PrincipalCache::Get(std::string_view pem) {
  {
    std::shared_lock lock(mu_);
    if (auto it = principals_.find(pem); it != principals_.end()) return it->second;
  }
  absl::StatusOr<std::string> principal = PrincipalFromPem(pem);
  std::unique_lock lock(mu_);
  if (principals_.size() >= capacity_) principals_.clear();
  principals_.emplace(std::string(pem), principal);
  return principal;
}

size_t PrincipalCache::size() const {
  std::shared_lock lock(mu_);
  return principals_.size();
}

absl::StatusOr<core::Caller> CallerOf(const grpc::ServerContext& context) {
  // Far more than the clients of one server; a flood of distinct certificates (each one
  // signed by the trusted CA) only makes the cache start over.
  static PrincipalCache cache(4096);
  core::Caller caller;
  caller.peer = context.peer();
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  const std::vector<grpc::string_ref> pems =
      auth ? auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME)
           : std::vector<grpc::string_ref>{};
  if (pems.empty()) {
    return absl::UnauthenticatedError("a client certificate signed by the Custos CA is required");
  }
  const std::string_view pem(pems.front().data(), pems.front().size());
  absl::StatusOr<std::string> principal = cache.Get(pem);
  if (!principal.ok()) {
    return absl::UnauthenticatedError(
        StrCat(principal.status().message(), " (certificate sha256 ", CertificateSha256(pem), ")"));
  }
  caller.principal = *std::move(principal);
  return caller;
}

}  // namespace custos::server
