#include "core/usage_tracker.h"

#include <algorithm>
#include <atomic>

#include "common/strings.h"

namespace custos::core {

struct UsageTracker::Counter {
  storage::VersionUsage usage;  // encryptions and decryptions as counted in memory
  bool dirty = false;           // counts or last_used_at not yet written
  bool reserving = false;       // the next block's reservation is being written
  bool flushing = false;        // Flush() is writing its counts
};

struct UsageTracker::Tracked {
  std::list<std::string>::iterator recency;
  // Calls between their Load() and their end; their counters may not be dropped meanwhile.
  // Taken with mu_; given back by a Pin, which may run without it.
  std::atomic<int> users{0};
  // Its reservations were loaded through their integrity check (else only its counts were).
  bool checked = false;
};

class UsageTracker::Pin {
 public:
  explicit Pin(Tracked* tracked) : tracked_(tracked) {}
  ~Pin() { tracked_->users.fetch_sub(1, std::memory_order_release); }
  Pin(const Pin&) = delete;
  Pin& operator=(const Pin&) = delete;

 private:
  Tracked* const tracked_;
};

UsageTracker::UsageTracker(storage::KeyStore* store, const Clock* clock, const UsageLimits& limits,
                           Reserve reserve, std::function<void()> on_rotation_wanted)
    : store_(store),
      clock_(clock),
      limits_(limits),
      reserve_(std::move(reserve)),
      on_rotation_wanted_(std::move(on_rotation_wanted)) {}

UsageTracker::~UsageTracker() = default;

absl::StatusOr<UsageTracker::Tracked*> UsageTracker::Load(std::unique_lock<std::mutex>& lock,
                                                          const std::string& key_id, Need need) {
  const bool check = need == Need::kCheckedReservations;
  for (;;) {
    auto it = tracked_.find(key_id);
    if (it != tracked_.end() && (it->second.checked || !check)) {
      recency_.splice(recency_.begin(), recency_, it->second.recency);
      it->second.users.fetch_add(1, std::memory_order_relaxed);
      return &it->second;
    }
    if (loading_keys_.count(key_id)) {  // another caller is reading it: wait for that
      settled_.wait(lock);
      continue;
    }
    loading_keys_.insert(key_id);
    lock.unlock();
    // A decryption only counts: it spares a cold key the reservations' integrity check (an
    // HSM HMAC per version), which guards encryptions alone.
    absl::StatusOr<std::vector<storage::VersionUsage>> stored =
        check ? store_->GetUsage(key_id) : store_->GetUsageUnchecked(key_id);
    lock.lock();
    loading_keys_.erase(key_id);
    settled_.notify_all();
    CUSTOS_RETURN_IF_ERROR(stored.status());
    if (it = tracked_.find(key_id); it != tracked_.end()) {
      // Loaded unchecked before, and now checked: every version's encryptions resume from its
      // checked reservation, or from none (nothing counted into the unchecked ones); the
      // decryptions and last use counted meanwhile stay.
      for (auto c = counters_.lower_bound({key_id, 0});
           c != counters_.end() && c->first.first == key_id; ++c) {
        storage::VersionUsage& counted = c->second->usage;
        counted.encryptions_reserved = 0;
        counted.encryptions = 0;
        counted.mac.clear();
      }
      for (const storage::VersionUsage& usage : *stored) {
        storage::VersionUsage& counted = CounterOf(key_id, usage.version)->usage;
        counted.encryptions_reserved = usage.encryptions_reserved;
        counted.encryptions = usage.encryptions_reserved;
        counted.mac = usage.mac;
      }
      it->second.checked = true;
      continue;
    }
    for (storage::VersionUsage& usage : *stored) {
      auto counter = std::make_unique<Counter>();
      // Resume from the reservation: whatever was used of it before a crash (or before the
      // counters were dropped) is unknown.
      usage.encryptions = usage.encryptions_reserved;
      counter->usage = std::move(usage);
      counters_[{key_id, counter->usage.version}] = std::move(counter);
    }
    recency_.push_front(key_id);
    Tracked& tracked = tracked_[key_id];
    tracked.recency = recency_.begin();
    tracked.checked = check;
    tracked.users.fetch_add(1, std::memory_order_relaxed);  // before DropIdle: not this one
    // A few at a time: the keys past the bound may all be waiting for a flush.
    DropIdle(/*max_looked_at=*/8);
    return &tracked;
  }
}

void UsageTracker::DropIdle(size_t max_looked_at) {
  auto it = recency_.end();
  for (size_t looked_at = 0; tracked_.size() > limits_.tracked_keys && it != recency_.begin() &&
                             looked_at < max_looked_at;
       ++looked_at) {
    --it;
    const std::string& key_id = *it;
    auto tracked = tracked_.find(key_id);
    if (tracked->second.users.load(std::memory_order_acquire) > 0) continue;
    const auto first = counters_.lower_bound({key_id, 0});
    auto last = first;
    bool idle = true;
    for (; last != counters_.end() && last->first.first == key_id; ++last) {
      idle = idle && !last->second->dirty && !last->second->reserving && !last->second->flushing;
    }
    if (!idle) continue;
    counters_.erase(first, last);
    tracked_.erase(tracked);
    it = recency_.erase(it);
  }
}

size_t UsageTracker::tracked_keys() const {
  std::lock_guard lock(mu_);
  return tracked_.size();
}

UsageTracker::Counter* UsageTracker::CounterOf(const std::string& key_id, uint32_t version) {
  std::unique_ptr<Counter>& counter = counters_[{key_id, version}];
  if (!counter) {
    counter = std::make_unique<Counter>();
    counter->usage.key_id = key_id;
    counter->usage.version = version;
  }
  return counter.get();
}

void UsageTracker::Deferred::Settle(bool written) {
  if (tracker_ == nullptr) return;
  {
    std::lock_guard lock(tracker_->mu_);
    counter_->reserving = false;
    if (written) {
      counter_->usage.encryptions_reserved =
          std::max(counter_->usage.encryptions_reserved, reserved_.encryptions_reserved);
      // The row carries the counts as of the reservation; a Flush() may have written newer
      // ones meanwhile, which the next must write again.
      counter_->dirty = true;
    }
    tracker_->settled_.notify_all();
  }
  tracker_ = nullptr;
  counter_ = nullptr;
}

absl::Status UsageTracker::CountEncryption(const std::string& key_id, uint32_t version,
                                           Deferred* deferred) {
  // A call holding a reservation it has not written would wait for itself (or for a call
  // waiting for it) if it counted again: one encryption per Deferred.
  if (deferred != nullptr && deferred->tracker_ != nullptr) {
    return absl::InternalError("a call counted a second encryption with a deferred reservation");
  }
  bool flagged = false;
  {
    std::unique_lock lock(mu_);
    CUSTOS_ASSIGN_OR_RETURN(Tracked* const tracked, Load(lock, key_id, Need::kCheckedReservations));
    const Pin pin(tracked);
    Counter* const counter = CounterOf(key_id, version);
    storage::VersionUsage& usage = counter->usage;
    for (;;) {
      if (usage.encryptions >= limits_.rotate_at) flagged = Flag(key_id, version) || flagged;
      if (usage.encryptions >= limits_.max_encryptions) {
        lock.unlock();
        if (flagged && on_rotation_wanted_) on_rotation_wanted_();
        return absl::ResourceExhaustedError(
            StrCat("version ", version, " of key ", key_id, " has reached its limit of ",
                   limits_.max_encryptions,
                   " encryptions (AES-GCM random IVs); it is being rotated, "
                   "retry shortly"));
      }
      if (usage.encryptions < usage.encryptions_reserved) break;
      if (counter->reserving) {  // another caller is reserving the next block: wait for it
        settled_.wait(lock);
        continue;
      }
      // Reserve the next block, durably, before counting into it.
      storage::VersionUsage reserved = usage;
      reserved.encryptions_reserved =
          std::min(limits_.max_encryptions, usage.encryptions_reserved + limits_.reservation_block);
      reserved.last_used_at = clock_->NowSeconds();
      counter->reserving = true;
      if (deferred != nullptr) {  // the caller writes it
        deferred->tracker_ = this;
        deferred->counter_ = counter;
        deferred->reserved_ = std::move(reserved);
        break;
      }
      lock.unlock();
      const absl::Status written = reserve_(reserved);
      lock.lock();
      counter->reserving = false;
      settled_.notify_all();
      CUSTOS_RETURN_IF_ERROR(written);
      usage.encryptions_reserved =
          std::max(usage.encryptions_reserved, reserved.encryptions_reserved);
    }
    ++usage.encryptions;
    usage.last_used_at = clock_->NowSeconds();
    counter->dirty = true;
    if (usage.encryptions >= limits_.rotate_at) flagged = Flag(key_id, version) || flagged;
  }
  if (flagged && on_rotation_wanted_) on_rotation_wanted_();
  return absl::OkStatus();
}

void UsageTracker::CountDecryption(const std::string& key_id, uint32_t version) {
  std::unique_lock lock(mu_);
  // Counts inform officers; a store hiccup must not fail decrypts.
  absl::StatusOr<Tracked*> tracked = Load(lock, key_id, Need::kCounts);
  if (!tracked.ok()) return;
  const Pin pin(*tracked);
  Counter* const counter = CounterOf(key_id, version);
  ++counter->usage.decryptions;
  counter->usage.last_used_at = clock_->NowSeconds();
  counter->dirty = true;
}

absl::StatusOr<std::vector<storage::VersionUsage>> UsageTracker::Usage(const std::string& key_id) {
  std::unique_lock lock(mu_);
  CUSTOS_ASSIGN_OR_RETURN(Tracked* const tracked, Load(lock, key_id, Need::kCheckedReservations));
  const Pin pin(tracked);
  std::vector<storage::VersionUsage> usage;
  for (auto it = counters_.lower_bound({key_id, 0});
       it != counters_.end() && it->first.first == key_id; ++it) {
    usage.push_back(it->second->usage);
  }
  return usage;
}

bool UsageTracker::Flag(const std::string& key_id, uint32_t version) {
  if (!flagged_.emplace(key_id, version).second) return false;
  rotation_wanted_[key_id] = version;
  return true;
}

std::map<std::string, uint32_t> UsageTracker::RotationWanted() {
  std::lock_guard lock(mu_);
  return rotation_wanted_;
}

void UsageTracker::RotationDone(const std::string& key_id, uint32_t version) {
  std::lock_guard lock(mu_);
  if (auto it = rotation_wanted_.find(key_id);
      it != rotation_wanted_.end() && it->second == version) {
    rotation_wanted_.erase(it);
  }
}

absl::Status UsageTracker::Flush() {
  std::vector<storage::VersionUsage> dirty;
  std::vector<Counter*> flushed;
  {
    std::lock_guard lock(mu_);
    for (const auto& [id, counter] : counters_) {
      if (!counter->dirty) continue;
      dirty.push_back(counter->usage);
      flushed.push_back(counter.get());
      counter->dirty = false;    // counts made from here on are dirty again
      counter->flushing = true;  // and it is not dropped before its counts are written
    }
  }
  // Written without the lock: counting goes on meanwhile.
  absl::Status written = dirty.empty() ? absl::OkStatus() : store_->PutUsageCounts(dirty);
  std::lock_guard lock(mu_);
  for (Counter* counter : flushed) {
    counter->flushing = false;
    if (!written.ok()) counter->dirty = true;
  }
  CUSTOS_RETURN_IF_ERROR(written);
  DropIdle(/*max_looked_at=*/16384);
  return absl::OkStatus();
}

}  // namespace custos::core
