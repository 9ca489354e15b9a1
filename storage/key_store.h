// KeyStore: the durable catalogue of keys, their wrapped versions and grants, in SQLite.
//
// One SQLite file in WAL mode (synchronous=FULL) holds everything; the schema is versioned
// and migrated forward on open. Key versions are stored only in wrapped form (under the HSM's
// root key), so the catalogue grows by rows, never by HSM objects.
//
// Reads on the hot path (GetKey, FindKeyByAlias) are served from an in-memory copy kept in
// step with every write this process makes; the process is the database's only writer.
// Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "audit/record.h"
#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::storage {

enum class KeyState { kEnabled = 1, kDisabled = 2, kPendingDeletion = 3, kDestroyed = 4 };
std::string_view KeyStateName(KeyState state);

struct KeyVersion {
  uint32_t version = 0;  // 1, 2, ... in creation order
  Bytes wrapped;         // AES-KWP under the root key named by root_key_label; empty once
                         // the key is DESTROYED (crypto-shredded)
  std::string root_key_label;
  int64_t created_at = 0;  // Unix seconds
};

// How much one key version has been used. Kept apart from KeyRecord (it changes on the hot
// path; the record does not). `encryptions_reserved` is a high-water mark reserved in blocks
// ahead of use, so a crash can never make the durable count go backwards.
struct VersionUsage {
  std::string key_id;
  uint32_t version = 0;
  uint64_t encryptions_reserved = 0;
  uint64_t encryptions = 0;  // as last flushed (<= encryptions_reserved)
  uint64_t decryptions = 0;  // as last flushed
  int64_t last_used_at = 0;  // Unix seconds; 0 if never
  Bytes mac;                 // as stored (see row_codec.h); set by the store, empty if none
};

struct KeyRecord {
  std::string id;     // canonical lower-case UUID
  std::string alias;  // unique; empty if none
  std::string description;
  std::map<std::string, std::string> tags;
  KeyState state = KeyState::kEnabled;
  int64_t created_at = 0;
  std::string created_by;  // principal
  uint32_t primary_version = 0;
  std::vector<KeyVersion> versions;      // ascending by version
  std::set<std::string> encrypt_grants;  // app principals that may encrypt / generate
  std::set<std::string> decrypt_grants;  // app principals that may decrypt
  uint32_t min_decrypt_version = 1;      // versions below it are retired: decrypt refused
  int64_t rotation_period_seconds = 0;   // automatic rotation; 0 = never
  int64_t deletion_due_at = 0;           // PENDING_DELETION: when destruction is due
  int64_t destroyed_at = 0;              // DESTROYED: when it was shredded
  // PENDING_DELETION: the server's observed time (seconds of its own running, summed over
  // every run; see core/observed_time.h) at which destruction is due. Destruction waits for
  // both this and deletion_due_at, so a clock stepped forward cannot shred a key early.
  int64_t deletion_due_observed = 0;
  // The versions, ascending, that held an encryption reservation when this row was written;
  // set by the store. A usage row these name is never absent or unreserved: a reservation
  // deleted with every row index entry naming it is caught by the key's row, whose own
  // newest record (and every one after it) is checked. Reservations recorded after that
  // record are found by that check (an archival carrying the row forward carries them
  // again after it).
  std::vector<uint32_t> reserved_versions;
  Bytes mac;  // as stored (see row_codec.h); set by the store, empty if none
  // Set (and the key unusable) when listing found that the row failed its integrity check;
  // empty otherwise. Never stored.
  std::string integrity_problem;

  const KeyVersion* FindVersion(uint32_t version) const;
};

// A dual-control request: an officer's proposal, its approvals and how it ended.
enum class RequestState { kPending = 1, kExecuted = 2, kRejected = 3, kExpired = 4, kFailed = 5 };
std::string_view RequestStateName(RequestState state);

struct Approval {
  std::string principal;
  int64_t at = 0;
};

struct RequestRecord {
  std::string id;          // canonical lower-case UUID
  std::string operation;   // e.g. "RotateKey"
  std::string key_id;      // empty for operations on no single key (root rotation)
  std::string parameters;  // canonical text of the operation's parameters
  std::string justification;
  std::string proposer;
  int64_t created_at = 0;
  int64_t expires_at = 0;
  RequestState state = RequestState::kPending;
  std::vector<Approval> approvals;  // in the order given; distinct principals
  std::string rejected_by;          // REJECTED: who
  std::string reason;               // REJECTED: why; FAILED/EXECUTED: what happened
  int64_t closed_at = 0;            // when it left PENDING
  Bytes mac;                        // as stored (see row_codec.h); set by the store
  std::string integrity_problem;    // set by ListRequests for a row failing its check
  // Not stored: what an executed request left running in the background (a root rotation
  // re-wrapping versions) has done so far; set by core::Kms, empty when nothing runs.
  std::string progress;
};

struct RequestFilter {
  std::optional<RequestState> state;
  std::string key_id;  // empty = any
};

struct RequestPage {
  std::vector<RequestRecord> requests;  // newest first (created_at, then id, descending)
  std::string next_page_token;
};

// Where the live audit log starts after an archival (docs/AUDIT.md): records up to and
// including `seq` were archived and removed; `hash` is record `seq`'s chain hash, the one the
// checkpoint signed at `seq` (which stays in the database) names. Seq 0: never archived.
struct AuditFloor {
  uint64_t seq = 0;
  Bytes hash;
};

// The record that carries a catalogue row's newest recorded digest forward into the live log
// before the record that last named it is archived: given the row's name and that record's
// seq, an unsealed record (the store names the row, sets its digest, seq and hash).
using CarryRecord = std::function<audit::Record(const std::string& row, uint64_t seq)>;

// An archival, committed with the batch that records it: the live log starts after the floor
// from then on (the records up to it are removed afterwards, by RemoveArchivedRecords).
struct AuditArchival {
  AuditFloor floor;        // the records up to floor.seq go; the log starts after it
  int64_t time = 0;        // when (for audit_archived)
  std::string request_id;  // the dual-control request that approved it
};

// Everything that one state change writes, committed in a single transaction: either all of
// it is durable or none of it is, the audit records of the change included.
struct WriteBatch {
  std::vector<KeyRecord> keys;          // inserted, or replacing the stored key with that id
  std::vector<RequestRecord> requests;  // inserted, or replacing the stored request
  std::map<std::string, std::string> settings;  // server-wide settings, upserted
  // Appended to the audit log in commit order; the store sets each record's seq and chain
  // hash (audit::ChainHash) as it commits it.
  std::vector<audit::Record> audit;
  // Encryption reservations (VersionUsage::encryptions_reserved and the counts), upserted.
  std::vector<VersionUsage> usage;
  // Archived audit records removed, before the batch's own records are appended.
  std::optional<AuditArchival> archival;
};

// How well group commit is batching, since the store was opened: Apply calls committed, and
// the group transactions (each one fsync) that carried them. Other writes (CreateKey,
// checkpoints, usage counters) and WAL checkpoints are not counted.
struct CommitStats {
  uint64_t batches = 0;
  uint64_t transactions = 0;
};

struct KeyPage {
  std::vector<std::shared_ptr<const KeyRecord>> keys;  // ascending by id
  std::string next_page_token;                         // empty on the last page
};

// Authenticates catalogue rows with a key the database cannot reach (custosd: an HMAC key in
// the HSM). See row_codec.h and row_integrity.h.
class RowAuthenticator {
 public:
  virtual ~RowAuthenticator() = default;
  // The MAC of `canonical`, a row's canonical encoding. UNAVAILABLE if the key cannot be
  // reached: nothing is then written, and nothing unchecked is served.
  virtual absl::StatusOr<Bytes> Mac(std::span<const uint8_t> canonical) = 0;
};

// The payload (its value: the row's name) of a DATA_LOSS status for a catalogue row that
// failed its integrity check.
inline constexpr char kIntegrityPayload[] = "custos/row-integrity";
// A catalogue row its integrity check refused, as opposed to any other DATA_LOSS (an HSM's,
// say).
inline bool RefusedRow(const absl::Status& status) {
  return absl::IsDataLoss(status) && status.GetPayload(kIntegrityPayload).has_value();
}
// The payload of a status for a row that could not be sealed (the authenticator failed): the
// batch was not written, though the database may be well.
inline constexpr char kSealPayload[] = "custos/row-seal";

class KeyStore {
 public:
  // Opens (creating if needed) the database at `path` and migrates it to the current schema.
  // The file and its WAL are created 0600. With an `authenticator` (which must outlive the
  // store) every row that decides who may do what is sealed when written and checked when read
  // back from the file (row_integrity.h): a row that fails is never served (DATA_LOSS with
  // kIntegrityPayload). Errors: UNAVAILABLE if the file cannot be opened, FAILED_PRECONDITION
  // if it was written by a newer Custos or another process holds it, DATA_LOSS if the audit
  // log's row index was dropped or redefined (audit_rows.h, CheckRowIndexDefinition).
  static absl::StatusOr<std::unique_ptr<KeyStore>> Open(const std::string& path,
                                                        RowAuthenticator* authenticator = nullptr);
  ~KeyStore();

  // Inserts a new key with its versions and grants in one transaction.
  // ALREADY_EXISTS if the id or alias is taken; nothing is written then.
  absl::Status CreateKey(const KeyRecord& key);

  // Writes a batch in one transaction (see WriteBatch). Concurrent calls are committed in
  // groups: one transaction and one fsync for every batch queued meanwhile, each batch under
  // its own savepoint, so a failing batch fails alone. A key in the batch replaces the
  // stored key with its id entirely (row, tags, versions, grants); a version whose `wrapped`
  // became empty has its material overwritten on disk (secure_delete). ALREADY_EXISTS if an
  // alias would be taken twice; nothing is written on any error.
  absl::Status Apply(const WriteBatch& batch);

  CommitStats GetCommitStats() const;
  // Told after each group commit of Apply calls, with the calls it made durable and how long
  // its transaction took, begin to durable commit (for the metrics). Set before the store is
  // used from several threads; it runs under the store's lock: keep it quick.
  using CommitObserver = std::function<void(size_t batches, std::chrono::nanoseconds took)>;
  void ObserveCommits(CommitObserver observer);

  // Fault injection for tests of what fails closed: while `fault` is not OK, every Apply
  // fails with it before writing anything (as a full disk or a failed fsync would).
  void InjectWriteFault(absl::Status fault);

  // Whether the database can commit now, for health checks: one write transaction that
  // rewrites the schema version with its own value (a page written to the WAL and synced, as
  // any commit, and nothing of meaning changed: no row, no audit record). Waits at most
  // `busy_timeout` for another connection's write lock, then UNAVAILABLE, as for a full disk
  // or an I/O error; the injected write fault, if any. Waits behind a group commit under way.
  absl::Status ProbeCommit(std::chrono::milliseconds busy_timeout);

  // Another connection holding a read transaction open (an auditor's `sqlite3` session left
  // in a BEGIN, a backup tool) keeps every checkpoint short of the WAL's end, so the WAL grows
  // with every commit until that reader lets go. Past `warn_bytes` (default 256 MiB) each
  // ProbeCommit sees it: a warning once, and a line when it is back under. A WAL that starts
  // over after the reader left is cut back to min(64 MiB, warn_bytes / 2) at its next commit
  // (journal_size_limit), so the space it took is given back to the disk.
  absl::Status WarnWalAbove(uint64_t warn_bytes);

  // Makes material erased by Apply unrecoverable from the files: checkpoints the WAL into
  // the database (whose freed pages secure_delete has zeroed) and truncates it.
  absl::Status PurgeErased();

  // NOT_FOUND if there is no such request.
  absl::StatusOr<RequestRecord> GetRequest(std::string_view id) const;
  // Requests matching `filter`, newest first, `page_size` (1..1000) at a time.
  absl::StatusOr<RequestPage> ListRequests(const RequestFilter& filter, size_t page_size,
                                           std::string_view page_token) const;
  // Requests still PENDING (whatever their expiry), oldest first.
  absl::StatusOr<std::vector<RequestRecord>> PendingRequests() const;

  // Ids of keys whose deletion is due (PENDING_DELETION, deletion_due_at <= now and
  // deletion_due_observed <= observed), and of ENABLED keys whose primary version is older
  // than their rotation period at `now`.
  absl::StatusOr<std::vector<std::string>> KeysDueForDeletion(int64_t now, int64_t observed) const;
  absl::StatusOr<std::vector<std::string>> KeysDueForRotation(int64_t now) const;

  // Recomputes the audit chain from the record after `seq` to the head: record `seq` (if not 0)
  // must have the stored hash `hash`, and every later one must chain to the one before it.
  // FAILED_PRECONDITION naming the first record that does not (its content, or its hash, was
  // changed). DATA_LOSS if the records are intact but the row index lacks one of them
  // (CheckRowIndexed). Reads a page at a time.
  absl::Status VerifyAuditChainFrom(uint64_t seq, std::span<const uint8_t> hash) const;
  // After the start-up check: every record after `seq` is known intact and `hash` is record
  // `seq`'s authentic hash (0: every record is). From then on a row is believed only if the
  // record vouching for it is intact too, recomputed on first need (storage/audit_trust.h).
  // `rows_noted` false: the records after `seq` were not all verified yet (a provisional anchor
  // during the start-up check), so a row they name is not refused for being noted by none.
  void AnchorAuditLog(uint64_t seq, Bytes hash, bool rows_noted = true);
  // Recomputes up to `budget` more records below the anchored point, with their row index
  // entries, noting the rows they name (for maintenance, so that no first use of an old row
  // waits for it, and every row the live log names is soon noted). FAILED_PRECONDITION if
  // they were changed.
  absl::Status VerifyOlderAuditRecords(uint64_t budget);
  // True once every record of the live log below the anchored point has been recomputed (or
  // the log is not anchored): an absent setting is then read without a walk.
  bool LiveLogWalked() const;

  // Seals a catalogue written before rows carried MACs, once: every key, request, reservation
  // and setting is written back sealed, each with the audit record `record_for(row name)`
  // names it in, and a last setting ("catalog_sealed", with its record) says the catalogue is
  // sealed. From then on an unsealed row is an integrity failure and is never sealed again.
  // Settings named in `replay_safe` are sealed without a record. Returns the number of rows sealed:
  // 0 if the catalogue was sealed before or there is no authenticator. Before sealing, the whole
  // live log is recomputed against the anchor (AnchorAuditLog): FAILED_PRECONDITION, sealing
  // nothing, if it was changed (a "sealed" record renamed, say).
  absl::StatusOr<uint64_t> SealCatalog(
      const std::function<audit::Record(const std::string& row)>& record_for,
      const std::set<std::string>& replay_safe);

  // Where the live log starts: the newest archival's floor (seq 0 if never archived).
  absl::StatusOr<AuditFloor> AuditLogFloor() const;
  // The seq of the newest record naming catalogue row `row` (0 if none does).
  absl::StatusOr<uint64_t> LastRecordNaming(std::string_view row) const;
  // The first live record's seq, after the floor (0 if there is none).
  absl::StatusOr<uint64_t> FirstAuditSeq() const;
  // Removes up to `limit` of the oldest archived records still stored, in one short
  // transaction; returns how many (0 when none is left). An archival commits its floor first
  // and leaves its records to this, so that no commit waits on millions of deletions; readers
  // never see them (ReadAudit, FirstAuditSeq, AuditLogReader start after the floor).
  absl::StatusOr<size_t> RemoveArchivedRecords(size_t limit);
  // Before an archival up to `through_seq`: for about `limit` catalogue rows whose newest
  // naming record is at or before it (a key's row with every reservation of the key, which
  // may go past it), appends `carry`'s record naming the row with that same
  // recorded digest (never one computed from the row as stored, so a row changed outside
  // Custos stays refused), in one transaction. Rows are taken in name order after `after`
  // (start with ""), which is moved past the last row carried once committed, so that each
  // call goes on where the last one stopped (a row passed cannot need carrying later: its
  // newer records come after `through_seq`). Returns how many; 0 when none is left. The
  // archival refuses to commit if any row is left (one written outside Custos meanwhile).
  absl::StatusOr<size_t> CarryForwardRowRecords(uint64_t through_seq, const CarryRecord& carry,
                                                size_t limit, std::string& after);
  // Live audit records (after the floor) with seq >= `from_seq`, at most `limit`, in seq order.
  absl::StatusOr<std::vector<audit::Record>> ReadAudit(uint64_t from_seq, size_t limit) const;
  // The last record's seq and hash (0 and 32 zero bytes for an empty log).
  absl::StatusOr<std::pair<uint64_t, Bytes>> AuditHead() const;
  // The same without waiting: nothing while a commit holds the store.
  std::optional<std::pair<uint64_t, Bytes>> AuditHeadIfIdle() const;
  // Stores a checkpoint; the newest one, or nullopt if none yet.
  absl::Status PutCheckpoint(const audit::Checkpoint& checkpoint);
  absl::StatusOr<std::optional<audit::Checkpoint>> LatestCheckpoint() const;
  absl::StatusOr<std::vector<audit::Checkpoint>> Checkpoints() const;
  // Checkpoints with seq >= `from_seq`, ascending, at most `limit` (1..1000).
  absl::StatusOr<std::vector<audit::Checkpoint>> ReadCheckpoints(uint64_t from_seq,
                                                                 size_t limit) const;

  // That the records after `head_seq` (the last the HSM's head covers, after a run that did
  // not sign its end) were written by Custos: each write transaction marks the log's newest
  // record with an HMAC of its chain hash, under a key made per run from the authenticator's
  // (the HSM's catalogue key) and a nonce stored with the mark. FAILED_PRECONDITION if the
  // newest record is not the one marked, there is no mark, or it does not verify (records
  // appended, cut or changed with SQL meanwhile; or a state from before marks, Custos 0.x,
  // left by a crash: re-anchoring accepts it); UNAVAILABLE if the authenticator cannot be
  // reached. OK without an authenticator.
  absl::Status CheckAuditTail(uint64_t head_seq);
  // Makes the run's tail mark key now (one authenticator call), so that the first write does
  // not wait for the HSM holding the database; else that write makes it.
  absl::Status PrepareTailMarks();
  // Whether writes mark the log's newest record (on by default). Off while the log awaits
  // re-anchoring: the records that run writes after an unexplained tail must not make it
  // pass the next start's check.
  void SetTailMarking(bool on);
  // Turns marking on and marks the log's newest record now, in a transaction of its own
  // (after an approved re-anchoring is committed).
  absl::Status ResumeTailMarks();

  // How many stored versions (crypto-shredded ones excepted) are wrapped under root `label`.
  absl::StatusOr<uint64_t> CountVersionsUnderRoot(std::string_view label) const;
  // The same for every root that wraps a stored version: label -> count (one scan).
  absl::StatusOr<std::map<std::string, uint64_t>> CountVersionsByRoot() const;
  // The stored versions under each of `labels` (0 for none), counted over every key's row
  // checked as a read checks it: for deciding to destroy a root, which the unchecked counts
  // above must not decide alone (an edited or deleted version row would lower them). DATA_LOSS
  // (kIntegrityPayload naming the row) if a key's row fails its check or the audit log names a
  // key whose row is missing: then no count holds. Reads every key, a page at a time.
  absl::StatusOr<std::map<std::string, uint64_t>> CountVersionsChecked(
      const std::set<std::string>& labels) const;
  // The id of a key whose grants name `principal`, if any (from the grants table, by its
  // index, unchecked: a grant row deleted outside Custos fails its key's row check anyway).
  absl::StatusOr<std::optional<std::string>> KeyGranting(std::string_view principal) const;
  // Keys by state, for the metrics: every state, with 0 for those no key is in.
  absl::StatusOr<std::map<KeyState, uint64_t>> CountKeysByState() const;

  // What a setting's absence from the database is taken for. Custos never deletes a setting,
  // but one deleted with the row index entries of every record naming it leaves no trace that
  // a probe finds: only a walk of the whole live log shows those records unindexed.
  enum class Absence {
    // Never set only once the whole live log is known intact: the first such read after the
    // log is anchored (AnchorAuditLog) walks what is left of it, seconds per million records,
    // as maintenance's VerifyOlderAuditRecords would; DATA_LOSS (kIntegrityPayload
    // "audit_log") if it does not verify, from then on until the log is anchored again. For a
    // setting whose absence would let something happen that its presence forbids.
    kProven,
    // Never set unless a record the row index or this run's walks know of names it. For a
    // setting whose absence only refuses a call, holds work back (no such token; nothing to
    // resume, purge or destroy) or allows what can be undone (disabling a key): no caller
    // waits for a walk, and a log found changed does not stop that work's every turn.
    kHarmless,
  };
  // A server-wide setting written by Apply (with an audit record naming it); nullopt if never
  // set (see Absence). DATA_LOSS (kIntegrityPayload) if it fails its check.
  absl::StatusOr<std::optional<std::string>> GetSetting(std::string_view name,
                                                        Absence absence = Absence::kProven) const;
  // A replay-safe setting: one whose older values may be served again without harm (observed
  // time: an older value only delays destruction). Sealed, but written without an audit record.
  absl::StatusOr<std::optional<std::string>> GetReplaySafeSetting(std::string_view name) const;
  absl::Status PutReplaySafeSetting(const std::string& name, const std::string& value);

  // Usage counters of a key's versions (absent versions have never been used). Reservations
  // are checked: DATA_LOSS (kIntegrityPayload) if one fails, or if a version's row is missing
  // although the audit log recorded it.
  absl::StatusOr<std::vector<VersionUsage>> GetUsage(std::string_view key_id) const;
  // The same rows with nothing checked, for counts that inform and guard nothing (decryptions,
  // last use): their reservations may have been edited and must never be counted into.
  absl::StatusOr<std::vector<VersionUsage>> GetUsageUnchecked(std::string_view key_id) const;
  // Upserts the counts and last use of versions in one transaction, never their reservations
  // (those are written by Apply, with an audit record).
  absl::Status PutUsageCounts(const std::vector<VersionUsage>& usage);

  // NOT_FOUND if there is no such key.
  absl::StatusOr<std::shared_ptr<const KeyRecord>> GetKey(std::string_view id) const;
  absl::StatusOr<std::shared_ptr<const KeyRecord>> FindKeyByAlias(std::string_view alias) const;

  // Keys in id order, `page_size` (1..1000) at a time, starting after `page_token`. A key that
  // fails its integrity check is listed with `integrity_problem` set.
  absl::StatusOr<KeyPage> ListKeys(size_t page_size, std::string_view page_token) const;

  // The schema version this store is at.
  int SchemaVersion() const;

  // How many keys are held in memory right now. Bounded whatever the catalogue's size; for
  // metrics and tests.
  size_t CachedKeyCount() const;

 private:
  class Impl;
  explicit KeyStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace custos::storage
