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

// Lower-case hex SHA-256 over every field of a request that an approver reviews (operation,
// key, parameters, justification, proposer, times). Approve may demand it.
std::string RequestDigest(const Request& request);

}  // namespace custos::core
