// KeyCache: a bounded LRU of key versions unwrapped into the HSM, by cache id.
//
// A miss unwraps the version under its root key (CKM_AES_KEY_WRAP_PAD) into a sensitive,
// non-extractable AES session object. Session objects die with the session that created
// them, so the cache owns one dedicated session for unwrapping and destroying; the objects are
// usable from every other session of the process.
//
// Callers get Refs (shared ownership). Eviction and Forget() only drop the cache's own
// reference: the HSM object is destroyed when the last Ref goes, so a thread in the middle of
// an operation never has its key pulled away. Concurrent misses for one id unwrap once. If the
// cache's session dies, every cached handle died with it: the next miss opens a new session,
// and entries from the dead one are never served again (they count as misses).
//
// Thread-safe. Refs may outlive the cache (they keep what they need alive).
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
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
  struct Core;  // The dedicated session, shared with every live Key.

 public:
  // One unwrapped key version in the HSM; destroys the object when the last Ref goes.
  class Key {
   public:
    Key(std::shared_ptr<Core> core, CK_OBJECT_HANDLE handle, uint64_t generation);
    ~Key();
    Key(const Key&) = delete;
    Key& operator=(const Key&) = delete;
    CK_OBJECT_HANDLE handle() const { return handle_; }

   private:
    friend class KeyCache;
    std::shared_ptr<Core> core_;
    CK_OBJECT_HANDLE handle_;
    uint64_t generation_;  // Of the cache session that created the object.
  };
  using Ref = std::shared_ptr<const Key>;

  // `pool` opens the cache's session and must outlive the cache. INVALID_ARGUMENT if
  // `capacity` is 0.
  static absl::StatusOr<std::unique_ptr<KeyCache>> Create(SessionPool* pool, size_t capacity);
  ~KeyCache();
  KeyCache(const KeyCache&) = delete;
  KeyCache& operator=(const KeyCache&) = delete;

  // The key cached under `cache_id`, or `wrapped` unwrapped under `root` (and cached). An entry
  // made from other wrapped bytes than `wrapped`, or under another root, is replaced, never
  // returned.
  absl::StatusOr<Ref> Get(const std::string& cache_id, std::span<const uint8_t> wrapped,
                          CK_OBJECT_HANDLE root);

  // Drops `cache_id` (its object goes once no operation uses it).
  void Forget(const std::string& cache_id);

  // Drops every entry unwrapped under `root` (after that root key was destroyed).
  void ForgetRoot(CK_OBJECT_HANDLE root);

  // Drops every entry (after a token loss the handles may name nothing, or something else).
  void Clear();

  size_t size() const;

 private:
  struct Entry {
    Ref key;
    Bytes wrapped;          // What `key` was unwrapped from; public data (it is wrapped).
    CK_OBJECT_HANDLE root;  // What it was unwrapped under.
    std::list<std::string>::iterator recency;
  };

  KeyCache(SessionPool* pool, size_t capacity);
  Ref Lookup(const std::string& cache_id, std::span<const uint8_t> wrapped, CK_OBJECT_HANDLE root);
  // Both below append the references they drop to `dropped`, which the caller releases only
  // after letting go of every lock: releasing may call into the HSM.
  void Insert(const std::string& cache_id, std::span<const uint8_t> wrapped, CK_OBJECT_HANDLE root,
              Ref key, std::vector<Ref>* dropped);
  void DropAllLocked(std::vector<Ref>* dropped);
  absl::StatusOr<CK_OBJECT_HANDLE> UnwrapLocked(std::span<const uint8_t> wrapped,
                                                CK_OBJECT_HANDLE root);

  SessionPool* const pool_;
  const size_t capacity_;
  const std::shared_ptr<Core> core_;

  mutable std::mutex mu_;  // Guards the two below. Never held while calling the HSM.
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> recency_;  // Most recently used first.
};

}  // namespace custos::hsm
