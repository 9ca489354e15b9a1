#include "policy/authorizer.h"

#include "absl/strings/str_cat.h"

namespace custos::policy {
namespace {

// Key use: the data plane, for apps only.
bool IsKeyUse(Action action) {
  switch (action) {
    case Action::kGenerateDataKey:
    case Action::kGenerateDataKeyWithoutPlaintext:
    case Action::kEncrypt:
    case Action::kDecrypt:
    case Action::kReEncrypt:
      return true;
    case Action::kCreateKey:
    case Action::kDescribeKey:
    case Action::kListKeys:
    case Action::kPropose:
    case Action::kApprove:
    case Action::kReject:
    case Action::kGetRequest:
    case Action::kListRequests:
    case Action::kReadAudit:
      return false;
  }
  return false;
}

// Key management: the control plane, for officers only.
bool IsKeyManagement(Action action) {
  switch (action) {
    case Action::kCreateKey:
    case Action::kDescribeKey:
    case Action::kListKeys:
    case Action::kPropose:
    case Action::kApprove:
    case Action::kReject:
    case Action::kGetRequest:
    case Action::kListRequests:
      return true;
    case Action::kReadAudit:
      return false;
    case Action::kGenerateDataKey:
    case Action::kGenerateDataKeyWithoutPlaintext:
    case Action::kEncrypt:
    case Action::kDecrypt:
    case Action::kReEncrypt:
      return false;
  }
  return false;
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
  }
  return "Unknown";
}

absl::Status AuthorizeRole(Role role, Action action) {
  // Anything not explicitly allowed is denied, including values outside the enums.
  switch (role) {
    case Role::kApp:
      if (IsKeyUse(action)) return absl::OkStatus();
      return Deny(role, action, "applications do not manage keys");
    case Role::kOfficer:
      if (IsKeyManagement(action)) return absl::OkStatus();
      return Deny(role, action, "officers never receive key material");
    case Role::kAuditor:
      if (action == Action::kReadAudit) return absl::OkStatus();
      return Deny(role, action, "auditors only read the audit log");
  }
  return Deny(role, action, "unknown role");
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
                        std::string_view key_id) {
  if (grants.count(std::string(principal)) > 0) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat("principal '", std::string(principal),
                                                  "' has no ", std::string(KeyUseName(use)),
                                                  " grant on key '", std::string(key_id), "'"));
}

}  // namespace custos::policy
