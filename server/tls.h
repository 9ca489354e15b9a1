// Server-side mutual TLS: TLS 1.2 or 1.3 only (gRPC's floor), a client certificate is required
// and verified against the configured CA (and its CRLs, if configured). Certificate, key and
// CA files are re-read every few minutes, so they can be renewed without a restart.
#pragma once

#include <memory>

#include <grpcpp/security/server_credentials.h>

#include "common/status.h"
#include "server/config.h"

namespace custos::server {

// FAILED_PRECONDITION naming the file if a certificate, key or CA file cannot be read.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MutualTlsCredentials(const Config& config);

}  // namespace custos::server
