// The key catalogue's SQLite schema and its forward migrations.
//
// The schema version lives in PRAGMA user_version. Migration steps are applied in order, all
// in one transaction, so a database is always at exactly one version. Never edit a released
// step: add a new one at the end. Internal to storage/.
#pragma once

#include "common/status.h"
#include "storage/sqlite.h"

namespace custos::storage {

// The version a fully migrated database is at.
int CurrentSchemaVersion();

// Brings `db` up to CurrentSchemaVersion() and returns that version. FAILED_PRECONDITION if
// the database was written by a newer Custos (its version is higher than ours); nothing is
// changed then.
absl::StatusOr<int> MigrateSchema(sqlite::Database& db);

// As MigrateSchema, but stops at `target` (0..CurrentSchemaVersion()) and returns the version
// the database is then at (higher than `target` if it already was). For tests that need a
// database as an older Custos left it.
absl::StatusOr<int> MigrateSchemaTo(sqlite::Database& db, int target);

}  // namespace custos::storage
