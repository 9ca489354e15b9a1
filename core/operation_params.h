// The parameters of a dual-control request, as stored with it: canonical JSON (sorted keys,
// only the fields of its operation), so that what officers approve is exactly what executes.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"
#include "core/kms.h"

namespace custos::core {

std::string EncodeParams(policy::Operation operation, const OperationParams& params);
// INTERNAL if the stored text does not parse (it was written by EncodeParams).
absl::StatusOr<OperationParams> DecodeParams(policy::Operation operation, std::string_view text);

// INVALID_ARGUMENT naming a parameter set in `params` that `operation` does not use. The
// request would be stored without it (EncodeParams keeps only its operation's fields), so
// officers would approve, and the server execute, something other than what was asked.
absl::Status RefuseUnusedParams(policy::Operation operation, const OperationParams& params);

// Lower-case hex SHA-256 over every field of a request that an approver reviews (operation,
// key, parameters, justification, proposer, times). Approve may demand it.
std::string RequestDigest(const Request& request);

}  // namespace custos::core
