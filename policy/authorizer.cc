#include "policy/authorizer.h"

#include <optional>

#include "absl/strings/str_cat.h"

namespace custos::policy {
namespace {

// The one role that may perform each action: separation of duties in a single table. Apps
// use keys (the data plane); officers manage them (the control plane); auditors read the log;
// databases fetch their table-space keys (and nothing an app may do).
std::optional<Role> RoleFor(Action action) {
  switch (action) {
    case Action::kGenerateDataKey:
    case Action::kGenerateDataKeyWithoutPlaintext:
    case Action::kEncrypt:
    case Action::kDecrypt:
    case Action::kReEncrypt:
      return Role::kApp;
    case Action::kCreateKey:
    case Action::kDescribeKey:
    case Action::kListKeys:
    case Action::kPropose:
    case Action::kApprove:
    case Action::kReject:
    case Action::kGetRequest:
    case Action::kListRequests:
      return Role::kOfficer;
    case Action::kReadAudit:
      return Role::kAuditor;
    case Action::kClaimDatabaseToken:
    case Action::kFetchTdeKey:
      return Role::kDatabase;
  }
  return std::nullopt;  // a value outside the enum: nobody
}

absl::Status Deny(Role role, Action action, std::string_view why) {
  return absl::PermissionDeniedError(
      absl::StrCat("role '", std::string(RoleName(role)), "' may not perform ",
                   std::string(ActionName(action)), ": ", std::string(why)));
}

}  // namespace

std::string_view ActionName(Action action) {
  switch (action) {
    case Action::kGenerateDataKey:
      return "GenerateDataKey";
    case Action::kGenerateDataKeyWithoutPlaintext:
      return "GenerateDataKeyWithoutPlaintext";
    case Action::kEncrypt:
      return "Encrypt";
    case Action::kDecrypt:
      return "Decrypt";
    case Action::kReEncrypt:
      return "ReEncrypt";
    case Action::kCreateKey:
      return "CreateKey";
    case Action::kDescribeKey:
      return "DescribeKey";
    case Action::kListKeys:
      return "ListKeys";
    case Action::kPropose:
      return "Propose";
    case Action::kApprove:
      return "Approve";
    case Action::kReject:
      return "Reject";
    case Action::kGetRequest:
      return "GetRequest";
    case Action::kListRequests:
      return "ListRequests";
    case Action::kReadAudit:
      return "ReadAudit";
    case Action::kClaimDatabaseToken:
      return "ClaimDatabaseToken";
    case Action::kFetchTdeKey:
      return "FetchTdeKey";
  }
  return "Unknown";
}

absl::Status AuthorizeRole(Role role, Action action) {
  const std::optional<Role> allowed = RoleFor(action);
  if (allowed == role) return absl::OkStatus();
  // The rule that refuses is the one that reserves the action for another role.
  switch (allowed.value_or(role)) {
    case Role::kApp:
      return Deny(role, action,
                  "only applications use key material; officers and auditors never receive it");
    case Role::kOfficer:
      return Deny(role, action, "only officers manage keys and their change requests");
    case Role::kAuditor:
      return Deny(role, action, "only auditors read the audit log");
    case Role::kDatabase:
      return Deny(role, action,
                  "only databases fetch table-space keys, through the tokens issued to them");
  }
  return Deny(role, action, "no role may");
}

std::string_view KeyUseName(KeyUse use) {
  switch (use) {
    case KeyUse::kEncrypt:
      return "encrypt";
    case KeyUse::kDecrypt:
      return "decrypt";
  }
  return "unknown";
}

absl::Status CheckGrant(const std::set<std::string>& grants, std::string_view principal, KeyUse use,
                        std::string_view key_name) {
  if (grants.count(std::string(principal)) > 0) return absl::OkStatus();
  return NoGrant(principal, use, key_name);
}

absl::Status NoGrant(std::string_view principal, KeyUse use, std::string_view key_name) {
  return absl::PermissionDeniedError(
      absl::StrCat("principal '", std::string(principal), "' has no ", std::string(KeyUseName(use)),
                   " grant on key '", std::string(key_name), "', or no such key exists"));
}

}  // namespace custos::policy
