// KeyCache: a bounded, least-recently-used set of immutable KeyRecords, found by id or alias.
//
// Serves the hot path (GetKey, FindKeyByAlias) without touching SQLite. Holds at most
// `capacity` keys, so a catalogue of millions of keys keeps only its working set in memory;
// entries are shared_ptr<const KeyRecord>, so an evicted record stays valid for whoever still
// holds it. Thread-safe. Internal to storage/.
#pragma once

#include <cstddef>
#include <list>
#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>

#include "storage/key_store.h"

namespace custos::storage {

class KeyCache {
 public:
  // Enough for the working set of a busy deployment (each record is well under 1 KiB, so
  // this is tens of MiB at most) while a million-key catalogue stays on disk.
  static constexpr size_t kDefaultCapacity = 32768;

  explicit KeyCache(size_t capacity = kDefaultCapacity);
  KeyCache(const KeyCache&) = delete;
  KeyCache& operator=(const KeyCache&) = delete;

  // The cached key, or nullptr. A hit makes the key the most recently used.
  std::shared_ptr<const KeyRecord> FindById(std::string_view id);
  std::shared_ptr<const KeyRecord> FindByAlias(std::string_view alias);

  // The cached key, or nullptr, leaving the order of use as it is (for a scan).
  std::shared_ptr<const KeyRecord> PeekById(std::string_view id) const;

  // Adds `key`, replacing any cached key with the same id, and evicts the least recently
  // used keys beyond capacity.
  void Put(std::shared_ptr<const KeyRecord> key);

  size_t size() const;
  size_t capacity() const { return capacity_; }

 private:
  using Lru = std::list<std::shared_ptr<const KeyRecord>>;  // Most recently used first.

  std::shared_ptr<const KeyRecord> Touch(Lru::iterator it);  // Requires mu_.
  void Erase(Lru::iterator it);                              // Requires mu_.

  const size_t capacity_;
  mutable std::mutex mu_;
  Lru lru_;
  // Keys are views into the records the list owns, so each id and alias is stored once.
  std::unordered_map<std::string_view, Lru::iterator> by_id_;
  std::unordered_map<std::string_view, Lru::iterator> by_alias_;
};

}  // namespace custos::storage
