#include "storage/schema.h"

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
  // Check before taking the write lock, so a newer database is never touched.
  CUSTOS_ASSIGN_OR_RETURN(int version, ReadVersion(db));
  CUSTOS_RETURN_IF_ERROR(CheckNotNewer(version));
  if (version == CurrentSchemaVersion()) return version;

  CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(db));
  // Read again under the write lock: another process may have migrated in between.
  CUSTOS_ASSIGN_OR_RETURN(version, ReadVersion(db));
  CUSTOS_RETURN_IF_ERROR(CheckNotNewer(version));
  for (int step = version; step < CurrentSchemaVersion(); ++step) {
    CUSTOS_RETURN_IF_ERROR(db.Exec(kMigrations[step]));
  }
  CUSTOS_RETURN_IF_ERROR(tx->Commit());
  return CurrentSchemaVersion();
}

}  // namespace custos::storage
