// Kms::Call: one use-case invocation. Authorizes the caller against the current policy and
// appends the audit event, whatever the outcome, when the use case finishes. Internal to core/.
#pragma once

#include <optional>
#include <string>

#include "common/strings.h"
#include "core/key_id.h"
#include "core/kms.h"

namespace custos::core {

// One use-case invocation: authorizes the caller and records the audit event on Finish.
class Kms::Call {
 public:
  Call(const Kms& kms, const Caller& caller, policy::Action action) : kms_(kms), caller_(caller) {
    // One id per call, in its records (and in its operator's log line with log.audit_mirror).
    event_.call_id = NewKeyId();
    event_.time = kms.options_.clock->NowSeconds();
    event_.principal = caller.principal;
    event_.peer = caller.peer;
    event_.action = std::string(policy::ActionName(action));
    action_ = action;
  }

  // Resolves the caller's role from the current policy and checks it may perform the action.
  // While the audit log awaits re-anchoring, only what approves that (and reading the log)
  // is served.
  absl::Status Authorize() {
    if (const std::string problem = kms_.AnchorProblem(); !problem.empty()) {
      switch (action_) {
        case policy::Action::kPropose:
        case policy::Action::kApprove:
        case policy::Action::kReject:
        case policy::Action::kGetRequest:
        case policy::Action::kListRequests:
        case policy::Action::kReadAudit:
          break;
        default:
          return absl::UnavailableError(
              StrCat("custosd serves nothing until officers approve re-anchoring the audit log, "
                     "which failed its start-up check: ",
                     problem));
      }
    }
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

  // Makes this call an item of the batch `batch_id`: its record commits with the others'.
  void JoinBatch(const std::string& batch_id) {
    event_.call_id = batch_id;
    in_batch_ = true;
  }

  // Where an encryption made for this call leaves a reservation due, for this call's own
  // record to write in its transaction (UsageTracker::Deferred); nullptr for a batch's items,
  // whose records commit with other items' (which could wait for it meanwhile).
  UsageTracker::Deferred* reservation() { return in_batch_ ? nullptr : &reservation_; }

  void SetKey(const storage::KeyRecord& key, uint32_t version) {
    event_.key_id = key.id;
    event_.key_version = version;
  }
  audit::Event& event() { return event_; }
  const Caller& caller() const { return caller_; }

  // Binds the encryption context to the audit record as an HMAC under an HSM key, never
  // its values. UNAVAILABLE if the HSM cannot compute it (the operation then fails).
  absl::Status BindContext(const EncryptionContext& context) {
    CUSTOS_ASSIGN_OR_RETURN(event_.context_hmac, kms_.ContextHmac(caller_.principal, context));
    return absl::OkStatus();
  }

  // Commits `batch` and this call's record (with `outcome`, plus any `extra` records) in one
  // transaction. Once it succeeded, Finish records nothing more.
  absl::Status CommitWith(storage::WriteBatch batch,
                          absl::StatusCode outcome = absl::StatusCode::kOk,
                          std::vector<audit::Event> extra = {}) {
    event_.outcome = outcome;
    for (audit::Event& e : extra) {
      if (e.call_id.empty()) e.call_id = event_.call_id;  // the server's records of this call
    }
    extra.insert(extra.begin(), event_);
    const bool reserving = AddReservation(batch, extra);
    CUSTOS_RETURN_IF_ERROR(kms_.Commit(std::move(batch), extra));
    recorded_ = true;
    if (reserving) reservation_.Written();
    return absl::OkStatus();
  }

  // Whether CommitWith wrote the call's record, and with it its batch.
  bool recorded() const { return recorded_; }

  // Records the outcome unless CommitWith already did; a result nobody could record is not
  // returned (fail closed).
  template <typename T>
  absl::StatusOr<T> Finish(absl::StatusOr<T> result) {
    std::vector<audit::Event> record;
    if (recorded_) result = Unreserved(std::move(result));  // CommitWith wrote what was due
    result = Record(std::move(result), &record);
    if (record.empty()) return result;  // CommitWith recorded it
    if (IsRepeat(result.status(), record.front())) {
      return result;  // a repeat, counted in a tally that is recorded (RefusalCounter)
    }
    // A failed call released nothing: its reservation, if any, is dropped unwritten.
    storage::WriteBatch batch;
    const bool reserving = result.ok() && AddReservation(batch, record);
    absl::Status recorded = kms_.Commit(std::move(batch), record);
    if (reserving && recorded.GetPayload(storage::kSealPayload)) {
      // The reservation's row needs a MAC from the HSM's catalogue key, the records do not: the
      // call fails, and its record says so. Encryptions waiting for the reservation need not
      // wait for that record: the next of them reserves.
      reservation_.Abandon();
      record.erase(record.begin());
      record.front().outcome = absl::StatusCode::kUnavailable;
      result = absl::UnavailableError(StrCat(
          "operation refused, its key's encryptions could not be reserved: ", recorded.message()));
      recorded = kms_.Commit({}, record);
    }
    if (!recorded.ok()) {
      return absl::UnavailableError(
          StrCat("operation refused, its record could not be written: ", recorded.message()));
    }
    if (reserving && result.ok()) reservation_.Written();
    return result;
  }

  // Finish without the commit: appends the call's record, unless CommitWith made it, to
  // `records`, which the caller commits before it returns `result` to anyone. A reservation
  // still due is not written here, so a result that needed one is refused (INTERNAL).
  template <typename T>
  absl::StatusOr<T> Settle(absl::StatusOr<T> result, std::vector<audit::Event>* records) {
    return Record(Unreserved(std::move(result)), records);
  }

 private:
  // True if `status` refused the call before anything was done (PERMISSION_DENIED, or the HSM
  // busy: no HSM call was started) and the refusal counter counted it as a repeat.
  bool IsRepeat(const absl::Status& status, const audit::Event& record) const {
    if (!kms_.refusal_counter_) return false;
    if (absl::IsPermissionDenied(status)) {
      return kms_.refusal_counter_(record, std::string(status.message()));
    }
    const auto busy = status.GetPayload(hsm::kBusyPayload);
    return busy.has_value() && absl::IsUnavailable(status) &&
           kms_.refusal_counter_(record, std::string(*busy));
  }

  // Appends the call's record with `result`'s outcome to `records`, unless it was made.
  template <typename T>
  absl::StatusOr<T> Record(absl::StatusOr<T> result, std::vector<audit::Event>* records) {
    kms_.RaiseIntegrityAlarm(result.status());
    if (recorded_) return result;
    event_.outcome = result.status().code();
    event_.row.clear();  // whatever row the call meant to change, it changed none
    records->push_back(event_);
    recorded_ = true;
    return result;
  }

  // `result`, unless it counted an encryption whose reservation nobody will write now (a
  // path that cannot write it): then INTERNAL, and the encryption is not released.
  template <typename T>
  absl::StatusOr<T> Unreserved(absl::StatusOr<T> result) {
    if (!result.ok() || reservation_.due() == nullptr) return result;
    return absl::InternalError(
        "an encryption's reservation was left unwritten; the result is withheld");
  }

  // Adds the reservation this call left due, if any, to `batch` and its record before the
  // call's own in `records`; true if there was one.
  bool AddReservation(storage::WriteBatch& batch, std::vector<audit::Event>& records) {
    const storage::VersionUsage* due = reservation_.due();
    if (due == nullptr) return false;
    batch.usage.push_back(*due);
    audit::Event reserved = kms_.ReservationEvent(*due);
    reserved.call_id = event_.call_id;  // the server's record of what this call needed
    records.insert(records.begin(), std::move(reserved));
    return true;
  }

  const Kms& kms_;
  const Caller& caller_;
  policy::Action action_;
  audit::Event event_;
  bool recorded_ = false;
  bool in_batch_ = false;
  UsageTracker::Deferred reservation_;  // declared last: settled before the rest goes
};

}  // namespace custos::core
