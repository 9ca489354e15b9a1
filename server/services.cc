#include "server/services.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <set>

#include "common/strings.h"
#include "core/operation_params.h"
#include "policy/policy.h"
#include "server/audit_proto.h"
#include "server/grpc_status.h"
#include "server/peer_identity.h"
#include "spdlog/spdlog.h"

namespace custos::server {
namespace {

using core::EncryptionContext;
namespace pb = custos::v1;

EncryptionContext ToContext(const google::protobuf::Map<std::string, std::string>& map) {
  return EncryptionContext(map.begin(), map.end());
}

std::span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

std::string ToString(const Bytes& b) { return std::string(b.begin(), b.end()); }

// The reply needs its own copy of a plaintext, wiped when gRPC releases the reply
// (WipingAllocator); gRPC's serialised and TLS buffers are freed unwiped (see
// docs/ARCHITECTURE.md, "Plaintext in memory").
void SetPlaintext(const SecureBytes& plaintext, std::string* field) {
  field->assign(plaintext.view());
}

void FillDataKey(const core::DataKey& key, pb::GenerateDataKeyResponse* out) {
  if (!key.plaintext.empty()) SetPlaintext(key.plaintext, out->mutable_plaintext());
  out->set_ciphertext_blob(ToString(key.ciphertext_blob));
  out->set_key_id(key.key_id);
  out->set_key_version(key.key_version);
}

void FillPlaintext(const core::Plaintext& opened, pb::DecryptResponse* out) {
  SetPlaintext(opened.plaintext, out->mutable_plaintext());
  out->set_key_id(opened.key_id);
  out->set_key_version(opened.key_version);
}

void FillReEncrypted(const core::ReEncrypted& result, pb::ReEncryptResponse* out) {
  out->set_ciphertext_blob(ToString(result.destination.ciphertext_blob));
  out->set_source_key_id(result.source_key_id);
  out->set_source_key_version(result.source_key_version);
  out->set_key_id(result.destination.key_id);
  out->set_key_version(result.destination.key_version);
}

// A batch larger than Kms takes is refused before it queues: its parsed request is the
// largest thing a caller can make a worker hold.
absl::Status BatchSize(int items) {
  if (items <= static_cast<int>(core::kMaxBatchItems)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      StrCat("a batch holds 1 to ", core::kMaxBatchItems, " items; this one holds ", items));
}

// One batch item's outcome, as the single call would have answered it.
void SetItemStatus(const absl::Status& status, pb::ItemStatus* out) {
  const grpc::Status mapped = ToGrpcStatus(status);
  out->set_code(mapped.error_code());
  out->set_message(mapped.error_message());
}

// 0 for a spec this server does not know: Kms refuses that size with INVALID_ARGUMENT.
size_t DataKeyBytes(pb::DataKeySpec spec) {
  switch (spec) {
    case pb::DATA_KEY_SPEC_UNSPECIFIED:
    case pb::AES_256:
      return 32;
    case pb::AES_128:
      return 16;
    default:
      return 0;
  }
}

// Times are Timestamps of whole seconds; the store's 0 ("never") leaves one unset.
void FillMetadata(const storage::KeyRecord& key, pb::KeyMetadata* out,
                  const std::vector<storage::VersionUsage>& usage = {}) {
  out->set_key_id(key.id);
  out->set_alias(key.alias);
  out->set_description(key.description);
  out->mutable_tags()->insert(key.tags.begin(), key.tags.end());
  out->set_state(static_cast<pb::KeyState>(key.state));
  out->mutable_create_time()->set_seconds(key.created_at);
  out->set_created_by(key.created_by);
  out->set_primary_version(key.primary_version);
  for (const storage::KeyVersion& v : key.versions) {
    pb::KeyVersionMetadata* version = out->add_versions();
    version->set_version(v.version);
    version->mutable_create_time()->set_seconds(v.created_at);
    version->set_retired(v.version < key.min_decrypt_version);
    for (const storage::VersionUsage& u : usage) {
      if (u.version != v.version) continue;
      version->set_encryptions(u.encryptions);
      version->set_decryptions(u.decryptions);
      if (u.last_used_at != 0) version->mutable_last_used_time()->set_seconds(u.last_used_at);
    }
  }
  for (const std::string& p : key.encrypt_grants) out->add_encrypt_principals(p);
  for (const std::string& p : key.decrypt_grants) out->add_decrypt_principals(p);
  out->set_min_decrypt_version(key.min_decrypt_version);
  if (key.deletion_due_at != 0) out->mutable_deletion_time()->set_seconds(key.deletion_due_at);
  if (key.destroyed_at != 0) out->mutable_destroy_time()->set_seconds(key.destroyed_at);
  out->set_rotation_period_days(static_cast<uint32_t>(key.rotation_period_seconds / policy::kDay));
  out->set_integrity_problem(key.integrity_problem);
}

// custos.v1.Operation <-> policy::Operation, by position in one table.
constexpr std::pair<pb::Operation, policy::Operation> kOperations[] = {
    {pb::CREATE_KEY, policy::Operation::kCreateKey},
    {pb::ROTATE_KEY, policy::Operation::kRotateKey},
    {pb::DISABLE_KEY, policy::Operation::kDisableKey},
    {pb::ENABLE_KEY, policy::Operation::kEnableKey},
    {pb::SCHEDULE_KEY_DELETION, policy::Operation::kScheduleKeyDeletion},
    {pb::CANCEL_KEY_DELETION, policy::Operation::kCancelKeyDeletion},
    {pb::UPDATE_KEY_GRANTS, policy::Operation::kUpdateKeyGrants},
    {pb::SET_MIN_DECRYPT_VERSION, policy::Operation::kSetMinDecryptVersion},
    {pb::ROTATE_ROOT_KEY, policy::Operation::kRotateRootKey},
    {pb::RE_ANCHOR_AUDIT_LOG, policy::Operation::kReAnchorAuditLog},
    {pb::ARCHIVE_AUDIT_LOG, policy::Operation::kArchiveAuditLog},
    {pb::CREATE_TDE_KEY, policy::Operation::kCreateTdeKey},
    {pb::ROTATE_TDE_KEY, policy::Operation::kRotateTdeKey},
    {pb::ISSUE_DATABASE_TOKEN, policy::Operation::kIssueDatabaseToken},
    {pb::REVOKE_DATABASE_TOKEN, policy::Operation::kRevokeDatabaseToken},
};

std::optional<policy::Operation> FromProto(pb::Operation operation) {
  for (const auto& [proto, domain] : kOperations) {
    if (proto == operation) return domain;
  }
  return std::nullopt;
}

pb::Operation ToProto(std::string_view operation_name) {
  for (const auto& [proto, domain] : kOperations) {
    if (policy::OperationName(domain) == operation_name) return proto;
  }
  return pb::OPERATION_UNSPECIFIED;
}

core::CreateKeyParams ToCreateParams(const pb::CreateKeyRequest& request) {
  core::CreateKeyParams params;
  params.alias = request.alias();
  params.description = request.description();
  params.tags.insert(request.tags().begin(), request.tags().end());
  params.encrypt_principals.insert(request.encrypt_principals().begin(),
                                   request.encrypt_principals().end());
  params.decrypt_principals.insert(request.decrypt_principals().begin(),
                                   request.decrypt_principals().end());
  params.rotation_period_days = request.rotation_period_days();
  return params;
}

void FillRequest(const core::Request& request, int approvals_required, pb::ChangeRequest* out) {
  out->set_request_id(request.id);
  out->set_operation(ToProto(request.operation));
  out->set_key_id(request.key_id);
  out->set_parameters(request.parameters);
  out->set_justification(request.justification);
  out->set_proposer(request.proposer);
  out->mutable_create_time()->set_seconds(request.created_at);
  out->mutable_expire_time()->set_seconds(request.expires_at);
  out->set_state(static_cast<pb::RequestState>(request.state));
  for (const storage::Approval& a : request.approvals) {
    pb::Approval* approval = out->add_approvals();
    approval->set_principal(a.principal);
    approval->mutable_time()->set_seconds(a.at);
  }
  out->set_approvals_required(static_cast<uint32_t>(approvals_required));
  out->set_rejected_by(request.rejected_by);
  out->set_reason(request.reason);
  if (request.closed_at != 0) out->mutable_close_time()->set_seconds(request.closed_at);
  out->set_digest(core::RequestDigest(request));
  out->set_integrity_problem(request.integrity_problem);
  out->set_progress(request.progress);
}

// A change request as the reply, with the approvals it needs under the current config.
grpc::Status ReplyWith(core::Kms& kms, const absl::StatusOr<core::Request>& request,
                       pb::ChangeRequest* response) {
  if (!request.ok()) return ToGrpcStatus(request.status());
  FillRequest(*request, kms.ApprovalsFor(*request), response);
  return grpc::Status::OK;
}

// A call without a usable identity is refused, and the refusal recorded (fail closed: the
// caller hears UNAVAILABLE if the audit log cannot take the record); its repeats from the same
// address within the interval are counted instead, one tally record each interval.
grpc::Status RefuseUnauthenticated(core::Kms& kms, RefusalRecorder& refusals, std::string_view rpc,
                                   const grpc::ServerContextBase& context,
                                   const absl::Status& refusal) {
  if (refusals.CountRepeat(rpc, "", context.peer(), absl::StatusCode::kUnauthenticated,
                           std::string(refusal.message()))) {
    return ToGrpcStatus(refusal);
  }
  const absl::Status recorded =
      kms.RecordAuthenticationRefusal(rpc, context.peer(), std::string(refusal.message()));
  return ToGrpcStatus(recorded.ok() ? refusal : recorded);
}

}  // namespace

CallRunner::CallRunner(core::Kms* kms, RefusalRecorder* refusals, Threads threads,
                       size_t max_waiting)
    : kms_(kms),
      refusals_(refusals),
      data_queue_(threads.data, max_waiting),
      officer_queue_(threads.admin, max_waiting),
      auditor_queue_(threads.admin, max_waiting) {}

WorkQueue& CallRunner::QueueOf(const grpc::ServerContextBase& context) {
  // By role, not by service: an application calling AdminService (denied there) queues with
  // the applications, so that it cannot fill the officers' lane.
  const absl::StatusOr<core::Caller> caller = CallerOf(context);
  if (!caller.ok()) return data_queue_;
  const std::optional<policy::Role> role = kms_->RoleOf(caller->principal);
  if (role == policy::Role::kOfficer) return officer_queue_;
  if (role == policy::Role::kAuditor) return auditor_queue_;
  return data_queue_;
}

absl::Status CallRunner::RateLimited(grpc::CallbackServerContext& context) {
  if (per_peer_ != nullptr) {
    const std::string address = PeerAddress(context.peer());
    if (!per_peer_->Allow(address)) {
      return absl::ResourceExhaustedError(
          StrCat("rate limit: calls from ", address, " exceed ", per_peer_->per_second(),
                 " a second (server.rate_limit_per_peer); retry with backoff"));
    }
  }
  if (per_principal_ != nullptr) {
    // Only an authenticated caller has a principal to count; the others are refused anyway.
    const absl::StatusOr<core::Caller> caller = CallerOf(context);
    if (caller.ok() && !per_principal_->Allow(caller->principal)) {
      return absl::ResourceExhaustedError(
          StrCat("rate limit: calls from principal '", caller->principal, "' exceed ",
                 per_principal_->per_second(),
                 " a second (server.rate_limit_per_principal); retry with backoff"));
    }
  }
  return absl::OkStatus();
}

void CallRunner::Answered(const char* rpc, grpc::StatusCode code,
                          std::chrono::steady_clock::time_point arrived) const {
  if (metrics_ == nullptr) return;
  metrics_
      ->GetCounter("custos_requests_total", "Calls answered, by method and status code",
                   {{"method", rpc}, {"code", StatusCodeName(code)}})
      .Add();
  metrics_
      ->GetHistogram("custos_request_duration_seconds",
                     "Calls from arrival to answer (queueing included), by method",
                     {{"method", rpc}})
      .Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - arrived).count());
}

grpc::ServerUnaryReactor* CallRunner::Run(grpc::CallbackServerContext* context, const char* rpc,
                                          Work work) {
  const auto arrived = std::chrono::steady_clock::now();
  if (absl::Status limited = RateLimited(*context); !limited.ok()) {
    ++rate_limited_;
    return Refuse(context, rpc, limited);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  WorkQueue& queue = QueueOf(*context);
  const bool queued =
      queue.TrySubmit([this, context, reactor, rpc, arrived, work = std::move(work)] {
        const grpc::Status status = Execute(*context, rpc, work);
        Answered(rpc, status.error_code(), arrived);
        reactor->Finish(status);
      });
  if (!queued) {
    ++refused_;
    const std::string reason = StrCat("custosd is at capacity: ", queue.max_waiting(),
                                      " calls are waiting already (server.max_waiting_calls)");
    absl::StatusOr<core::Caller> caller = CallerOf(*context);
    refusals_->Refused(rpc, caller.ok() ? std::move(caller->principal) : std::string(),
                       context->peer(), absl::StatusCode::kResourceExhausted, reason);
    Answered(rpc, grpc::StatusCode::RESOURCE_EXHAUSTED, arrived);
    reactor->Finish(
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, StrCat(reason, "; retry with backoff")));
  }
  return reactor;
}

grpc::ServerUnaryReactor* CallRunner::Refuse(grpc::CallbackServerContext* context, const char* rpc,
                                             const absl::Status& refusal) {
  absl::StatusOr<core::Caller> caller = CallerOf(*context);
  refusals_->Refused(rpc, caller.ok() ? std::move(caller->principal) : std::string(),
                     context->peer(), refusal.code(), std::string(refusal.message()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const grpc::Status status = ToGrpcStatus(refusal);
  Answered(rpc, status.error_code(), std::chrono::steady_clock::now());
  reactor->Finish(status);
  return reactor;
}

grpc::Status CallRunner::Execute(const grpc::CallbackServerContext& context, const char* rpc,
                                 const Work& work) {
  // Nobody is waiting for the answer: do no HSM work and write no record for it.
  if (context.IsCancelled()) {
    ++abandoned_;
    return grpc::Status::CANCELLED;
  }
  if (context.deadline() <= std::chrono::system_clock::now()) {
    ++abandoned_;
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                        "the call's deadline passed while it waited in custosd's queue");
  }
  absl::StatusOr<core::Caller> caller = CallerOf(context);
  if (!caller.ok()) return RefuseUnauthenticated(*kms_, *refusals_, rpc, context, caller.status());
  return work(*kms_, *caller);
}

KeyServiceImpl::KeyServiceImpl(CallRunner* runner) : runner_(runner) {
  SetMessageAllocatorFor_GenerateDataKey(&generate_);
  SetMessageAllocatorFor_GenerateDataKeyWithoutPlaintext(&generate_without_plaintext_);
  SetMessageAllocatorFor_Encrypt(&encrypt_);
  SetMessageAllocatorFor_Decrypt(&decrypt_);
  SetMessageAllocatorFor_ReEncrypt(&re_encrypt_);
  SetMessageAllocatorFor_BatchGenerateDataKey(&batch_generate_);
  SetMessageAllocatorFor_BatchDecrypt(&batch_decrypt_);
  SetMessageAllocatorFor_BatchReEncrypt(&batch_re_encrypt_);
}

grpc::ServerUnaryReactor* KeyServiceImpl::GenerateDataKey(grpc::CallbackServerContext* context,
                                                          const pb::GenerateDataKeyRequest* request,
                                                          pb::GenerateDataKeyResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::DataKey> key =
            kms.GenerateDataKey(caller, request->key(), ToContext(request->encryption_context()),
                                DataKeyBytes(request->key_spec()), /*with_plaintext=*/true);
        if (!key.ok()) return ToGrpcStatus(key.status());
        FillDataKey(*key, response);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::GenerateDataKeyWithoutPlaintext(
    grpc::CallbackServerContext* context, const pb::GenerateDataKeyRequest* request,
    pb::GenerateDataKeyWithoutPlaintextResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::DataKey> key =
            kms.GenerateDataKey(caller, request->key(), ToContext(request->encryption_context()),
                                DataKeyBytes(request->key_spec()), /*with_plaintext=*/false);
        if (!key.ok()) return ToGrpcStatus(key.status());
        response->set_ciphertext_blob(ToString(key->ciphertext_blob));
        response->set_key_id(key->key_id);
        response->set_key_version(key->key_version);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::Encrypt(grpc::CallbackServerContext* context,
                                                  const pb::EncryptRequest* request,
                                                  pb::EncryptResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::Ciphertext> sealed =
            kms.Encrypt(caller, request->key(), AsBytes(request->plaintext()),
                        ToContext(request->encryption_context()));
        if (!sealed.ok()) return ToGrpcStatus(sealed.status());
        response->set_ciphertext_blob(ToString(sealed->ciphertext_blob));
        response->set_key_id(sealed->key_id);
        response->set_key_version(sealed->key_version);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::Decrypt(grpc::CallbackServerContext* context,
                                                  const pb::DecryptRequest* request,
                                                  pb::DecryptResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::Plaintext> opened = kms.Decrypt(
            caller, AsBytes(request->ciphertext_blob()), ToContext(request->encryption_context()));
        if (!opened.ok()) return ToGrpcStatus(opened.status());
        FillPlaintext(*opened, response);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::ReEncrypt(grpc::CallbackServerContext* context,
                                                    const pb::ReEncryptRequest* request,
                                                    pb::ReEncryptResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::ReEncrypted> result = kms.ReEncrypt(
            caller, AsBytes(request->ciphertext_blob()),
            ToContext(request->source_encryption_context()), request->destination_key(),
            ToContext(request->destination_encryption_context()));
        if (!result.ok()) return ToGrpcStatus(result.status());
        FillReEncrypted(*result, response);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::BatchGenerateDataKey(
    grpc::CallbackServerContext* context, const pb::BatchGenerateDataKeyRequest* request,
    pb::BatchGenerateDataKeyResponse* response) {
  if (absl::Status size = BatchSize(request->items_size()); !size.ok()) {
    return runner_->Refuse(context, __func__, size);
  }
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        // The items refer to these contexts: reserved, so that none moves.
        std::vector<EncryptionContext> contexts;
        contexts.reserve(request->items_size());
        std::vector<core::DataKeyItem> items;
        items.reserve(request->items_size());
        for (const pb::GenerateDataKeyRequest& item : request->items()) {
          items.push_back({item.key(), contexts.emplace_back(ToContext(item.encryption_context())),
                           DataKeyBytes(item.key_spec())});
        }
        absl::StatusOr<std::vector<absl::StatusOr<core::DataKey>>> results =
            kms.BatchGenerateDataKey(caller, items, !request->without_plaintext());
        if (!results.ok()) return ToGrpcStatus(results.status());
        for (const absl::StatusOr<core::DataKey>& key : *results) {
          pb::BatchGenerateDataKeyResponse::Result* result = response->add_results();
          SetItemStatus(key.status(), result->mutable_status());
          if (key.ok()) FillDataKey(*key, result->mutable_data_key());
        }
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::BatchDecrypt(grpc::CallbackServerContext* context,
                                                       const pb::BatchDecryptRequest* request,
                                                       pb::BatchDecryptResponse* response) {
  if (absl::Status size = BatchSize(request->items_size()); !size.ok()) {
    return runner_->Refuse(context, __func__, size);
  }
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        std::vector<EncryptionContext> contexts;
        contexts.reserve(request->items_size());
        std::vector<core::DecryptItem> items;
        items.reserve(request->items_size());
        for (const pb::DecryptRequest& item : request->items()) {
          items.push_back({AsBytes(item.ciphertext_blob()),
                           contexts.emplace_back(ToContext(item.encryption_context()))});
        }
        absl::StatusOr<std::vector<absl::StatusOr<core::Plaintext>>> results =
            kms.BatchDecrypt(caller, items);
        if (!results.ok()) return ToGrpcStatus(results.status());
        for (const absl::StatusOr<core::Plaintext>& opened : *results) {
          pb::BatchDecryptResponse::Result* result = response->add_results();
          SetItemStatus(opened.status(), result->mutable_status());
          if (opened.ok()) FillPlaintext(*opened, result->mutable_plaintext());
        }
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* KeyServiceImpl::BatchReEncrypt(grpc::CallbackServerContext* context,
                                                         const pb::BatchReEncryptRequest* request,
                                                         pb::BatchReEncryptResponse* response) {
  if (absl::Status size = BatchSize(request->items_size()); !size.ok()) {
    return runner_->Refuse(context, __func__, size);
  }
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        std::vector<EncryptionContext> contexts;
        contexts.reserve(2 * static_cast<size_t>(request->items_size()));
        std::vector<core::ReEncryptItem> items;
        items.reserve(request->items_size());
        for (const pb::ReEncryptRequest& item : request->items()) {
          const EncryptionContext& source =
              contexts.emplace_back(ToContext(item.source_encryption_context()));
          items.push_back(
              {AsBytes(item.ciphertext_blob()), source, item.destination_key(),
               contexts.emplace_back(ToContext(item.destination_encryption_context()))});
        }
        absl::StatusOr<std::vector<absl::StatusOr<core::ReEncrypted>>> results =
            kms.BatchReEncrypt(caller, items);
        if (!results.ok()) return ToGrpcStatus(results.status());
        for (const absl::StatusOr<core::ReEncrypted>& reencrypted : *results) {
          pb::BatchReEncryptResponse::Result* result = response->add_results();
          SetItemStatus(reencrypted.status(), result->mutable_status());
          if (reencrypted.ok()) FillReEncrypted(*reencrypted, result->mutable_reencrypted());
        }
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::CreateKey(grpc::CallbackServerContext* context,
                                                      const pb::CreateKeyRequest* request,
                                                      pb::KeyMetadata* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::KeyRef> key = kms.CreateKey(caller, ToCreateParams(*request));
        if (!key.ok()) return ToGrpcStatus(key.status());
        FillMetadata(**key, response);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::DescribeKey(grpc::CallbackServerContext* context,
                                                        const pb::DescribeKeyRequest* request,
                                                        pb::KeyMetadata* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::Kms::KeyDescription> described =
            kms.DescribeKey(caller, request->key());
        if (!described.ok()) return ToGrpcStatus(described.status());
        FillMetadata(*described->key, response, described->usage);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::ListKeys(grpc::CallbackServerContext* context,
                                                     const pb::ListKeysRequest* request,
                                                     pb::ListKeysResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        const size_t page_size = request->page_size() == 0 ? 100 : request->page_size();
        absl::StatusOr<storage::KeyPage> page =
            kms.ListKeys(caller, page_size, request->page_token());
        if (!page.ok()) return ToGrpcStatus(page.status());
        for (const auto& key : page->keys) FillMetadata(*key, response->add_keys());
        response->set_next_page_token(page->next_page_token);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::Propose(grpc::CallbackServerContext* context,
                                                    const pb::ProposeRequest* request,
                                                    pb::ChangeRequest* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        const std::optional<policy::Operation> operation = FromProto(request->operation());
        if (!operation) {
          return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "operation is missing or unknown");
        }
        core::Proposal proposal;
        proposal.operation = *operation;
        proposal.key = request->key();
        proposal.justification = request->justification();
        proposal.params.create = ToCreateParams(request->create_key());
        proposal.params.encrypt_principals.insert(request->encrypt_principals().begin(),
                                                  request->encrypt_principals().end());
        proposal.params.decrypt_principals.insert(request->decrypt_principals().begin(),
                                                  request->decrypt_principals().end());
        proposal.params.min_decrypt_version = request->min_decrypt_version();
        proposal.params.deletion_waiting_days = request->deletion_waiting_days();
        proposal.params.tde = {request->tde_key().mount(), request->tde_key().key_id(),
                               request->tde_key().key()};
        const pb::DatabaseTokenParams& token = request->database_token();
        proposal.params.token = {token.principal(),
                                 token.mount(),
                                 {token.key_ids().begin(), token.key_ids().end()},
                                 static_cast<int64_t>(token.ttl_days())};
        proposal.params.token_id = request->token_id();
        proposal.params.archive_through = request->archive_through();
        return ReplyWith(kms, kms.Propose(caller, proposal), response);
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::Approve(grpc::CallbackServerContext* context,
                                                    const pb::ApproveRequest* request,
                                                    pb::ChangeRequest* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        return ReplyWith(kms, kms.Approve(caller, request->request_id(), request->digest()),
                         response);
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::Reject(grpc::CallbackServerContext* context,
                                                   const pb::RejectRequest* request,
                                                   pb::ChangeRequest* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        return ReplyWith(kms, kms.Reject(caller, request->request_id(), request->reason()),
                         response);
      });
}

grpc::ServerUnaryReactor* DatabaseServiceImpl::ClaimDatabaseToken(
    grpc::CallbackServerContext* context, const pb::ClaimDatabaseTokenRequest* request,
    pb::ClaimDatabaseTokenResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<SecureBytes> token = kms.ClaimDatabaseToken(caller, request->token_id());
        if (!token.ok()) return ToGrpcStatus(token.status());
        response->set_token(std::string(token->view()));
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::GetRequest(grpc::CallbackServerContext* context,
                                                       const pb::GetRequestRequest* request,
                                                       pb::ChangeRequest* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        return ReplyWith(kms, kms.GetRequest(caller, request->request_id()), response);
      });
}

grpc::ServerUnaryReactor* AdminServiceImpl::ListRequests(grpc::CallbackServerContext* context,
                                                         const pb::ListRequestsRequest* request,
                                                         pb::ListRequestsResponse* response) {
  return runner_->Run(
      context, __func__,
      [request, response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        storage::RequestFilter filter;
        if (request->state() != pb::REQUEST_STATE_UNSPECIFIED) {
          filter.state = static_cast<storage::RequestState>(request->state());
        }
        filter.key_id = request->key();
        const size_t page_size = request->page_size() == 0 ? 100 : request->page_size();
        absl::StatusOr<storage::RequestPage> page =
            kms.ListRequests(caller, filter, page_size, request->page_token());
        if (!page.ok()) return ToGrpcStatus(page.status());
        for (const core::Request& r : page->requests) {
          FillRequest(r, kms.ApprovalsFor(r), response->add_requests());
        }
        response->set_next_page_token(page->next_page_token);
        return grpc::Status::OK;
      });
}

// The streams open now. A stream is a member from its admission until its reactor is done.
class AuditServiceImpl::Streams {
 public:
  class Member {
   public:
    explicit Member(grpc::CallbackServerContext* context) : context_(context) {}
    virtual ~Member() = default;

   protected:
    // Since when a write has waited for the client (steady clock, ns); 0 while none does.
    void WriteStarted() { writing_since_ = Now(); }
    void WriteDone() { writing_since_ = 0; }

   private:
    friend class Streams;
    static int64_t Now() {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(
                 std::chrono::steady_clock::now().time_since_epoch())
          .count();
    }
    grpc::CallbackServerContext* const context_;
    std::atomic<int64_t> writing_since_{0};
    bool evicted_ = false;  // guarded by Streams::mu_
  };

  explicit Streams(Limits limits) : limits_(limits) {}

  // OK if `stream` may start. When max_streams are open, streams whose write has waited on
  // their client for stall_limit are cancelled to make room first.
  absl::Status Admit(Member* stream) {
    std::lock_guard lock(mu_);
    if (open_.size() - evicting_ >= limits_.max_streams) {
      const int64_t stalled_before =
          Member::Now() -
          std::chrono::duration_cast<std::chrono::nanoseconds>(limits_.stall_limit).count();
      for (Member* open : open_) {
        const int64_t since = open->writing_since_.load();
        if (open->evicted_ || since == 0 || since > stalled_before) continue;
        open->evicted_ = true;
        ++evicting_;
        open->context_->TryCancel();
        spdlog::warn(
            "audit: cancelled a stream from {} whose client read nothing for {} s, to "
            "make room for another",
            open->context_->peer(), limits_.stall_limit.count());
      }
    }
    if (open_.size() - evicting_ >= limits_.max_streams) {
      return absl::ResourceExhaustedError(StrCat("too many audit streams are open (",
                                                 limits_.max_streams,
                                                 ", audit.max_streams); retry with backoff"));
    }
    open_.insert(stream);
    return absl::OkStatus();
  }

  void Leave(Member* stream) {
    std::lock_guard lock(mu_);
    if (stream->evicted_) --evicting_;
    open_.erase(stream);
  }

 private:
  const Limits limits_;
  std::mutex mu_;
  std::set<Member*> open_;
  size_t evicting_ = 0;  // members of open_ cancelled as stalled, not done yet
};

namespace {

// Streams what `read` returns, a page at a time, from seq `from` until `limit` items (0 = all)
// or the end. Pages are read on the CallRunner's workers of the caller's lane; between them the
// stream only waits for its client, holding no thread. Each page authenticates the caller anew,
// as each unary call does: a certificate revoked or expired while a stream is open ends it
// before its next page (UNAUTHENTICATED), not when the client closes it.
template <typename Item, typename Proto>
class PageStream final : public grpc::ServerWriteReactor<Proto>,
                         public AuditServiceImpl::Streams::Member {
 public:
  using Read = std::function<absl::StatusOr<std::vector<Item>>(core::Kms&, const core::Caller&,
                                                               uint64_t, size_t)>;

  PageStream(CallRunner* runner, AuditServiceImpl::Streams* streams,
             grpc::CallbackServerContext* context, const char* rpc, uint64_t from, uint64_t limit,
             Read read)
      : Member(context),
        runner_(runner),
        streams_(streams),
        context_(context),
        rpc_(rpc),
        from_(from),
        left_(limit == 0 ? UINT64_MAX : limit),
        read_(std::move(read)) {
    if (absl::Status admitted = streams_->Admit(this); !admitted.ok()) {
      absl::StatusOr<core::Caller> caller = CallerOf(*context_);
      runner_->refusals().Refused(rpc_, caller.ok() ? std::move(caller->principal) : std::string(),
                                  context_->peer(), admitted.code(),
                                  std::string(admitted.message()));
      this->Finish(ToGrpcStatus(admitted));
      return;
    }
    admitted_ = true;
    Fetch();
  }

  void OnWriteDone(bool ok) override {
    WriteDone();
    if (!ok) {
      this->Finish(grpc::Status::CANCELLED);
      return;
    }
    Next();
  }

  void OnDone() override {
    if (admitted_) streams_->Leave(this);
    delete this;
  }

 private:
  static constexpr size_t kPage = 1000;

  void Next() {
    if (index_ < page_.size()) {
      server::ToProto(page_[index_++], &message_);
      WriteStarted();
      this->StartWrite(&message_);
    } else if (last_page_ || left_ == 0) {
      this->Finish(grpc::Status::OK);
    } else {
      Fetch();
    }
  }

  void Fetch() {
    const bool posted = runner_->Post(*context_, [this] {
      if (context_->IsCancelled()) {
        this->Finish(grpc::Status::CANCELLED);
        return;
      }
      absl::StatusOr<core::Caller> caller = CallerOf(*context_);
      if (!caller.ok()) {
        this->Finish(RefuseUnauthenticated(runner_->kms(), runner_->refusals(), rpc_, *context_,
                                           caller.status()));
        return;
      }
      absl::StatusOr<std::vector<Item>> page = read_(
          runner_->kms(), *caller, from_, static_cast<size_t>(std::min<uint64_t>(left_, kPage)));
      if (!page.ok()) {
        this->Finish(ToGrpcStatus(page.status()));
        return;
      }
      page_ = *std::move(page);
      index_ = 0;
      left_ -= page_.size();
      last_page_ = page_.size() < kPage;
      if (!page_.empty()) from_ = page_.back().seq + 1;
      Next();
    });
    if (!posted) {
      this->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                "custosd is at capacity (server.max_waiting_calls); retry with "
                                "backoff"));
    }
  }

  CallRunner* const runner_;
  AuditServiceImpl::Streams* const streams_;
  grpc::CallbackServerContext* const context_;
  const char* const rpc_;
  // Touched by one thread at a time: the worker reading a page, then gRPC's callbacks.
  bool admitted_ = false;
  uint64_t from_;
  uint64_t left_;
  const Read read_;
  std::vector<Item> page_;
  size_t index_ = 0;
  bool last_page_ = false;
  Proto message_;  // the write under way
};

}  // namespace

AuditServiceImpl::AuditServiceImpl(CallRunner* runner, RefusalRecorder* refusals, Limits limits)
    : runner_(runner), refusals_(refusals), streams_(std::make_unique<Streams>(limits)) {}

AuditServiceImpl::~AuditServiceImpl() = default;

grpc::ServerWriteReactor<pb::AuditRecord>* AuditServiceImpl::ReadRecords(
    grpc::CallbackServerContext* context, const pb::ReadRecordsRequest* request) {
  return new PageStream<audit::Record, pb::AuditRecord>(
      runner_, streams_.get(), context, __func__, std::max<uint64_t>(request->from_seq(), 1),
      request->limit(),
      [](core::Kms& kms, const core::Caller& caller, uint64_t from, size_t count) {
        return kms.ReadAudit(caller, from, count);
      });
}

grpc::ServerUnaryReactor* AuditServiceImpl::GetCheckpoint(
    grpc::CallbackServerContext* context, const pb::GetCheckpointRequest* /*request*/,
    pb::Checkpoint* response) {
  return runner_->Run(
      context, __func__, [response](core::Kms& kms, const core::Caller& caller) -> grpc::Status {
        absl::StatusOr<core::Kms::SignedCheckpoint> latest = kms.LatestCheckpoint(caller);
        if (!latest.ok()) return ToGrpcStatus(latest.status());
        ToProto(latest->checkpoint, response);
        response->set_public_key_pem(latest->public_key_pem);
        return grpc::Status::OK;
      });
}

grpc::ServerWriteReactor<pb::Checkpoint>* AuditServiceImpl::ReadCheckpoints(
    grpc::CallbackServerContext* context, const pb::ReadCheckpointsRequest* request) {
  return new PageStream<audit::Checkpoint, pb::Checkpoint>(
      runner_, streams_.get(), context, __func__, request->from_seq(), request->limit(),
      [](core::Kms& kms, const core::Caller& caller, uint64_t from, size_t count) {
        return kms.ReadCheckpoints(caller, from, count);
      });
}

}  // namespace custos::server
