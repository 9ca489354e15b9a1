#include "storage/key_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "storage/key_cache.h"
#include "storage/key_rows.h"
#include "storage/schema.h"
#include "storage/sqlite.h"

namespace custos::storage {
namespace {

constexpr size_t kMaxPageSize = 1000;
// How long a statement waits for another connection's lock before giving up with BUSY.
constexpr int kBusyTimeoutMs = 5000;
constexpr char kHex[] = "0123456789abcdef";

absl::Status Configure(sqlite::Database& db) {
  sqlite3_busy_timeout(db.handle(), kBusyTimeoutMs);
  // secure_delete: freed pages are zeroed, so erased key material cannot be read back from
  // the file. foreign_keys: child rows cannot outlive their key.
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA secure_delete = ON"));
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA foreign_keys = ON"));
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA synchronous = FULL"));
  CUSTOS_ASSIGN_OR_RETURN(const std::string mode, db.QueryText("PRAGMA journal_mode = WAL"));
  if (mode != "wal") {
    return absl::FailedPreconditionError(
        absl::StrCat("the key database cannot use WAL journaling (journal_mode is '", mode, "')"));
  }
  return absl::OkStatus();
}

// Page tokens are the hex of the last id returned: opaque to callers, trivially checked.
std::string EncodePageToken(std::string_view last_id) {
  std::string token;
  token.reserve(last_id.size() * 2);
  for (unsigned char c : last_id) {
    token.push_back(kHex[c >> 4]);
    token.push_back(kHex[c & 0x0f]);
  }
  return token;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

absl::StatusOr<std::string> DecodePageToken(std::string_view token) {
  std::string id;
  id.reserve(token.size() / 2);
  for (size_t i = 0; i + 1 < token.size(); i += 2) {
    const int hi = HexDigit(token[i]);
    const int lo = HexDigit(token[i + 1]);
    if (hi < 0 || lo < 0) break;
    id.push_back(static_cast<char>(hi << 4 | lo));
  }
  if (token.size() % 2 != 0 || id.size() * 2 != token.size()) {
    return absl::InvalidArgumentError(
        "invalid page token: pass back the next_page_token of a previous ListKeys reply");
  }
  return id;
}

absl::Status NoKeyWithId(std::string_view id) {
  return absl::NotFoundError(absl::StrCat("no key with id '", std::string(id), "'"));
}

}  // namespace

// Lock order: db_mu before the cache's own lock. Loads from SQLite and writes both run under
// db_mu and update the cache before releasing it, so a slow load can never put back a record
// older than one a write has just cached. Cache hits take only the cache's lock.
class KeyStore::Impl {
 public:
  Impl(std::unique_ptr<sqlite::Database> db, int schema_version)
      : db_(std::move(db)), schema_version_(schema_version) {}

  std::mutex db_mu_;
  const std::unique_ptr<sqlite::Database> db_;  // Guarded by db_mu_.
  const int schema_version_;
  KeyCache cache_;
};

KeyStore::KeyStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KeyStore::~KeyStore() = default;

absl::StatusOr<std::unique_ptr<KeyStore>> KeyStore::Open(const std::string& path) {
  CUSTOS_ASSIGN_OR_RETURN(auto db, sqlite::Database::Open(path));
  CUSTOS_RETURN_IF_ERROR(Configure(*db));
  CUSTOS_ASSIGN_OR_RETURN(const int version, MigrateSchema(*db));
  // SQLite makes these with the database's mode; files left by an older run may be looser.
  CUSTOS_RETURN_IF_ERROR(sqlite::RestrictToOwner(path + "-wal", /*create=*/false));
  CUSTOS_RETURN_IF_ERROR(sqlite::RestrictToOwner(path + "-shm", /*create=*/false));
  return std::unique_ptr<KeyStore>(new KeyStore(std::make_unique<Impl>(std::move(db), version)));
}

absl::Status KeyStore::CreateKey(const KeyRecord& key) {
  if (key.id.empty()) return absl::InvalidArgumentError("a key needs a non-empty id");
  auto record = std::make_shared<KeyRecord>(key);
  // Stored versions come back in version order; keep the cached copy identical.
  std::stable_sort(record->versions.begin(), record->versions.end(),
                   [](const KeyVersion& a, const KeyVersion& b) { return a.version < b.version; });

  std::lock_guard lock(impl_->db_mu_);
  {
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    CUSTOS_RETURN_IF_ERROR(InsertKey(*impl_->db_, *record));
    CUSTOS_RETURN_IF_ERROR(tx->Commit());
  }
  impl_->cache_.Put(std::move(record));  // Only once durable.
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::GetKey(std::string_view id) const {
  if (auto hit = impl_->cache_.FindById(id)) return hit;
  std::lock_guard lock(impl_->db_mu_);
  if (auto hit = impl_->cache_.FindById(id)) return hit;  // Loaded while we waited.
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const KeyRecord> key, LoadKey(*impl_->db_, id));
  if (key == nullptr) return NoKeyWithId(id);
  impl_->cache_.Put(key);
  return key;
}

absl::StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::FindKeyByAlias(
    std::string_view alias) const {
  const auto not_found = [&] {
    return absl::NotFoundError(absl::StrCat("no key with alias '", std::string(alias), "'"));
  };
  if (alias.empty()) return not_found();  // An empty alias means "none"; no key has it.
  if (auto hit = impl_->cache_.FindByAlias(alias)) return hit;
  std::lock_guard lock(impl_->db_mu_);
  if (auto hit = impl_->cache_.FindByAlias(alias)) return hit;
  CUSTOS_ASSIGN_OR_RETURN(const auto id, FindKeyIdByAlias(*impl_->db_, alias));
  if (!id.has_value()) return not_found();
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const KeyRecord> key, LoadKey(*impl_->db_, *id));
  if (key == nullptr) return not_found();
  impl_->cache_.Put(key);
  return key;
}

absl::StatusOr<KeyPage> KeyStore::ListKeys(size_t page_size, std::string_view page_token) const {
  if (page_size < 1 || page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be between 1 and ", kMaxPageSize, ", got ", page_size));
  }
  CUSTOS_ASSIGN_OR_RETURN(const std::string after_id, DecodePageToken(page_token));
  std::vector<std::shared_ptr<KeyRecord>> keys;
  {
    std::lock_guard lock(impl_->db_mu_);
    // One extra row tells whether another page follows. Listing bypasses the cache, so a
    // full scan does not evict the hot keys.
    CUSTOS_ASSIGN_OR_RETURN(keys, LoadKeysAfter(*impl_->db_, after_id, page_size + 1));
  }
  KeyPage page;
  if (keys.size() > page_size) {
    keys.resize(page_size);
    page.next_page_token = EncodePageToken(keys.back()->id);
  }
  page.keys.assign(std::make_move_iterator(keys.begin()), std::make_move_iterator(keys.end()));
  return page;
}

int KeyStore::SchemaVersion() const { return impl_->schema_version_; }

size_t KeyStore::CachedKeyCount() const { return impl_->cache_.size(); }

std::string_view KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kEnabled:
      return "ENABLED";
    case KeyState::kDisabled:
      return "DISABLED";
    case KeyState::kPendingDeletion:
      return "PENDING_DELETION";
    case KeyState::kDestroyed:
      return "DESTROYED";
  }
  return "UNKNOWN";
}

const KeyVersion* KeyRecord::FindVersion(uint32_t version) const {
  // Versions are few and ascending; a binary search would not pay for itself.
  for (const KeyVersion& v : versions) {
    if (v.version == version) return &v;
  }
  return nullptr;
}

}  // namespace custos::storage
