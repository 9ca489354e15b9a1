// Key lifecycle: what each key-management operation does to a key, and when it may.
#include <utility>

#include "common/strings.h"
#include "core/call.h"
#include "core/key_id.h"
#include "core/kms.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::KeyRecord;
using storage::KeyState;

constexpr size_t kMaxAliasBytes = 128;
constexpr size_t kMaxDescriptionBytes = 1024;
constexpr size_t kMaxTags = 50;
constexpr size_t kMaxTagKeyBytes = 128;
constexpr size_t kMaxTagValueBytes = 256;

absl::Status ValidateAlias(std::string_view alias) {
  if (alias.empty()) return absl::OkStatus();
  if (alias.size() > kMaxAliasBytes) {
    return absl::InvalidArgumentError(
        StrCat("alias is ", alias.size(), " bytes; at most ", kMaxAliasBytes, " allowed"));
  }
  for (char c : alias) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '/' || c == '.';
    if (!ok) {
      return absl::InvalidArgumentError(
          "alias may contain only letters, digits, '-', '_', '/' and '.'");
    }
  }
  if (ParseKeyId(alias)) {
    return absl::InvalidArgumentError("alias must not look like a key id (UUID)");
  }
  return absl::OkStatus();
}

absl::Status ValidateTags(const std::map<std::string, std::string>& tags) {
  if (tags.size() > kMaxTags) {
    return absl::InvalidArgumentError(StrCat("at most ", kMaxTags, " tags allowed"));
  }
  for (const auto& [name, value] : tags) {
    if (name.empty() || name.size() > kMaxTagKeyBytes || value.size() > kMaxTagValueBytes) {
      return absl::InvalidArgumentError(StrCat("tag names must be 1..", kMaxTagKeyBytes,
                                               " bytes and values at most ", kMaxTagValueBytes,
                                               " bytes"));
    }
  }
  return absl::OkStatus();
}

// Grants may name only apps: an officer or auditor with a grant would break separation of
// duties, and a principal missing from the policy is most likely a typo.
absl::Status ValidateGrantees(const policy::Policy& policy, const std::set<std::string>& grantees,
                              std::string_view field) {
  for (const std::string& principal : grantees) {
    if (policy.RoleOf(principal) != policy::Role::kApp) {
      return absl::InvalidArgumentError(StrCat("principal '", principal, "' in ", field,
                                               " is not an app in the policy; only apps "
                                               "may be granted use of a key"));
    }
  }
  return absl::OkStatus();
}
absl::Status Refuse(const KeyRecord& key, Operation operation, std::string_view allowed) {
  return absl::FailedPreconditionError(StrCat(policy::OperationName(operation), " needs key ",
                                              key.id, " to be ", allowed, "; it is ",
                                              storage::KeyStateName(key.state)));
}

}  // namespace

absl::Status Kms::ValidateCreate(const CreateKeyParams& params) const {
  CUSTOS_RETURN_IF_ERROR(ValidateAlias(params.alias));
  if (params.description.size() > kMaxDescriptionBytes) {
    return absl::InvalidArgumentError(
        StrCat("description is longer than ", kMaxDescriptionBytes, " bytes"));
  }
  CUSTOS_RETURN_IF_ERROR(ValidateTags(params.tags));
  if (params.rotation_period_days < 0 || params.rotation_period_days > 3650) {
    return absl::InvalidArgumentError("rotation period must be 1..3650 days, or 0 for none");
  }
  const std::shared_ptr<const policy::Policy> policy = CurrentPolicy();
  CUSTOS_RETURN_IF_ERROR(
      ValidateGrantees(*policy, params.encrypt_principals, "encrypt_principals"));
  return ValidateGrantees(*policy, params.decrypt_principals, "decrypt_principals");
}

absl::Status Kms::CheckAliasFree(Call& call, const std::string& alias) const {
  if (alias.empty()) return absl::OkStatus();
  absl::StatusOr<KeyRef> holder = options_.store->FindKeyByAlias(alias);
  if (!holder.ok()) return absl::OkStatus();  // a race, or a row refused: the commit decides
  call.SetKey(**holder, 0);
  return absl::AlreadyExistsError(StrCat("alias '", alias, "' is already in use"));
}

absl::StatusOr<KeyRecord> Kms::NewKey(const Caller& caller, const CreateKeyParams& params) {
  KeyRecord key;
  key.id = NewKeyId();
  key.alias = params.alias;
  key.description = params.description;
  key.tags = params.tags;
  key.state = KeyState::kEnabled;
  key.created_at = options_.clock->NowSeconds();
  key.created_by = caller.principal;
  key.primary_version = 1;
  key.encrypt_grants = params.encrypt_principals;
  key.decrypt_grants = params.decrypt_principals;
  key.rotation_period_seconds = params.rotation_period_days * policy::kDay;
  // The version is generated in the HSM and only its wrapped form comes out: creating a key
  // adds a row, never a token object.
  CUSTOS_ASSIGN_OR_RETURN(const std::string root, RootForNewVersions());
  CUSTOS_ASSIGN_OR_RETURN(Bytes wrapped, options_.hsm->GenerateWrappedKey(root));
  key.versions.push_back({1, std::move(wrapped), root, key.created_at});
  return key;
}

absl::StatusOr<KeyRecord> Kms::Applied(const KeyRecord& current, Operation operation,
                                       const OperationParams& params) {
  KeyRecord key = current;
  const int64_t now = options_.clock->NowSeconds();
  const bool live = key.state == KeyState::kEnabled || key.state == KeyState::kDisabled;
  CUSTOS_RETURN_IF_ERROR(CheckTdeSealing(current, operation, params));
  switch (operation) {
    case Operation::kCreateKey:
    case Operation::kRotateRootKey:
    case Operation::kReAnchorAuditLog:
    case Operation::kArchiveAuditLog:
    case Operation::kCreateTdeKey:
    case Operation::kRotateTdeKey:
    case Operation::kIssueDatabaseToken:
    case Operation::kRevokeDatabaseToken:
      return absl::InternalError(
          StrCat(policy::OperationName(operation), " does not apply to a single key"));
    case Operation::kRotateKey: {
      if (!live) return Refuse(key, operation, "ENABLED or DISABLED");
      CUSTOS_ASSIGN_OR_RETURN(const std::string root, RootForNewVersions());
      CUSTOS_ASSIGN_OR_RETURN(Bytes wrapped, options_.hsm->GenerateWrappedKey(root));
      const uint32_t version = key.versions.back().version + 1;
      key.versions.push_back({version, std::move(wrapped), root, now});
      key.primary_version = version;
      return key;
    }
    case Operation::kDisableKey:
      if (key.state != KeyState::kEnabled) return Refuse(key, operation, "ENABLED");
      key.state = KeyState::kDisabled;
      return key;
    case Operation::kEnableKey:
      if (key.state != KeyState::kDisabled) return Refuse(key, operation, "DISABLED");
      key.state = KeyState::kEnabled;
      return key;
    case Operation::kScheduleKeyDeletion: {
      if (!live) return Refuse(key, operation, "ENABLED or DISABLED");
      int64_t waiting = options_.dual_control.deletion_waiting_seconds;
      if (params.deletion_waiting_days != 0) {
        if (params.deletion_waiting_days < 7 || params.deletion_waiting_days > 30) {
          return absl::InvalidArgumentError("deletion waiting period must be 7 to 30 days");
        }
        waiting = params.deletion_waiting_days * policy::kDay;
      }
      // Due when both the wall clock and the server's observed time say the period is over.
      CUSTOS_ASSIGN_OR_RETURN(const int64_t observed, observed_.Now());
      key.state = KeyState::kPendingDeletion;
      key.deletion_due_at = now + waiting;
      key.deletion_due_observed = observed + waiting;
      return key;
    }
    case Operation::kCancelKeyDeletion:
      if (key.state != KeyState::kPendingDeletion) {
        return Refuse(key, operation, "PENDING_DELETION");
      }
      // Back to DISABLED, not ENABLED: re-enabling is a decision of its own.
      key.state = KeyState::kDisabled;
      key.deletion_due_at = 0;
      key.deletion_due_observed = 0;
      return key;
    case Operation::kUpdateKeyGrants: {
      if (key.state == KeyState::kDestroyed) return Refuse(key, operation, "not DESTROYED");
      const std::shared_ptr<const policy::Policy> policy = CurrentPolicy();
      CUSTOS_RETURN_IF_ERROR(
          ValidateGrantees(*policy, params.encrypt_principals, "encrypt_principals"));
      CUSTOS_RETURN_IF_ERROR(
          ValidateGrantees(*policy, params.decrypt_principals, "decrypt_principals"));
      key.encrypt_grants = params.encrypt_principals;
      key.decrypt_grants = params.decrypt_principals;
      return key;
    }
    case Operation::kSetMinDecryptVersion:
      if (key.state == KeyState::kDestroyed) return Refuse(key, operation, "not DESTROYED");
      if (params.min_decrypt_version < 1 || params.min_decrypt_version > key.primary_version) {
        return absl::InvalidArgumentError(StrCat("minimum decryption version must be 1..",
                                                 key.primary_version,
                                                 " (the primary version can never be retired)"));
      }
      key.min_decrypt_version = params.min_decrypt_version;
      return key;
  }
  return absl::InternalError("unknown operation");
}

}  // namespace custos::core
