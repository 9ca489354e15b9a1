// UsageTracker: how much each key version is used, and the AES-GCM limit on encryptions.
//
// Random 96-bit IVs allow at most 2^32 encryptions under one key (NIST SP 800-38D). Every
// encryption is counted in memory; the durable count is reserved in blocks ahead of use
// (one store write per block, not per request), and after a restart counting resumes from the
// reservation, so a crash can skip ahead but never rewind. When a version's count reaches
// `rotate_at`, its key is flagged for automatic rotation, once per version (encryptions that
// arrive while the rotation runs must not ask for another); at `max_encryptions` further
// encryptions under it are refused. Decryption counts and last-use times are flushed with
// reservations and by Flush(); a crash may lose the unflushed tail of those (they inform
// officers, they guard nothing).
//
// Memory is bounded: the counters of at most `tracked_keys` keys stay in memory, the least
// recently used beyond that are dropped once nothing of theirs is unwritten (no reservation
// being written, no count or last-use time awaiting Flush(), no call using them). A key used
// again is loaded afresh and, as after a restart, resumes counting encryptions from its
// reservation: dropping can skip part of a block, never rewind. Counts made since the last
// Flush() keep their key in memory until it runs, so between two flushes the tracker may hold
// more keys than the bound, as many as were used meanwhile. A key first used by a decryption
// is loaded without its reservations' integrity check (its counts guard nothing); they are
// checked before any encryption counts into them. Thread-safe.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/clock.h"
#include "common/status.h"
#include "storage/key_store.h"

namespace custos::core {

struct UsageLimits {
  uint64_t max_encryptions = uint64_t{1} << 32;  // per version; refuse at this count
  uint64_t rotate_at = uint64_t{3} << 30;        // flag for rotation at this count (75 %)
  uint64_t reservation_block = 10000;            // encryptions reserved per store write
  size_t tracked_keys = 100000;                  // keys whose counters stay in memory (>= 1)
};

class UsageTracker {
  struct Counter;  // one version's counts

 public:
  // Writes a reservation durably, with the audit record that names its row (the Kms does).
  using Reserve = std::function<absl::Status(const storage::VersionUsage& reservation)>;

  // `store` and `clock` must outlive the tracker. `reserve` writes reservations;
  // `on_rotation_wanted` (may be empty) is called, without locks held, when a key is first
  // flagged.
  UsageTracker(storage::KeyStore* store, const Clock* clock, const UsageLimits& limits,
               Reserve reserve, std::function<void()> on_rotation_wanted);
  ~UsageTracker();

  // A reservation left to a call to write with its own audit record, in the transaction that
  // must commit before the call's result is released: a crash before that commit loses the
  // reservation and the result with it, so no ciphertext counted past what is durable ever
  // leaves. Saves a cold key's first call a commit of its own (and an fsync in series).
  // Until it is settled, other encryptions under that version wait, as for any reservation;
  // so a call counts one encryption with it and nothing more (INTERNAL otherwise).
  class Deferred {
   public:
    Deferred() = default;
    ~Deferred() { Settle(/*written=*/false); }  // never written: as if never made
    Deferred(const Deferred&) = delete;
    Deferred& operator=(const Deferred&) = delete;

    // The usage row to write with the call's record, or nullptr if no reservation is due.
    const storage::VersionUsage* due() const { return tracker_ ? &reserved_ : nullptr; }
    // Call once the row and its record committed: the block may be counted into by all.
    void Written() { Settle(/*written=*/true); }
    // Drops it unwritten, as the destructor would: the next encryption reserves.
    void Abandon() { Settle(/*written=*/false); }

   private:
    friend class UsageTracker;
    void Settle(bool written);

    UsageTracker* tracker_ = nullptr;  // set while a reservation is due
    Counter* counter_ = nullptr;
    storage::VersionUsage reserved_;
  };

  // Counts one encryption under (key_id, version) before it happens. RESOURCE_EXHAUSTED when
  // the version has reached its limit; UNAVAILABLE if a reservation cannot be written (the
  // encryption must not happen then either). With `deferred`, a reservation due is left in
  // it for the caller to write instead of being written here.
  absl::Status CountEncryption(const std::string& key_id, uint32_t version,
                               Deferred* deferred = nullptr);
  void CountDecryption(const std::string& key_id, uint32_t version);

  // The key's usage as of now (durable counts merged with what is only in memory yet).
  absl::StatusOr<std::vector<storage::VersionUsage>> Usage(const std::string& key_id);

  // Keys flagged for rotation and not yet done, each with the version that crossed the
  // threshold: rotating is due only while that version is still the key's primary.
  std::map<std::string, uint32_t> RotationWanted();
  // The flag of (key_id, version) is dealt with (rotated, or no longer primary); a flag whose
  // rotation failed stays, for the next maintenance turn.
  void RotationDone(const std::string& key_id, uint32_t version);

  // Writes counts and last-use times that are only in memory, then drops the counters of
  // keys beyond the bound that nothing uses.
  absl::Status Flush();

  size_t tracked_keys() const;  // keys whose counters are in memory

 private:
  struct Tracked;  // a key whose counters are in memory
  class Pin;       // keeps a key's counters in memory while a call uses them
  // What a caller of Load() needs of the stored rows: only the counts (a decryption), or
  // reservations that passed their integrity check (an encryption, or showing them).
  enum class Need { kCounts, kCheckedReservations };
  // Loads `key_id`'s stored counters unless they are in memory (checked, if `need` says so),
  // reading the store with `lock` (on mu_) released: a cold key never holds up calls on others.
  // Callers for the same key wait for the one load. Counters loaded unchecked are checked
  // before anything counts into their reservations. The key is pinned for the caller, who holds
  // it in a Pin.
  absl::StatusOr<Tracked*> Load(std::unique_lock<std::mutex>& lock, const std::string& key_id,
                                Need need);
  // Drops the counters of the least recently used keys while more than tracked_keys are
  // in memory, skipping keys in use or with something unwritten, looking at no more than
  // `max_looked_at` keys. With mu_.
  void DropIdle(size_t max_looked_at);
  // The counter of (key_id, version), once Load()ed; made if the store had none. With mu_.
  Counter* CounterOf(const std::string& key_id, uint32_t version);
  // Flags (key_id, version) for rotation unless it was flagged before; true if it is new.
  // Called with mu_.
  bool Flag(const std::string& key_id, uint32_t version);

  storage::KeyStore* const store_;
  const Clock* const clock_;
  const UsageLimits limits_;
  const Reserve reserve_;
  const std::function<void()> on_rotation_wanted_;

  // Guards everything below; never held across a store read or write. A reservation's write
  // runs with the counter marked `reserving` (until a Deferred one is settled): encryptions
  // under that version wait for it (they may not count past what is durable), all others go
  // on.
  mutable std::mutex mu_;
  std::condition_variable settled_;  // a reservation or a load finished
  std::map<std::pair<std::string, uint32_t>, std::unique_ptr<Counter>> counters_;
  std::unordered_map<std::string, Tracked> tracked_;  // keys whose counters are loaded
  std::list<std::string> recency_;                    // tracked_'s keys, most recent first
  std::set<std::string> loading_keys_;
  std::map<std::string, uint32_t> rotation_wanted_;
  std::set<std::pair<std::string, uint32_t>> flagged_;  // versions ever flagged in this run
};

}  // namespace custos::core
