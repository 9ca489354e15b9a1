// RevocationList: the client CAs (tls.client_ca) and their current CRLs (tls.crl_dir), loaded
// and verified by custosd itself, so that a revoked client certificate is refused at its next
// call, whichever connection it arrives on.
//
// Why not leave it to gRPC: gRPC 1.51 takes only a CRL directory, accepts every certificate
// whose CA has no CRL there (soft fail), and sees a new CRL only when its credentials are
// rebuilt, never on a connection already open. custosd therefore parses the CRLs with OpenSSL,
// fails closed when one is missing, and checks every call against the current lists
// (PeerAuthenticator in server/peer_identity.h). gRPC keeps its own check at handshakes.
//
// Loading (at start-up and on SIGHUP) requires, for every CA certificate in the bundle, a
// complete CRL signed by that CA's key with thisUpdate <= now < nextUpdate. Every file of the
// folder that holds a CRL counts (PEM or DER; `openssl rehash` names such as <hash>.r0, or any
// other name); files without a CRL (a README, the CA's own <hash>.0 link) are skipped. Any CRL
// that no CA of the bundle signed, with a bad signature, a delta CRL, a CRL covering only part
// of a CA's certificates or with an unknown critical extension fails the whole load, naming
// the file and the CA, so a misplaced or forged CRL is never silently ignored. When a CA has
// several current CRLs, the one with the latest thisUpdate counts. Immutable once loaded;
// shared as shared_ptr<const RevocationList>.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "common/status.h"

namespace custos::server {

class RevocationList {
 public:
  // The CAs of the PEM bundle `client_ca_file` and their CRLs from `crl_dir`, checked against
  // `now` (seconds since the epoch). FAILED_PRECONDITION naming every CA (by subject) and file
  // at fault and why: no CRL, bad signature, expired or not yet valid, not a CA of the bundle.
  static absl::StatusOr<std::shared_ptr<const RevocationList>> Load(
      const std::string& client_ca_file, const std::string& crl_dir, int64_t now);

  // Whether a certificate may be used at `now`, by its issuer (name as DER, and authority key
  // identifier, "" if it has none) and serial number (upper-case hex, as
  // `openssl x509 -serial` prints it). UNAUTHENTICATED if its serial is on its CA's CRL, its
  // issuing CA is itself revoked by another CA of the bundle, its issuer is no CA of the lists
  // (an intermediate the client sent that is not in tls.client_ca, or a CA added to the bundle
  // since the last load: no CRL of ours covers it), or that CA's CRL is no longer current
  // (it expired since the load: without a current CRL nobody can tell whether the
  // certificate was revoked, and gRPC refuses new handshakes in that state too). A lookup
  // and a few comparisons; no parsing.
  absl::Status Check(std::string_view issuer_der, std::string_view authority_key_id,
                     std::string_view serial, int64_t now) const;

  // For the operator's log: CAs, revoked serials, the earliest nextUpdate.
  std::string Describe() const;

  // Lets a string_view look up a set of strings without a copy.
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  // Each CA of the bundle and what its CRL says.
  struct Authority {
    std::string subject_der;  // the CA's subject name, DER
    std::string subject;      // the same, RFC 2253 text, for messages
    std::string key_id;       // subject key identifier; "" if the CA has none
    std::string issuer_der;   // the CA's own issuer and serial, to tell whether another
    std::string serial;       // CA of the bundle revoked it
    int64_t this_update = 0;  // of the CRL in force
    int64_t next_update = 0;
    std::string crl_file;  // where that CRL came from
    std::unordered_set<std::string, StringHash, std::equal_to<>> revoked;  // upper-case hex
    bool revoked_by_parent = false;
  };
  const std::vector<Authority>& authorities() const { return authorities_; }

 private:
  RevocationList() = default;
  std::vector<Authority> authorities_;
};

// Seconds since the epoch as 2026-01-27T10:00:00Z.
std::string FormatUtc(int64_t seconds);

}  // namespace custos::server
