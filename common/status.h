// Error handling shared by every Custos library.
//
// Libraries return absl::Status / absl::StatusOr<T>; nothing throws across a library
// boundary. absl's codes are numerically the gRPC codes, so server/ maps them in one place.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define CUSTOS_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status custos_status_ = (expr);          \
    if (!custos_status_.ok()) return custos_status_; \
  } while (0)

#define CUSTOS_CONCAT_INNER(a, b) a##b
#define CUSTOS_CONCAT(a, b) CUSTOS_CONCAT_INNER(a, b)

// `CUSTOS_ASSIGN_OR_RETURN(auto x, F());` declares x from a StatusOr or returns its error.
#define CUSTOS_ASSIGN_OR_RETURN(lhs, expr) \
  CUSTOS_ASSIGN_OR_RETURN_IMPL(CUSTOS_CONCAT(custos_statusor_, __LINE__), lhs, expr)
#define CUSTOS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()
