// The one place where Custos errors become gRPC statuses.
#pragma once

#include <grpcpp/grpcpp.h>

#include "common/status.h"

namespace custos::server {

// absl and gRPC share code numbers; the message is kept (truncated to 1 KiB).
grpc::Status ToGrpcStatus(const absl::Status& status);

// The code's name as the audit log writes it: "OK", "PERMISSION_DENIED", ...
std::string StatusCodeName(grpc::StatusCode code);

}  // namespace custos::server
