// KeyCache: a bounded LRU of key versions unwrapped into the HSM, by cache id.
//
// A miss unwraps the version under its root key (CKM_AES_KEY_WRAP_PAD) into a sensitive,
// non-extractable AES session object. Session objects die with the session that created
// them, so the cache unwraps and destroys on sessions of its own; the objects are usable from
// every other session of the process.
//
// Concurrency. The cache's one lock is never held across a PKCS#11 call, and a hit takes
// nothing else. PKCS#11 allows a session one call at a time, so a miss borrows one of the
// cache's sessions for its unwrap, and opens another when all are in use: misses for different
// ids proceed at once, as far as the module itself lets them. Misses for the same id, wrapped
// bytes and root unwrap once: the first caller unwraps, the others wait for its outcome (the
// key, or the error). If the HSM hangs, that unwrap and the callers waiting for it hang; no
// other Get does.
//
// Sessions are kept for the cache's life (closing one would destroy the objects it made), so
// there are as many as unwraps and destructions ever ran at once. Pkcs11Hsm calls Get only
// while it holds a pool session, which bounds that by about the pool's size. A session that a
// set-aside call used (hsm/call_executor.h) is retired: no unwrap is given it again, and it
// is closed once the last object it made is destroyed (then opened afresh when needed).
//
// Callers get Refs (shared ownership). Eviction and Forget() only drop the cache's own
// reference: the HSM object is destroyed when the last Ref goes, so a thread in the middle of
// an operation never has its key pulled away. Letting go of a Ref never waits for an unwrap:
// the object is destroyed on the session that made it, at once if that session is free, else
// by the thread using it as soon as its call returns.
//
// Forget(), ForgetRoot() and Clear() also cover unwraps under way when they run: those callers
// still get their key, but it is not cached. If one of the cache's sessions dies, every cached
// handle may have died too (and a module may hand the same handles out again): entries made
// before are never served again (they count as misses).
//
// Thread-safe. Refs may outlive the cache (they keep what they need alive).
#pragma once

#include <p11-kit/pkcs11.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "hsm/session_pool.h"

namespace custos::hsm {

class KeyCache {
 private:
  struct Core;     // The cache's sessions and its lock, shared with every live Key.
  struct Session;  // One of the cache's sessions.

 public:
  // One unwrapped key version in the HSM; destroys the object when the last Ref goes.
  class Key {
   public:
    ~Key();
    Key(const Key&) = delete;
    Key& operator=(const Key&) = delete;
    CK_OBJECT_HANDLE handle() const { return handle_; }

   private:
    friend class KeyCache;
    Key(std::shared_ptr<Core> core, Session* session, CK_OBJECT_HANDLE handle, uint64_t generation);

    const std::shared_ptr<Core> core_;
    Session* const session_;  // Owned by core_: the session that made the object.
    const CK_OBJECT_HANDLE handle_;
    const uint64_t generation_;  // Of that session's handle when it made the object.
  };
  using Ref = std::shared_ptr<const Key>;

  // `pool` opens the cache's sessions and must outlive the cache. A caller waits for another's
  // unwrap of the same version only until that unwrap has been under way for `flight_wait`;
  // later callers get UNAVAILABLE at once while it lasts, so that a hung unwrap holds up one
  // thread, not every caller of that version. INVALID_ARGUMENT if `capacity` is 0.
  static absl::StatusOr<std::unique_ptr<KeyCache>> Create(
      SessionPool* pool, size_t capacity,
      std::chrono::milliseconds flight_wait = std::chrono::seconds(1));
  // No Get may be under way.
  ~KeyCache();
  KeyCache(const KeyCache&) = delete;
  KeyCache& operator=(const KeyCache&) = delete;

  // The key cached under `cache_id`, or `wrapped` unwrapped under `root` (and cached). An entry
  // made from other wrapped bytes than `wrapped`, or under another root, is replaced, never
  // returned. Errors are those of C_UnwrapKey (see CkError), or of opening a session.
  absl::StatusOr<Ref> Get(const std::string& cache_id, std::span<const uint8_t> wrapped,
                          CK_OBJECT_HANDLE root);

  // Lookups answered from the cache, and the rest (an unwrap, this caller's or another's
  // under way), since the cache was made.
  uint64_t hits() const { return hits_.load(std::memory_order_relaxed); }
  uint64_t misses() const { return misses_.load(std::memory_order_relaxed); }

  // Drops `cache_id` (its object goes once no operation uses it); an unwrap of it under way
  // is not cached.
  void Forget(const std::string& cache_id);

  // Drops every entry unwrapped under `root` (after that root key was destroyed), and keeps
  // unwraps under it that are under way from being cached.
  void ForgetRoot(CK_OBJECT_HANDLE root);

  // Drops every entry, and keeps unwraps under way from being cached (after a token loss the
  // handles may name nothing, or something else).
  void Clear();

  // The module was finalised: the cache's sessions and every object they made are gone. Drops
  // every entry and forgets the sessions without calling the module (their handles may name
  // new sessions once it is initialised again). No Get may be under way.
  void Abandon();

  size_t size() const;

 private:
  struct Entry {
    Ref key;
    Bytes wrapped;          // What `key` was unwrapped from; public data (it is wrapped).
    CK_OBJECT_HANDLE root;  // What it was unwrapped under.
    uint64_t epoch;         // Core::epoch when its C_UnwrapKey began.
    std::list<std::string>::iterator recency;
  };
  struct Flight;  // An unwrap under way, and the outcome its waiters are given.
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
  struct Unwrapped {
    Ref key;
    uint64_t epoch;  // Core::epoch when the C_UnwrapKey that made it began.
  };

  KeyCache(SessionPool* pool, size_t capacity, std::chrono::milliseconds flight_wait);
  // The four below need core_->mu held. The last two append the references they drop to
  // `dropped`, which the caller releases only after letting go of the lock: releasing takes the
  // lock, and may call into the HSM.
  Ref LookupLocked(const std::string& cache_id, std::span<const uint8_t> wrapped,
                   CK_OBJECT_HANDLE root);
  void InsertLocked(const std::string& cache_id, const Flight& flight, Unwrapped unwrapped,
                    std::vector<Ref>* dropped);
  void DropAllLocked(std::vector<Ref>* dropped);
  // Unwraps on a session borrowed for the call; takes core_->mu only between HSM calls.
  absl::StatusOr<Unwrapped> Unwrap(std::span<const uint8_t> wrapped, CK_OBJECT_HANDLE root);
  absl::StatusOr<Unwrapped> UnwrapOn(Session* session, std::span<const uint8_t> wrapped,
                                     CK_OBJECT_HANDLE root);

  SessionPool* const pool_;
  const size_t capacity_;
  const std::chrono::milliseconds flight_wait_;
  const std::shared_ptr<Core> core_;

  // Guarded by core_->mu, which is never held while calling the HSM.
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> recency_;  // Most recently used first.
  // The unwrap under way for each id that may still be cached: Forget, ForgetRoot and Clear
  // take unwraps out of here, and so does a later miss for the id with other bytes or root.
  std::unordered_map<std::string, std::shared_ptr<Flight>> flights_;
};

}  // namespace custos::hsm
