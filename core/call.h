// Kms::Call: one use-case invocation. Authorizes the caller against the current policy and
// appends the audit event, whatever the outcome, when the use case finishes. Internal to core/.
#pragma once

#include <optional>
#include <string>

#include "common/strings.h"
#include "core/kms.h"

namespace custos::core {

// One use-case invocation: authorizes the caller and records the audit event on Finish.
class Kms::Call {
 public:
  Call(const Kms& kms, const Caller& caller, policy::Action action) : kms_(kms), caller_(caller) {
    event_.time = kms.options_.clock->NowSeconds();
    event_.principal = caller.principal;
    event_.peer = caller.peer;
    event_.action = std::string(policy::ActionName(action));
    action_ = action;
  }

  // Resolves the caller's role from the current policy and checks it may perform the action.
  absl::Status Authorize() {
    const std::shared_ptr<const policy::Policy> policy = kms_.CurrentPolicy();
    const std::optional<policy::Role> role = policy->RoleOf(caller_.principal);
    if (!role) {
      return absl::PermissionDeniedError(
          StrCat("principal '", caller_.principal,
                 "' holds no role in the policy; an administrator must add it to the policy file"));
    }
    event_.role = std::string(policy::RoleName(*role));
    return policy::AuthorizeRole(*role, action_);
  }

  void SetKey(const storage::KeyRecord& key, uint32_t version) {
    event_.key_id = key.id;
    event_.key_version = version;
  }
  audit::Event& event() { return event_; }
  const Caller& caller() const { return caller_; }

  // Records the outcome; a result nobody could record is not returned (fail closed).
  template <typename T>
  absl::StatusOr<T> Finish(absl::StatusOr<T> result) {
    event_.outcome = result.status().code();
    absl::Status recorded = kms_.options_.audit->Append(event_);
    if (!recorded.ok()) {
      return absl::UnavailableError(
          StrCat("audit log unavailable, operation refused: ", recorded.message()));
    }
    return result;
  }

 private:
  const Kms& kms_;
  const Caller& caller_;
  policy::Action action_;
  audit::Event event_;
};

}  // namespace custos::core
