#include "policy/dual_control.h"

#include "common/strings.h"

namespace custos::policy {

std::string_view OperationName(Operation operation) {
  switch (operation) {
    case Operation::kCreateKey:
      return "CreateKey";
    case Operation::kRotateKey:
      return "RotateKey";
    case Operation::kDisableKey:
      return "DisableKey";
    case Operation::kEnableKey:
      return "EnableKey";
    case Operation::kScheduleKeyDeletion:
      return "ScheduleKeyDeletion";
    case Operation::kCancelKeyDeletion:
      return "CancelKeyDeletion";
    case Operation::kUpdateKeyGrants:
      return "UpdateKeyGrants";
    case Operation::kSetMinDecryptVersion:
      return "SetMinDecryptVersion";
    case Operation::kRotateRootKey:
      return "RotateRootKey";
    case Operation::kReAnchorAuditLog:
      return "ReAnchorAuditLog";
    case Operation::kCreateTdeKey:
      return "CreateTdeKey";
    case Operation::kRotateTdeKey:
      return "RotateTdeKey";
    case Operation::kIssueDatabaseToken:
      return "IssueDatabaseToken";
    case Operation::kRevokeDatabaseToken:
      return "RevokeDatabaseToken";
    case Operation::kArchiveAuditLog:
      return "ArchiveAuditLog";
  }
  return "Unknown";
}

std::optional<Operation> ParseOperation(std::string_view name) {
  for (Operation operation : kAllOperations) {
    if (OperationName(operation) == name) return operation;
  }
  return std::nullopt;
}

std::string DualControlConfig::Summary() const {
  std::string summary = "approvals";
  for (const auto& [operation, count] : approvals) {
    summary += StrCat(" ", OperationName(operation), "=", count);
  }
  return StrCat(summary, "; request_ttl=", request_ttl_seconds,
                "s; deletion_waiting=", deletion_waiting_seconds, "s");
}

DualControlConfig DualControlConfig::Defaults() {
  DualControlConfig config;
  for (Operation operation : kAllOperations) config.approvals[operation] = 2;
  config.approvals[Operation::kCreateKey] = 0;
  return config;
}

absl::Status DualControlConfig::Validate() const {
  for (Operation operation : kAllOperations) {
    const auto it = approvals.find(operation);
    if (it == approvals.end()) {
      return absl::InvalidArgumentError(
          StrCat("dual_control: no approval count for ", OperationName(operation)));
    }
    const int minimum = operation == Operation::kCreateKey ? 0 : 1;
    if (it->second < minimum) {
      return absl::InvalidArgumentError(
          StrCat("dual_control: ", OperationName(operation), " needs at least ", minimum,
                 " approval", minimum == 1 ? "" : "s", " besides the proposer; got ", it->second,
                 " (dual control never fails open)"));
    }
  }
  if (request_ttl_seconds < 60 || request_ttl_seconds > 30 * kDay) {
    return absl::InvalidArgumentError(
        "dual_control: request_ttl_hours must be between 1 minute and 30 days");
  }
  if (deletion_waiting_seconds < 7 * kDay || deletion_waiting_seconds > 30 * kDay) {
    return absl::InvalidArgumentError(
        "dual_control: deletion_waiting_days must be between 7 and 30");
  }
  return absl::OkStatus();
}

absl::Status CheckQuorumsReachable(const DualControlConfig& config, const Policy& policy) {
  const size_t officers = policy.CountOf(Role::kOfficer);
  for (const auto& [operation, approvals] : config.approvals) {
    if (static_cast<size_t>(approvals) + 1 > officers) {
      return absl::FailedPreconditionError(
          StrCat(OperationName(operation), " needs ", approvals + 1,
                 " distinct officers (proposer and approvers) but the policy names ", officers));
    }
  }
  return absl::OkStatus();
}

}  // namespace custos::policy
