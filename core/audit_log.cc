// The audit log as the use cases write and read it: every event committed with the change it
// records, signed checkpoints, and what auditors read.
#include <openssl/crypto.h>

#include "absl/strings/numbers.h"
#include "audit/verifier.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/encryption_context.h"
#include "core/kms.h"
#include "spdlog/spdlog.h"
#include "storage/row_codec.h"

namespace custos::core {

using policy::Action;
using storage::RequestState;

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

absl::Status Kms::Commit(storage::WriteBatch batch, const std::vector<audit::Event>& events) const {
  // seq and hash are the store's to set, in commit order.
  for (const audit::Event& e : events) batch.audit.push_back(audit::RecordFromEvent(e, 0));
  absl::Status written = options_.store->Apply(batch);
  if (written.GetPayload(storage::kSealPayload)) return written;  // the HSM's doing, not the log's
  if (absl::IsUnavailable(written) || absl::IsInternal(written)) {
    return absl::UnavailableError(StrCat("audit log unavailable: ", written.message()));
  }
  CUSTOS_RETURN_IF_ERROR(written);
  Committed(events);
  return absl::OkStatus();
}

void Kms::Committed(const std::vector<audit::Event>& events) const {
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
}

namespace {

// The head this HSM last signed, as kept in its token (Options::audit_head_label).
struct SignedHead {
  uint64_t seq = 0;
  Bytes hash;
  bool stopped = false;  // custosd stopped cleanly here: nothing may follow it
};

constexpr std::string_view kStoppedLine = "stopped\n";

std::string EncodeHead(uint64_t seq, std::span<const uint8_t> hash, bool stopped = false) {
  return StrCat("custos-audit-head-v1\nseq=", seq, "\nhash=", audit::ToHex(hash), "\n",
                stopped ? kStoppedLine : "");
}

absl::StatusOr<SignedHead> DecodeHead(std::string text) {
  SignedHead head;
  if (text.size() > kStoppedLine.size() &&
      text.compare(text.size() - kStoppedLine.size(), kStoppedLine.size(), kStoppedLine) == 0) {
    head.stopped = true;
    text.resize(text.size() - kStoppedLine.size());
  }
  const std::string prefix = "custos-audit-head-v1\nseq=";
  const size_t hash_at = text.find("\nhash=");
  if (text.rfind(prefix, 0) != 0 || hash_at == std::string::npos || text.back() != '\n' ||
      !absl::SimpleAtoi(text.substr(prefix.size(), hash_at - prefix.size()), &head.seq)) {
    return absl::DataLossError("the audit head kept in the HSM is malformed");
  }
  absl::StatusOr<Bytes> hash = audit::FromHex(text.substr(hash_at + 6, text.size() - hash_at - 7));
  if (!hash.ok() || hash->size() != audit::kHashBytes) {
    return absl::DataLossError("the audit head kept in the HSM is malformed");
  }
  head.hash = *std::move(hash);
  return head;
}

}  // namespace

absl::Status Kms::Checkpoint() {
  std::lock_guard lock(checkpoint_mu_);
  // Nothing is signed over a log that does not extend what this HSM signed before.
  if (const std::string problem = AnchorProblem(); !problem.empty()) {
    return absl::FailedPreconditionError(
        StrCat("not signing a checkpoint until the audit log is re-anchored: ", problem));
  }
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
  checkpoint.prev_seq = latest ? latest->seq : 0;  // checkpoints form a chain of their own
  checkpoint.prev_hash = latest ? latest->hash : Bytes(audit::kHashBytes, 0);
  checkpoint.key_label = options_.audit_signing_key_label;
  const std::string message = audit::CheckpointMessage(checkpoint);
  CUSTOS_RETURN_IF_ERROR(ConfirmTokenClaim());
  CUSTOS_ASSIGN_OR_RETURN(
      checkpoint.signature,
      options_.hsm->SignSha256(
          checkpoint.key_label,
          std::span(reinterpret_cast<const uint8_t*>(message.data()), message.size())));
  CUSTOS_RETURN_IF_ERROR(options_.store->PutCheckpoint(checkpoint));
  // Then the HSM's own copy of the head, which only the PIN holder can change: rewriting or
  // deleting history (or the stored checkpoints) before it shows at the next start-up. If
  // this write fails, the HSM's head only lags, which the next checkpoint catches up.
  CUSTOS_RETURN_IF_ERROR(ConfirmTokenClaim());
  CUSTOS_RETURN_IF_ERROR(options_.hsm->WriteTokenData(options_.audit_head_label,
                                                      EncodeHead(checkpoint.seq, checkpoint.hash)));
  // Records that came while signing may have made the next checkpoint due already; their
  // commits saw the count above the threshold and woke nobody.
  if ((records_since_checkpoint_ -= counted) >= options_.checkpoint_every &&
      options_.wake_maintenance) {
    options_.wake_maintenance();
  }
  return absl::OkStatus();
}

absl::Status Kms::ConfirmTokenClaim() const {
  return options_.confirm_token_claim ? options_.confirm_token_claim() : absl::OkStatus();
}

absl::Status Kms::CloseAuditLog() {
  CUSTOS_RETURN_IF_ERROR(Checkpoint());
  std::lock_guard lock(checkpoint_mu_);
  CUSTOS_ASSIGN_OR_RETURN(auto head, options_.store->AuditHead());
  CUSTOS_ASSIGN_OR_RETURN(std::optional<audit::Checkpoint> latest,
                          options_.store->LatestCheckpoint());
  if (!latest || latest->seq != head.first) {
    return absl::FailedPreconditionError("the audit log's end is not signed; not marking it");
  }
  CUSTOS_RETURN_IF_ERROR(ConfirmTokenClaim());
  return options_.hsm->WriteTokenData(options_.audit_head_label,
                                      EncodeHead(head.first, head.second, /*stopped=*/true));
}

absl::Status Kms::VerifyAuditLog(bool full) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> kept_values,
                          options_.hsm->ReadTokenData(options_.audit_head_label));
  // Two copies when a replacement was cut short: the later head is the one that counts.
  std::optional<SignedHead> kept;
  for (const std::string& value : kept_values) {
    CUSTOS_ASSIGN_OR_RETURN(SignedHead head, DecodeHead(value));
    // (of two at the same seq, the one saying custosd stopped: the stricter)
    if (!kept || head.seq > kept->seq || (head.seq == kept->seq && head.stopped)) {
      kept = std::move(head);
    }
  }
  CUSTOS_ASSIGN_OR_RETURN(auto head, options_.store->AuditHead());
  CUSTOS_ASSIGN_OR_RETURN(std::optional<audit::Checkpoint> latest,
                          options_.store->LatestCheckpoint());
  if (latest) {  // the checkpoint the next one will name as its predecessor
    CUSTOS_ASSIGN_OR_RETURN(const std::string pem,
                            options_.hsm->PublicKeyPem(options_.audit_signing_key_label));
    CUSTOS_ASSIGN_OR_RETURN(const audit::PublicKeyVerifier key,
                            audit::PublicKeyVerifier::FromPem(pem));
    if (!key.Verify(*latest)) {
      return absl::FailedPreconditionError(
          StrCat("the audit log's latest stored checkpoint (at ", latest->seq,
                 ") is not signed by this HSM's audit key: checkpoints were forged or replaced"));
    }
  }
  // Where the live log starts: record 1, or just after the checkpoint an archival ended at.
  CUSTOS_RETURN_IF_ERROR(CheckAuditFloor());
  CUSTOS_ASSIGN_OR_RETURN(const storage::AuditFloor floor, options_.store->AuditLogFloor());
  PublishArchives(floor.seq);  // an archival that committed just before a crash
  const auto verify_all = [&]() -> absl::Status {
    CUSTOS_RETURN_IF_ERROR(options_.store->VerifyAuditChainFrom(floor.seq, floor.hash));
    options_.store->AnchorAuditLog(0, Bytes(audit::kHashBytes, 0));
    return absl::OkStatus();
  };
  // A state from before the HSM kept the head: its log is checked in full once, and the HSM
  // keeps the head from the next checkpoint on.
  if (!kept) return verify_all();
  // The HSM's head lags when writing it failed (Checkpoint), and an archival may have gone
  // past it: the checkpoint at the floor, which CheckAuditFloor found signed by this HSM, is
  // then the newest head known.
  if (kept->seq < floor.seq) *kept = SignedHead{floor.seq, floor.hash, false};
  const SignedHead& signed_head = *kept;
  if (signed_head.seq > head.first) {
    return absl::FailedPreconditionError(
        StrCat("the audit log ends at record ", head.first, " but this HSM signed a checkpoint at ",
               signed_head.seq,
               ": records were removed, an older copy of the database was restored, or "
               "another copy of it ran on this HSM token and signed its own records (a fork: "
               "re-anchoring would drop that copy's records from the chain)"));
  }
  if (signed_head.stopped && head.first > signed_head.seq) {
    return absl::FailedPreconditionError(StrCat("custosd stopped at audit record ", signed_head.seq,
                                                " (the head this HSM signed) "
                                                "but the log goes on to record ",
                                                head.first,
                                                ": records were added while it was stopped"));
  }
  if (!latest || latest->seq < signed_head.seq) {
    return absl::FailedPreconditionError(
        StrCat("this HSM signed a checkpoint at record ", signed_head.seq,
               " but the database's latest stored checkpoint is at ", latest ? latest->seq : 0,
               ": stored checkpoints were deleted"));
  }
  if (absl::Status extends =
          options_.store->VerifyAuditChainFrom(signed_head.seq, signed_head.hash);
      !extends.ok()) {
    // The records are intact but the row index is not: rebuilt, not re-anchored.
    if (absl::IsDataLoss(extends)) return extends;
    return absl::FailedPreconditionError(
        StrCat("the audit log does not extend the checkpoint this HSM signed at record ",
               signed_head.seq, ": ", extends.message(),
               " (history was rewritten, or an older copy of the database was restored)"));
  }
  // A run that did not sign its end (a crash, or a stop whose last writes failed) leaves
  // records after the head: the last write of that run marked them, and records someone
  // appended meanwhile, vouching for rows put back from an older copy, are not so marked.
  if (!signed_head.stopped) {
    if (absl::Status tail = options_.store->CheckAuditTail(signed_head.seq); !tail.ok()) {
      if (!absl::IsFailedPrecondition(tail)) return tail;
      return absl::FailedPreconditionError(
          StrCat("the audit log after the checkpoint this HSM signed at record ", signed_head.seq,
                 " was not written by custosd: ", tail.message()));
    }
  }
  if (signed_head.stopped) {  // from now on records follow it again, and a crash may cut them
    CUSTOS_RETURN_IF_ERROR(ConfirmTokenClaim());
    CUSTOS_RETURN_IF_ERROR(options_.hsm->WriteTokenData(
        options_.audit_head_label, EncodeHead(signed_head.seq, signed_head.hash)));
  }
  // The run's tail mark key, made now rather than by the first write, under the database.
  CUSTOS_RETURN_IF_ERROR(options_.store->PrepareTailMarks());
  if (full) return verify_all();
  // The records before the head are recomputed when a row first relies on one of them, and by
  // maintenance (KeyStore::AnchorAuditLog).
  options_.store->AnchorAuditLog(signed_head.seq, signed_head.hash);
  return absl::OkStatus();
}

void Kms::RequireReAnchoring(std::string problem) {
  options_.store->SetTailMarking(problem.empty());
  std::lock_guard lock(policy_mu_);
  anchor_problem_ = std::move(problem);
  root_proven_ = false;  // proven again over the log as anchored now
}

std::string Kms::AnchorProblem() const {
  std::lock_guard lock(policy_mu_);
  return anchor_problem_;
}

absl::Status Kms::ServingAllowed(policy::Operation operation) const {
  const std::string problem = AnchorProblem();
  if (problem.empty()) return absl::OkStatus();
  return absl::UnavailableError(
      StrCat(policy::OperationName(operation), " waits: the audit log failed its start-up check (",
             problem, "); officers must approve a ReAnchorAuditLog request first"));
}

void Kms::RaiseIntegrityAlarm(const absl::Status& status) const {
  const auto row = status.GetPayload(storage::kIntegrityPayload);
  if (!row) return;
  const std::string name(*row);
  {
    std::lock_guard lock(alarm_mu_);
    if (!alarmed_rows_.insert(name).second) return;
  }
  spdlog::error("integrity alarm: {}", std::string(status.message()));
  audit::Event event =
      ServerEvent("IntegrityFailure", "", "", status.code(), std::string(status.message()));
  if (name.rfind("key:", 0) == 0) event.key_id = name.substr(4);
  if (name.rfind("request:", 0) == 0) event.request_id = name.substr(8);
  if (absl::Status recorded = Commit({}, {std::move(event)}); !recorded.ok()) {
    spdlog::error("integrity alarm not recorded: {}", recorded.ToString());
  }
}

absl::StatusOr<uint64_t> Kms::SealCatalog() {
  return options_.store->SealCatalog(
      [this](const std::string& row) {
        audit::Event event = ServerEvent("SealCatalogRow", "", "", absl::StatusCode::kOk,
                                         "sealed as found at the first start with row MACs");
        event.row = row;
        return audit::RecordFromEvent(event, 0);
      },
      {kObservedSecondsSetting});
}

absl::Status Kms::NothingToReAnchor() {
  return absl::FailedPreconditionError(
      "the audit log extends the HSM's last signed checkpoint: there is nothing to re-anchor");
}

absl::Status Kms::ExpireEarlierReAnchorings() {
  const ChangeLock lock = LockServer();  // as any change to a server-wide request
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
  for (Request& request : pending) {
    if (request.operation != policy::OperationName(policy::Operation::kReAnchorAuditLog)) continue;
    request.state = RequestState::kExpired;
    request.closed_at = options_.clock->NowSeconds();
    request.reason =
        "expired at a restart: a re-anchoring is approved in the run whose start-up check it "
        "answers";
    storage::WriteBatch batch;
    batch.requests.push_back(request);
    audit::Event expired =
        ServerEvent("ExpireRequest", "", request.id, absl::StatusCode::kOk, request.reason);
    expired.row = storage::RequestRowName(request.id);
    CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), {std::move(expired)}));
    spdlog::warn("ReAnchorAuditLog request {} proposed before this start {}", request.id,
                 request.reason);
  }
  return absl::OkStatus();
}

absl::StatusOr<Request> Kms::ReAnchor(Call& call, Request request) {
  const std::string problem = AnchorProblem();
  if (problem.empty()) return CloseFailed(call, std::move(request), NothingToReAnchor());
  CUSTOS_ASSIGN_OR_RETURN(auto head, options_.store->AuditHead());
  request.state = RequestState::kExecuted;
  request.closed_at = options_.clock->NowSeconds();
  request.reason = StrCat("audit log re-anchored at record ", head.first, " (hash ",
                          audit::ToHex(head.second), "); it had failed its check: ", problem);
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  call.event().row = storage::RequestRowName(request.id);
  // The key that marks the log once re-anchored, made before anything is committed.
  CUSTOS_RETURN_IF_ERROR(options_.store->PrepareTailMarks());
  CUSTOS_RETURN_IF_ERROR(call.CommitWith(
      std::move(batch), absl::StatusCode::kOk,
      {ServerEvent("ReAnchorAuditLog", "", request.id, absl::StatusCode::kOk, problem)}));
  // Only once its record is committed is the log as it now stands marked, the re-anchoring
  // included (a crash in between leaves the log awaiting a re-anchoring again).
  if (absl::Status marked = options_.store->ResumeTailMarks(); !marked.ok()) {
    spdlog::error("marking the re-anchored audit log: {} (the next write marks it)",
                  marked.ToString());
  }
  // The restored log is believed as far as it chains to its own head; the records after it
  // are this process's. Anchored before anything is served again, so that no read takes an
  // absence for proven over the unanchored log (the root in use is proven again after it).
  options_.store->AnchorAuditLog(head.first, head.second);
  RequireReAnchoring("");
  // Sign the log as it now stands, and keep that head in the HSM: from here on it is the
  // anchor. (If this fails, the timer signs again.)
  if (absl::Status signed_head = Checkpoint(); !signed_head.ok()) {
    spdlog::error("audit checkpoint after re-anchoring: {}", signed_head.ToString());
  }
  return request;
}

absl::StatusOr<Kms::SignedCheckpoint> Kms::LatestCheckpoint(const Caller& caller) {
  Call call(*this, caller, Action::kReadAudit);
  return call.Finish([&]() -> absl::StatusOr<SignedCheckpoint> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    // The last one stored, never a new signature: an auditor polling in a loop costs the HSM
    // nothing and adds no checkpoints. The server signs one every checkpoint interval and every
    // checkpoint_every records; records after it are the log's unsigned tail.
    CUSTOS_ASSIGN_OR_RETURN(std::optional<audit::Checkpoint> latest,
                            options_.store->LatestCheckpoint());
    if (!latest) return absl::NotFoundError("the audit log has no checkpoint yet");
    SignedCheckpoint signed_checkpoint;
    signed_checkpoint.message = audit::CheckpointMessage(*latest);
    CUSTOS_ASSIGN_OR_RETURN(signed_checkpoint.public_key_pem, SigningPublicKey(latest->key_label));
    signed_checkpoint.checkpoint = *std::move(latest);
    return signed_checkpoint;
  }());
}

absl::StatusOr<std::string> Kms::SigningPublicKey(const std::string& label) {
  {
    std::lock_guard lock(public_keys_mu_);
    if (auto known = public_keys_.find(label); known != public_keys_.end()) return known->second;
  }
  // Asked outside the lock: a stuck HSM holds up only the callers that need it.
  CUSTOS_ASSIGN_OR_RETURN(std::string pem, options_.hsm->PublicKeyPem(label));
  std::lock_guard lock(public_keys_mu_);
  return public_keys_.try_emplace(label, std::move(pem)).first->second;
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

audit::Event Kms::ReservationEvent(const storage::VersionUsage& reservation) const {
  audit::Event event =
      ServerEvent("ReserveEncryptions", reservation.key_id, "", absl::StatusCode::kOk,
                  StrCat("encryptions reserved up to ", reservation.encryptions_reserved));
  event.key_version = reservation.version;
  event.row = storage::UsageRowName(reservation.key_id, reservation.version);
  return event;
}

absl::Status Kms::Reserve(const storage::VersionUsage& reservation) const {
  storage::WriteBatch batch;
  batch.usage.push_back(reservation);
  return Commit(std::move(batch), {ReservationEvent(reservation)});
}

absl::StatusOr<std::string> Kms::ContextHmac(std::string_view principal,
                                             const EncryptionContext& context) const {
  if (context.empty()) return std::string();
  WipedBytes canonical;  // holds the context's values
  AppendCanonicalContext(context, canonical);
  const std::string cache_key = context_macs_.KeyOf(principal, canonical);
  if (std::optional<std::string> cached = context_macs_.Find(cache_key)) return *cached;
  CUSTOS_ASSIGN_OR_RETURN(Bytes mac,
                          options_.hsm->HmacSha256(options_.audit_hmac_key_label, canonical));
  std::string hex = audit::ToHex(mac);
  context_macs_.Insert(cache_key, hex);
  return hex;
}

absl::Status Kms::RecordServerStart() {
  const std::string root = CurrentRoot();
  CUSTOS_ASSIGN_OR_RETURN(const bool confines, options_.hsm->RootKeyConfinesVersions(root));
  return Commit({}, {ServerEvent("ServerStart", "", "", absl::StatusCode::kOk,
                                 StrCat("root ", root, confines ? " (confining)" : " (legacy)",
                                        "; dual control ", options_.dual_control.Summary())),
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

absl::Status Kms::RecordRefusedCalls(const std::vector<RefusedCalls>& refused) {
  std::vector<audit::Event> events;
  events.reserve(refused.size());
  for (const RefusedCalls& tally : refused) {
    audit::Event event;
    event.time = options_.clock->NowSeconds();
    event.principal = tally.principal;
    event.action = tally.rpc;
    event.outcome = tally.code;
    event.peer = tally.peer;
    event.detail = StrCat(tally.count, tally.count == 1 ? " call" : " calls", " refused from ",
                          tally.first, " to ", tally.last, ": ", tally.reason);
    events.push_back(std::move(event));
  }
  return Commit({}, events);
}

}  // namespace custos::core
