// SecureMemory: the allocator behind SecureBytes. Its memory is locked into RAM (mlock), so
// secrets are never written to swap, and excluded from core dumps (madvise MADV_DONTDUMP), so a
// crash does not leave them in a core file. Every block is wiped with OPENSSL_cleanse before it
// is reused or unmapped.
//
// Locking memory costs a syscall, so it is done once: a pool (2 MiB by default) is mmap'd,
// locked and excluded up front, and carved into blocks of power-of-two size classes (16 bytes to
// 8 KiB: data keys, PINs, decrypted payloads up to 4 KiB plus their GCM tag). Blocks never move
// between classes. Each class has a lock-free free list (a compare-and-swap per operation), and
// each thread keeps a few free blocks of each class in front of it (up to 16 blocks and 4 KiB,
// at least one block), so the common alloc/free pair on the hot path takes no atomic operation,
// no lock and no syscall. A thread's cached blocks go back to the shared lists when it exits.
//
// When the pool has no block left for a class, or a request is larger than 8 KiB, the block gets
// its own mapping, locked and excluded the same way (a few syscalls, for the rare case).
//
// mlock is bounded by RLIMIT_MEMLOCK (8 MiB on Debian unless raised, e.g. LimitMEMLOCK= in the
// systemd unit). When locking fails the memory is still excluded from core dumps and everything
// keeps working: one warning is logged for the process and stats().lock_failed reports it.
// Memory locks are not inherited across fork().
//
// Thread-safe: Allocate and Free may be called from any thread, on any block.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/status.h"

namespace custos {

class SecureMemory {
 public:
  static constexpr size_t kDefaultPoolBytes = size_t{2} << 20;
  static constexpr size_t kMinBlockBytes = 16;
  static constexpr size_t kMaxBlockBytes = 8192;  // larger requests get their own mapping
  static constexpr int kSizeClasses = 10;         // 16, 32, ..., 8192 bytes

  // Allocation counts of Global() lag by up to 63 per thread until it exits or calls
  // ReleaseThreadCache(): threads add them in batches.
  struct Stats {
    size_t pool_bytes = 0;              // size of the pre-locked pool
    size_t locked_bytes = 0;            // bytes mlock'd now: the pool and live own mappings
    uint64_t pool_allocations = 0;      // blocks served from the pool, since creation
    uint64_t fallback_allocations = 0;  // blocks that got their own mapping, since creation
    bool lock_failed = false;           // an mlock failed: some secrets may reach swap
  };

  // The process-wide instance SecureBytes allocates from, created on first use. Never destroyed,
  // so SecureBytes with static storage duration stay valid until exit.
  static SecureMemory& Global() {
    SecureMemory* memory = global_.load(std::memory_order_acquire);
    return memory != nullptr ? *memory : CreateGlobal();
  }
  // Sets the pool size of Global(), rounded up to whole pages (0: no pool, every block gets its
  // own mapping). Fails with FailedPrecondition once Global() has been created.
  static absl::Status Configure(size_t pool_bytes);

  // A separate instance, without thread caches: for tests. Blocks must be freed into the
  // instance they came from, and all of them before it is destroyed.
  explicit SecureMemory(size_t pool_bytes) : SecureMemory(pool_bytes, false) {}
  ~SecureMemory();
  SecureMemory(const SecureMemory&) = delete;
  SecureMemory& operator=(const SecureMemory&) = delete;

  // Returns a zeroed block of at least `size` (> 0) bytes and stores its usable size in
  // `*capacity`. Throws std::bad_alloc if no memory can be mapped, as std::vector would.
  uint8_t* Allocate(size_t size, size_t* capacity);
  // Wipes the first `used` bytes of a block from Allocate and releases it. The bytes past
  // `used` must be zero (never written, or wiped already).
  void Free(uint8_t* block, size_t capacity, size_t used);

  Stats stats() const;
  // Returns the calling thread's cached blocks to the shared free lists and adds its pending
  // allocation count to stats(). Runs by itself when a thread exits.
  void ReleaseThreadCache();

  // Test hook: whether [p, p + size) lies in the pool and is all zero. Reads only pool memory,
  // which stays mapped whether or not the block is allocated (and is exempt from ASan).
  bool IsPoolMemoryZeroForTesting(const uint8_t* p, size_t size) const;

 private:
  // A Treiber stack of free blocks. `head` packs a tag, bumped on every change so that a stale
  // compare-and-swap fails (the ABA problem), with the top block's index + 1 (0: empty).
  struct alignas(64) FreeList {
    std::atomic<uint64_t> head{0};
  };

  SecureMemory(size_t pool_bytes, bool thread_cached);
  static SecureMemory& CreateGlobal();
  void CountPoolAllocation();
  bool InPool(const uint8_t* p) const;
  uint8_t* PopFree(int size_class);
  void PushFree(int size_class, uint8_t* block);
  uint8_t* Carve(size_t bytes);
  uint8_t* AllocateMapping(size_t size, size_t* capacity);
  void FreeMapping(uint8_t* block);

  static std::atomic<SecureMemory*> global_;

  const bool thread_cached_;  // only Global(): a cache must not outlive its instance
  uint8_t* pool_ = nullptr;
  size_t pool_bytes_ = 0;
  bool pool_locked_ = false;
  std::atomic<size_t> carved_{0};  // pool bytes handed to a free list or a caller so far
  // next_[i]: index + 1 of the block below block i (in 16-byte units) on its free list. Kept
  // out of the blocks so that free blocks stay all zero and no thread reads a live block.
  std::unique_ptr<std::atomic<uint32_t>[]> next_;
  FreeList lists_[kSizeClasses];
  std::atomic<uint64_t> pool_allocations_{0};
  std::atomic<uint64_t> fallback_allocations_{0};
  std::atomic<size_t> fallback_locked_bytes_{0};
  std::atomic<bool> lock_failed_{false};
};

}  // namespace custos
