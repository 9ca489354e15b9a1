#include "storage/key_rows.h"

#include <cstdint>
#include <unordered_map>

#include "absl/strings/str_cat.h"

namespace custos::storage {
namespace {

constexpr char kKeyIdTaken[] = "SELECT 1 FROM keys WHERE id = ?1";
constexpr char kSelectIdByAlias[] = "SELECT id FROM keys WHERE alias = ?1";
constexpr char kInsertKey[] =
    "INSERT INTO keys (id, alias, description, state, created_at, created_by, primary_version)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
constexpr char kInsertTag[] = "INSERT INTO key_tags (key_id, name, value) VALUES (?1, ?2, ?3)";
constexpr char kInsertVersion[] =
    "INSERT INTO key_versions (key_id, version, wrapped, root_key_label, created_at)"
    " VALUES (?1, ?2, ?3, ?4, ?5)";
constexpr char kInsertGrant[] =
    "INSERT INTO key_grants (key_id, principal, use) VALUES (?1, ?2, ?3)";

// Both key queries return the same columns, read by ReadKeyRow.
constexpr char kSelectKeyById[] =
    "SELECT id, alias, description, state, created_at, created_by, primary_version"
    " FROM keys WHERE id = ?1";
constexpr char kSelectKeysAfter[] =
    "SELECT id, alias, description, state, created_at, created_by, primary_version"
    " FROM keys WHERE id > ?1 ORDER BY id LIMIT ?2";
// Child rows of every key whose id lies in [?1, ?2].
constexpr char kSelectTags[] =
    "SELECT key_id, name, value FROM key_tags WHERE key_id BETWEEN ?1 AND ?2";
constexpr char kSelectVersions[] =
    "SELECT key_id, version, wrapped, root_key_label, created_at FROM key_versions"
    " WHERE key_id BETWEEN ?1 AND ?2 ORDER BY key_id, version";
constexpr char kSelectGrants[] =
    "SELECT key_id, principal, use FROM key_grants WHERE key_id BETWEEN ?1 AND ?2";

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

}  // namespace

absl::Status InsertKey(sqlite::Database& db, const KeyRecord& key) {
  // Checked first so the caller hears which name is taken, in words, rather than a
  // constraint message.
  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kKeyIdTaken));
    stmt.BindText(1, key.id);
    CUSTOS_ASSIGN_OR_RETURN(const bool taken, stmt.Step());
    if (taken)
      return absl::AlreadyExistsError(absl::StrCat("key id '", key.id, "' already exists"));
  }
  if (!key.alias.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(auto owner, FindKeyIdByAlias(db, key.alias));
    if (owner.has_value()) {
      return absl::AlreadyExistsError(absl::StrCat("alias '", key.alias, "' is already in use"));
    }
  }

  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kInsertKey));
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
        .BindInt64(7, key.primary_version);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  for (const auto& [name, value] : key.tags) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kInsertTag));
    stmt.BindText(1, key.id).BindText(2, name).BindText(3, value);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  for (const KeyVersion& version : key.versions) {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kInsertVersion));
    stmt.BindText(1, key.id)
        .BindInt64(2, version.version)
        .BindBlob(3, version.wrapped)
        .BindText(4, version.root_key_label)
        .BindInt64(5, version.created_at);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  CUSTOS_RETURN_IF_ERROR(InsertGrants(db, key.id, key.encrypt_grants, kEncrypt));
  return InsertGrants(db, key.id, key.decrypt_grants, kDecrypt);
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

}  // namespace custos::storage
