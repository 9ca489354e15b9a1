// A request that does not parse as its method's message gets INVALID_ARGUMENT, and is
// recorded. gRPC's callback API answers such a call UNIMPLEMENTED with no message, as it does a
// method that does not exist, before any of Custos's code runs: the caller cannot tell a bad
// client from a wrong server, and nothing of the call reached the audit log or the operator.
#pragma once

#include <memory>

#include <grpcpp/support/server_interceptor.h>

#include "server/refusals.h"

namespace custos::server {

// For grpc::ServerBuilder::experimental().SetInterceptorCreators: on unary and server-
// streaming calls (whose one request gRPC parses before the method runs), one that did not
// parse is answered INVALID_ARGUMENT naming its method, and counted by `refusals` (logged and
// audited, coalesced, with the caller's principal and address). `refusals` must outlive the
// server.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MalformedRequestRefusals(
    RefusalRecorder* refusals);

}  // namespace custos::server
