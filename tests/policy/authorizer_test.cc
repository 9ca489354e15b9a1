#include "policy/authorizer.h"

#include <map>
#include <set>
#include <string>
#include <utility>

#include <catch2/catch.hpp>

namespace custos::policy {
namespace {

constexpr Action kAllActions[] = {
    Action::kGenerateDataKey, Action::kGenerateDataKeyWithoutPlaintext,
    Action::kEncrypt,         Action::kDecrypt,
    Action::kReEncrypt,       Action::kCreateKey,
    Action::kDescribeKey,     Action::kListKeys,
    Action::kPropose,         Action::kApprove,
    Action::kReject,          Action::kGetRequest,
    Action::kListRequests,    Action::kReadAudit,
};

TEST_CASE("Every role x action pair is decided as separation of duties says", "[authorizer]") {
  const std::set<Action> app_may = {Action::kGenerateDataKey,
                                    Action::kGenerateDataKeyWithoutPlaintext, Action::kEncrypt,
                                    Action::kDecrypt, Action::kReEncrypt};
  const std::set<Action> officer_may = {
      Action::kCreateKey, Action::kDescribeKey, Action::kListKeys,   Action::kPropose,
      Action::kApprove,   Action::kReject,      Action::kGetRequest, Action::kListRequests};
  // Each role's actions, and the rule that reserves them for it (named in every refusal).
  const std::map<Role, std::pair<std::set<Action>, std::string>> rules = {
      {Role::kApp,
       {app_may, "only applications use key material; officers and auditors never receive it"}},
      {Role::kOfficer, {officer_may, "only officers manage keys and their change requests"}},
      {Role::kAuditor, {{Action::kReadAudit}, "only auditors read the audit log"}},
  };
  for (const auto& [role, rule] : rules) {
    for (Action action : kAllActions) {
      INFO(RoleName(role) << " " << ActionName(action));
      const absl::Status status = AuthorizeRole(role, action);
      if (rule.first.count(action) > 0) {
        CHECK(status.ok());
        continue;
      }
      std::string reserved_by;
      for (const auto& [owner, owner_rule] : rules) {
        if (owner_rule.first.count(action) > 0) reserved_by = owner_rule.second;
      }
      CHECK(status.code() == absl::StatusCode::kPermissionDenied);
      CHECK(status.message() == "role '" + std::string(RoleName(role)) + "' may not perform " +
                                    std::string(ActionName(action)) + ": " + reserved_by);
    }
  }
}

TEST_CASE("Denials read as a person would act on them", "[authorizer]") {
  CHECK(AuthorizeRole(Role::kOfficer, Action::kDecrypt).message() ==
        "role 'officer' may not perform Decrypt: only applications use key material; officers "
        "and auditors never receive it");
  CHECK(AuthorizeRole(Role::kApp, Action::kCreateKey).message() ==
        "role 'app' may not perform CreateKey: only officers manage keys and their change "
        "requests");
  CHECK(AuthorizeRole(Role::kAuditor, Action::kListKeys).message() ==
        "role 'auditor' may not perform ListKeys: only officers manage keys and their change "
        "requests");
  // The rule that refused, not one about the caller's own role.
  CHECK(AuthorizeRole(Role::kApp, Action::kReadAudit).message() ==
        "role 'app' may not perform ReadAudit: only auditors read the audit log");
  CHECK(AuthorizeRole(Role::kOfficer, Action::kReadAudit).message() ==
        "role 'officer' may not perform ReadAudit: only auditors read the audit log");
}

TEST_CASE("Action and key-use names are stable", "[authorizer]") {
  const std::map<Action, std::string> names = {
      {Action::kGenerateDataKey, "GenerateDataKey"},
      {Action::kGenerateDataKeyWithoutPlaintext, "GenerateDataKeyWithoutPlaintext"},
      {Action::kEncrypt, "Encrypt"},
      {Action::kDecrypt, "Decrypt"},
      {Action::kReEncrypt, "ReEncrypt"},
      {Action::kCreateKey, "CreateKey"},
      {Action::kDescribeKey, "DescribeKey"},
      {Action::kListKeys, "ListKeys"},
      {Action::kPropose, "Propose"},
      {Action::kApprove, "Approve"},
      {Action::kReject, "Reject"},
      {Action::kGetRequest, "GetRequest"},
      {Action::kListRequests, "ListRequests"},
      {Action::kReadAudit, "ReadAudit"},
  };
  REQUIRE(names.size() == std::size(kAllActions));
  for (const auto& [action, name] : names) CHECK(ActionName(action) == name);
  CHECK(KeyUseName(KeyUse::kEncrypt) == "encrypt");
  CHECK(KeyUseName(KeyUse::kDecrypt) == "decrypt");
}

TEST_CASE("CheckGrant allows granted principals and names the missing grant", "[authorizer]") {
  const std::set<std::string> grants = {"spiffe://custos.local/app/billing"};
  CHECK(CheckGrant(grants, "spiffe://custos.local/app/billing", KeyUse::kEncrypt, "k1").ok());

  const absl::Status denied =
      CheckGrant(grants, "spiffe://custos.local/app/reports", KeyUse::kEncrypt, "k1");
  CHECK(denied.code() == absl::StatusCode::kPermissionDenied);
  CHECK(denied.message() ==
        "principal 'spiffe://custos.local/app/reports' has no encrypt grant on key 'k1', or no "
        "such key exists");
  CHECK(CheckGrant({}, "p", KeyUse::kDecrypt, "k2").message() ==
        "principal 'p' has no decrypt grant on key 'k2', or no such key exists");
  CHECK(CheckGrant({}, "p", KeyUse::kDecrypt, "k2") == NoGrant("p", KeyUse::kDecrypt, "k2"));
  CHECK_FALSE(CheckGrant(grants, "", KeyUse::kDecrypt, "k1").ok());
}

}  // namespace
}  // namespace custos::policy
