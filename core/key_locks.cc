#include "core/key_locks.h"

#include <utility>

namespace custos::core {

KeyLocks::Held::Held(Held&& other) noexcept
    : locks_(std::exchange(other.locks_, nullptr)), name_(std::move(other.name_)) {}

KeyLocks::Held& KeyLocks::Held::operator=(Held&& other) noexcept {
  if (this != &other) {
    Unlock();
    locks_ = std::exchange(other.locks_, nullptr);
    name_ = std::move(other.name_);
  }
  return *this;
}

void KeyLocks::Held::Unlock() {
  if (locks_ != nullptr) std::exchange(locks_, nullptr)->Unlock(name_);
}

KeyLocks::Held KeyLocks::Lock(const std::string& name) {
  Entry* entry;
  {
    std::lock_guard lock(mu_);
    std::unique_ptr<Entry>& slot = entries_[name];
    if (!slot) slot = std::make_unique<Entry>();
    ++slot->users;
    entry = slot.get();  // stays: it has a user
  }
  entry->mu.lock();
  return Held(this, name);
}

void KeyLocks::Unlock(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = entries_.find(name);
  it->second->mu.unlock();
  if (--it->second->users == 0) entries_.erase(it);
}

}  // namespace custos::core
