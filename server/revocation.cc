#include "server/revocation.h"

#include <openssl/err.h>
#include <openssl/pem.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "common/strings.h"
#include "server/x509_util.h"

namespace custos::server {
namespace {

namespace fs = std::filesystem;
using x509::BioPtr;
using x509::CrlPtr;
using x509::X509Ptr;

// Far beyond any real CRL; stops a stray huge file in the folder from eating memory.
constexpr uintmax_t kMaxCrlFileBytes = 64u << 20;

struct Ca {
  X509Ptr cert;
  RevocationList::Authority authority;
  // The newest CRL seen for it that is not current, to say why it has none.
  std::string stale_reason;
  int64_t stale_this_update = INT64_MIN;
};

struct ErrorList {
  std::vector<std::string> errors;
  void Add(std::string error) { errors.push_back(std::move(error)); }
  std::string Joined() const {
    std::string out;
    for (const std::string& e : errors) out += (out.empty() ? "" : "; ") + e;
    return out;
  }
};

absl::StatusOr<std::vector<Ca>> ReadCas(const std::string& path) {
  BioPtr bio(BIO_new_file(path.c_str(), "r"));
  if (!bio) {
    ERR_clear_error();
    return absl::FailedPreconditionError(StrCat("cannot read tls.client_ca ", path));
  }
  std::vector<Ca> cas;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    X509Ptr owned(cert);
    // The same certificate twice in the bundle is one CA.
    const bool seen = std::any_of(cas.begin(), cas.end(),
                                  [&](const Ca& ca) { return X509_cmp(ca.cert.get(), cert) == 0; });
    if (seen) continue;
    Ca ca;
    ca.authority.subject_der = x509::NameDer(X509_get_subject_name(cert));
    ca.authority.subject = x509::NameText(X509_get_subject_name(cert));
    ca.authority.key_id = x509::OctetBytes(X509_get0_subject_key_id(cert));
    ca.authority.issuer_der = x509::NameDer(X509_get_issuer_name(cert));
    ca.authority.serial = x509::SerialHex(X509_get0_serialNumber(cert));
    ca.cert = std::move(owned);
    cas.push_back(std::move(ca));
  }
  ERR_clear_error();  // the end of the file reads as an error
  if (cas.empty()) {
    return absl::FailedPreconditionError(
        StrCat("tls.client_ca ", path, " holds no PEM certificate"));
  }
  return cas;
}

// Every CRL in one file: PEM blocks ("X509 CRL"; other blocks are skipped unread, so a key in
// the folder never prompts for a passphrase), else the whole file as one DER CRL.
std::vector<CrlPtr> ReadCrls(const std::string& text) {
  std::vector<CrlPtr> crls;
  if (text.find("-----BEGIN") != std::string::npos) {
    BioPtr bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
    while (bio) {
      X509_CRL* crl = PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr);
      if (crl == nullptr) break;
      crls.emplace_back(crl);
    }
  } else {
    const unsigned char* der = reinterpret_cast<const unsigned char*>(text.data());
    X509_CRL* crl = d2i_X509_CRL(nullptr, &der, static_cast<long>(text.size()));
    if (crl != nullptr &&
        der == reinterpret_cast<const unsigned char*>(text.data()) + text.size()) {
      crls.emplace_back(crl);
    } else {
      X509_CRL_free(crl);
    }
  }
  ERR_clear_error();
  return crls;
}

// Why `crl` cannot stand for the whole list of its CA's revocations; "" if it can. Custos
// reads complete CRLs only: a delta CRL or one limited by its issuing distribution point
// would leave some revocations out, and an unknown critical extension may change its meaning.
std::string Unsupported(X509_CRL* crl) {
  for (int i = 0; i < X509_CRL_get_ext_count(crl); ++i) {
    X509_EXTENSION* ext = X509_CRL_get_ext(crl, i);
    const int nid = OBJ_obj2nid(X509_EXTENSION_get_object(ext));
    if (nid == NID_delta_crl) return "is a delta CRL; Custos needs complete CRLs";
    if (nid == NID_issuing_distribution_point) {
      std::unique_ptr<ISSUING_DIST_POINT, decltype(&ISSUING_DIST_POINT_free)> idp(
          static_cast<ISSUING_DIST_POINT*>(X509V3_EXT_d2i(ext)), &ISSUING_DIST_POINT_free);
      if (!idp) return "has an issuing distribution point that does not parse";
      if (idp->onlyCA > 0 || idp->onlyattr > 0 || idp->onlysomereasons != nullptr ||
          idp->indirectCRL > 0 || idp->distpoint != nullptr) {
        return "covers only part of its CA's certificates (issuing distribution point); "
               "Custos needs complete CRLs";
      }
      continue;
    }
    if (X509_EXTENSION_get_critical(ext) && nid != NID_authority_key_identifier &&
        nid != NID_crl_number) {
      return "has an unknown critical extension";
    }
  }
  const STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl);
  for (int i = 0; i < sk_X509_REVOKED_num(revoked); ++i) {
    const STACK_OF(X509_EXTENSION)* exts =
        X509_REVOKED_get0_extensions(sk_X509_REVOKED_value(revoked, i));
    for (int j = 0; j < sk_X509_EXTENSION_num(exts); ++j) {
      // certificateIssuer (indirect CRLs) and anything else critical changes the entry.
      if (X509_EXTENSION_get_critical(sk_X509_EXTENSION_value(exts, j))) {
        return "has an entry with a critical extension (an indirect CRL?)";
      }
    }
  }
  return "";
}

// Reads one CRL into the CA that signed it, or records why it cannot be used.
void TakeCrl(X509_CRL* crl, const std::string& file, int64_t now, std::vector<Ca>& cas,
             ErrorList& errors) {
  const std::string issuer = x509::NameDer(X509_CRL_get_issuer(crl));
  const std::string issuer_text = x509::NameText(X509_CRL_get_issuer(crl));
  Ca* signer = nullptr;
  bool named = false;
  for (Ca& ca : cas) {
    if (ca.authority.subject_der != issuer) continue;
    named = true;
    EVP_PKEY* key = X509_get0_pubkey(ca.cert.get());
    if (key != nullptr && X509_CRL_verify(crl, key) == 1) {
      signer = &ca;
      break;
    }
  }
  ERR_clear_error();
  if (!named) {
    errors.Add(StrCat("CRL ", file, " is issued by '", issuer_text,
                      "', which is not a CA of tls.client_ca"));
    return;
  }
  if (signer == nullptr) {
    errors.Add(StrCat("CA '", issuer_text, "': CRL ", file,
                      " has a bad signature (not signed by this CA's key)"));
    return;
  }
  const std::string subject = signer->authority.subject;
  if (const std::string why = Unsupported(crl); !why.empty()) {
    errors.Add(StrCat("CA '", subject, "': CRL ", file, " ", why));
    return;
  }
  const std::optional<int64_t> this_update = x509::EpochSeconds(X509_CRL_get0_lastUpdate(crl));
  const ASN1_TIME* next_time = X509_CRL_get0_nextUpdate(crl);
  const std::optional<int64_t> next_update = x509::EpochSeconds(next_time);
  if (!this_update || next_time == nullptr || !next_update) {
    errors.Add(StrCat("CA '", subject, "': CRL ", file,
                      next_time == nullptr ? " has no nextUpdate, so it is never known to be "
                                             "current"
                                           : " has a time that does not parse"));
    return;
  }
  Ca& ca = *signer;
  if (*this_update > now || *next_update <= now) {
    if (*this_update > ca.stale_this_update) {
      ca.stale_this_update = *this_update;
      ca.stale_reason =
          *this_update > now
              ? StrCat("its CRL ", file, " is not valid until ", FormatUtc(*this_update))
              : StrCat("its CRL ", file, " expired at ", FormatUtc(*next_update));
    }
    return;
  }
  RevocationList::Authority& authority = ca.authority;
  if (!authority.crl_file.empty() && *this_update < authority.this_update) return;  // older
  if (authority.crl_file.empty() || *this_update > authority.this_update) {
    authority.revoked.clear();
    authority.this_update = *this_update;
    authority.next_update = *next_update;
    authority.crl_file = file;
  } else {
    // Two current CRLs issued at the same moment (a file and its rehash link): both count.
    authority.next_update = std::min(authority.next_update, *next_update);
  }
  const STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl);
  for (int i = 0; i < sk_X509_REVOKED_num(revoked); ++i) {
    authority.revoked.insert(
        x509::SerialHex(X509_REVOKED_get0_serialNumber(sk_X509_REVOKED_value(revoked, i))));
  }
}

}  // namespace

std::string FormatUtc(int64_t seconds) {
  const time_t t = static_cast<time_t>(seconds);
  struct tm tm {};
  char text[32];
  if (gmtime_r(&t, &tm) == nullptr || strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) {
    return StrCat(seconds, " s since the epoch");
  }
  return text;
}

absl::StatusOr<std::shared_ptr<const RevocationList>> RevocationList::Load(
    const std::string& client_ca_file, const std::string& crl_dir, int64_t now) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Ca> cas, ReadCas(client_ca_file));
  std::error_code error;
  fs::directory_iterator dir(crl_dir, error);
  if (error) {
    return absl::FailedPreconditionError(
        StrCat("cannot read tls.crl_dir ", crl_dir, ": ", error.message()));
  }
  // In name order, so that messages come out the same way every time.
  std::vector<fs::path> files;
  for (const fs::directory_entry& entry : dir) {
    if (entry.is_regular_file(error)) files.push_back(entry.path());  // follows symlinks
  }
  std::sort(files.begin(), files.end());
  ErrorList errors;
  for (const fs::path& path : files) {
    const uintmax_t size = fs::file_size(path, error);
    if (error || size > kMaxCrlFileBytes) {
      errors.Add(StrCat("CRL folder file ", path.string(), " cannot be read or is too large"));
      continue;
    }
    std::ifstream in(path, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in && !in.eof()) {
      errors.Add(StrCat("cannot read ", path.string()));
      continue;
    }
    for (const CrlPtr& crl : ReadCrls(text)) TakeCrl(crl.get(), path.string(), now, cas, errors);
  }
  for (const Ca& ca : cas) {
    if (!ca.authority.crl_file.empty()) continue;
    errors.Add(StrCat("CA '", ca.authority.subject, "' has no current CRL",
                      ca.stale_reason.empty() ? " (none in the folder)" : ": " + ca.stale_reason));
  }
  if (!errors.errors.empty()) {
    return absl::FailedPreconditionError(StrCat("tls.crl_dir ", crl_dir, ": ", errors.Joined()));
  }
  std::shared_ptr<RevocationList> list(new RevocationList());
  for (Ca& ca : cas) list->authorities_.push_back(std::move(ca.authority));
  // An intermediate CA that its parent (also in the bundle) revoked signs nothing valid.
  for (Authority& child : list->authorities_) {
    for (const Authority& parent : list->authorities_) {
      if (&parent == &child || parent.subject_der != child.issuer_der) continue;
      if (parent.revoked.contains(child.serial)) child.revoked_by_parent = true;
    }
  }
  return std::shared_ptr<const RevocationList>(std::move(list));
}

absl::Status RevocationList::Check(std::string_view issuer_der, std::string_view authority_key_id,
                                   std::string_view serial, int64_t now) const {
  bool found = false;
  for (const Authority& ca : authorities_) {
    if (ca.subject_der != issuer_der) continue;
    // Two CAs may share a name (a renewed CA key): the key identifiers tell them apart.
    if (!authority_key_id.empty() && !ca.key_id.empty() && ca.key_id != authority_key_id) {
      continue;
    }
    found = true;
    if (now >= ca.next_update || now < ca.this_update) {
      return absl::UnauthenticatedError(
          StrCat("no current CRL for client CA '", ca.subject, "' (",
                 now >= ca.next_update ? "it expired at " + FormatUtc(ca.next_update)
                                       : "it is not valid until " + FormatUtc(ca.this_update),
                 "); install a current CRL in tls.crl_dir and reload (SIGHUP)"));
    }
    if (ca.revoked.contains(serial)) {
      return absl::UnauthenticatedError(StrCat("client certificate revoked (serial ", serial, ")"));
    }
    if (ca.revoked_by_parent) {
      return absl::UnauthenticatedError(
          StrCat("client certificate's issuing CA '", ca.subject, "' is revoked"));
    }
  }
  if (!found) {
    return absl::UnauthenticatedError(
        "client certificate's issuer is no CA of tls.client_ca as last loaded, so no CRL covers "
        "it (an intermediate CA missing from the bundle, or a CA added since the last reload)");
  }
  return absl::OkStatus();
}

std::string RevocationList::Describe() const {
  size_t revoked = 0;
  int64_t next_update = INT64_MAX;
  for (const Authority& ca : authorities_) {
    revoked += ca.revoked.size();
    next_update = std::min(next_update, ca.next_update);
  }
  return StrCat(authorities_.size(), authorities_.size() == 1 ? " client CA, " : " client CAs, ",
                revoked, " revoked serial", revoked == 1 ? "" : "s", ", next CRL update due ",
                FormatUtc(next_update));
}

}  // namespace custos::server
