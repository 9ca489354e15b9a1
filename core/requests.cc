// Dual control: proposals, approvals, rejections and expiry of key-management requests, and
// the one place that executes an approved request.
#include <algorithm>

#include "common/strings.h"
#include "core/call.h"
#include "core/key_id.h"
#include "core/kms.h"
#include "core/operation_params.h"
#include "storage/row_codec.h"

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

// Requests about the whole server, not one key: they lock it exclusively, and one of each
// kind may be pending.
bool IsServerWide(Operation operation) {
  return operation == Operation::kRotateRootKey || operation == Operation::kReAnchorAuditLog ||
         operation == Operation::kArchiveAuditLog;
}

// The request a call names, for its audit record from the start (a refused approval or
// rejection says which request it was for): only as a canonical request id, so that what a
// caller sends in its place (any bytes, up to a message's size) never reaches the log. Only
// in the canonical (lower-case) form that lookups match: an upper-cased id finds no request,
// and its record must not name one.
std::string NamedRequest(std::string_view request_id) {
  const std::optional<KeyIdBytes> id = ParseKeyId(request_id);
  if (!id || FormatKeyId(*id) != request_id) return std::string();
  return std::string(request_id);
}

// A request id as Propose returns them; anything else is the caller's mistake, not a lookup.
absl::Status CheckRequestId(std::string_view request_id) {
  if (!NamedRequest(request_id).empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      "request_id is not a request id: Propose returns them as lower-case UUIDs");
}

// What a change's lock name (Kms::LockNameOf) names, in an officer's words.
std::string TargetWords(std::string_view lock_name) {
  const size_t slash = lock_name.find('/');
  const std::string_view kind = lock_name.substr(0, slash);
  const std::string_view rest = lock_name.substr(slash + 1);
  if (kind == "key") return StrCat("key ", rest);
  if (kind == "alias") return StrCat("alias '", rest, "'");
  if (kind == "db-token") return StrCat("database token ", rest);
  if (const size_t last = rest.rfind('/'); kind == "tde" && last != std::string_view::npos) {
    return StrCat("key id ", rest.substr(last + 1), " of mount '", rest.substr(0, last), "'");
  }
  return std::string(lock_name);
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
    if (proposal.operation != Operation::kReAnchorAuditLog) {
      CUSTOS_RETURN_IF_ERROR(ServingAllowed(proposal.operation));
    } else if (AnchorProblem().empty()) {
      // Not stored: approvals given while the log is sound must not count toward re-anchoring
      // it after a later restore or edit.
      return NothingToReAnchor();
    }
    if (proposal.justification.empty()) {
      return absl::InvalidArgumentError("a proposal needs a justification for the approvers");
    }
    if (proposal.justification.size() > kMaxJustificationBytes) {
      return absl::InvalidArgumentError(
          StrCat("justification is longer than ", kMaxJustificationBytes, " bytes"));
    }
    // A field the operation does not use would be dropped from what officers approve.
    const bool server_wide = IsServerWide(proposal.operation);
    if (!proposal.key.empty() && (server_wide || proposal.operation == Operation::kCreateKey ||
                                  policy::IsGatewayOperation(proposal.operation))) {
      return absl::InvalidArgumentError(
          StrCat("key does not apply to ", policy::OperationName(proposal.operation),
                 ": the request would be stored, approved and executed without it"));
    }
    CUSTOS_RETURN_IF_ERROR(RefuseUnusedParams(proposal.operation, proposal.params));
    // Server-wide requests lock the server; the others, the key they change (found first to
    // learn its id, then read again under the lock, as it is now).
    CUSTOS_ASSIGN_OR_RETURN(const ChangeLock lock, [&]() -> absl::StatusOr<ChangeLock> {
      if (server_wide) return LockServer();
      if (proposal.operation == Operation::kCreateKey ||
          policy::IsGatewayOperation(proposal.operation)) {
        return LockShared(TargetLockName(proposal.operation, proposal.params));
      }
      CUSTOS_ASSIGN_OR_RETURN(KeyRef found, FindKey(proposal.key));
      return LockShared(KeyLockName(found->id));
    }());
    // Expiry by the later of the wall clock and observed time (ObservedTime::WallBounds).
    const ObservedTime::Bounds time = observed_.WallBounds();
    const int64_t now = time.latest;
    Request request;
    request.id = NewKeyId();
    request.operation = std::string(policy::OperationName(proposal.operation));
    request.justification = proposal.justification;
    request.proposer = caller.principal;
    request.created_at = options_.clock->NowSeconds();
    request.expires_at = now + options_.dual_control.request_ttl_seconds;
    request.parameters = EncodeParams(proposal.operation, proposal.params);

    if (server_wide) {
      if (proposal.operation == Operation::kRotateRootKey) {
        CUSTOS_RETURN_IF_ERROR(NoRootMigrationRunning());
      }
      if (proposal.operation == Operation::kArchiveAuditLog) {
        CUSTOS_RETURN_IF_ERROR(CheckArchiveProposal(proposal.params.archive_through));
      }
      CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
      for (const Request& other : pending) {
        if (other.operation == request.operation && other.expires_at > now) {
          return absl::FailedPreconditionError(
              StrCat(request.operation, " request ", other.id, " is already pending"));
        }
      }
    } else if (proposal.operation == Operation::kCreateKey) {
      CUSTOS_RETURN_IF_ERROR(ValidateCreate(proposal.params.create));
      CUSTOS_RETURN_IF_ERROR(CheckAliasFree(call, proposal.params.create.alias));
    } else if (policy::IsGatewayOperation(proposal.operation)) {
      CUSTOS_RETURN_IF_ERROR(CheckGatewayProposal(proposal.operation, proposal.params));
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
    }
    // One change at a time per key, table-space key, token or new key's alias: two requests
    // never both act on the state they saw (nor does the second fail at its quorum).
    if (!server_wide) {
      CUSTOS_RETURN_IF_ERROR(RefusePending(request.key_id.empty()
                                               ? TargetLockName(proposal.operation, proposal.params)
                                               : KeyLockName(request.key_id),
                                           now));
    }
    // Named in the record only now: a refused proposal stores no request.
    call.event().request_id = request.id;
    if (ApprovalsFor(proposal.operation, proposal.params) == 0) {
      absl::StatusOr<Request> executed = Execute(call, request, proposal.params);
      // Nor one it did not store after all (the HSM unreachable, the commit failed); a request
      // that failed is stored, closed, with the call's record.
      if (!executed.ok() && !call.recorded()) call.event().request_id.clear();
      return executed;
    }
    storage::WriteBatch batch;
    batch.requests.push_back(request);
    call.event().row = storage::RequestRowName(request.id);
    CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
    return request;
  }());
}

absl::Status Kms::RefusePending(const std::string& target, int64_t now) {
  if (target.empty()) return absl::OkStatus();
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
  for (Request& other : pending) {
    if (LockNameOf(other) != target) continue;
    if (other.expires_at <= now) {
      CUSTOS_RETURN_IF_ERROR(Expire(std::move(other)));
      continue;
    }
    return absl::FailedPreconditionError(
        StrCat(TargetWords(target), " already has pending request ", other.id, " (",
               other.operation, "); approve, reject or let it expire first"));
  }
  return absl::OkStatus();
}

std::string Kms::TargetLockName(Operation operation, const OperationParams& params) {
  if (operation == Operation::kCreateKey) {
    return params.create.alias.empty() ? "" : "alias/" + params.create.alias;
  }
  return GatewayLockName(operation, params);
}

Kms::ChangeLock Kms::LockServer() {
  ChangeLock lock;
  lock.exclusive = std::unique_lock(requests_mu_);
  return lock;
}

Kms::ChangeLock Kms::LockShared(const std::string& name) {
  ChangeLock lock;
  if (!name.empty()) lock.held = key_locks_.Lock(name);
  lock.shared = std::shared_lock(requests_mu_);
  return lock;
}

std::string Kms::LockNameOf(const Request& request) {
  if (!request.key_id.empty()) return KeyLockName(request.key_id);
  if (const std::optional<Operation> operation = policy::ParseOperation(request.operation)) {
    const absl::StatusOr<OperationParams> params = DecodeParams(*operation, request.parameters);
    if (params.ok()) {
      if (std::string name = TargetLockName(*operation, *params); !name.empty()) return name;
    }
  }
  return "request/" + request.id;
}

absl::StatusOr<Kms::ChangeLock> Kms::LockRequest(std::string_view request_id) {
  // Read before locking, to learn what to lock; what the request names never changes.
  CUSTOS_ASSIGN_OR_RETURN(const Request request, options_.store->GetRequest(request_id));
  const std::optional<Operation> operation = policy::ParseOperation(request.operation);
  if (operation && IsServerWide(*operation)) return LockServer();
  return LockShared(LockNameOf(request));
}

absl::StatusOr<Request> Kms::LoadPending(Call& call, std::string_view request_id) {
  CUSTOS_ASSIGN_OR_RETURN(Request request, options_.store->GetRequest(request_id));
  call.event().request_id = request.id;
  call.event().key_id = request.key_id;
  if (request.state != RequestState::kPending) {
    return absl::FailedPreconditionError(NotPending(request));
  }
  const ObservedTime::Bounds time = observed_.WallBounds();
  if (request.expires_at <= time.latest) {
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
  call.event().request_id = NamedRequest(request_id);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(CheckRequestId(request_id));
    if (expected_digest.empty()) {
      return absl::InvalidArgumentError(
          "an approval must name the digest of the request as reviewed (GetRequest shows it)");
    }
    CUSTOS_ASSIGN_OR_RETURN(ChangeLock lock, LockRequest(request_id));
    CUSTOS_ASSIGN_OR_RETURN(Request request, LoadPending(call, request_id));
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
    CUSTOS_ASSIGN_OR_RETURN(OperationParams params, DecodeParams(*operation, request.parameters));
    if (valid < ApprovalsFor(*operation, params)) {
      storage::WriteBatch batch;
      batch.requests.push_back(request);
      call.event().row = storage::RequestRowName(request.id);
      CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
      return request;
    }
    return Execute(call, std::move(request), params);
  }());
}

int Kms::ApprovalsFor(Operation operation, const OperationParams& params) const {
  const policy::DualControlConfig& config = options_.dual_control;
  const bool grants =
      !params.create.encrypt_principals.empty() || !params.create.decrypt_principals.empty();
  if (operation == Operation::kCreateKey && grants) {
    return std::max(config.ApprovalsFor(operation),
                    config.ApprovalsFor(Operation::kUpdateKeyGrants));
  }
  return config.ApprovalsFor(operation);
}

int Kms::ApprovalsFor(const Request& request) const {
  const std::optional<Operation> operation = policy::ParseOperation(request.operation);
  if (!operation) return 0;
  const absl::StatusOr<OperationParams> params = DecodeParams(*operation, request.parameters);
  return params.ok() ? ApprovalsFor(*operation, *params)
                     : options_.dual_control.ApprovalsFor(*operation);
}

absl::StatusOr<Request> Kms::Execute(Call& call, Request request, const OperationParams& params) {
  const Operation operation = *policy::ParseOperation(request.operation);
  storage::WriteBatch batch;
  absl::StatusOr<KeyRecord> changed = absl::InternalError("unset");
  // Checked again now, against the policy as it is: the proposer may have lost the role, or a
  // grantee stopped being an app, since the proposal.
  if (CurrentPolicy()->RoleOf(request.proposer) != policy::Role::kOfficer) {
    changed = absl::FailedPreconditionError(
        StrCat("its proposer '", request.proposer, "' is no longer an officer"));
  } else if (operation == Operation::kReAnchorAuditLog) {
    return ReAnchor(call, std::move(request));
  } else if (const absl::Status serving = ServingAllowed(operation); !serving.ok()) {
    return serving;
  } else if (operation == Operation::kRotateRootKey) {
    return RotateRoot(call, std::move(request));
  } else if (operation == Operation::kArchiveAuditLog) {
    return ArchiveAudit(call, std::move(request), params.archive_through);
  } else if (policy::IsGatewayOperation(operation)) {
    return ExecuteGateway(call, std::move(request), params);
  } else if (operation == Operation::kCreateKey) {
    absl::Status valid = ValidateCreate(params.create);
    // Taken since the proposal (a key made without grants needs no approval): the request
    // fails, before the HSM makes a version for nothing, rather than stay pending.
    if (valid.ok() && !params.create.alias.empty()) {
      const absl::Status holder = options_.store->FindKeyByAlias(params.create.alias).status();
      if (holder.ok() || absl::IsDataLoss(holder)) {  // (a refused row holds it too)
        valid = absl::FailedPreconditionError(
            StrCat("alias '", params.create.alias, "' was taken after it was proposed"));
      } else if (!absl::IsNotFound(holder)) {
        valid = holder;  // UNAVAILABLE leaves the request pending, as below
      }
    }
    changed = valid.ok() ? NewKey({request.proposer, call.caller().peer}, params.create)
                         : absl::StatusOr<KeyRecord>(valid);
  } else {
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, options_.store->GetKey(request.key_id));
    changed = Applied(*key, operation, params);
  }
  // An unreachable HSM leaves the request as it was: the approval can simply be given again.
  if (absl::IsUnavailable(changed.status())) return changed.status();
  if (!changed.ok()) return CloseFailed(call, std::move(request), changed.status());
  request.closed_at = options_.clock->NowSeconds();
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
  // Two rows change: the request (the approval's record) and the key (the execution's).
  call.event().row = storage::RequestRowName(request.id);
  executed.row = storage::KeyRowName(changed->id);
  CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch), absl::StatusCode::kOk, {executed}));
  return request;
}

absl::StatusOr<Request> Kms::CloseFailed(Call& call, Request request, const absl::Status& failed) {
  request.closed_at = options_.clock->NowSeconds();
  request.state = RequestState::kFailed;
  request.reason = std::string(failed.message());
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  call.event().row = storage::RequestRowName(request.id);
  CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch), absl::StatusCode::kFailedPrecondition));
  return absl::FailedPreconditionError(StrCat(
      "request ", request.id, " reached its quorum but could not execute: ", request.reason));
}

absl::StatusOr<Request> Kms::Reject(const Caller& caller, std::string_view request_id,
                                    std::string_view reason) {
  Call call(*this, caller, Action::kReject);
  call.event().request_id = NamedRequest(request_id);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(CheckRequestId(request_id));
    if (reason.empty()) return absl::InvalidArgumentError("a rejection needs a reason");
    if (reason.size() > kMaxReasonBytes) {
      return absl::InvalidArgumentError(
          StrCat("reason is longer than ", kMaxReasonBytes, " bytes"));
    }
    CUSTOS_ASSIGN_OR_RETURN(ChangeLock lock, LockRequest(request_id));
    CUSTOS_ASSIGN_OR_RETURN(Request request, LoadPending(call, request_id));
    request.state = RequestState::kRejected;
    request.rejected_by = caller.principal;
    request.reason = std::string(reason);
    request.closed_at = options_.clock->NowSeconds();
    storage::WriteBatch batch;
    batch.requests.push_back(request);
    call.event().row = storage::RequestRowName(request.id);
    CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
    return request;
  }());
}

absl::StatusOr<Request> Kms::GetRequest(const Caller& caller, std::string_view request_id) {
  Call call(*this, caller, Action::kGetRequest);
  call.event().request_id = NamedRequest(request_id);
  return call.Finish([&]() -> absl::StatusOr<Request> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(CheckRequestId(request_id));
    CUSTOS_ASSIGN_OR_RETURN(Request request, options_.store->GetRequest(request_id));
    return WithProgress(std::move(request));
  }());
}

absl::StatusOr<storage::RequestPage> Kms::ListRequests(const Caller& caller,
                                                       const storage::RequestFilter& filter,
                                                       size_t page_size,
                                                       std::string_view page_token) {
  Call call(*this, caller, Action::kListRequests);
  return call.Finish([&]() -> absl::StatusOr<storage::RequestPage> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    if (filter.state &&
        (*filter.state < RequestState::kPending || *filter.state > RequestState::kFailed)) {
      return absl::InvalidArgumentError(
          "state must be PENDING, EXECUTED, REJECTED, EXPIRED or FAILED (or unset, for all)");
    }
    storage::RequestFilter resolved = filter;
    if (!filter.key_id.empty()) {  // an alias names the key it stands for
      CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(filter.key_id));
      resolved.key_id = key->id;
    }
    CUSTOS_ASSIGN_OR_RETURN(storage::RequestPage page,
                            options_.store->ListRequests(resolved, page_size, page_token));
    for (Request& request : page.requests) request = WithProgress(std::move(request));
    return page;
  }());
}

absl::Status Kms::Expire(Request request) {
  request.state = RequestState::kExpired;
  request.closed_at = options_.clock->NowSeconds();
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  audit::Event expired =
      ServerEvent("ExpireRequest", request.key_id, request.id, absl::StatusCode::kOk);
  expired.row = storage::RequestRowName(request.id);
  return Commit(std::move(batch), {std::move(expired)});
}

}  // namespace custos::core
