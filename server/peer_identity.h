// Who is calling: the principal named by a verified client certificate.
#pragma once

#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "common/status.h"
#include "core/kms.h"

namespace custos::server {

// The principal of a PEM certificate: its URI subject alternative name (such as
// spiffe://custos.local/app/billing), else its subject common name. INVALID_ARGUMENT if the
// PEM does not parse, names neither, names several URI SANs, has a URI-like CN but no URI SAN
// (so a CN can never pass for a URI principal), or the name has control characters.
absl::StatusOr<std::string> PrincipalFromPem(std::string_view pem);

// The caller of a gRPC call whose TLS layer has already verified the client certificate
// against the configured CA. UNAUTHENTICATED if the call carries no certificate.
absl::StatusOr<core::Caller> CallerOf(const grpc::ServerContext& context);

}  // namespace custos::server
