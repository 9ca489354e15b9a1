// Kms: Custos's use cases, independent of any transport.
//
// Every call takes the authenticated Caller and runs the same steps: resolve the caller's role
// from the current policy, check that the role may perform the action (separation of duties),
// do the work (key lookup, grant check, one or two HSM calls), then append an audit event
// whatever the outcome. If the audit sink refuses the event, a successful result is discarded
// and UNAVAILABLE returned: nothing is answered that was not recorded.
//
// Errors: NOT_FOUND unknown key; PERMISSION_DENIED wrong role, unknown principal or no grant;
// INVALID_ARGUMENT malformed input or a ciphertext that does not authenticate;
// FAILED_PRECONDITION key not enabled; UNAVAILABLE HSM, store or audit log down;
// ALREADY_EXISTS alias taken. Messages say what to fix and never carry secrets.
//
// Thread-safe; the HSM, store, sink and clock it is given must outlive it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>

#include "audit/event.h"
#include "audit/record.h"
#include "common/clock.h"
#include "common/secure_bytes.h"
#include "common/status.h"
#include "core/ciphertext_blob.h"
#include "core/context_mac_cache.h"
#include "core/encryption_context.h"
#include "core/key_locks.h"
#include "core/observed_time.h"
#include "core/usage_tracker.h"
#include "hsm/hsm.h"
#include "policy/authorizer.h"
#include "policy/dual_control.h"
#include "policy/policy.h"
#include "storage/key_store.h"

namespace custos::core {

// Who is asking, as established by the transport (e.g. from a verified client certificate).
struct Caller {
  std::string principal;
  std::string peer;  // transport address, for the audit log
};

inline constexpr size_t kMaxEncryptPlaintextBytes = kBlobMaxPlaintextBytes;

struct DataKey {
  std::string key_id;
  uint32_t key_version = 0;
  SecureBytes plaintext;  // empty for GenerateDataKeyWithoutPlaintext
  Bytes ciphertext_blob;
};

struct Ciphertext {
  std::string key_id;
  uint32_t key_version = 0;
  Bytes ciphertext_blob;
};

struct Plaintext {
  std::string key_id;
  uint32_t key_version = 0;
  SecureBytes plaintext;
};

struct ReEncrypted {
  std::string source_key_id;
  uint32_t source_key_version = 0;
  Ciphertext destination;
};

// One item of a batch call (Kms::Batch*), as the single call takes it; the spans and views
// must outlive the call.
struct DataKeyItem {
  std::string_view key;
  const EncryptionContext& context;
  size_t key_bytes = 0;
};
struct DecryptItem {
  std::span<const uint8_t> blob;
  const EncryptionContext& context;
};
struct ReEncryptItem {
  std::span<const uint8_t> blob;
  const EncryptionContext& source_context;
  std::string_view destination_key;
  const EncryptionContext& destination_context;
};
inline constexpr size_t kMaxBatchItems = 1000;

struct CreateKeyParams {
  std::string alias;
  std::string description;
  std::map<std::string, std::string> tags;
  std::set<std::string> encrypt_principals;
  std::set<std::string> decrypt_principals;
  int64_t rotation_period_days = 0;  // automatic rotation; 0 = never, else 1..3650
};

using KeyRef = std::shared_ptr<const storage::KeyRecord>;

// A table-space key of the key/value gateway (docs/TDE.md): key `key_id` of `mount`.
struct TdeKeyParams {
  std::string mount;    // the mount databases name in their URL: 1..64 of [A-Za-z0-9_.-]
  uint32_t key_id = 0;  // the database's own key id, from 1
  std::string key;      // CreateTdeKey: the Custos key (id or alias) its versions are sealed under
};

// IssueDatabaseToken: who may fetch what through the gateway, until when.
struct DatabaseTokenParams {
  std::string principal;       // a principal with the role database
  std::string mount;           // the one mount it may read
  std::set<uint32_t> key_ids;  // the key ids of that mount it may read
  int64_t ttl_days = 0;        // 1..366
};

// What a dual-control operation changes; only the fields of its operation are read.
struct OperationParams {
  CreateKeyParams create;                    // CreateKey
  std::set<std::string> encrypt_principals;  // UpdateKeyGrants: the new grants, whole
  std::set<std::string> decrypt_principals;  // UpdateKeyGrants
  uint32_t min_decrypt_version = 0;          // SetMinDecryptVersion
  int64_t deletion_waiting_days = 0;         // ScheduleKeyDeletion; 0 = the config's
  TdeKeyParams tde;                          // CreateTdeKey, RotateTdeKey
  DatabaseTokenParams token;                 // IssueDatabaseToken
  std::string token_id;                      // RevokeDatabaseToken
  uint64_t archive_through = 0;              // ArchiveAuditLog: a stored checkpoint's seq
};

struct Proposal {
  policy::Operation operation = policy::Operation::kRotateKey;
  std::string key;  // id or alias; empty for CreateKey
  OperationParams params;
  std::string justification;
};

using Request = storage::RequestRecord;

// The store setting that names the root key new versions are wrapped under.
inline constexpr char kRootKeySetting[] = "root_key_label";
// The store setting listing (a JSON array) the roots that rotations retired and that are still
// to be destroyed in the HSM: each goes once no stored version is wrapped under it.
inline constexpr char kRetiredRootsSetting[] = "retired_root_key_labels";
// The store setting naming the root rotation whose re-wrapping of versions off legacy roots
// runs in the background (JSON: request id, roots, counts); empty when none does. It outlives
// a restart: the next maintenance turn resumes the work.
inline constexpr char kRootMigrationSetting[] = "root_migration";
// The store setting that says erased key material may still be in the WAL: "1" from a
// destruction until a purge succeeds (retried by maintenance), each change recorded.
inline constexpr char kPurgePendingSetting[] = "purge_pending";

// The principal under which the server's own actions (expiry, destruction) are audited.
inline constexpr char kServerPrincipal[] = "custosd";

// How far the wall clock may move against observed time between two maintenance turns before
// the server alerts (log and a ClockJump audit record). Time servers slew by far less.
inline constexpr int64_t kClockJumpToleranceSeconds = 300;
// Older audit records each maintenance turn recomputes (about 1 s; KeyStore::AnchorAuditLog).
inline constexpr uint64_t kOlderRecordsPerTurn = 500'000;

class Kms {
 public:
  struct Options {
    hsm::Hsm* hsm = nullptr;
    storage::KeyStore* store = nullptr;
    audit::Sink* audit = nullptr;  // optional mirror of committed records (operator logs)
    const Clock* clock = nullptr;
    std::shared_ptr<const policy::Policy> policy;
    policy::DualControlConfig dual_control = policy::DualControlConfig::Defaults();
    std::string root_key_label = "custos-root";  // the root new versions are wrapped under
    UsageLimits usage_limits;
    std::string audit_hmac_key_label = "custos-audit-hmac";        // HSM key for context HMACs
    std::string audit_signing_key_label = "custos-audit-signing";  // signs checkpoints
    // The HSM data object that keeps the last signed head of the audit log.
    std::string audit_head_label = "custos-audit-head";
    // Records after which a checkpoint is due at once (besides the server's timer).
    uint64_t checkpoint_every = 1000;
    // Where ArchiveAuditLog writes its archive files (storage/audit_archive.h).
    std::string audit_archive_dir;
    // Contexts whose audit HMAC is kept in memory (ContextMacCache); 0 = none.
    size_t context_hmac_cache = 65536;
    // Called when housekeeping has work now (a key wants rotating, a checkpoint is due); the
    // server wakes its maintenance thread, which runs RunMaintenance and Checkpoint.
    std::function<void()> wake_maintenance;
    // Asked before each checkpoint is signed and each write of the audit head to the token: an
    // error (this server no longer holds the token, hsm/token_lease.h) writes nothing.
    std::function<absl::Status()> confirm_token_claim = nullptr;
  };
  explicit Kms(Options options);
  ~Kms();  // stops the background work (StopBackgroundWork)
  Kms(const Kms&) = delete;
  Kms& operator=(const Kms&) = delete;

  // Asked, before serving, about each call refused with PERMISSION_DENIED, with its record and
  // the refusal's message, and about each refused UNAVAILABLE because the HSM was busy (no
  // HSM call started), with the busy refusal's kind (hsm::kBusyPayload) for its message: true
  // if it was counted as a repeat of a refusal recorded shortly
  // before (a client in a retry loop; the server records a tally per interval), and then gets
  // no record of its own. Without one, every refusal has its own record.
  using RefusalCounter = std::function<bool(const audit::Event& record, std::string_view reason)>;
  void SetRefusalCounter(RefusalCounter counter) { refusal_counter_ = std::move(counter); }

  // Stops what runs on Kms's own thread (a root rotation's re-wrapping, which resumes at the
  // next start) and waits for it: call before recording the server's stop, so no record
  // follows it.
  void StopBackgroundWork();

  // Replaces the policy for every later call (e.g. on SIGHUP), unless the new policy would
  // break separation of duties or dual control: FAILED_PRECONDITION if a principal named in
  // some key's grants would hold a role other than app, or too few officers remain for a
  // quorum. The current policy stays in force then.
  absl::Status ReplacePolicy(std::shared_ptr<const policy::Policy> policy);
  // FAILED_PRECONDITION if a principal some key grants use to holds a role other than app
  // in `policy`: custosd starts with no such policy, as a reload refuses one.
  absl::Status GrantsFit(const policy::Policy& policy) const;

  // --- Applications -------------------------------------------------------------------------
  // A fresh data key of `key_bytes` (16 or 32; 0 for a key spec the front door did not
  // know) from the HSM's RNG, encrypted under `key`'s primary version. With `with_plaintext` false
  // the plaintext is wiped before returning.
  absl::StatusOr<DataKey> GenerateDataKey(const Caller& caller, std::string_view key,
                                          const EncryptionContext& context, size_t key_bytes,
                                          bool with_plaintext);
  // Encrypts 1..4096 bytes under `key`'s primary version.
  absl::StatusOr<Ciphertext> Encrypt(const Caller& caller, std::string_view key,
                                     std::span<const uint8_t> plaintext,
                                     const EncryptionContext& context);
  absl::StatusOr<Plaintext> Decrypt(const Caller& caller, std::span<const uint8_t> blob,
                                    const EncryptionContext& context);
  // Decrypts `blob` and encrypts its plaintext under the primary version of
  // `destination_key` (the blob's own key if empty). Needs a decrypt grant on the source and
  // an encrypt grant on the destination. The plaintext never leaves this call.
  absl::StatusOr<ReEncrypted> ReEncrypt(const Caller& caller, std::span<const uint8_t> blob,
                                        const EncryptionContext& source_context,
                                        std::string_view destination_key,
                                        const EncryptionContext& destination_context);

  // Batches: 1..kMaxBatchItems items, each run exactly as its single call would be (its own
  // authorization, grant check, outcome and audit record, under one call id for the batch) and
  // succeeding or failing on its own, in order. The records commit together, once; the results
  // are returned only after that (UNAVAILABLE for the whole batch if the log refuses).
  // INVALID_ARGUMENT for an empty or oversized batch.
  absl::StatusOr<std::vector<absl::StatusOr<DataKey>>> BatchGenerateDataKey(
      const Caller& caller, std::span<const DataKeyItem> items, bool with_plaintext);
  absl::StatusOr<std::vector<absl::StatusOr<Plaintext>>> BatchDecrypt(
      const Caller& caller, std::span<const DecryptItem> items);
  absl::StatusOr<std::vector<absl::StatusOr<ReEncrypted>>> BatchReEncrypt(
      const Caller& caller, std::span<const ReEncryptItem> items);

  // --- Officers -----------------------------------------------------------------------------
  absl::StatusOr<KeyRef> CreateKey(const Caller& caller, const CreateKeyParams& params);
  struct KeyDescription {
    KeyRef key;
    std::vector<storage::VersionUsage> usage;  // per version, as of now
  };
  absl::StatusOr<KeyDescription> DescribeKey(const Caller& caller, std::string_view key);
  absl::StatusOr<storage::KeyPage> ListKeys(const Caller& caller, size_t page_size,
                                            std::string_view page_token);

  // --- Dual control (officers) ---------------------------------------------------------------
  // Every key-management change is a request that executes once enough other officers approve
  // it. Propose validates the operation against the key as it is now; FAILED_PRECONDITION if
  // the key's state does not allow it or the key (table-space key, token, new key's alias)
  // already has a pending request (one change at a time per target, so two requests can never
  // both act on stale state). An operation needing no approval (CreateKey without grants, by
  // default) executes at once.
  absl::StatusOr<Request> Propose(const Caller& caller, const Proposal& proposal);
  // Records the caller's approval; at quorum the request executes exactly once, in the same
  // transaction that records the approval. `expected_digest` must equal RequestDigest() of
  // the request as stored (INVALID_ARGUMENT if empty): the approver approves what they
  // reviewed. Only approvers who are officers under the current policy count.
  // Errors: INVALID_ARGUMENT a request_id not as Propose returns them (a lower-case UUID; so
  // for Reject and GetRequest too), or no digest; NOT_FOUND unknown request;
  // PERMISSION_DENIED the proposer approving;
  // FAILED_PRECONDITION request not pending (executed, rejected, expired, failed), digest
  // mismatch, or the operation no longer applies. Approving twice is OK and counts once.
  absl::StatusOr<Request> Approve(const Caller& caller, std::string_view request_id,
                                  std::string_view expected_digest);
  // Any officer (the proposer included, to withdraw it) may reject a pending request; it then
  // accepts nothing more.
  absl::StatusOr<Request> Reject(const Caller& caller, std::string_view request_id,
                                 std::string_view reason);
  absl::StatusOr<Request> GetRequest(const Caller& caller, std::string_view request_id);
  absl::StatusOr<storage::RequestPage> ListRequests(const Caller& caller,
                                                    const storage::RequestFilter& filter,
                                                    size_t page_size, std::string_view page_token);

  // --- Databases (the key/value gateway, docs/TDE.md) -----------------------------------------
  // A database takes the token officers issued it (IssueDatabaseToken), once, as
  // "cdt.<token id>.<secret>"; only the secret's SHA-256 is kept, and nobody else ever sees it.
  // PERMISSION_DENIED unless the caller is a database and the token's principal; NOT_FOUND
  // for an unknown token id; FAILED_PRECONDITION if it was claimed already, revoked or expired.
  absl::StatusOr<SecureBytes> ClaimDatabaseToken(const Caller& caller, std::string_view token_id);
  struct TdeKey {
    uint32_t version = 0;
    SecureBytes key;  // 32 bytes
  };
  // Version `version` (or the newest) of key `key_id` of `mount`, for the holder of `token`
  // calling from `peer`. PERMISSION_DENIED for a token that is malformed, unknown, wrong,
  // unclaimed, revoked or expired, or whose principal is no database now (coalesced in the
  // log, as every refusal); NOT_FOUND alike for a mount, key id or version that does not
  // exist and for one the token is not bound to. Recorded as FetchTdeKey with the Custos key
  // and version that sealed it and "mount=<m> key_id=<n> version=<v>". `request`: what the
  // gateway found wrong with the request itself (a version that is no number, a path or method
  // that fetches nothing, a body), returned once the token is checked, so that a bad token is
  // PERMISSION_DENIED whatever was asked, and recorded either way; with an empty `mount` the
  // record's detail is its message.
  absl::StatusOr<TdeKey> FetchTdeKey(std::string_view peer, std::string_view token,
                                     std::string_view mount, uint32_t key_id,
                                     std::optional<uint32_t> version,
                                     const absl::Status& request = absl::OkStatus());

  // --- Housekeeping (the server's own timer) ------------------------------------------------
  // Expires pending requests past their TTL, destroys keys whose deletion waiting period has
  // ended (crypto-shredding), rotates keys whose rotation period has passed or whose primary
  // version neared its encryption limit (pre-approved by policy), and flushes usage counts.
  // Audited under kServerPrincipal. Safe to call at any time.
  absl::Status RunMaintenance();

  // Records an event of the server's own (start, stop, policy load) under kServerPrincipal.
  // The server start records the policy too. UNAVAILABLE if the audit sink refuses.
  absl::Status RecordServerStart();
  absl::Status RecordServerStop();
  // Records that a call to `rpc` from `peer` was refused before any use case ran because its
  // client certificate names no usable identity (`reason`, which must hold no secret).
  // Principal and role are empty: nobody was authenticated. UNAVAILABLE if the log refuses,
  // and the caller is then told so rather than left with a refusal nobody recorded.
  absl::Status RecordAuthenticationRefusal(std::string_view rpc, std::string peer,
                                           std::string_view reason);
  // Calls the front door refused before any use case ran (for capacity), counted: one record
  // per tally, so a client retrying in a loop adds a record per interval, not one per call.
  struct RefusedCalls {
    std::string rpc;        // e.g. "GenerateDataKey"
    std::string principal;  // "" if the caller was not authenticated
    std::string peer;       // the caller's address
    absl::StatusCode code = absl::StatusCode::kResourceExhausted;
    std::string reason;  // why, with no secret
    uint64_t count = 0;
    int64_t first = 0;  // Unix seconds of the first and last refusal counted
    int64_t last = 0;
  };
  // One record each, committed together. UNAVAILABLE if the audit log refuses.
  absl::Status RecordRefusedCalls(const std::vector<RefusedCalls>& refused);

  // Signs a checkpoint of the audit log's head with the HSM's signing key, naming the last
  // stored checkpoint as its predecessor, stores it and keeps its head in the HSM (a private
  // data object, audit_head_label), if records were added since the last one. Run by the
  // server's timer, and when woken after checkpoint_every records. FAILED_PRECONDITION while
  // the log awaits re-anchoring.
  absl::Status Checkpoint();
  // At a clean stop, after the last record: signs a last checkpoint and marks the head the HSM
  // keeps as where custosd stopped, so that records added to the file while it is stopped are
  // refused at the next start (VerifyAuditLog, which clears the mark).
  absl::Status CloseAuditLog();

  // --- Start-up -------------------------------------------------------------------------------
  // Checks, before anything is served, that nobody rewrote the audit log while custosd was
  // stopped: the latest stored checkpoint is signed by this HSM's key; the log extends the
  // head this HSM last signed (it reaches that seq, nothing was removed or rewritten up to
  // it: the chain is recomputed from there to the head) and the stored checkpoints reach it
  // too (none were deleted). With `full`, or if the HSM keeps no head yet (a state from
  // before it did, whose log is then trusted once), the whole chain is recomputed.
  // FAILED_PRECONDITION naming what is wrong: history was rewritten or truncated, or an older
  // copy of the database restored.
  absl::Status VerifyAuditLog(bool full);
  // After VerifyAuditLog refused a log that is legitimate (a restore from backup): serve
  // nothing but what lets officers approve a ReAnchorAuditLog request (Propose of that
  // operation, Approve, Reject, GetRequest, ListRequests; auditors may read); every other
  // call, maintenance and checkpoints wait. Executing the request records `problem`, signs
  // the log as it stands and keeps that head in the HSM.
  void RequireReAnchoring(std::string problem);
  // At a start whose log awaits re-anchoring: expires every ReAnchorAuditLog request still
  // pending from an earlier run, so that approvals given for one start's problem (or before a
  // restore) never count toward accepting another's.
  absl::Status ExpireEarlierReAnchorings();
  // Why the log awaits re-anchoring; empty if it does not (health checks ask).
  std::string AnchorProblem() const;
  // The role `principal` holds under the current policy; none if it holds none.
  std::optional<policy::Role> RoleOf(std::string_view principal) const {
    return CurrentPolicy()->RoleOf(principal);
  }
  // Seals a catalogue written before rows carried MACs, once (KeyStore::SealCatalog), each row
  // recorded as SealCatalogRow. Returns the number of rows sealed.
  absl::StatusOr<uint64_t> SealCatalog();
  // The latest signed checkpoint and the PEM public key that verifies it (auditors only).
  struct SignedCheckpoint {
    audit::Checkpoint checkpoint;
    std::string message;  // exactly what was signed
    std::string public_key_pem;
  };
  absl::StatusOr<SignedCheckpoint> LatestCheckpoint(const Caller& caller);
  // Audit records from `from_seq`, at most `limit` (auditors only).
  absl::StatusOr<std::vector<audit::Record>> ReadAudit(const Caller& caller, uint64_t from_seq,
                                                       size_t limit);
  // Stored signed checkpoints from `from_seq`, ascending, at most `limit` (auditors only).
  absl::StatusOr<std::vector<audit::Checkpoint>> ReadCheckpoints(const Caller& caller,
                                                                 uint64_t from_seq, size_t limit);

  // Approvals needed for `operation` with `params` under this server's config. A CreateKey
  // that grants anything needs UpdateKeyGrants's quorum as well as its own: granting is a
  // change to who may use a key, whichever request makes it.
  int ApprovalsFor(policy::Operation operation, const OperationParams& params) const;
  // The same for a stored request (its parameters decoded; 0 if they cannot be).
  int ApprovalsFor(const Request& request) const;

  // The label of the root key new versions are wrapped under now.
  std::string CurrentRoot() const;
  // CurrentRoot, for a new version: the label custosd read at start, before the log was checked
  // against the HSM, is used only once the store, read again over the checked log, agrees
  // (once a run, and again after a re-anchoring or a root rotation that failed). The first call may
  // walk the live log (KeyStore::Absence::kProven): maintenance proves it once its own walk is
  // done, else the first new version does. DATA_LOSS if the record of the last root rotation
  // was deleted outside Custos.
  absl::StatusOr<std::string> RootForNewVersions();

  // The context HMAC cache's lookups answered from memory, and the rest (for the metrics).
  std::pair<uint64_t, uint64_t> ContextHmacCacheCounts() const {
    return {context_macs_.hits(), context_macs_.misses()};
  }

  // Keys whose usage counters are in memory (for the metrics: keys.usage_cache sizing).
  size_t UsageTrackedKeys() const { return usage_.tracked_keys(); }

 private:
  class Call;

  std::shared_ptr<const policy::Policy> CurrentPolicy() const;
  absl::Status ConfirmTokenClaim() const;  // Options::confirm_token_claim
  absl::StatusOr<KeyRef> FindKey(std::string_view key) const;
  // The key named `key_name`, if the caller may encrypt under it now (grant, state).
  absl::StatusOr<KeyRef> KeyForEncryption(Call& call, std::string_view key_name) const;
  // What sealing under a key's primary version takes: the blob's header, the AAD and the
  // wrapped version (a view into the key record).
  struct Sealing {
    BlobHeader header;
    WipedBytes aad;
    hsm::WrappedKey version;
  };
  // Counts the encryption first: none happens past the version's limit. A reservation due
  // is written at once, or left in `reservation` if there is one (a call's, which writes it
  // with the call's record: UsageTracker::Deferred).
  absl::StatusOr<Sealing> SealingFor(const storage::KeyRecord& key,
                                     const EncryptionContext& context,
                                     UsageTracker::Deferred* reservation);
  absl::StatusOr<Ciphertext> EncryptUnder(const storage::KeyRecord& key,
                                          std::span<const uint8_t> plaintext,
                                          const EncryptionContext& context,
                                          UsageTracker::Deferred* reservation);
  // A fresh data key of `key_bytes` sealed under `key`: one HSM call draws and seals it.
  absl::StatusOr<DataKey> GenerateUnder(const storage::KeyRecord& key, size_t key_bytes,
                                        const EncryptionContext& context,
                                        UsageTracker::Deferred* reservation);
  absl::StatusOr<Plaintext> DecryptBlob(Call& call, std::span<const uint8_t> blob,
                                        const EncryptionContext& context);
  // The HSM part of a decryption, once the caller may: version checks and the unseal.
  absl::StatusOr<Plaintext> OpenBlob(const storage::KeyRecord& key, const ParsedBlob& parsed,
                                     const EncryptionContext& context);
  // The gateway's dual-control operations (core/tde.cc): what a proposal must be to be made,
  // the name its changes lock ("" for none), and its execution.
  absl::Status CheckGatewayProposal(policy::Operation operation, const OperationParams& params);
  static std::string GatewayLockName(policy::Operation operation, const OperationParams& params);
  absl::StatusOr<Request> ExecuteGateway(Call& call, Request request,
                                         const OperationParams& params);
  // FAILED_PRECONDITION if `operation` would leave table-space keys that `key` seals unreadable
  // (DisableKey, ScheduleKeyDeletion, SetMinDecryptVersion past their versions) or open to apps
  // (UpdateKeyGrants granting anyone).
  absl::Status CheckTdeSealing(const storage::KeyRecord& key, policy::Operation operation,
                               const OperationParams& params) const;
  // Closes `request` FAILED with the reason `failed` gives, recorded with the call.
  absl::StatusOr<Request> CloseFailed(Call& call, Request request, const absl::Status& failed);
  // The data-plane use cases inside their Call, shared by the single and the batch calls.
  absl::StatusOr<DataKey> GenerateDataKeyIn(Call& call, const DataKeyItem& item,
                                            bool with_plaintext);
  absl::StatusOr<Plaintext> DecryptIn(Call& call, const DecryptItem& item);
  absl::StatusOr<ReEncrypted> ReEncryptIn(Call& call, const ReEncryptItem& item);
  template <typename T, typename Item, typename Run>
  absl::StatusOr<std::vector<absl::StatusOr<T>>> RunBatch(const Caller& caller,
                                                          policy::Action action,
                                                          std::span<const Item> items, Run run);
  absl::Status ValidateCreate(const CreateKeyParams& params) const;
  // ALREADY_EXISTS if `alias` names a key; the call is then recorded against that key, not
  // against the id a new key would have had (which never exists).
  absl::Status CheckAliasFree(Call& call, const std::string& alias) const;
  // A new key record from `params`, its first version generated in the HSM.
  absl::StatusOr<storage::KeyRecord> NewKey(const Caller& caller, const CreateKeyParams& params);
  // The key `operation` would leave behind (without writing it); FAILED_PRECONDITION or
  // INVALID_ARGUMENT if it does not apply to `key` as it is now.
  absl::StatusOr<storage::KeyRecord> Applied(const storage::KeyRecord& key,
                                             policy::Operation operation,
                                             const OperationParams& params);
  // The one place that changes key state: executes an approved request, writing the key and
  // the request in one transaction. Called with the request's ChangeLock held.
  absl::StatusOr<Request> Execute(Call& call, Request request, const OperationParams& params);
  // Executes a RotateRootKey request (see docs/ARCHITECTURE.md, "Root key rotation"): the new
  // root is in use when it returns; versions under legacy roots are re-wrapped afterwards, in
  // the background (MigrateRoots), with the request's progress shown by GetRequest.
  absl::StatusOr<Request> RotateRoot(Call& call, Request request);
  // FAILED_PRECONDITION while a root rotation's re-wrapping is not done.
  absl::Status NoRootMigrationRunning() const;
  // Starts the background re-wrapping kRootMigrationSetting names, unless it runs already or
  // nothing is named. Called with requests_mu_ held.
  absl::Status ResumeRootMigration();
  // The background re-wrapping itself (on migration_thread_), page by page, until done or
  // stopped; HSM and audit log outages are waited out.
  void MigrateRoots(const std::string& job);
  // Waits `delay` unless stopped first; false once stopped.
  bool MigrationPause(std::chrono::milliseconds delay);
  // `request` with its background progress, if it has any running.
  Request WithProgress(Request request) const;
  // Executes a ReAnchorAuditLog request.
  absl::StatusOr<Request> ReAnchor(Call& call, Request request);
  // FAILED_PRECONDITION: the log passed its start-up check, so a re-anchoring has no place.
  static absl::Status NothingToReAnchor();
  // Refuses now an ArchiveAuditLog proposal that could not execute: `through` must be a
  // stored checkpoint past the live log's start.
  absl::Status CheckArchiveProposal(uint64_t through) const;
  // Executes an ArchiveAuditLog request (docs/AUDIT.md, "Archiving the log").
  absl::StatusOr<Request> ArchiveAudit(Call& call, Request request, uint64_t through);
  // The start-up check of where the live log starts: the archival floor kept (sealed) in the
  // catalogue, the database's own, the first record and the checkpoint signed there agree.
  absl::Status CheckAuditFloor() const;
  // Gives the archive of the archival up to `floor` its name, removes pending files of
  // archivals that did not commit and are covered, and warns of the others
  // (storage::PublishAuditArchives).
  void PublishArchives(uint64_t floor) const;
  // A maintenance turn's share of removing archived records still stored: slices of a short
  // transaction each, so that calls commit in between. True if some are left.
  absl::StatusOr<bool> RemoveArchivedRecords();
  // UNAVAILABLE (saying why) while the log awaits re-anchoring: `operation` must wait.
  absl::Status ServingAllowed(policy::Operation operation) const;
  // Raises the alarm, once per row, for a catalogue row that failed its integrity check
  // (`status` carries storage::kIntegrityPayload): an error log line and an audit record.
  void RaiseIntegrityAlarm(const absl::Status& status) const;
  // Destroys every retired root (kRetiredRootsSetting) that wraps no stored version any more,
  // recording each attempt under `request_id` (empty when maintenance runs it). Called with
  // requests_mu_ held. Nothing is destroyed or dropped from the list until the root in use is
  // proven (RootForNewVersions), since that root is never destroyed.
  absl::Status DestroyRetiredRoots(const std::string& request_id);
  // The stored versions under each of `labels`, counted from every key's checked row
  // (storage::KeyStore::CountVersionsChecked), for deciding which roots to retire or destroy.
  // nullopt while that cannot be known: a key's row failed its check (its alarm raised), and
  // for an hour after, so that an edited row does not have every maintenance turn read the
  // whole catalogue again. Called with requests_mu_ held.
  absl::StatusOr<std::optional<std::map<std::string, uint64_t>>> CheckedRootUse(
      const std::set<std::string>& labels);
  // kRetiredRootsSetting's labels. Its absence only holds back their destruction, unless the
  // list is to be written back with more (`absence`: kProven).
  absl::StatusOr<std::vector<std::string>> RetiredRoots(
      storage::KeyStore::Absence absence = storage::KeyStore::Absence::kHarmless) const;
  // What a key-management change holds while it checks and writes: requests_mu_ exclusively
  // for the changes that concern the whole server (root rotation, re-anchoring the log), else,
  // by name (key_locks_), the key it changes (or what else it changes alone), then
  // requests_mu_ shared. In that order: a change waiting for its key holds nothing that a
  // server-wide change waits for (those take no key lock). Members in locking order, released
  // the other way round; built once, never assigned over.
  struct ChangeLock {
    ChangeLock() = default;
    ChangeLock(ChangeLock&&) = default;
    ChangeLock& operator=(ChangeLock&&) = delete;

    KeyLocks::Held held;
    std::shared_lock<std::shared_mutex> shared;
    std::unique_lock<std::shared_mutex> exclusive;
  };
  ChangeLock LockServer();
  ChangeLock LockShared(const std::string& name);
  // The lock a change to the request `request_id` takes (NOT_FOUND if there is none).
  absl::StatusOr<ChangeLock> LockRequest(std::string_view request_id);
  static std::string KeyLockName(const std::string& key_id) { return "key/" + key_id; }
  // The name a change to `request` locks: its key's, a gateway key's or token's, a new key's
  // alias, or else its own.
  static std::string LockNameOf(const Request& request);
  // What a change naming no key locks: a gateway key or token, or the alias of a key to be
  // created; "" when nothing else can name it yet (a new token, a key without an alias).
  static std::string TargetLockName(policy::Operation operation, const OperationParams& params);
  // FAILED_PRECONDITION if a pending request locks `target` (a LockNameOf name; "" names
  // nothing), expiring those past `now` first. Called with `target`'s lock held.
  absl::Status RefusePending(const std::string& target, int64_t now);
  absl::StatusOr<Request> LoadPending(Call& call, std::string_view request_id);
  absl::Status Expire(Request request);
  absl::Status DestroyKey(const std::string& key_id);
  // Purges erased material from the database files if a purge is pending; records the attempt.
  absl::Status PurgeErased();
  // Rotates `key_id` (pre-approved by policy). With `worn_version`, only while that version is
  // still the key's primary; without, only while it is due by period at `now`. Called with the
  // key's lock held.
  absl::Status AutoRotate(const std::string& key_id, std::optional<uint32_t> worn_version,
                          int64_t now);
  // The turn's work, each step under the lock it needs (see ChangeLock).
  // `new_versions`: the root in use is proven, so due rotations are made (else they wait, and
  // nothing is recorded for them).
  absl::Status RunMaintenanceTurn(bool new_versions);
  // An audit event of the server's own (principal kServerPrincipal).
  audit::Event ServerEvent(std::string_view action, const std::string& key_id,
                           const std::string& request_id, absl::StatusCode outcome,
                           std::string detail = "") const;
  // Commits `batch` with the audit records of `events` in one transaction (group-committed
  // with concurrent callers), then mirrors the events to the operator's sink. UNAVAILABLE if
  // the log cannot be written: nothing of the batch is then written either.
  absl::Status Commit(storage::WriteBatch batch, const std::vector<audit::Event>& events) const;
  // What follows a commit of the records of `events`, however written: their mirror to the
  // operator's sink, and their count towards the next checkpoint.
  void Committed(const std::vector<audit::Event>& events) const;
  // The audit HMAC of `context`, from the HSM or the context cache (whose entries are
  // `principal`'s own: no caller learns by timing what contexts another used).
  absl::StatusOr<std::string> ContextHmac(std::string_view principal,
                                          const EncryptionContext& context) const;
  // The audit record of an encryption reservation (ReserveEncryptions).
  audit::Event ReservationEvent(const storage::VersionUsage& reservation) const;
  // Writes an encryption reservation with its audit record, in a transaction of its own.
  absl::Status Reserve(const storage::VersionUsage& reservation) const;
  // The PEM public key of audit signing key `label`, exported (and self-checked) by the HSM
  // the first time, then from memory: auditors polling for checkpoints cost the HSM nothing,
  // and are answered while it is busy or stuck.
  absl::StatusOr<std::string> SigningPublicKey(const std::string& label);

  Options options_;
  mutable std::mutex policy_mu_;
  std::shared_ptr<const policy::Policy> policy_;
  std::string root_key_label_;                    // guarded by policy_mu_
  bool root_proven_ = false;                      // guarded by policy_mu_; see RootForNewVersions
  std::atomic<bool> root_refusal_logged_{false};  // maintenance logs one refusal a run
  bool RootProven() const {
    std::lock_guard lock(policy_mu_);
    return root_proven_;
  }
  std::string anchor_problem_;  // guarded by policy_mu_; empty unless awaiting re-anchoring
  // With key_locks_, serialises request state changes and key changes (see ChangeLock), so
  // every request moves through its states exactly once; the data path never takes it. Changes
  // to one key take it shared and lock that key: changes to other keys run side by side, and
  // all wait out what holds it exclusively, a root rotation above all, which must not miss a
  // key being wrapped under the root it retires. A direct CreateKey takes it shared, after its
  // alias's lock if it names one (the store refuses a taken alias).
  std::shared_mutex requests_mu_;
  // Until when CheckedRootUse reads nothing, after a key's row failed its check there.
  std::chrono::steady_clock::time_point root_use_unknown_until_;  // guarded by requests_mu_
  // Retired roots a checked walk found no version under, this run: one walk a root, however
  // often its destruction is retried. None gains a version again (new versions go under the
  // root in use; re-wrapping moves them off legacy roots).
  std::set<std::string> roots_checked_empty_;  // guarded by requests_mu_
  KeyLocks key_locks_;
  UsageTracker usage_;
  ObservedTime observed_;
  mutable ContextMacCache context_macs_;
  mutable std::atomic<uint64_t> records_since_checkpoint_{0};
  std::mutex checkpoint_mu_;   // one signer at a time (timer, RPC), so counts are taken once
  std::mutex maintenance_mu_;  // one maintenance turn at a time (a purge follows destructions)
  mutable std::mutex alarm_mu_;
  mutable std::set<std::string> alarmed_rows_;  // guarded by alarm_mu_
  std::mutex public_keys_mu_;
  std::map<std::string, std::string> public_keys_;  // label -> PEM; guarded by public_keys_mu_
  RefusalCounter refusal_counter_;                  // set before serving
  // A root rotation's background re-wrapping: one at a time, on its own thread.
  mutable std::mutex migration_mu_;
  std::condition_variable migration_cv_;  // wakes a pause when stopping
  bool migration_stopping_ = false;       // guarded by migration_mu_
  bool migration_running_ = false;        // guarded by migration_mu_
  std::string migration_request_;         // guarded by migration_mu_: whose progress
  std::string migration_progress_;        // guarded by migration_mu_
  std::thread migration_thread_;          // guarded by migration_mu_
};

}  // namespace custos::core
