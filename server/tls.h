// Server-side mutual TLS: TLS 1.2 or 1.3 only (gRPC's floor), a client certificate is required
// and verified against the configured CA. Certificate, key and CA files are re-read every few
// minutes, so they can be renewed without a restart.
//
// Revocation is custosd's own (server/revocation.h): with tls.crl_dir, every CA of
// tls.client_ca needs a current CRL at start-up and at every reload (SIGHUP), or custosd
// refuses to start / keeps the lists it has; every call is then checked against the lists in
// force (server/peer_identity.h), so a revoked or expired certificate is refused at its next
// call even on a connection opened before. Connections are also closed after
// tls.max_connection_age_seconds (LimitConnectionAge), so nothing rests on a handshake forever.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "common/status.h"
#include "server/config.h"
#include "server/peer_identity.h"

namespace custos::server {

// The default of tls.max_connection_age_seconds, and its bounds.
inline constexpr int kDefaultMaxConnectionAgeSeconds = 3600;
inline constexpr int kMaxConnectionAgeLimitSeconds = 86400;
// How long calls still running on a connection past its maximum age may take to finish.
inline constexpr int kConnectionAgeGraceSeconds = 60;

// FAILED_PRECONDITION naming the setting and file if tls.cert, tls.key or tls.client_ca cannot
// be read, holds no PEM certificate (key), or if the key is not the certificate's;
// PERMISSION_DENIED as CheckPrivateKeyFile for tls.key. What custosd --check-config and the
// start-up check.
absl::Status CheckTlsFiles(const Config& config);

// The server credentials, after CheckTlsFiles. FAILED_PRECONDITION naming the file if a
// certificate, key or CA file cannot be read; PERMISSION_DENIED naming tls.key if the key file is
// not a regular file of this process's user readable by nobody else (mode 0600 or 0400), as the HSM
// PIN file. With tls.crl_dir, also loads the CRLs into `authenticator` (the one CallerOf uses by
// default): FAILED_PRECONDITION naming each CA without a current, correctly signed CRL. Without it,
// turns revocation checking off there (expiry is still checked at every call).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MutualTlsCredentials(
    const Config& config, PeerAuthenticator& authenticator = ProcessAuthenticator());

// Re-reads tls.client_ca and tls.crl_dir (on SIGHUP) into `authenticator`; the next call is
// checked against the new lists. On any error the lists in force stay (the error says why, as
// at start-up). Returns a description of the lists for the operator's log.
absl::StatusOr<std::string> ReloadClientCrls(
    const Config& config, PeerAuthenticator& authenticator = ProcessAuthenticator());

// PERMISSION_DENIED naming `path` unless it is a regular file (symbolic links followed: gRPC
// reads it by path) that belongs to this process's effective user and that neither group nor
// others may read or write; FAILED_PRECONDITION if it cannot be examined.
absl::Status CheckPrivateKeyFile(const std::string& path, std::string_view setting);

// Makes `builder`'s server close every connection after `max_age_seconds` (gRPC adds +-10%
// jitter), giving calls still running kConnectionAgeGraceSeconds to finish: a backstop that
// bounds how long any handshake is relied on. INVALID_ARGUMENT unless 1..86400.
absl::Status LimitConnectionAge(grpc::ServerBuilder& builder, int max_age_seconds);

}  // namespace custos::server
