#include "hsm/key_cache.h"

#include <algorithm>
#include <utility>

#include "absl/memory/memory.h"
#include "hsm/ck_error.h"
#include "hsm/p11_object.h"
#include "hsm/root_key.h"
#include "spdlog/spdlog.h"

namespace custos::hsm {

// The cache's own session. Lock order: Core::mu before KeyCache::mu_, never the reverse.
struct KeyCache::Core {
  explicit Core(std::shared_ptr<const Pkcs11Module> m) : module(std::move(m)) {}
  ~Core() { CloseLocked(); }

  // Closing the session destroys every object it made: they all belong to the old generation.
  void CloseLocked() {
    if (session != CK_INVALID_HANDLE) module->api()->C_CloseSession(session);
    session = CK_INVALID_HANDLE;
    ++generation;
  }

  const std::shared_ptr<const Pkcs11Module> module;
  std::mutex mu;  // Serialises use of `session`.
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  std::atomic<uint64_t> generation{1};  // Written under `mu`; read without it by lookups.
};

KeyCache::Key::Key(std::shared_ptr<Core> core, CK_OBJECT_HANDLE handle, uint64_t generation)
    : core_(std::move(core)), handle_(handle), generation_(generation) {}

KeyCache::Key::~Key() {
  std::lock_guard lock(core_->mu);
  // An object from an earlier session died with it; its handle may even name a newer object.
  if (generation_ != core_->generation || core_->session == CK_INVALID_HANDLE) return;
  CK_RV rv = core_->module->api()->C_DestroyObject(core_->session, handle_);
  if (rv == CKR_OK || IsHandleStale(rv)) return;
  if (IsSessionDead(rv)) {
    core_->CloseLocked();
    return;
  }
  spdlog::error("PKCS#11 C_DestroyObject of a cached key version failed: {}", CkrName(rv));
}

absl::StatusOr<std::unique_ptr<KeyCache>> KeyCache::Create(SessionPool* pool, size_t capacity) {
  if (capacity == 0) return absl::InvalidArgumentError("HSM key cache capacity must be > 0");
  return absl::WrapUnique(new KeyCache(pool, capacity));
}

KeyCache::KeyCache(SessionPool* pool, size_t capacity)
    : pool_(pool), capacity_(capacity), core_(std::make_shared<Core>(pool->module())) {}

KeyCache::~KeyCache() = default;

absl::StatusOr<KeyCache::Ref> KeyCache::Get(const std::string& cache_id,
                                            std::span<const uint8_t> wrapped,
                                            CK_OBJECT_HANDLE root) {
  if (Ref hit = Lookup(cache_id, wrapped, root)) return hit;
  std::vector<Ref> dropped;  // Declared first so that it is released after the lock.
  std::lock_guard session_lock(core_->mu);
  // Misses for one id queue up here; all but the first find the key already unwrapped.
  if (Ref hit = Lookup(cache_id, wrapped, root)) return hit;
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE handle, UnwrapLocked(wrapped, root));
  auto key = std::make_shared<const Key>(core_, handle, core_->generation.load());
  Insert(cache_id, wrapped, root, key, &dropped);
  return key;
}

absl::StatusOr<CK_OBJECT_HANDLE> KeyCache::UnwrapLocked(std::span<const uint8_t> wrapped,
                                                        CK_OBJECT_HANDLE root) {
  // Exactly what a confining root's unwrap template demands (a session object, gone with the
  // session, never on the token; sensitive; usable only for AES-GCM), plus its uses.
  AttributeTemplate unwrapped;
  unwrapped.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_ENCRYPT, true)
      .Bool(CKA_DECRYPT, true);
  AddConfinedVersionAttributes(unwrapped);
  CK_MECHANISM mechanism{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_RV rv = CKR_OK;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (core_->session == CK_INVALID_HANDLE) {
      CUSTOS_ASSIGN_OR_RETURN(core_->session, pool_->OpenSession());
    }
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    rv = core_->module->api()->C_UnwrapKey(core_->session, &mechanism, root,
                                           const_cast<CK_BYTE*>(wrapped.data()), wrapped.size(),
                                           unwrapped.data(), unwrapped.size(), &handle);
    if (rv == CKR_OK) return handle;
    if (IsLoginLost(rv)) {
      CUSTOS_RETURN_IF_ERROR(pool_->EnsureLoggedIn(core_->session));
    } else if (IsSessionDead(rv)) {
      // Its objects died with it. (A live session is never closed here: SoftHSM2 2.6 frees
      // session objects under threads still using them.)
      core_->CloseLocked();
    } else {
      break;
    }
  }
  return CkError("C_UnwrapKey", rv);
}

KeyCache::Ref KeyCache::Lookup(const std::string& cache_id, std::span<const uint8_t> wrapped,
                               CK_OBJECT_HANDLE root) {
  std::lock_guard lock(mu_);
  auto it = entries_.find(cache_id);
  if (it == entries_.end()) return nullptr;
  const Entry& entry = it->second;
  if (entry.key->generation_ != core_->generation.load() || entry.root != root ||
      !std::equal(entry.wrapped.begin(), entry.wrapped.end(), wrapped.begin(), wrapped.end())) {
    return nullptr;  // Dead with an old session, or another key (or root) under the same id.
  }
  recency_.splice(recency_.begin(), recency_, entry.recency);
  return entry.key;
}

void KeyCache::Insert(const std::string& cache_id, std::span<const uint8_t> wrapped,
                      CK_OBJECT_HANDLE root, Ref key, std::vector<Ref>* dropped) {
  std::lock_guard lock(mu_);
  if (auto it = entries_.find(cache_id); it != entries_.end()) {
    dropped->push_back(std::move(it->second.key));
    recency_.erase(it->second.recency);
    entries_.erase(it);
  }
  while (entries_.size() >= capacity_) {
    auto oldest = entries_.find(recency_.back());
    dropped->push_back(std::move(oldest->second.key));
    entries_.erase(oldest);
    recency_.pop_back();
  }
  recency_.push_front(cache_id);
  entries_.emplace(cache_id, Entry{std::move(key), Bytes(wrapped.begin(), wrapped.end()), root,
                                   recency_.begin()});
}

void KeyCache::Forget(const std::string& cache_id) {
  Ref dropped;  // Released after the lock.
  std::lock_guard lock(mu_);
  auto it = entries_.find(cache_id);
  if (it == entries_.end()) return;
  dropped = std::move(it->second.key);
  recency_.erase(it->second.recency);
  entries_.erase(it);
}

void KeyCache::ForgetRoot(CK_OBJECT_HANDLE root) {
  std::vector<Ref> dropped;  // Released after the lock.
  std::lock_guard lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->second.root != root) {
      ++it;
      continue;
    }
    dropped.push_back(std::move(it->second.key));
    recency_.erase(it->second.recency);
    it = entries_.erase(it);
  }
}

void KeyCache::Clear() {
  std::vector<Ref> dropped;  // Released after the lock.
  std::lock_guard lock(mu_);
  DropAllLocked(&dropped);
}

void KeyCache::DropAllLocked(std::vector<Ref>* dropped) {
  for (auto& [id, entry] : entries_) dropped->push_back(std::move(entry.key));
  entries_.clear();
  recency_.clear();
}

size_t KeyCache::size() const {
  std::lock_guard lock(mu_);
  return entries_.size();
}

}  // namespace custos::hsm
