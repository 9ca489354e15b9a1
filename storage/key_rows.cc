#include "storage/key_rows.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <unordered_map>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace custos::storage {
namespace {

constexpr char kKeyIdTaken[] = "SELECT 1 FROM keys WHERE id = ?1";
constexpr char kSelectIdByAlias[] = "SELECT id FROM keys WHERE alias = ?1";
// Updates the row in place rather than deleting it, so nothing that hangs off the key's id
// (its usage counters) is touched.
constexpr char kUpsertKey[] =
    "INSERT INTO keys (id, alias, description, state, created_at, created_by, primary_version,"
    " min_decrypt_version, rotation_period_seconds, deletion_due_at, destroyed_at,"
    " deletion_due_observed, mac, reserved_versions)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    " ON CONFLICT (id) DO UPDATE SET alias = excluded.alias, description = excluded.description,"
    " state = excluded.state, created_at = excluded.created_at,"
    " created_by = excluded.created_by, primary_version = excluded.primary_version,"
    " min_decrypt_version = excluded.min_decrypt_version,"
    " rotation_period_seconds = excluded.rotation_period_seconds,"
    " deletion_due_at = excluded.deletion_due_at, destroyed_at = excluded.destroyed_at,"
    " deletion_due_observed = excluded.deletion_due_observed, mac = excluded.mac,"
    " reserved_versions = excluded.reserved_versions";
constexpr char kDeleteTags[] = "DELETE FROM key_tags WHERE key_id = ?1";
constexpr char kInsertTag[] = "INSERT INTO key_tags (key_id, name, value) VALUES (?1, ?2, ?3)";
constexpr char kSelectStoredVersions[] =
    "SELECT version, wrapped, root_key_label, created_at FROM key_versions WHERE key_id = ?1";
constexpr char kInsertVersion[] =
    "INSERT INTO key_versions (key_id, version, wrapped, root_key_label, created_at)"
    " VALUES (?1, ?2, ?3, ?4, ?5)";
constexpr char kUpdateVersion[] =
    "UPDATE key_versions SET wrapped = ?3, root_key_label = ?4, created_at = ?5"
    " WHERE key_id = ?1 AND version = ?2";
constexpr char kDeleteVersion[] = "DELETE FROM key_versions WHERE key_id = ?1 AND version = ?2";
constexpr char kDeleteGrants[] = "DELETE FROM key_grants WHERE key_id = ?1";
constexpr char kInsertGrant[] =
    "INSERT INTO key_grants (key_id, principal, use) VALUES (?1, ?2, ?3)";

// Both key queries return the same columns, read by ReadKeyRow.
constexpr char kSelectKeyById[] =
    "SELECT id, alias, description, state, created_at, created_by, primary_version,"
    " min_decrypt_version, rotation_period_seconds, deletion_due_at, destroyed_at,"
    " deletion_due_observed, mac, reserved_versions FROM keys WHERE id = ?1";
constexpr char kSelectKeysAfter[] =
    "SELECT id, alias, description, state, created_at, created_by, primary_version,"
    " min_decrypt_version, rotation_period_seconds, deletion_due_at, destroyed_at,"
    " deletion_due_observed, mac, reserved_versions FROM keys WHERE id > ?1 ORDER BY id LIMIT ?2";
// Child rows of every key whose id lies in [?1, ?2].
constexpr char kSelectTags[] =
    "SELECT key_id, name, value FROM key_tags WHERE key_id BETWEEN ?1 AND ?2";
constexpr char kSelectVersions[] =
    "SELECT key_id, version, wrapped, root_key_label, created_at FROM key_versions"
    " WHERE key_id BETWEEN ?1 AND ?2 ORDER BY key_id, version";
constexpr char kSelectGrants[] =
    "SELECT key_id, principal, use FROM key_grants WHERE key_id BETWEEN ?1 AND ?2";

// The sweeps. `state = 3` and `rotation_period_seconds > 0` are spelled exactly as in the
// partial indexes of schema version 2, so SQLite reads those indexes, not every key. No
// ORDER BY: SQLite would rather scan the whole table in id order than sort a few rows, so
// the (few) ids are sorted afterwards.
constexpr char kSelectDueForDeletion[] =
    "SELECT id FROM keys WHERE state = 3 AND deletion_due_at <= ?1"
    " AND deletion_due_observed <= ?2";
constexpr char kSelectDueForRotation[] =
    "SELECT k.id FROM keys AS k JOIN key_versions AS v"
    " ON v.key_id = k.id AND v.version = k.primary_version"
    " WHERE k.rotation_period_seconds > 0 AND k.state = 1"
    " AND v.created_at + k.rotation_period_seconds <= ?1";

// Spelled as the partial index of schema version 5, so SQLite counts from the index alone.
constexpr char kCountVersionsUnderRoot[] =
    "SELECT count(*) FROM key_versions WHERE root_key_label = ?1 AND length(wrapped) > 0";

// Over the index of records by row; a key's row, once written, is never deleted by Custos.
constexpr char kSelectRecordedKeyWithoutRow[] =
    "SELECT row_name FROM audit_log INDEXED BY audit_log_by_row WHERE row_name <> ''"
    " AND row_name >= 'key:' AND row_name < 'key;' AND seq > ?1"
    " AND substr(row_name, 5) NOT IN (SELECT id FROM keys) LIMIT 1";

constexpr char kSelectKeyGranting[] = "SELECT min(key_id) FROM key_grants WHERE principal = ?1";

constexpr char kCountKeysByState[] = "SELECT state, count(*) FROM keys GROUP BY state";

constexpr char kCountVersionsByRoot[] =
    "SELECT root_key_label, count(*) FROM key_versions WHERE length(wrapped) > 0"
    " GROUP BY root_key_label";

constexpr char kSelectUsage[] =
    "SELECT key_id, version, encryptions_reserved, encryptions, decryptions, last_used_at, mac"
    " FROM version_usage WHERE key_id = ?1 ORDER BY version";
constexpr char kSelectVersionsWithoutUsage[] =
    "SELECT v.version FROM key_versions AS v LEFT JOIN version_usage AS u"
    " ON u.key_id = v.key_id AND u.version = v.version"
    " WHERE v.key_id = ?1 AND u.version IS NULL ORDER BY v.version";
// The versions of a key holding a reservation, which the key's row names.
constexpr char kSelectReservedVersions[] =
    "SELECT version FROM version_usage WHERE key_id = ?1 AND encryptions_reserved > 0"
    " ORDER BY version";
// A reservation: everything, the (sealed) reservation included.
constexpr char kUpsertUsage[] =
    "INSERT INTO version_usage"
    " (key_id, version, encryptions_reserved, encryptions, decryptions, last_used_at, mac)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (key_id, version) DO UPDATE SET"
    " encryptions_reserved = excluded.encryptions_reserved,"
    " encryptions = excluded.encryptions, decryptions = excluded.decryptions,"
    " last_used_at = excluded.last_used_at, mac = excluded.mac";
// Counts only: a version never reserved is inserted with no reservation; an existing row keeps
// its reservation and MAC.
constexpr char kUpsertUsageCounts[] =
    "INSERT INTO version_usage"
    " (key_id, version, encryptions_reserved, encryptions, decryptions, last_used_at, mac)"
    " VALUES (?1, ?2, 0, ?3, ?4, ?5, NULL) ON CONFLICT (key_id, version) DO UPDATE SET"
    " encryptions = excluded.encryptions, decryptions = excluded.decryptions,"
    " last_used_at = excluded.last_used_at";

constexpr char kEncrypt[] = "encrypt";
constexpr char kDecrypt[] = "decrypt";

absl::Status InsertGrants(sqlite::Database& db, const std::string& key_id,
                          const std::set<std::string>& principals, const char* use) {
  for (const std::string& principal : principals) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kInsertGrant));
    stmt.BindText(1, key_id).BindText(2, principal).BindText(3, use);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  return absl::OkStatus();
}

// The versions `sql`, a query of key ?1, returns, in its order.
absl::StatusOr<std::vector<uint32_t>> SelectVersions(sqlite::Database& db, const char* sql,
                                                     std::string_view key_id) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(sql));
  stmt.BindText(1, key_id);
  std::vector<uint32_t> versions;
  while (true) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return versions;
    versions.push_back(static_cast<uint32_t>(stmt.ColumnInt64(0)));
  }
}

// The reserved versions as stored: ascending decimal numbers joined by commas, or empty.
// Anything else reads as {0}, which no row written by Custos holds: its MAC check then refuses
// that one key (DATA_LOSS, alarmed), as for any other column edited.
std::vector<uint32_t> ParseVersions(const std::string& text) {
  std::vector<uint32_t> versions;
  if (text.empty()) return versions;
  for (const absl::string_view part : absl::StrSplit(text, ',')) {
    uint32_t version = 0;
    if (!absl::SimpleAtoi(part, &version) || version == 0 ||
        (!versions.empty() && version <= versions.back())) {
      return {0};
    }
    versions.push_back(version);
  }
  return versions;
}

absl::StatusOr<std::shared_ptr<KeyRecord>> ReadKeyRow(const sqlite::Statement& row) {
  auto key = std::make_shared<KeyRecord>();
  key->id = row.ColumnText(0);
  key->alias = row.ColumnText(1);  // NULL (no alias) reads as empty.
  key->description = row.ColumnText(2);
  const int64_t state = row.ColumnInt64(3);
  if (state < static_cast<int64_t>(KeyState::kEnabled) ||
      state > static_cast<int64_t>(KeyState::kDestroyed)) {
    return absl::InternalError(absl::StrCat("key '", key->id, "' has unknown state ", state));
  }
  key->state = static_cast<KeyState>(state);
  key->created_at = row.ColumnInt64(4);
  key->created_by = row.ColumnText(5);
  key->primary_version = static_cast<uint32_t>(row.ColumnInt64(6));
  key->min_decrypt_version = static_cast<uint32_t>(row.ColumnInt64(7));
  key->rotation_period_seconds = row.ColumnInt64(8);
  key->deletion_due_at = row.ColumnInt64(9);
  key->destroyed_at = row.ColumnInt64(10);
  key->deletion_due_observed = row.ColumnInt64(11);
  key->mac = row.ColumnBlob(12);  // NULL (never sealed) reads as empty
  key->reserved_versions = ParseVersions(row.ColumnText(13));
  return key;
}

// Fills in tags, versions and grants of `keys`, which must be every key with an id between
// the first's and the last's, in id order.
absl::Status LoadChildren(sqlite::Database& db, std::vector<std::shared_ptr<KeyRecord>>& keys) {
  if (keys.empty()) return absl::OkStatus();
  const std::string first = keys.front()->id;
  const std::string last = keys.back()->id;
  std::unordered_map<std::string, KeyRecord*> by_id;
  by_id.reserve(keys.size());
  for (auto& key : keys) by_id.emplace(key->id, key.get());

  // Runs `sql` over the page's id range and hands each row to `add` with its key.
  auto for_each_row = [&](const char* sql, auto add) -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(sql));
    stmt.BindText(1, first).BindText(2, last);
    while (true) {
      CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
      if (!row) return absl::OkStatus();
      auto it = by_id.find(stmt.ColumnText(0));
      if (it == by_id.end()) continue;  // Cannot happen while we are the only writer.
      CUSTOS_RETURN_IF_ERROR(add(stmt, *it->second));
    }
  };
  CUSTOS_RETURN_IF_ERROR(
      for_each_row(kSelectTags, [](const sqlite::Statement& row, KeyRecord& key) {
        key.tags.emplace(row.ColumnText(1), row.ColumnText(2));
        return absl::OkStatus();
      }));
  CUSTOS_RETURN_IF_ERROR(
      for_each_row(kSelectVersions, [](const sqlite::Statement& row, KeyRecord& key) {
        KeyVersion& version = key.versions.emplace_back();
        version.version = static_cast<uint32_t>(row.ColumnInt64(1));
        version.wrapped = row.ColumnBlob(2);
        version.root_key_label = row.ColumnText(3);
        version.created_at = row.ColumnInt64(4);
        return absl::OkStatus();
      }));
  return for_each_row(kSelectGrants, [](const sqlite::Statement& row, KeyRecord& key) {
    const std::string use = row.ColumnText(2);
    if (use == kEncrypt) {
      key.encrypt_grants.insert(row.ColumnText(1));
    } else if (use == kDecrypt) {
      key.decrypt_grants.insert(row.ColumnText(1));
    } else {
      return absl::InternalError(
          absl::StrCat("key '", key.id, "' has a grant of unknown use '", use, "'"));
    }
    return absl::OkStatus();
  });
}

// Writes every row of `key`; `is_new` if the caller knows no row of it exists yet.
absl::Status WriteKeyRows(sqlite::Database& db, const KeyRecord& key, bool is_new) {
  if (!key.alias.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(auto owner, FindKeyIdByAlias(db, key.alias));
    if (owner.has_value() && *owner != key.id) {
      return absl::AlreadyExistsError(absl::StrCat("alias '", key.alias, "' is already in use"));
    }
  }

  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kUpsertKey));
    stmt.BindText(1, key.id);
    if (key.alias.empty()) {
      stmt.BindNull(2);  // UNIQUE allows many NULLs, so any number of keys can lack an alias.
    } else {
      stmt.BindText(2, key.alias);
    }
    stmt.BindText(3, key.description)
        .BindInt64(4, static_cast<int64_t>(key.state))
        .BindInt64(5, key.created_at)
        .BindText(6, key.created_by)
        .BindInt64(7, key.primary_version)
        .BindInt64(8, key.min_decrypt_version)
        .BindInt64(9, key.rotation_period_seconds)
        .BindInt64(10, key.deletion_due_at)
        .BindInt64(11, key.destroyed_at)
        .BindInt64(12, key.deletion_due_observed);
    if (key.mac.empty()) {
      stmt.BindNull(13);
    } else {
      stmt.BindBlob(13, key.mac);
    }
    const std::string reserved = absl::StrJoin(key.reserved_versions, ",");
    stmt.BindText(14, reserved);  // bound, not copied: it must outlive Run
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }

  // A new key has no child rows yet: nothing to delete or compare (the bulk path).
  if (!is_new) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kDeleteTags));
    stmt.BindText(1, key.id);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  for (const auto& [name, value] : key.tags) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kInsertTag));
    stmt.BindText(1, key.id).BindText(2, name).BindText(3, value);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }

  // Versions are diffed against the stored rows rather than deleted and reinserted: a
  // rotation adds one row and touches no other. A version whose material is erased is
  // UPDATEd to the empty blob; with secure_delete on, SQLite zeroes the space the old cell
  // occupied (and any page it frees), so the only copies left are in WAL frames written
  // before the erase, which PurgeErased checkpoints away. (Checked by the shredding test,
  // also with the row moved around by page splits; an extra zeroblob() pass first is not
  // needed.)
  std::map<uint32_t, KeyVersion> stored;
  if (!is_new) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectStoredVersions));
    stmt.BindText(1, key.id);
    while (true) {
      CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
      if (!row) break;
      KeyVersion version;
      version.version = static_cast<uint32_t>(stmt.ColumnInt64(0));
      version.wrapped = stmt.ColumnBlob(1);
      version.root_key_label = stmt.ColumnText(2);
      version.created_at = stmt.ColumnInt64(3);
      stored.emplace(version.version, std::move(version));
    }
  }
  for (const KeyVersion& version : key.versions) {
    auto old = stored.find(version.version);
    const char* sql = kInsertVersion;
    if (old != stored.end()) {
      const KeyVersion& was = old->second;
      const bool unchanged = was.wrapped == version.wrapped &&
                             was.root_key_label == version.root_key_label &&
                             was.created_at == version.created_at;
      stored.erase(old);  // Seen: not to be deleted below. A repeat then fails as a duplicate.
      if (unchanged) continue;
      sql = kUpdateVersion;
    }
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(sql));
    stmt.BindText(1, key.id)
        .BindInt64(2, version.version)
        .BindBlob(3, version.wrapped)
        .BindText(4, version.root_key_label)
        .BindInt64(5, version.created_at);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  for (const auto& [number, version] : stored) {  // Stored but no longer in the record.
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kDeleteVersion));
    stmt.BindText(1, key.id).BindInt64(2, number);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }

  if (!is_new) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kDeleteGrants));
    stmt.BindText(1, key.id);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  CUSTOS_RETURN_IF_ERROR(InsertGrants(db, key.id, key.encrypt_grants, kEncrypt));
  return InsertGrants(db, key.id, key.decrypt_grants, kDecrypt);
}

}  // namespace

absl::Status InsertKey(sqlite::Database& db, const KeyRecord& key) {
  // Checked first so the caller hears which name is taken, in words, rather than a
  // constraint message.
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kKeyIdTaken));
  stmt.BindText(1, key.id);
  CUSTOS_ASSIGN_OR_RETURN(const bool taken, stmt.Step());
  if (taken) return absl::AlreadyExistsError(absl::StrCat("key id '", key.id, "' already exists"));
  return WriteKeyRows(db, key, /*is_new=*/true);
}

absl::Status WriteKey(sqlite::Database& db, const KeyRecord& key) {
  return WriteKeyRows(db, key, /*is_new=*/false);
}

absl::StatusOr<std::shared_ptr<KeyRecord>> LoadKey(sqlite::Database& db, std::string_view id) {
  std::vector<std::shared_ptr<KeyRecord>> keys;
  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectKeyById));
    stmt.BindText(1, id);
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return nullptr;
    CUSTOS_ASSIGN_OR_RETURN(auto key, ReadKeyRow(stmt));
    keys.push_back(std::move(key));
  }
  CUSTOS_RETURN_IF_ERROR(LoadChildren(db, keys));
  return keys.front();
}

absl::StatusOr<std::optional<std::string>> FindKeyIdByAlias(sqlite::Database& db,
                                                            std::string_view alias) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectIdByAlias));
  stmt.BindText(1, alias);
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return std::nullopt;
  return stmt.ColumnText(0);
}

absl::StatusOr<std::vector<std::shared_ptr<KeyRecord>>> LoadKeysAfter(sqlite::Database& db,
                                                                      std::string_view after_id,
                                                                      size_t limit) {
  std::vector<std::shared_ptr<KeyRecord>> keys;
  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectKeysAfter));
    stmt.BindText(1, after_id).BindInt64(2, static_cast<int64_t>(limit));
    while (true) {
      CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
      if (!row) break;
      CUSTOS_ASSIGN_OR_RETURN(auto key, ReadKeyRow(stmt));
      keys.push_back(std::move(key));
    }
  }
  CUSTOS_RETURN_IF_ERROR(LoadChildren(db, keys));
  return keys;
}

namespace {

// Ids, ascending, that `sql` selects with `values` bound to ?1, ?2...
absl::StatusOr<std::vector<std::string>> SelectIds(sqlite::Database& db, const char* sql,
                                                   std::initializer_list<int64_t> values) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(sql));
  int index = 0;
  for (int64_t value : values) stmt.BindInt64(++index, value);
  std::vector<std::string> ids;
  while (true) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) break;
    ids.push_back(stmt.ColumnText(0));
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> SelectKeysDueForDeletion(sqlite::Database& db, int64_t now,
                                                                  int64_t observed) {
  return SelectIds(db, kSelectDueForDeletion, {now, observed});
}

absl::StatusOr<std::vector<std::string>> SelectKeysDueForRotation(sqlite::Database& db,
                                                                  int64_t now) {
  return SelectIds(db, kSelectDueForRotation, {now});
}

absl::StatusOr<uint64_t> CountVersionsUnderRoot(sqlite::Database& db, std::string_view label) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kCountVersionsUnderRoot));
  stmt.BindText(1, label);
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return absl::InternalError("count(*) returned no row");
  return static_cast<uint64_t>(stmt.ColumnInt64(0));
}

absl::StatusOr<std::map<std::string, uint64_t>> CountVersionsByRoot(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kCountVersionsByRoot));
  std::map<std::string, uint64_t> counts;
  for (;;) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return counts;
    counts.emplace(stmt.ColumnText(0), static_cast<uint64_t>(stmt.ColumnInt64(1)));
  }
}

absl::StatusOr<std::optional<std::string>> FirstRecordedKeyWithoutRow(sqlite::Database& db,
                                                                      uint64_t floor_seq) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectRecordedKeyWithoutRow));
  stmt.BindInt64(1, static_cast<int64_t>(floor_seq));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return std::nullopt;
  return stmt.ColumnText(0);
}

absl::StatusOr<std::optional<std::string>> SelectKeyGranting(sqlite::Database& db,
                                                             std::string_view principal) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectKeyGranting));
  stmt.BindText(1, principal);
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row || stmt.ColumnIsNull(0)) return std::nullopt;
  return stmt.ColumnText(0);
}

absl::StatusOr<std::map<int64_t, uint64_t>> CountKeysByState(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kCountKeysByState));
  std::map<int64_t, uint64_t> counts;
  for (;;) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return counts;
    counts.emplace(stmt.ColumnInt64(0), static_cast<uint64_t>(stmt.ColumnInt64(1)));
  }
}

absl::StatusOr<std::vector<VersionUsage>> SelectUsage(sqlite::Database& db,
                                                      std::string_view key_id) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectUsage));
  stmt.BindText(1, key_id);
  std::vector<VersionUsage> usage;
  while (true) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return usage;
    VersionUsage& u = usage.emplace_back();
    u.key_id = stmt.ColumnText(0);
    u.version = static_cast<uint32_t>(stmt.ColumnInt64(1));
    // Counters are stored as SQLite's signed 64-bit integers; the casts round-trip every
    // uint64_t bit for bit.
    u.encryptions_reserved = static_cast<uint64_t>(stmt.ColumnInt64(2));
    u.encryptions = static_cast<uint64_t>(stmt.ColumnInt64(3));
    u.decryptions = static_cast<uint64_t>(stmt.ColumnInt64(4));
    u.last_used_at = stmt.ColumnInt64(5);
    u.mac = stmt.ColumnBlob(6);
  }
}

absl::StatusOr<std::vector<uint32_t>> SelectVersionsWithoutUsage(sqlite::Database& db,
                                                                 std::string_view key_id) {
  return SelectVersions(db, kSelectVersionsWithoutUsage, key_id);
}

absl::StatusOr<std::vector<uint32_t>> SelectReservedVersions(sqlite::Database& db,
                                                             std::string_view key_id) {
  return SelectVersions(db, kSelectReservedVersions, key_id);
}

absl::Status UpsertUsage(sqlite::Database& db, const VersionUsage& usage) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kUpsertUsage));
  stmt.BindText(1, usage.key_id)
      .BindInt64(2, usage.version)
      .BindInt64(3, static_cast<int64_t>(usage.encryptions_reserved))
      .BindInt64(4, static_cast<int64_t>(usage.encryptions))
      .BindInt64(5, static_cast<int64_t>(usage.decryptions))
      .BindInt64(6, usage.last_used_at);
  if (usage.mac.empty()) {
    stmt.BindNull(7);
  } else {
    stmt.BindBlob(7, usage.mac);
  }
  return stmt.Run();
}

absl::Status UpsertUsageCounts(sqlite::Database& db, const VersionUsage& usage) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kUpsertUsageCounts));
  stmt.BindText(1, usage.key_id)
      .BindInt64(2, usage.version)
      .BindInt64(3, static_cast<int64_t>(usage.encryptions))
      .BindInt64(4, static_cast<int64_t>(usage.decryptions))
      .BindInt64(5, usage.last_used_at);
  return stmt.Run();
}

}  // namespace custos::storage
