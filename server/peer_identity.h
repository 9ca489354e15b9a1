// Who is calling: the principal named by a verified client certificate, and whether that
// certificate may still be used at this moment (not expired, not revoked).
//
// Principals come in two kinds that can never be mistaken for each other:
//
//   URI principal   the certificate's one URI SAN, exactly as written: a scheme (RFC 3986:
//                   a letter, then letters, digits, '+', '-' or '.') followed by ':' and at
//                   least one more character, e.g. spiffe://custos.local/app/billing or
//                   urn:example:billing. It always contains ':'.
//   CN principal    without a URI SAN, the subject's one common name, e.g. billing-app. It
//                   never contains ':'.
//
// So a policy entry with ':' can only match a URI SAN and one without only a CN: a CN
// "urn:x" or "spiffe://..." is refused, and so is a URI SAN without a scheme ("officer1").
// Either kind is printable ASCII only (0x21..0x7E: no space, no control or non-ASCII
// character), so bidi controls, look-alike Unicode names, and names differing only in spaces
// never reach the policy or the audit log. The certificate must also carry the clientAuth
// extended key usage: a server or e-mail certificate of the same CA is not a client identity.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include <grpcpp/grpcpp.h>

#include "common/clock.h"
#include "common/status.h"
#include "core/kms.h"
#include "server/revocation.h"

namespace custos::server {

// What a usable client certificate says, parsed once (see PrincipalCache).
struct PeerCertificate {
  std::string principal;         // see the kinds above
  std::string serial;            // upper-case hex, as `openssl x509 -serial` prints it
  std::string issuer_der;        // the issuer's name, DER
  std::string authority_key_id;  // "" if the certificate names none
  int64_t not_before = 0;        // seconds since the epoch
  int64_t not_after = 0;
  std::string sha256;  // fingerprint, as CertificateSha256
};

// Parses a PEM certificate into what Custos needs of it. INVALID_ARGUMENT if it does not
// parse, lacks the clientAuth extended key usage, or names no usable principal: several URI
// SANs, a URI SAN without a scheme, no URI SAN and no (or several) common names, a common name
// with ':', or a character outside printable ASCII. Says nothing about time or revocation.
absl::StatusOr<PeerCertificate> ParsePeerCertificate(std::string_view pem);

// ParsePeerCertificate(pem)'s principal.
absl::StatusOr<std::string> PrincipalFromPem(std::string_view pem);

// ParsePeerCertificate's answers (refusals included, their message ending with
// " (certificate sha256 <hex>)") by the exact PEM. Parsing a certificate costs more than
// most calls it authenticates (a third of custosd's CPU per GenerateDataKey when done on every
// call, docs/PERFORMANCE.md), and a client sends the same certificate on every call of a
// connection. The answer depends on the PEM alone, so a cached one is never stale; what
// changes with time (expiry, revocation) is checked per call by PeerAuthenticator from the
// parsed fields. Holds at most `capacity` certificates (it starts over when full).
// Thread-safe.
class PrincipalCache {
 public:
  using Entry = absl::StatusOr<std::shared_ptr<const PeerCertificate>>;
  explicit PrincipalCache(size_t capacity) : capacity_(capacity) {}
  Entry Get(std::string_view pem);
  size_t size() const;

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  const size_t capacity_;
  mutable std::shared_mutex mu_;
  std::unordered_map<std::string, Entry, Hash, std::equal_to<>> entries_;  // guarded by mu_
};

// The SHA-256 fingerprint of a PEM certificate's DER, in lower-case hex (as
// `openssl x509 -noout -fingerprint -sha256` shows it, without colons); "" if it does not parse.
std::string CertificateSha256(std::string_view pem);

// Decides, at every call, whether a client certificate (already verified against the CA by
// the TLS layer at the handshake) may call now: its identity (PrincipalCache), its validity
// period against the clock, and, once revocation lists are set, its CA's current CRL. A
// connection opened before a certificate expired or was revoked is thus refused at its next
// call; the TLS layer alone would let it run until it closes. The per-call cost is a cache
// lookup, an atomic load and a few comparisons. Thread-safe.
class PeerAuthenticator {
 public:
  PeerAuthenticator(const Clock* clock, size_t cache_capacity)
      : clock_(clock), cache_(cache_capacity) {}

  // The principal of the certificate `pem`, or UNAUTHENTICATED saying why (ending with
  // " (certificate sha256 <hex>)"): no usable identity, not yet valid, expired, revoked, or
  // its CA has no current CRL.
  absl::StatusOr<std::string> Authenticate(std::string_view pem) const;

  // Checks revocation against `lists` from the next call on; nullptr turns revocation
  // checking off (expiry is still checked).
  void SetRevocationList(std::shared_ptr<const RevocationList> lists) {
    lists_.store(std::move(lists));
  }
  std::shared_ptr<const RevocationList> revocation_list() const { return lists_.load(); }

  // Loads `client_ca_file` and the CRLs of `crl_dir` (RevocationList::Load, at this clock's
  // now) and uses them from the next call; "" for `crl_dir` turns revocation checking off.
  // On error the lists in use stay as they were. Returns a description for the log.
  absl::StatusOr<std::string> LoadRevocationList(const std::string& client_ca_file,
                                                 const std::string& crl_dir);

 private:
  const Clock* const clock_;
  mutable PrincipalCache cache_;
  std::atomic<std::shared_ptr<const RevocationList>> lists_;
};

// The authenticator CallerOf uses (system clock, 4096 certificates cached). MutualTlsCredentials
// and ReloadClientCrls (server/tls.h) set its revocation lists.
PeerAuthenticator& ProcessAuthenticator();

// The caller of a gRPC call whose TLS layer has already verified the client certificate
// against the configured CA, by ProcessAuthenticator(). UNAUTHENTICATED if the call carries no
// certificate, or one that names no usable identity or may not be used now (the message then
// ends with the certificate's fingerprint, so the refusal's audit record says which
// certificate it was).
absl::StatusOr<core::Caller> CallerOf(const grpc::ServerContextBase& context);

}  // namespace custos::server
