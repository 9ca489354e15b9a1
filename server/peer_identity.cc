#include "server/peer_identity.h"

#include <openssl/asn1.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "audit/record.h"
#include "common/strings.h"
#include "server/x509_util.h"

namespace custos::server {
namespace {

using x509::BioPtr;
using x509::X509Ptr;

struct NamesFree {
  void operator()(GENERAL_NAMES* n) const { GENERAL_NAMES_free(n); }
};

X509Ptr ParsePem(std::string_view pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509Ptr cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  ERR_clear_error();
  return cert;
}

std::string Sha256(X509* cert) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (X509_digest(cert, EVP_sha256(), digest, &size) != 1) return "";
  return audit::ToHex(std::span<const uint8_t>(digest, size));
}

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

// The subject's common names, as UTF-8 (whatever string type the certificate used, so a
// BMPString "officer1" is "officer1"); nullopt if one does not decode.
std::optional<std::vector<std::string>> CommonNames(X509* cert) {
  std::vector<std::string> names;
  const X509_NAME* subject = X509_get_subject_name(cert);
  for (int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1); i >= 0;
       i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) {
    const ASN1_STRING* cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));
    unsigned char* utf8 = nullptr;
    const int size = ASN1_STRING_to_UTF8(&utf8, cn);
    if (size < 0) return std::nullopt;
    names.emplace_back(reinterpret_cast<const char*>(utf8), static_cast<size_t>(size));
    OPENSSL_free(utf8);
  }
  return names;
}

// Principals appear in logs and the audit record and are matched byte for byte against the
// policy: printable ASCII only, no space.
bool PrintableAscii(std::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// True if `s` starts with an RFC 3986 scheme and ':' (scheme = ALPHA *( ALPHA / DIGIT / "+" /
// "-" / "." )).
bool HasScheme(std::string_view s) {
  const size_t colon = s.find(':');
  if (colon == std::string_view::npos || colon == 0 || !IsAlpha(s[0])) return false;
  for (char c : s.substr(0, colon)) {
    if (!IsAlpha(c) && !(c >= '0' && c <= '9') && c != '+' && c != '-' && c != '.') return false;
  }
  return true;
}

absl::Status Invalid(const char* message) { return absl::InvalidArgumentError(message); }

// The principal, by the rules in the header.
absl::StatusOr<std::string> Principal(X509* cert) {
  const std::vector<std::string> uris = UriSans(cert);
  if (uris.size() > 1) {
    return Invalid("client certificate names several URI SANs; Custos needs exactly one");
  }
  if (uris.size() == 1) {
    const std::string& uri = uris.front();
    if (!PrintableAscii(uri)) {
      return Invalid(
          "client certificate identity has a character outside printable ASCII (a space, a "
          "control or a non-ASCII character)");
    }
    // A URI SAN "officer1" would otherwise pass for the CN principal officer1.
    if (!HasScheme(uri) || uri.size() == uri.find(':') + 1) {
      return Invalid("client certificate URI SAN has no scheme (such as spiffe:// or urn:)");
    }
    return uri;
  }
  const std::optional<std::vector<std::string>> cns = CommonNames(cert);
  if (!cns) return Invalid("client certificate common name does not decode");
  if (cns->size() > 1) {
    return Invalid("client certificate names several common names; Custos needs exactly one");
  }
  if (cns->empty() || cns->front().empty()) {
    return Invalid("client certificate names no URI SAN and no common name");
  }
  const std::string& cn = cns->front();
  if (!PrintableAscii(cn)) {
    return Invalid(
        "client certificate identity has a character outside printable ASCII (a space, a "
        "control or a non-ASCII character)");
  }
  // ':' marks URI principals: a CN must never pass for one (spiffe://.../officer/x, urn:x).
  if (HasScheme(cn)) {
    return Invalid("client certificate has a URI-like common name but no URI SAN");
  }
  if (cn.find(':') != std::string::npos) {
    return Invalid(
        "client certificate common name has ':', which only URI principals (URI SANs) hold");
  }
  return cn;
}

}  // namespace

absl::StatusOr<PeerCertificate> ParsePeerCertificate(std::string_view pem) {
  const X509Ptr cert = ParsePem(pem);
  if (!cert) return Invalid("client certificate does not parse");
  const uint32_t flags = X509_get_extension_flags(cert.get());
  if ((flags & EXFLAG_INVALID) != 0) {
    return Invalid("client certificate has malformed or duplicate extensions");
  }
  if ((flags & EXFLAG_XKUSAGE) == 0) {
    return Invalid(
        "client certificate has no extended key usage; Custos needs clientAuth "
        "(extendedKeyUsage = clientAuth)");
  }
  if ((X509_get_extended_key_usage(cert.get()) & XKU_SSL_CLIENT) == 0) {
    return Invalid("client certificate's extended key usage lacks clientAuth");
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string principal, Principal(cert.get()));
  PeerCertificate out;
  out.principal = std::move(principal);
  out.serial = x509::SerialHex(X509_get0_serialNumber(cert.get()));
  out.issuer_der = x509::NameDer(X509_get_issuer_name(cert.get()));
  out.authority_key_id = x509::OctetBytes(X509_get0_authority_key_id(cert.get()));
  const std::optional<int64_t> not_before = x509::EpochSeconds(X509_get0_notBefore(cert.get()));
  const std::optional<int64_t> not_after = x509::EpochSeconds(X509_get0_notAfter(cert.get()));
  if (!not_before || !not_after || out.serial.empty() || out.issuer_der.empty()) {
    return Invalid("client certificate serial, issuer or validity period does not parse");
  }
  out.not_before = *not_before;
  out.not_after = *not_after;
  out.sha256 = Sha256(cert.get());
  return out;
}

absl::StatusOr<std::string> PrincipalFromPem(std::string_view pem) {
  CUSTOS_ASSIGN_OR_RETURN(PeerCertificate cert, ParsePeerCertificate(pem));
  return std::move(cert.principal);
}

std::string CertificateSha256(std::string_view pem) {
  const X509Ptr cert = ParsePem(pem);
  return cert ? Sha256(cert.get()) : "";
}

PrincipalCache::Entry PrincipalCache::Get(std::string_view pem) {
  {
    std::shared_lock lock(mu_);
    if (auto it = entries_.find(pem); it != entries_.end()) return it->second;
  }
  Entry entry = [&]() -> Entry {
    absl::StatusOr<PeerCertificate> parsed = ParsePeerCertificate(pem);
    if (parsed.ok()) return std::make_shared<const PeerCertificate>(*std::move(parsed));
    return absl::Status(
        parsed.status().code(),
        StrCat(parsed.status().message(), " (certificate sha256 ", CertificateSha256(pem), ")"));
  }();
  std::unique_lock lock(mu_);
  if (entries_.size() >= capacity_) entries_.clear();
  entries_.emplace(std::string(pem), entry);
  return entry;
}

size_t PrincipalCache::size() const {
  std::shared_lock lock(mu_);
  return entries_.size();
}

absl::StatusOr<std::string> PeerAuthenticator::Authenticate(std::string_view pem) const {
  const PrincipalCache::Entry entry = cache_.Get(pem);
  if (!entry.ok()) return absl::UnauthenticatedError(entry.status().message());
  const PeerCertificate& cert = **entry;
  const int64_t now = clock_->NowSeconds();
  absl::Status usable;
  if (now < cert.not_before) {
    usable = absl::UnauthenticatedError(
        StrCat("client certificate not valid until ", FormatUtc(cert.not_before)));
  } else if (now > cert.not_after) {  // valid through notAfter itself (RFC 5280)
    usable = absl::UnauthenticatedError(
        StrCat("client certificate expired at ", FormatUtc(cert.not_after)));
  } else if (const std::shared_ptr<const RevocationList> lists = lists_.load()) {
    usable = lists->Check(cert.issuer_der, cert.authority_key_id, cert.serial, now);
  }
  if (!usable.ok()) {
    return absl::UnauthenticatedError(
        StrCat(usable.message(), " (certificate sha256 ", cert.sha256, ")"));
  }
  return cert.principal;
}

absl::StatusOr<std::string> PeerAuthenticator::LoadRevocationList(const std::string& client_ca_file,
                                                                  const std::string& crl_dir) {
  if (crl_dir.empty()) {
    SetRevocationList(nullptr);
    return std::string(
        "revocation checking is off (no tls.crl_dir); certificate expiry is still checked at "
        "every call");
  }
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const RevocationList> lists,
                          RevocationList::Load(client_ca_file, crl_dir, clock_->NowSeconds()));
  std::string description = lists->Describe();
  SetRevocationList(std::move(lists));
  return description;
}

PeerAuthenticator& ProcessAuthenticator() {
  // Far more than the clients of one server; a flood of distinct certificates (each one
  // signed by the trusted CA) only makes the cache start over.
  static const SystemClock clock{};
  static PeerAuthenticator authenticator(&clock, 4096);
  return authenticator;
}

absl::StatusOr<core::Caller> CallerOf(const grpc::ServerContextBase& context) {
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
  CUSTOS_ASSIGN_OR_RETURN(caller.principal, ProcessAuthenticator().Authenticate(pem));
  return caller;
}

}  // namespace custos::server
