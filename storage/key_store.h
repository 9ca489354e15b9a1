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

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::storage {

enum class KeyState { kEnabled = 1, kDisabled = 2, kPendingDeletion = 3, kDestroyed = 4 };
std::string_view KeyStateName(KeyState state);

struct KeyVersion {
  uint32_t version = 0;     // 1, 2, ... in creation order
  Bytes wrapped;            // AES-KWP under the root key named by root_key_label
  std::string root_key_label;
  int64_t created_at = 0;   // Unix seconds
};

struct KeyRecord {
  std::string id;           // canonical lower-case UUID
  std::string alias;        // unique; empty if none
  std::string description;
  std::map<std::string, std::string> tags;
  KeyState state = KeyState::kEnabled;
  int64_t created_at = 0;
  std::string created_by;   // principal
  uint32_t primary_version = 0;
  std::vector<KeyVersion> versions;       // ascending by version
  std::set<std::string> encrypt_grants;   // app principals that may encrypt / generate
  std::set<std::string> decrypt_grants;   // app principals that may decrypt

  const KeyVersion* FindVersion(uint32_t version) const;
};

struct KeyPage {
  std::vector<std::shared_ptr<const KeyRecord>> keys;  // ascending by id
  std::string next_page_token;  // empty on the last page
};

class KeyStore {
 public:
  // Opens (creating if needed) the database at `path` and migrates it to the current schema.
  // The file and its WAL are created 0600. Errors: UNAVAILABLE if the file cannot be opened,
  // FAILED_PRECONDITION if it was written by a newer Custos.
  static absl::StatusOr<std::unique_ptr<KeyStore>> Open(const std::string& path);
  ~KeyStore();

  // Inserts a new key with its versions and grants in one transaction.
  // ALREADY_EXISTS if the id or alias is taken; nothing is written then.
  absl::Status CreateKey(const KeyRecord& key);

  // NOT_FOUND if there is no such key.
  absl::StatusOr<std::shared_ptr<const KeyRecord>> GetKey(std::string_view id) const;
  absl::StatusOr<std::shared_ptr<const KeyRecord>> FindKeyByAlias(std::string_view alias) const;

  // Keys in id order, `page_size` (1..1000) at a time, starting after `page_token`.
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
