// Reading and writing KeyRecords as rows of the keys, key_tags, key_versions and key_grants
// tables, the queries of the lifecycle sweeps, and per-version usage counters. Every
// statement is constant SQL with bound parameters.
//
// Not thread-safe: callers hold the Database's lock. Internal to storage/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "storage/key_store.h"
#include "storage/sqlite.h"

namespace custos::storage {

// Inserts `key` with its tags, versions and grants. Run it inside a write transaction: the
// duplicate checks are only race-free under the write lock. ALREADY_EXISTS naming the id or
// the alias if either is taken; nothing is written then.
absl::Status InsertKey(sqlite::Database& db, const KeyRecord& key);

// Inserts `key`, or replaces the stored key with its id entirely: the keys row is updated in
// place (so nothing hanging off the id is cascaded away), tags and grants are replaced, and
// versions are updated, inserted or deleted one by one, leaving unchanged ones alone. Run it
// inside a write transaction. ALREADY_EXISTS naming the alias if another key holds it.
absl::Status WriteKey(sqlite::Database& db, const KeyRecord& key);

// The key with `id`, complete, or nullptr if there is none.
absl::StatusOr<std::shared_ptr<KeyRecord>> LoadKey(sqlite::Database& db, std::string_view id);

// The id of the key with `alias`, or nullopt if there is none.
absl::StatusOr<std::optional<std::string>> FindKeyIdByAlias(sqlite::Database& db,
                                                            std::string_view alias);

// Up to `limit` complete keys with ids after `after_id`, ascending by id. Four queries
// whatever the page size: one for the keys, one per child table over the page's id range.
absl::StatusOr<std::vector<std::shared_ptr<KeyRecord>>> LoadKeysAfter(sqlite::Database& db,
                                                                      std::string_view after_id,
                                                                      size_t limit);

// How many stored versions (not erased) are wrapped under root `label`.
absl::StatusOr<uint64_t> CountVersionsUnderRoot(sqlite::Database& db, std::string_view label);
// The same for every root that wraps any version: label -> count.
absl::StatusOr<std::map<std::string, uint64_t>> CountVersionsByRoot(sqlite::Database& db);
// The row name ("key:<id>") of a key that an audit record after `floor_seq` names but whose
// row is not in the database, if there is one.
absl::StatusOr<std::optional<std::string>> FirstRecordedKeyWithoutRow(sqlite::Database& db,
                                                                      uint64_t floor_seq);
// The id of a key that grants `principal` use, if any (the first by id).
absl::StatusOr<std::optional<std::string>> SelectKeyGranting(sqlite::Database& db,
                                                             std::string_view principal);
// Keys by their state column (KeyState's values): state -> count.
absl::StatusOr<std::map<int64_t, uint64_t>> CountKeysByState(sqlite::Database& db);

// Ids, ascending, of PENDING_DELETION keys with deletion_due_at <= now and
// deletion_due_observed <= observed.
absl::StatusOr<std::vector<std::string>> SelectKeysDueForDeletion(sqlite::Database& db, int64_t now,
                                                                  int64_t observed);
// Ids, ascending, of ENABLED keys with a rotation period whose primary version was created
// at least a period before `now`.
absl::StatusOr<std::vector<std::string>> SelectKeysDueForRotation(sqlite::Database& db,
                                                                  int64_t now);

// Usage rows of `key_id`, ascending by version.
absl::StatusOr<std::vector<VersionUsage>> SelectUsage(sqlite::Database& db,
                                                      std::string_view key_id);
// Versions of `key_id` that have no usage row, ascending.
absl::StatusOr<std::vector<uint32_t>> SelectVersionsWithoutUsage(sqlite::Database& db,
                                                                 std::string_view key_id);
// Versions of `key_id` with a reservation (encryptions_reserved > 0), ascending.
absl::StatusOr<std::vector<uint32_t>> SelectReservedVersions(sqlite::Database& db,
                                                             std::string_view key_id);
// Inserts or replaces one usage row, its reservation and MAC included.
absl::Status UpsertUsage(sqlite::Database& db, const VersionUsage& usage);
// Inserts or updates the counts and last use of one usage row, never its reservation or MAC.
absl::Status UpsertUsageCounts(sqlite::Database& db, const VersionUsage& usage);

}  // namespace custos::storage
