// Who is calling: the principal named by a verified client certificate.
#pragma once

#include <functional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include <grpcpp/grpcpp.h>

#include "common/status.h"
#include "core/kms.h"

namespace custos::server {

// The principal of a PEM certificate: its URI subject alternative name (such as
// spiffe://custos.local/app/billing), else its subject common name. INVALID_ARGUMENT if the
// PEM does not parse, names neither, names several URI SANs, has a URI-like CN but no URI SAN
// (so a CN can never pass for a URI principal), or the name has control characters.
absl::StatusOr<std::string> PrincipalFromPem(std::string_view pem);

// PrincipalFromPem's answers (refusals included) by the exact PEM. Parsing a certificate
// costs more than most calls it authenticates (a third of custosd's CPU per GenerateDataKey
// when done on every call, docs/PERFORMANCE.md), and a client sends the same certificate on
// every call of a connection. The answer depends on the PEM alone, so a cached one is never
// stale; the TLS layer still verifies the chain (and CRLs) at every handshake. Holds at most
// `capacity` certificates (it starts over when full). Thread-safe.
class PrincipalCache {
 public:
  explicit PrincipalCache(size_t capacity) : capacity_(capacity) {}
  absl::StatusOr<std::string> Get(std::string_view pem);
  size_t size() const;

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  const size_t capacity_;
  mutable std::shared_mutex mu_;
  std::unordered_map<std::string, absl::StatusOr<std::string>, Hash, std::equal_to<>>
      principals_;  // guarded by mu_
};

// The SHA-256 fingerprint of a PEM certificate's DER, in lower-case hex (as
// `openssl x509 -noout -fingerprint -sha256` shows it, without colons); "" if it does not parse.
std::string CertificateSha256(std::string_view pem);

// The caller of a gRPC call whose TLS layer has already verified the client certificate
// against the configured CA. UNAUTHENTICATED if the call carries no certificate, or one that
// names no usable identity (the message then ends with the certificate's fingerprint, so the
// refusal's audit record says which certificate it was).
absl::StatusOr<core::Caller> CallerOf(const grpc::ServerContext& context);

}  // namespace custos::server
