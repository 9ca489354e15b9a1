// Dual control: proposals, approvals, rejections and expiry of key-management requests, and
// the housekeeping that destroys keys when their deletion waiting period ends.
#include <algorithm>
#include <map>
#include <optional>
#include <set>

#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

#include "common/strings.h"
#include "core/call.h"
#include "core/key_id.h"
#include "core/kms.h"
#include "core/operation_params.h"

namespace custos::core {
namespace {

using policy::Action;
using policy::Operation;
using storage::KeyRecord;
using storage::KeyState;
using storage::RequestState;

constexpr size_t kMaxJustificationBytes = 2048;
constexpr size_t kMaxReasonBytes = 2048;

std::string NotPending(const Request& request) {
  return StrCat("request ", request.id, " is ", storage::RequestStateName(request.state),
                "; only PENDING requests accept approvals or rejections");
}

bool HasApproved(const Request& request, std::string_view principal) {
  return std::any_of(request.approvals.begin(), request.approvals.end(),
                     [&](const storage::Approval& a) { return a.principal == principal; });
}

}  // namespace

absl::StatusOr<Request> Kms::Propose(const Caller& caller, const Proposal& proposal) {
  Call call(*this, caller, Action::kPropose);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    if (proposal.justification.empty()) {
      return absl::InvalidArgumentError("a proposal needs a justification for the approvers");
    }
    if (proposal.justification.size() > kMaxJustificationBytes) {
      return absl::InvalidArgumentError(
          StrCat("justification is longer than ", kMaxJustificationBytes, " bytes"));
    }
    std::lock_guard lock(requests_mu_);
    const int64_t now = options_.clock->NowSeconds();
    Request request;
    request.id = NewKeyId();
    request.operation = std::string(policy::OperationName(proposal.operation));
    request.justification = proposal.justification;
    request.proposer = caller.principal;
    request.created_at = now;
    request.expires_at = now + options_.dual_control.request_ttl_seconds;
    request.parameters = EncodeParams(proposal.operation, proposal.params);
    call.event().request_id = request.id;

    if (proposal.operation == Operation::kRotateRootKey) {
      CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
      for (const Request& other : pending) {
        if (other.operation == request.operation && other.expires_at > now) {
          return absl::FailedPreconditionError(
              StrCat("root key rotation ", other.id, " is already pending"));
        }
      }
    } else if (proposal.operation == Operation::kCreateKey) {
      CUSTOS_RETURN_IF_ERROR(ValidateCreate(proposal.params.create));
      if (!proposal.params.create.alias.empty() &&
          options_.store->FindKeyByAlias(proposal.params.create.alias).ok()) {
        return absl::AlreadyExistsError(
            StrCat("alias '", proposal.params.create.alias, "' is already in use"));
      }
    } else {
      CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(proposal.key));
      call.SetKey(*key, key->primary_version);
      request.key_id = key->id;
      // Refuse now what could not execute now; Execute checks again at quorum.
      if (proposal.operation != Operation::kRotateKey) {
        CUSTOS_RETURN_IF_ERROR(Applied(*key, proposal.operation, proposal.params).status());
      } else if (key->state != KeyState::kEnabled && key->state != KeyState::kDisabled) {
        return absl::FailedPreconditionError(StrCat("RotateKey needs key ", key->id,
                                                    " to be ENABLED or DISABLED; it is ",
                                                    storage::KeyStateName(key->state)));
      }
      // One change at a time per key: two requests never both act on the state they saw.
      CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
      for (Request& other : pending) {
        if (other.key_id != key->id) continue;
        if (other.expires_at <= now) {
          CUSTOS_RETURN_IF_ERROR(Expire(std::move(other)));
          continue;
        }
        return absl::FailedPreconditionError(
            StrCat("key ", key->id, " already has pending request ", other.id, " (",
                   other.operation, "); approve, reject or let it expire first"));
      }
    }
    if (ApprovalsFor(proposal.operation) == 0) return Execute(call, request, proposal.params);
    storage::WriteBatch batch;
    batch.requests.push_back(request);
    CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
    return request;
  }());
}

absl::StatusOr<Request> Kms::LoadPending(Call& call, std::string_view request_id) {
  CUSTOS_ASSIGN_OR_RETURN(Request request, options_.store->GetRequest(request_id));
  call.event().request_id = request.id;
  call.event().key_id = request.key_id;
  if (request.state != RequestState::kPending) {
    return absl::FailedPreconditionError(NotPending(request));
  }
  if (request.expires_at <= options_.clock->NowSeconds()) {
    const std::string id = request.id;
    CUSTOS_RETURN_IF_ERROR(Expire(std::move(request)));
    return absl::FailedPreconditionError(
        StrCat("request ", id,
               " is EXPIRED; only PENDING requests accept approvals or "
               "rejections"));
  }
  return request;
}

absl::StatusOr<Request> Kms::Approve(const Caller& caller, std::string_view request_id,
                                     std::string_view expected_digest) {
  Call call(*this, caller, Action::kApprove);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    std::lock_guard lock(requests_mu_);
    CUSTOS_ASSIGN_OR_RETURN(Request request, LoadPending(call, request_id));
    if (expected_digest.empty()) {
      return absl::InvalidArgumentError(
          "an approval must name the digest of the request as reviewed (GetRequest shows it)");
    }
    if (expected_digest != RequestDigest(request)) {
      return absl::FailedPreconditionError(
          StrCat("request ", request.id,
                 " is not the request you reviewed (digest mismatch); "
                 "fetch it again and review it before approving"));
    }
    if (request.proposer == caller.principal) {
      return absl::PermissionDeniedError(StrCat("the proposer of request ", request.id,
                                                " cannot approve it; another officer "
                                                "must"));
    }
    if (HasApproved(request, caller.principal)) return request;  // a retry counts once
    request.approvals.push_back({caller.principal, options_.clock->NowSeconds()});
    const std::optional<Operation> operation = policy::ParseOperation(request.operation);
    if (!operation) return absl::InternalError("stored request has an unknown operation");
    // Approvals count only from principals who are officers now (a policy reload may have
    // taken the role away since they approved).
    const std::shared_ptr<const policy::Policy> policy = CurrentPolicy();
    const int valid = static_cast<int>(std::count_if(
        request.approvals.begin(), request.approvals.end(), [&](const storage::Approval& a) {
          return policy->RoleOf(a.principal) == policy::Role::kOfficer;
        }));
    if (valid < ApprovalsFor(*operation)) {
      storage::WriteBatch batch;
      batch.requests.push_back(request);
      CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
      return request;
    }
    CUSTOS_ASSIGN_OR_RETURN(OperationParams params, DecodeParams(*operation, request.parameters));
    return Execute(call, std::move(request), params);
  }());
}

absl::StatusOr<Request> Kms::Execute(Call& call, Request request, const OperationParams& params) {
  const Operation operation = *policy::ParseOperation(request.operation);
  storage::WriteBatch batch;
  absl::StatusOr<KeyRecord> changed = absl::InternalError("unset");
  if (operation == Operation::kRotateRootKey) return RotateRoot(call, std::move(request));
  if (operation == Operation::kCreateKey) {
    changed = NewKey({request.proposer, call.caller().peer}, params.create);
  } else {
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, options_.store->GetKey(request.key_id));
    changed = Applied(*key, operation, params);
  }
  // An unreachable HSM leaves the request as it was: the approval can simply be given again.
  if (absl::IsUnavailable(changed.status())) return changed.status();
  request.closed_at = options_.clock->NowSeconds();
  if (!changed.ok()) {
    request.state = RequestState::kFailed;
    request.reason = std::string(changed.status().message());
    batch.requests.push_back(request);
    CUSTOS_RETURN_IF_ERROR(
        call.CommitWith(std::move(batch), absl::StatusCode::kFailedPrecondition));
    return absl::FailedPreconditionError(StrCat(
        "request ", request.id, " reached its quorum but could not execute: ", request.reason));
  }
  request.state = RequestState::kExecuted;
  request.key_id = changed->id;
  request.reason =
      StrCat(request.operation, " executed; key ", changed->id, " is ",
             storage::KeyStateName(changed->state), ", primary version ", changed->primary_version);
  call.SetKey(*changed, changed->primary_version);
  batch.keys.push_back(*changed);
  batch.requests.push_back(request);
  audit::Event executed =
      ServerEvent(request.operation, changed->id, request.id, absl::StatusCode::kOk);
  executed.key_version = changed->primary_version;
  CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch), absl::StatusCode::kOk, {executed}));
  return request;
}

namespace {

// The next root label: "custos-root" -> "custos-root.2" -> "custos-root.3" ...
std::string NextRootLabel(const std::string& label) {
  const size_t dot = label.rfind('.');
  if (dot != std::string::npos && dot + 1 < label.size() && dot + 10 > label.size() &&
      label.find_first_not_of("0123456789", dot + 1) == std::string::npos) {
    return StrCat(label.substr(0, dot), ".", std::stoi(label.substr(dot + 1)) + 1);
  }
  return StrCat(label, ".2");
}

}  // namespace

absl::StatusOr<Request> Kms::RotateRoot(Call& call, Request request) {
  // Roots retired earlier that nothing depends on any more go first.
  CUSTOS_RETURN_IF_ERROR(DestroyRetiredRoots(request.id));
  const std::string old_root = CurrentRoot();
  const std::string new_root = NextRootLabel(old_root);
  // ALREADY_EXISTS: an earlier attempt was cut short; carry on where it stopped.
  absl::Status created = options_.hsm->CreateRootKey(new_root);
  if (!created.ok() && !absl::IsAlreadyExists(created)) return created;
  // Versions under a legacy root (one that does not confine what it unwraps) move to the new
  // root, inside the HSM. Versions under a confining root cannot move, by design: they stay
  // under it, and it is destroyed once the last of them is (see DestroyRetiredRoots).
  std::map<std::string, bool> confines;  // by root label
  std::set<std::string> retired = {old_root};
  size_t rewrapped = 0, kept = 0;
  std::string page_token;
  do {  // Page by page: each page commits on its own, so a crash loses no finished work.
    CUSTOS_ASSIGN_OR_RETURN(storage::KeyPage page, options_.store->ListKeys(1000, page_token));
    storage::WriteBatch batch;
    size_t moved = 0;
    for (const KeyRef& current : page.keys) {
      KeyRecord key = *current;
      bool changed = false;
      for (storage::KeyVersion& version : key.versions) {
        if (version.wrapped.empty() || version.root_key_label == new_root) continue;
        retired.insert(version.root_key_label);
        auto known = confines.find(version.root_key_label);
        if (known == confines.end()) {
          CUSTOS_ASSIGN_OR_RETURN(const bool confining,
                                  options_.hsm->RootKeyConfinesVersions(version.root_key_label));
          known = confines.emplace(version.root_key_label, confining).first;
        }
        if (known->second) {
          ++kept;
          continue;
        }
        CUSTOS_ASSIGN_OR_RETURN(Bytes wrapped,
                                options_.hsm->RewrapKey({StrCat(key.id, "/", version.version),
                                                         version.wrapped, version.root_key_label},
                                                        new_root));
        version.wrapped = std::move(wrapped);
        version.root_key_label = new_root;
        changed = true;
        ++moved;
      }
      if (changed) batch.keys.push_back(std::move(key));
    }
    if (!batch.keys.empty()) {  // each page recorded with what it moved
      audit::Event page_event =
          ServerEvent("RewrapKeyVersions", "", request.id, absl::StatusCode::kOk,
                      StrCat(moved, " versions of ", batch.keys.size(),
                             " keys re-wrapped from a legacy root under ", new_root));
      CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), {std::move(page_event)}));
    }
    rewrapped += moved;
    page_token = page.next_page_token;
  } while (!page_token.empty());

  request.state = RequestState::kExecuted;
  request.closed_at = options_.clock->NowSeconds();
  request.reason = StrCat("root key rotated from '", old_root, "' to '", new_root, "'; ", rewrapped,
                          " key versions re-wrapped from legacy roots; ", kept,
                          " stay under the confining roots that wrapped them");
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> already_retired, RetiredRoots());
  retired.insert(already_retired.begin(), already_retired.end());
  retired.erase(new_root);
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  batch.settings[kRootKeySetting] = new_root;
  // Remembered durably, so that their destruction is retried after a failure or a crash.
  batch.settings[kRetiredRootsSetting] = nlohmann::json(retired).dump();
  CUSTOS_RETURN_IF_ERROR(
      call.CommitWith(std::move(batch), absl::StatusCode::kOk,
                      {ServerEvent("RotateRootKey", "", request.id, absl::StatusCode::kOk,
                                   StrCat("new root ", new_root, "; ", rewrapped,
                                          " versions re-wrapped, ", kept, " kept"))}));
  {
    std::lock_guard lock(policy_mu_);
    root_key_label_ = new_root;
  }
  // The rotation is done; roots that still wrap versions, or cannot be destroyed now, are left
  // to maintenance.
  (void)DestroyRetiredRoots(request.id);
  return request;
}

absl::StatusOr<std::vector<std::string>> Kms::RetiredRoots() const {
  CUSTOS_ASSIGN_OR_RETURN(std::optional<std::string> stored,
                          options_.store->GetSetting(kRetiredRootsSetting));
  if (!stored || stored->empty()) return std::vector<std::string>();
  const nlohmann::json labels = nlohmann::json::parse(*stored, nullptr, /*allow_exceptions=*/false);
  if (!labels.is_array()) return absl::InternalError("the stored retired roots are not a list");
  std::vector<std::string> out;
  for (const nlohmann::json& label : labels) {
    if (!label.is_string()) return absl::InternalError("a stored retired root is not a label");
    out.push_back(label.get<std::string>());
  }
  return out;
}

absl::Status Kms::DestroyRetiredRoots(const std::string& request_id) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> retired, RetiredRoots());
  if (retired.empty()) return absl::OkStatus();
  const std::string current = CurrentRoot();
  std::vector<std::string> remaining;
  std::vector<audit::Event> events;
  absl::Status first_failure;
  for (const std::string& label : retired) {
    if (label == current) continue;  // never destroyed while new versions use it
    CUSTOS_ASSIGN_OR_RETURN(const uint64_t wrapped, options_.store->CountVersionsUnderRoot(label));
    if (wrapped > 0) {
      remaining.push_back(label);
      continue;
    }
    // Nothing refers to it any more. Destroying it bounds how long a destroyed key survives
    // in old database backups: their wrapped bytes are useless without it.
    absl::Status destroyed = options_.hsm->DestroyRootKey(label);
    if (absl::IsNotFound(destroyed)) destroyed = absl::OkStatus();  // done before a crash
    events.push_back(
        ServerEvent("DestroyRootKey", "", request_id, destroyed.code(), "root " + label));
    if (!destroyed.ok()) {
      remaining.push_back(label);
      if (first_failure.ok()) first_failure = destroyed;
    }
  }
  if (remaining.size() == retired.size() && events.empty()) return absl::OkStatus();
  storage::WriteBatch batch;
  batch.settings[kRetiredRootsSetting] = nlohmann::json(remaining).dump();
  CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), std::move(events)));
  return first_failure;
}

absl::StatusOr<Request> Kms::Reject(const Caller& caller, std::string_view request_id,
                                    std::string_view reason) {
  Call call(*this, caller, Action::kReject);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    if (reason.empty()) return absl::InvalidArgumentError("a rejection needs a reason");
    if (reason.size() > kMaxReasonBytes) {
      return absl::InvalidArgumentError(
          StrCat("reason is longer than ", kMaxReasonBytes, " bytes"));
    }
    std::lock_guard lock(requests_mu_);
    CUSTOS_ASSIGN_OR_RETURN(Request request, LoadPending(call, request_id));
    request.state = RequestState::kRejected;
    request.rejected_by = caller.principal;
    request.reason = std::string(reason);
    request.closed_at = options_.clock->NowSeconds();
    storage::WriteBatch batch;
    batch.requests.push_back(request);
    CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
    return request;
  }());
}

absl::StatusOr<Request> Kms::GetRequest(const Caller& caller, std::string_view request_id) {
  Call call(*this, caller, Action::kGetRequest);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    call.event().request_id = std::string(request_id);
    return options_.store->GetRequest(request_id);
  }());
}

absl::StatusOr<storage::RequestPage> Kms::ListRequests(const Caller& caller,
                                                       const storage::RequestFilter& filter,
                                                       size_t page_size,
                                                       std::string_view page_token) {
  Call call(*this, caller, Action::kListRequests);
  return call.Finish([&]() -> absl::StatusOr<storage::RequestPage> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    storage::RequestFilter resolved = filter;
    if (!filter.key_id.empty()) {  // an alias names the key it stands for
      CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(filter.key_id));
      resolved.key_id = key->id;
    }
    return options_.store->ListRequests(resolved, page_size, page_token);
  }());
}

absl::Status Kms::Expire(Request request) {
  request.state = RequestState::kExpired;
  request.closed_at = options_.clock->NowSeconds();
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  return Commit(std::move(batch),
                {ServerEvent("ExpireRequest", request.key_id, request.id, absl::StatusCode::kOk)});
}

absl::Status Kms::DestroyKey(const std::string& key_id) {
  CUSTOS_ASSIGN_OR_RETURN(KeyRef current, options_.store->GetKey(key_id));
  KeyRecord key = *current;
  for (storage::KeyVersion& version : key.versions) version.wrapped.clear();
  key.state = KeyState::kDestroyed;
  key.destroyed_at = options_.clock->NowSeconds();
  storage::WriteBatch batch;
  batch.keys.push_back(key);
  absl::Status written =
      Commit(std::move(batch), {ServerEvent("DestroyKey", key.id, "", absl::StatusCode::kOk)});
  if (written.ok()) {
    for (const storage::KeyVersion& version : key.versions) {
      options_.hsm->Forget(StrCat(key.id, "/", version.version));
    }
    written = options_.store->PurgeErased();
  }
  return written;
}

absl::Status Kms::RunMaintenance() {
  std::lock_guard lock(requests_mu_);
  const int64_t now = options_.clock->NowSeconds();
  CUSTOS_ASSIGN_OR_RETURN(const int64_t observed, observed_.Now());
  if (std::optional<int64_t> jump = observed_.TakeWallClockJump(kClockJumpToleranceSeconds)) {
    const std::string detail =
        StrCat("the wall clock moved ", *jump, " s against the time this server observed passing; ",
               "key destruction waits for both clocks");
    spdlog::error("clock: {}", detail);
    CUSTOS_RETURN_IF_ERROR(
        Commit({}, {ServerEvent("ClockJump", "", "", absl::StatusCode::kOk, detail)}));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
  for (Request& request : pending) {
    if (request.expires_at <= now) CUSTOS_RETURN_IF_ERROR(Expire(std::move(request)));
  }
  CUSTOS_RETURN_IF_ERROR(DestroyRetiredRoots(""));
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> due,
                          options_.store->KeysDueForDeletion(now, observed));
  for (const std::string& key_id : due) CUSTOS_RETURN_IF_ERROR(DestroyKey(key_id));
  // Rotations due by period (whatever the primary version), then those a version's usage asked
  // for (only while that version is still primary: one crossing, one rotation).
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> stale, options_.store->KeysDueForRotation(now));
  for (const std::string& key_id : stale) CUSTOS_RETURN_IF_ERROR(AutoRotate(key_id, std::nullopt));
  for (const auto& [key_id, version] : usage_.RotationWanted()) {
    CUSTOS_RETURN_IF_ERROR(AutoRotate(key_id, version));
    usage_.RotationDone(key_id, version);
  }
  CUSTOS_RETURN_IF_ERROR(observed_.Persist());
  return usage_.Flush();
}

absl::Status Kms::AutoRotate(const std::string& key_id, std::optional<uint32_t> worn_version) {
  CUSTOS_ASSIGN_OR_RETURN(KeyRef key, options_.store->GetKey(key_id));
  if (key->state != KeyState::kEnabled) return absl::OkStatus();  // nothing encrypts under it
  if (worn_version && key->primary_version != *worn_version) return absl::OkStatus();  // done
  absl::StatusOr<KeyRecord> rotated = Applied(*key, Operation::kRotateKey, {});
  if (!rotated.ok()) {
    (void)Commit({}, {ServerEvent("AutoRotateKey", key_id, "", rotated.status().code())});
    return rotated.status();
  }
  storage::WriteBatch batch;
  batch.keys.push_back(*rotated);
  audit::Event event = ServerEvent("AutoRotateKey", key_id, "", absl::StatusCode::kOk);
  event.key_version = rotated->primary_version;
  return Commit(std::move(batch), {event});
}

audit::Event Kms::ServerEvent(std::string_view action, const std::string& key_id,
                              const std::string& request_id, absl::StatusCode outcome,
                              std::string detail) const {
  audit::Event event;
  event.time = options_.clock->NowSeconds();
  event.principal = kServerPrincipal;
  event.role = "server";
  event.action = std::string(action);
  event.key_id = key_id;
  event.request_id = request_id;
  event.outcome = outcome;
  event.detail = std::move(detail);
  return event;
}

absl::Status Kms::Commit(storage::WriteBatch batch, std::vector<audit::Event> events) const {
  // seq and hash are the store's to set, in commit order.
  for (const audit::Event& e : events) batch.audit.push_back(audit::RecordFromEvent(e, 0));
  absl::Status written = options_.store->Apply(batch);
  if (absl::IsUnavailable(written) || absl::IsInternal(written)) {
    return absl::UnavailableError(StrCat("audit log unavailable: ", written.message()));
  }
  CUSTOS_RETURN_IF_ERROR(written);
  if (options_.audit != nullptr) {
    for (const audit::Event& e : events) (void)options_.audit->Append(e);  // a mirror only
  }
  // Wake maintenance (which signs a checkpoint) once, as the count crosses the threshold: if
  // signing fails, the timer retries, rather than every commit waking it again.
  const uint64_t before = records_since_checkpoint_.fetch_add(events.size());
  if (before < options_.checkpoint_every && before + events.size() >= options_.checkpoint_every &&
      options_.wake_maintenance) {
    options_.wake_maintenance();
  }
  return absl::OkStatus();
}

absl::Status Kms::Checkpoint() {
  std::lock_guard lock(checkpoint_mu_);
  // Read before the head, so records committed while signing still count towards the next.
  const uint64_t counted = records_since_checkpoint_.load();
  CUSTOS_ASSIGN_OR_RETURN(auto head, options_.store->AuditHead());
  if (head.first == 0) return absl::OkStatus();
  CUSTOS_ASSIGN_OR_RETURN(std::optional<audit::Checkpoint> latest,
                          options_.store->LatestCheckpoint());
  if (latest && latest->seq == head.first) {  // signed already: those records are covered
    records_since_checkpoint_ -= counted;
    return absl::OkStatus();
  }
  audit::Checkpoint checkpoint;
  checkpoint.seq = head.first;
  checkpoint.hash = head.second;
  checkpoint.time = options_.clock->NowSeconds();
  checkpoint.key_label = options_.audit_signing_key_label;
  const std::string message =
      audit::CheckpointMessage(checkpoint.seq, checkpoint.hash, checkpoint.time);
  CUSTOS_ASSIGN_OR_RETURN(
      checkpoint.signature,
      options_.hsm->SignSha256(
          checkpoint.key_label,
          std::span(reinterpret_cast<const uint8_t*>(message.data()), message.size())));
  CUSTOS_RETURN_IF_ERROR(options_.store->PutCheckpoint(checkpoint));
  // Records that came while signing may have made the next checkpoint due already; their
  // commits saw the count above the threshold and woke nobody.
  if ((records_since_checkpoint_ -= counted) >= options_.checkpoint_every &&
      options_.wake_maintenance) {
    options_.wake_maintenance();
  }
  return absl::OkStatus();
}

absl::StatusOr<Kms::SignedCheckpoint> Kms::LatestCheckpoint(const Caller& caller) {
  Call call(*this, caller, Action::kReadAudit);
  return call.Finish([&]() -> absl::StatusOr<SignedCheckpoint> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(Checkpoint());  // so the auditor sees the log as of now
    CUSTOS_ASSIGN_OR_RETURN(std::optional<audit::Checkpoint> latest,
                            options_.store->LatestCheckpoint());
    if (!latest) return absl::NotFoundError("the audit log has no checkpoint yet");
    SignedCheckpoint signed_checkpoint;
    signed_checkpoint.message = audit::CheckpointMessage(latest->seq, latest->hash, latest->time);
    CUSTOS_ASSIGN_OR_RETURN(signed_checkpoint.public_key_pem,
                            options_.hsm->PublicKeyPem(latest->key_label));
    signed_checkpoint.checkpoint = *std::move(latest);
    return signed_checkpoint;
  }());
}

absl::StatusOr<std::vector<audit::Record>> Kms::ReadAudit(const Caller& caller, uint64_t from_seq,
                                                          size_t limit) {
  Call call(*this, caller, Action::kReadAudit);
  return call.Finish([&]() -> absl::StatusOr<std::vector<audit::Record>> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    return options_.store->ReadAudit(from_seq, limit);
  }());
}

absl::StatusOr<std::vector<audit::Checkpoint>> Kms::ReadCheckpoints(const Caller& caller,
                                                                    uint64_t from_seq,
                                                                    size_t limit) {
  Call call(*this, caller, Action::kReadAudit);
  return call.Finish([&]() -> absl::StatusOr<std::vector<audit::Checkpoint>> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    return options_.store->ReadCheckpoints(from_seq, limit);
  }());
}

absl::StatusOr<std::string> Kms::ContextHmac(const EncryptionContext& context) const {
  if (context.empty()) return std::string();
  Bytes canonical;
  AppendCanonicalContext(context, canonical);
  CUSTOS_ASSIGN_OR_RETURN(Bytes mac,
                          options_.hsm->HmacSha256(options_.audit_hmac_key_label, canonical));
  return audit::ToHex(mac);
}

absl::Status Kms::RecordServerStart() {
  const std::string root = CurrentRoot();
  CUSTOS_ASSIGN_OR_RETURN(const bool confines, options_.hsm->RootKeyConfinesVersions(root));
  return Commit({}, {ServerEvent("ServerStart", "", "", absl::StatusCode::kOk,
                                 StrCat("root ", root, confines ? " (confining)" : " (legacy)")),
                     ServerEvent("LoadPolicy", "", "", absl::StatusCode::kOk,
                                 StrCat("policy sha256=", CurrentPolicy()->sha256_hex()))});
}

absl::Status Kms::RecordServerStop() {
  return Commit({}, {ServerEvent("ServerStop", "", "", absl::StatusCode::kOk)});
}

absl::Status Kms::RecordAuthenticationRefusal(std::string_view rpc, std::string peer,
                                              std::string_view reason) {
  audit::Event event;
  event.time = options_.clock->NowSeconds();
  event.action = std::string(rpc);
  event.outcome = absl::StatusCode::kUnauthenticated;
  event.peer = std::move(peer);
  event.detail = std::string(reason);
  return Commit({}, {std::move(event)});
}

absl::Status Kms::ReplacePolicy(std::shared_ptr<const policy::Policy> policy) {
  CUSTOS_RETURN_IF_ERROR(policy::CheckQuorumsReachable(options_.dual_control, *policy));
  // Held throughout, so no key change validated against the old policy slips in meanwhile.
  std::lock_guard requests_lock(requests_mu_);
  std::string page_token;
  do {
    CUSTOS_ASSIGN_OR_RETURN(storage::KeyPage page, options_.store->ListKeys(1000, page_token));
    for (const KeyRef& key : page.keys) {
      for (const auto* grants : {&key->encrypt_grants, &key->decrypt_grants}) {
        for (const std::string& principal : *grants) {
          const std::optional<policy::Role> role = policy->RoleOf(principal);
          if (role && *role != policy::Role::kApp) {
            return absl::FailedPreconditionError(StrCat(
                "principal '", principal, "' would hold role '", policy::RoleName(*role),
                "' but key ", key->id, " grants it use of key material; revoke the grant first"));
          }
        }
      }
    }
    page_token = page.next_page_token;
  } while (!page_token.empty());
  const std::string detail = StrCat("policy sha256=", policy->sha256_hex());
  {
    std::lock_guard lock(policy_mu_);
    policy_ = std::move(policy);
  }
  return Commit({}, {ServerEvent("LoadPolicy", "", "", absl::StatusCode::kOk, detail)});
}

}  // namespace custos::core
