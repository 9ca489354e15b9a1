#include "storage/key_cache.h"

#include <iterator>
#include <utility>

namespace custos::storage {

KeyCache::KeyCache(size_t capacity) : capacity_(capacity > 0 ? capacity : 1) {}

std::shared_ptr<const KeyRecord> KeyCache::FindById(std::string_view id) {
  std::lock_guard lock(mu_);
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : Touch(it->second);
}

std::shared_ptr<const KeyRecord> KeyCache::PeekById(std::string_view id) const {
  std::lock_guard lock(mu_);
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : *it->second;
}

std::shared_ptr<const KeyRecord> KeyCache::FindByAlias(std::string_view alias) {
  std::lock_guard lock(mu_);
  auto it = by_alias_.find(alias);
  return it == by_alias_.end() ? nullptr : Touch(it->second);
}

void KeyCache::Put(std::shared_ptr<const KeyRecord> key) {
  std::lock_guard lock(mu_);
  if (auto old = by_id_.find(key->id); old != by_id_.end()) Erase(old->second);
  lru_.push_front(std::move(key));
  const KeyRecord& record = *lru_.front();
  by_id_.emplace(record.id, lru_.begin());
  if (!record.alias.empty()) {
    // Aliases are unique, but if a stale entry claims this one, the newest record wins; the
    // entry is replaced whole so its key views the new record.
    by_alias_.erase(record.alias);
    by_alias_.emplace(record.alias, lru_.begin());
  }
  while (lru_.size() > capacity_) Erase(std::prev(lru_.end()));
}

size_t KeyCache::size() const {
  std::lock_guard lock(mu_);
  return lru_.size();
}

std::shared_ptr<const KeyRecord> KeyCache::Touch(Lru::iterator it) {
  lru_.splice(lru_.begin(), lru_, it);  // Iterators stay valid, so the indexes need no update.
  return *it;
}

void KeyCache::Erase(Lru::iterator it) {
  const KeyRecord& record = **it;
  by_id_.erase(record.id);
  if (!record.alias.empty()) {
    // Only drop the alias entry if it still points at this record.
    auto alias = by_alias_.find(record.alias);
    if (alias != by_alias_.end() && alias->second == it) by_alias_.erase(alias);
  }
  lru_.erase(it);  // Last: the index keys above are views into this record.
}

}  // namespace custos::storage
