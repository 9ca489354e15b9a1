#include "hsm/key_cache.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/memory/memory.h"
#include "hsm/call_executor.h"
#include "hsm/ck_error.h"
#include "hsm/p11_object.h"
#include "hsm/root_key.h"
#include "spdlog/spdlog.h"

namespace custos::hsm {

// One of the cache's sessions. PKCS#11 lets a session serve one call at a time, so a thread
// borrows it (Core::Borrow) for its calls and gives it back; in between, it is that thread's.
struct KeyCache::Session {
  // Used only by the borrower.
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;  // Opened by the first unwrap that needs it.
  // Bumped (by the borrower, under Core::mu) whenever `handle` is closed: the objects it made
  // died with it, and their handles may name newer objects. Read by the borrower, or under mu.
  uint64_t generation = 1;
  // Guarded by Core::mu.
  bool borrowed = false;
  // Used by a call that was set aside (see hsm/call_executor.h): the module may have left it
  // in any state, so no unwrap is given it again. It lives on only to destroy its objects, and
  // is closed (then free to be opened afresh) once none is left.
  bool retired = false;
  size_t objects = 0;  // Made on `handle` (this generation) and not destroyed yet.
  // Objects let go of while the session was borrowed, with the generation that made them: the
  // borrower destroys them before giving the session back.
  std::vector<std::pair<CK_OBJECT_HANDLE, uint64_t>> doomed;
};

// What every Key needs after the cache itself may be gone: the sessions, and the lock.
struct KeyCache::Core {
  explicit Core(std::shared_ptr<const Pkcs11Module> m) : module(std::move(m)) {}
  // Runs once no Key is left, so nothing is borrowed. Closing a session destroys its objects.
  ~Core() {
    for (const auto& session : sessions) {
      if (session->handle != CK_INVALID_HANDLE) module->api()->C_CloseSession(session->handle);
    }
  }

  // A session nobody is using (not necessarily open yet), or a new one; the caller's until it
  // calls GiveBack.
  Session* Borrow() {
    std::lock_guard lock(mu);
    for (const auto& session : sessions) {
      if (!session->borrowed && !session->retired) {
        session->borrowed = true;
        return session.get();
      }
    }
    Session* added = sessions.emplace_back(std::make_unique<Session>()).get();
    added->borrowed = true;
    return added;
  }

  // Destroys what was let go of meanwhile, then frees `session` for others (closing it first
  // if it is retired and owns nothing any more).
  void GiveBack(Session* session) {
    const bool set_aside = CallExecutor::SetAside();
    for (;;) {
      std::vector<std::pair<CK_OBJECT_HANDLE, uint64_t>> doomed;
      {
        std::lock_guard lock(mu);
        if (set_aside) session->retired = true;
        if (session->doomed.empty()) {
          if (!session->retired || session->objects > 0) {
            session->borrowed = false;
            return;
          }
        } else {
          doomed.swap(session->doomed);
        }
      }
      if (doomed.empty()) {  // Retired and empty: no object of it can be in use.
        if (session->handle != CK_INVALID_HANDLE) module->api()->C_CloseSession(session->handle);
        session->handle = CK_INVALID_HANDLE;
        std::lock_guard lock(mu);
        ++session->generation;
        session->retired = false;
        if (session->doomed.empty()) {
          session->borrowed = false;
          return;
        }
        continue;  // Released meanwhile under the old generation: nothing left to destroy.
      }
      for (const auto& [object, generation] : doomed) DestroyOn(session, object, generation);
    }
  }

  // The last Ref to `object` is gone. Never waits for another thread's HSM call: if its session
  // is in use, its borrower destroys the object when it gives the session back.
  void Release(Session* session, CK_OBJECT_HANDLE object, uint64_t generation) {
    {
      std::lock_guard lock(mu);
      if (generation != session->generation) return;  // Died with an earlier session.
      if (session->borrowed) {
        session->doomed.emplace_back(object, generation);
        return;
      }
      session->borrowed = true;
    }
    DestroyOn(session, object, generation);
    GiveBack(session);
  }

  // The borrower's: destroys `object` if it is still the session's.
  void DestroyOn(Session* session, CK_OBJECT_HANDLE object, uint64_t generation) {
    if (generation != session->generation || session->handle == CK_INVALID_HANDLE) return;
    CK_RV rv = module->api()->C_DestroyObject(session->handle, object);
    {
      std::lock_guard lock(mu);
      if (session->objects > 0) --session->objects;
    }
    if (rv == CKR_OK || IsHandleStale(rv)) return;
    if (IsSessionDead(rv)) {
      Dead(session);
      return;
    }
    spdlog::error("PKCS#11 C_DestroyObject of a cached key version failed: {}", CkrName(rv));
  }

  // The borrower's, when the HSM says `session` is gone: its objects died with it. The cache's
  // other sessions are likely gone too (a token loss ends them all) without anyone knowing yet,
  // and a module may reuse handles, so no entry made before this is served again (`epoch`).
  // A live session is never closed here: SoftHSM2 2.6 frees session objects under threads
  // still using them.
  void Dead(Session* session) {
    module->api()->C_CloseSession(session->handle);
    session->handle = CK_INVALID_HANDLE;
    std::lock_guard lock(mu);
    ++session->generation;
    session->objects = 0;
    ++epoch;
  }

  uint64_t Epoch() {
    std::lock_guard lock(mu);
    return epoch;
  }

  const std::shared_ptr<const Pkcs11Module> module;
  // Guards what is marked so here, in Session and in KeyCache. Never held while calling the
  // HSM, nor while a Ref is released (releasing takes it).
  std::mutex mu;
  std::vector<std::unique_ptr<Session>> sessions;  // Only ever grows: each owns its objects.
  uint64_t epoch = 1;  // Bumped whenever one of `sessions` is found dead.
};

// An unwrap under way. Its leader (the caller that found no entry and no matching flight)
// unwraps; callers for the same id, bytes and root wait for `outcome` instead.
struct KeyCache::Flight {
  Flight(std::span<const uint8_t> w, CK_OBJECT_HANDLE r)
      : wrapped(w.begin(), w.end()), root(r), started(std::chrono::steady_clock::now()) {}

  bool Matches(std::span<const uint8_t> w, CK_OBJECT_HANDLE r) const {
    return root == r && std::equal(wrapped.begin(), wrapped.end(), w.begin(), w.end());
  }

  const Bytes wrapped;
  const CK_OBJECT_HANDLE root;
  const std::chrono::steady_clock::time_point started;
  // Guarded by Core::mu. Set once, after the flight left flights_, so a flight in flights_ holds
  // no Ref (dropping it there releases no key).
  std::optional<absl::StatusOr<Ref>> outcome;
  std::condition_variable landed;  // Notified when `outcome` is set.
};

KeyCache::Key::Key(std::shared_ptr<Core> core, Session* session, CK_OBJECT_HANDLE handle,
                   uint64_t generation)
    : core_(std::move(core)), session_(session), handle_(handle), generation_(generation) {}

KeyCache::Key::~Key() { core_->Release(session_, handle_, generation_); }

absl::StatusOr<std::unique_ptr<KeyCache>> KeyCache::Create(SessionPool* pool, size_t capacity,
                                                           std::chrono::milliseconds flight_wait) {
  if (capacity == 0) return absl::InvalidArgumentError("HSM key cache capacity must be > 0");
  return absl::WrapUnique(new KeyCache(pool, capacity, flight_wait));
}

KeyCache::KeyCache(SessionPool* pool, size_t capacity, std::chrono::milliseconds flight_wait)
    : pool_(pool),
      capacity_(capacity),
      flight_wait_(flight_wait),
      core_(std::make_shared<Core>(pool->module())) {}

KeyCache::~KeyCache() = default;

absl::StatusOr<KeyCache::Ref> KeyCache::Get(const std::string& cache_id,
                                            std::span<const uint8_t> wrapped,
                                            CK_OBJECT_HANDLE root) {
  std::unique_lock lock(core_->mu);
  if (Ref hit = LookupLocked(cache_id, wrapped, root)) {
    hits_.fetch_add(1, std::memory_order_relaxed);
    return hit;
  }
  misses_.fetch_add(1, std::memory_order_relaxed);

  if (auto it = flights_.find(cache_id);
      it != flights_.end() && it->second->Matches(wrapped, root)) {
    const std::shared_ptr<Flight> flight = it->second;
    if (!flight->landed.wait_until(lock, flight->started + flight_wait_,
                                   [&] { return flight->outcome.has_value(); })) {
      return absl::UnavailableError(
          "the HSM has not finished unwrapping this key version for another call; retry later");
    }
    absl::StatusOr<Ref> outcome = *flight->outcome;
    lock.unlock();  // No Ref may go while the lock is held (see Core::mu); `flight` holds one.
    return outcome;
  }

  // This caller unwraps. A flight under way for other bytes or another root under this id is
  // superseded: it lands without being cached, as this one would replace its entry anyway.
  const auto flight = std::make_shared<Flight>(wrapped, root);
  flights_[cache_id] = flight;
  lock.unlock();
  absl::StatusOr<Unwrapped> unwrapped = Unwrap(wrapped, root);
  absl::StatusOr<Ref> outcome =
      unwrapped.ok() ? absl::StatusOr<Ref>(unwrapped->key) : unwrapped.status();

  std::vector<Ref> dropped;
  lock.lock();
  // Still in flights_: no Forget, ForgetRoot or Clear (nor a miss for other bytes) came since
  // the flight began. Still the epoch: no session found dead since the unwrap began.
  if (auto it = flights_.find(cache_id); it != flights_.end() && it->second == flight) {
    flights_.erase(it);
    if (unwrapped.ok() && unwrapped->epoch == core_->epoch) {
      InsertLocked(cache_id, *flight, *std::move(unwrapped), &dropped);
    }
  }
  flight->outcome = outcome;
  flight->landed.notify_all();
  lock.unlock();  // Before `dropped`, `unwrapped` and `flight` go.
  return outcome;
}

absl::StatusOr<KeyCache::Unwrapped> KeyCache::Unwrap(std::span<const uint8_t> wrapped,
                                                     CK_OBJECT_HANDLE root) {
  Session* session = core_->Borrow();
  absl::StatusOr<Unwrapped> unwrapped = UnwrapOn(session, wrapped, root);
  core_->GiveBack(session);
  return unwrapped;
}

absl::StatusOr<KeyCache::Unwrapped> KeyCache::UnwrapOn(Session* session,
                                                       std::span<const uint8_t> wrapped,
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
    if (session->handle == CK_INVALID_HANDLE) {
      CUSTOS_ASSIGN_OR_RETURN(session->handle, pool_->OpenSession());
    }
    // Read before the call: if a session is found dead meanwhile, this key is not cached.
    const uint64_t epoch = core_->Epoch();
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    rv = core_->module->api()->C_UnwrapKey(session->handle, &mechanism, root,
                                           const_cast<CK_BYTE*>(wrapped.data()), wrapped.size(),
                                           unwrapped.data(), unwrapped.size(), &handle);
    if (rv == CKR_OK) {
      {
        std::lock_guard lock(core_->mu);
        ++session->objects;
      }
      return Unwrapped{Ref(new Key(core_, session, handle, session->generation)), epoch};
    }
    if (IsLoginLost(rv)) {
      CUSTOS_RETURN_IF_ERROR(pool_->EnsureLoggedIn(session->handle));
    } else if (IsSessionDead(rv)) {
      core_->Dead(session);
    } else {
      break;
    }
  }
  return CkError("C_UnwrapKey", rv);
}

KeyCache::Ref KeyCache::LookupLocked(const std::string& cache_id, std::span<const uint8_t> wrapped,
                                     CK_OBJECT_HANDLE root) {
  auto it = entries_.find(cache_id);
  if (it == entries_.end()) return nullptr;
  const Entry& entry = it->second;
  if (entry.epoch != core_->epoch || entry.root != root ||
      !std::equal(entry.wrapped.begin(), entry.wrapped.end(), wrapped.begin(), wrapped.end())) {
    return nullptr;  // Perhaps dead with a session, or another key (or root) under the same id.
  }
  recency_.splice(recency_.begin(), recency_, entry.recency);
  return entry.key;
}

void KeyCache::InsertLocked(const std::string& cache_id, const Flight& flight, Unwrapped unwrapped,
                            std::vector<Ref>* dropped) {
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
  entries_.emplace(cache_id, Entry{std::move(unwrapped.key), flight.wrapped, flight.root,
                                   unwrapped.epoch, recency_.begin()});
}

void KeyCache::Forget(const std::string& cache_id) {
  Ref dropped;  // Released after the lock.
  std::lock_guard lock(core_->mu);
  flights_.erase(cache_id);
  auto it = entries_.find(cache_id);
  if (it == entries_.end()) return;
  dropped = std::move(it->second.key);
  recency_.erase(it->second.recency);
  entries_.erase(it);
}

void KeyCache::ForgetRoot(CK_OBJECT_HANDLE root) {
  std::vector<Ref> dropped;  // Released after the lock.
  std::lock_guard lock(core_->mu);
  std::erase_if(flights_, [root](const auto& flight) { return flight.second->root == root; });
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
  std::lock_guard lock(core_->mu);
  flights_.clear();
  DropAllLocked(&dropped);
}

void KeyCache::Abandon() {
  std::vector<Ref> dropped;  // Released after the lock; their sessions' generations are past.
  std::lock_guard lock(core_->mu);
  for (const auto& session : core_->sessions) {
    session->handle = CK_INVALID_HANDLE;
    ++session->generation;
    session->objects = 0;
    session->doomed.clear();
    session->retired = false;  // Whatever the module left it in died with the module.
  }
  ++core_->epoch;
  flights_.clear();
  DropAllLocked(&dropped);
}

void KeyCache::DropAllLocked(std::vector<Ref>* dropped) {
  for (auto& [id, entry] : entries_) dropped->push_back(std::move(entry.key));
  entries_.clear();
  recency_.clear();
}

size_t KeyCache::size() const {
  std::lock_guard lock(core_->mu);
  return entries_.size();
}

}  // namespace custos::hsm
