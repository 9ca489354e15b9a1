#include "storage/schema.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace custos::storage {
namespace {

// Step N (1-based) takes a database from version N-1 to N and sets user_version to N in the
// same transaction. Only constant SQL here: no value ever comes from a caller.
constexpr const char* kMigrations[] = {
    // 1: the key catalogue. Child rows belong to their key; wrapped material is removed with
    // it (secure_delete overwrites the freed pages).
    R"sql(
      CREATE TABLE keys (
        id TEXT PRIMARY KEY NOT NULL CHECK (id <> ''),
        alias TEXT CHECK (alias <> ''),
        description TEXT NOT NULL,
        state INTEGER NOT NULL CHECK (state BETWEEN 1 AND 4),
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        primary_version INTEGER NOT NULL
      ) WITHOUT ROWID;
      -- Aliases are unique; keys without one (NULL) stay out of the index altogether.
      CREATE UNIQUE INDEX keys_by_alias ON keys (alias) WHERE alias IS NOT NULL;
      CREATE TABLE key_tags (
        key_id TEXT NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (key_id, name)
      ) WITHOUT ROWID;
      CREATE TABLE key_versions (
        key_id TEXT NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
        version INTEGER NOT NULL CHECK (version > 0),
        wrapped BLOB NOT NULL,
        root_key_label TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (key_id, version)
      ) WITHOUT ROWID;
      CREATE TABLE key_grants (
        key_id TEXT NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
        principal TEXT NOT NULL,
        use TEXT NOT NULL CHECK (use IN ('encrypt', 'decrypt')),
        PRIMARY KEY (key_id, principal, use)
      ) WITHOUT ROWID;
      PRAGMA user_version = 1;
    )sql",
    // 2: key lifecycle and dual control. Keys gain their retirement floor, rotation period
    // and deletion times (existing keys get the defaults: nothing retired, no automatic
    // rotation, no deletion scheduled); requests with their approvals; per-version usage.
    R"sql(
      ALTER TABLE keys ADD COLUMN min_decrypt_version INTEGER NOT NULL DEFAULT 1;
      ALTER TABLE keys ADD COLUMN rotation_period_seconds INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE keys ADD COLUMN deletion_due_at INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE keys ADD COLUMN destroyed_at INTEGER NOT NULL DEFAULT 0;
      -- The periodic sweeps read only the few keys these cover, not the whole catalogue.
      CREATE INDEX keys_pending_deletion ON keys (deletion_due_at) WHERE state = 3;
      CREATE INDEX keys_with_rotation ON keys (state) WHERE rotation_period_seconds > 0;
      CREATE TABLE requests (
        id TEXT PRIMARY KEY NOT NULL CHECK (id <> ''),
        operation TEXT NOT NULL,
        -- NULL for an operation on no single key (root rotation), hence no foreign key.
        key_id TEXT CHECK (key_id <> ''),
        parameters TEXT NOT NULL,
        justification TEXT NOT NULL,
        proposer TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        state INTEGER NOT NULL CHECK (state BETWEEN 1 AND 5),
        rejected_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        closed_at INTEGER NOT NULL
      );
      -- Listings are newest first, optionally by state or key: each reads one index in order.
      CREATE INDEX requests_by_state ON requests (state, created_at, id);
      CREATE INDEX requests_by_key ON requests (key_id, created_at, id);
      CREATE INDEX requests_by_time ON requests (created_at, id);
      CREATE TABLE request_approvals (
        request_id TEXT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
        principal TEXT NOT NULL,
        at INTEGER NOT NULL,
        ordinal INTEGER NOT NULL,  -- position in the request's list of approvals
        PRIMARY KEY (request_id, principal)
      ) WITHOUT ROWID;
      -- No foreign key: counters are flushed on their own schedule, and keys are never
      -- deleted (a destroyed key stays as a tombstone), so no row can be orphaned.
      CREATE TABLE version_usage (
        key_id TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version > 0),
        encryptions_reserved INTEGER NOT NULL,
        encryptions INTEGER NOT NULL,
        decryptions INTEGER NOT NULL,
        last_used_at INTEGER NOT NULL,
        PRIMARY KEY (key_id, version)
      ) WITHOUT ROWID;
      PRAGMA user_version = 2;
    )sql",
    // 3: server-wide settings (e.g. which root key wraps new versions).
    R"sql(
      CREATE TABLE settings (
        name TEXT PRIMARY KEY NOT NULL CHECK (name <> ''),
        value TEXT NOT NULL
      ) WITHOUT ROWID;
      PRAGMA user_version = 3;
    )sql",
    // 4: the audit log, append-only (triggers refuse UPDATE and DELETE), and its signed
    // checkpoints. Records commit in the same transaction as the change they record.
    R"sql(
      CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        principal TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        key_id TEXT NOT NULL,
        key_version INTEGER NOT NULL,
        source_key_id TEXT NOT NULL,
        source_key_version INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        peer TEXT NOT NULL,
        context_hmac TEXT NOT NULL,
        detail TEXT NOT NULL,
        hash BLOB NOT NULL CHECK (length(hash) = 32)
      );
      CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
      CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
      CREATE TABLE audit_checkpoints (
        seq INTEGER PRIMARY KEY,
        hash BLOB NOT NULL,
        time INTEGER NOT NULL,
        key_label TEXT NOT NULL,
        signature BLOB NOT NULL
      );
      PRAGMA user_version = 4;
    )sql",
    // 5: what an insider with the database file cannot get around. Destruction waits for
    // observed time too (core/observed_time.h; it starts at 0 with this version, so a pending
    // deletion is due once as much time as its wall-clock due time had left has been
    // observed). Versions are found by the root that wraps them. Audit records gain format 2
    // (call id, and the catalogue row a record changed with its digest, found by an index);
    // checkpoints name the one before them and are never changed or removed. Every row that
    // decides who may do what carries a MAC under an HSM key (NULL: not sealed yet).
    R"sql(
      ALTER TABLE keys ADD COLUMN deletion_due_observed INTEGER NOT NULL DEFAULT 0;
      UPDATE keys SET deletion_due_observed =
        MAX(0, deletion_due_at - CAST(strftime('%s', 'now') AS INTEGER)) WHERE state = 3;
      CREATE INDEX key_versions_by_root ON key_versions (root_key_label)
        WHERE length(wrapped) > 0;
      ALTER TABLE audit_log ADD COLUMN format INTEGER NOT NULL DEFAULT 1;
      ALTER TABLE audit_log ADD COLUMN call_id TEXT NOT NULL DEFAULT '';
      ALTER TABLE audit_log ADD COLUMN row_name TEXT NOT NULL DEFAULT '';
      ALTER TABLE audit_log ADD COLUMN row_digest TEXT NOT NULL DEFAULT '';
      CREATE INDEX audit_log_by_row ON audit_log (row_name, seq) WHERE row_name <> '';
      ALTER TABLE audit_checkpoints ADD COLUMN format INTEGER NOT NULL DEFAULT 1;
      ALTER TABLE audit_checkpoints ADD COLUMN prev_seq INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE audit_checkpoints ADD COLUMN prev_hash BLOB NOT NULL DEFAULT x'';
      CREATE TRIGGER audit_checkpoints_append_only_update BEFORE UPDATE ON audit_checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit checkpoints are never changed'); END;
      CREATE TRIGGER audit_checkpoints_append_only_delete BEFORE DELETE ON audit_checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit checkpoints are never removed'); END;
      ALTER TABLE keys ADD COLUMN mac BLOB;
      ALTER TABLE requests ADD COLUMN mac BLOB;
      ALTER TABLE version_usage ADD COLUMN mac BLOB;
      ALTER TABLE settings ADD COLUMN mac BLOB;
      PRAGMA user_version = 5;
    )sql",
    // 6: audit log archival (docs/AUDIT.md). Each archival leaves a row here: the records up
    // to and including `through_seq` were written to a verified archive (and are removed after,
    // a slice at a time), and the
    // checkpoint signed at that seq is where the live log now starts. The append-only triggers
    // make one exception, guarded by this table: records at or before the newest archival, and
    // checkpoints before it, may be deleted. The table itself only grows, and only forward.
    R"sql(
      CREATE TABLE audit_archived (
        through_seq INTEGER PRIMARY KEY CHECK (through_seq > 0),
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        time INTEGER NOT NULL,
        request_id TEXT NOT NULL
      );
      CREATE TRIGGER audit_archived_forward BEFORE INSERT ON audit_archived
        WHEN NEW.through_seq <= (SELECT IFNULL(MAX(through_seq), 0) FROM audit_archived)
        BEGIN SELECT RAISE(ABORT, 'audit archival only moves forward'); END;
      CREATE TRIGGER audit_archived_update BEFORE UPDATE ON audit_archived
        BEGIN SELECT RAISE(ABORT, 'audit archivals are never changed'); END;
      CREATE TRIGGER audit_archived_delete BEFORE DELETE ON audit_archived
        BEGIN SELECT RAISE(ABORT, 'audit archivals are never removed'); END;
      DROP TRIGGER audit_log_append_only_delete;
      CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
        WHEN OLD.seq > (SELECT IFNULL(MAX(through_seq), 0) FROM audit_archived)
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
      DROP TRIGGER audit_checkpoints_append_only_delete;
      CREATE TRIGGER audit_checkpoints_append_only_delete BEFORE DELETE ON audit_checkpoints
        WHEN OLD.seq >= (SELECT IFNULL(MAX(through_seq), 0) FROM audit_archived)
        BEGIN SELECT RAISE(ABORT, 'audit checkpoints are never removed'); END;
      PRAGMA user_version = 6;
    )sql",
    // 7: a key's row names the versions that held an encryption reservation when it was last
    // written (KeyRecord::reserved_versions, comma-separated): one of them found without its
    // reservation was deleted, however the row index was edited with it.
    R"sql(
      ALTER TABLE keys ADD COLUMN reserved_versions TEXT NOT NULL DEFAULT '';
      PRAGMA user_version = 7;
    )sql",
    // 8: the log's newest record is marked, in the transaction that writes it, with a MAC of
    // its chain hash under a key made from the HSM's catalogue key (KeyStore::CheckAuditTail):
    // records appended by someone else after custosd stopped without signing its end carry no
    // such mark. One row, replaced at each write. And grants found by principal, so that a
    // policy is checked against them without reading them all (Kms::GrantsFit).
    R"sql(
      CREATE TABLE audit_tail (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        nonce BLOB NOT NULL,
        mac BLOB NOT NULL
      );
      CREATE INDEX key_grants_by_principal ON key_grants (principal);
      PRAGMA user_version = 8;
    )sql",
};

absl::StatusOr<int> ReadVersion(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(const std::string text, db.QueryText("PRAGMA user_version"));
  int version = 0;
  if (!absl::SimpleAtoi(text, &version)) {
    return absl::InternalError(absl::StrCat("unreadable schema version '", text, "'"));
  }
  return version;
}

absl::Status CheckNotNewer(int version) {
  if (version < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("database schema version ", version, " was not written by Custos"));
  }
  if (version <= CurrentSchemaVersion()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("database schema version ", version, " is newer than this Custos supports (",
                   CurrentSchemaVersion(), "); upgrade Custos or restore a matching backup"));
}

}  // namespace

int CurrentSchemaVersion() { return static_cast<int>(std::size(kMigrations)); }

absl::StatusOr<int> MigrateSchema(sqlite::Database& db) {
  return MigrateSchemaTo(db, CurrentSchemaVersion());
}

absl::StatusOr<int> MigrateSchemaTo(sqlite::Database& db, int target) {
  if (target < 0 || target > CurrentSchemaVersion()) {
    return absl::InvalidArgumentError(absl::StrCat("no schema version ", target));
  }
  // Check before taking the write lock, so a newer database is never touched.
  CUSTOS_ASSIGN_OR_RETURN(int version, ReadVersion(db));
  CUSTOS_RETURN_IF_ERROR(CheckNotNewer(version));
  if (version >= target) return version;

  CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(db));
  // Read again under the write lock: another process may have migrated in between.
  CUSTOS_ASSIGN_OR_RETURN(version, ReadVersion(db));
  CUSTOS_RETURN_IF_ERROR(CheckNotNewer(version));
  for (int step = version; step < target; ++step) {
    CUSTOS_RETURN_IF_ERROR(db.Exec(kMigrations[step]));
  }
  CUSTOS_RETURN_IF_ERROR(tx->Commit());
  return std::max(version, target);
}

}  // namespace custos::storage
