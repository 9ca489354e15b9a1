#include "common/secure_memory.h"

#include <openssl/crypto.h>
#include <sanitizer/asan_interface.h>  // no-op macros outside AddressSanitizer builds
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <mutex>
#include <new>
#include <system_error>
#include <utility>

namespace custos {
namespace {

constexpr size_t kMaxPoolBytes = size_t{1} << 30;  // block indexes must fit in 32 bits
constexpr uint64_t kTagOne = uint64_t{1} << 32;
constexpr uint64_t kTagMask = ~uint64_t{0} << 32;

// A block with its own mapping starts this far into it, after a header; keeps 16-byte alignment.
constexpr size_t kHeaderBytes = 16;
struct MappingHeader {
  size_t bytes;  // of the whole mapping
  bool locked;
};
static_assert(sizeof(MappingHeader) <= kHeaderBytes);

// Per class, a thread keeps at most 16 free blocks and 4 KiB, but at least one block.
constexpr int kMaxCachedBlocks = 16;
constexpr size_t kMaxCachedBytes = 4096;
constexpr uint32_t kCountBatch = 64;  // allocations counted before adding them to stats

// Free blocks of Global() kept by one thread, wiped like every free block. Trivially
// destructible, so that it stays usable while other thread_local objects are destroyed.
struct ThreadCache {
  uint8_t* blocks[SecureMemory::kSizeClasses][kMaxCachedBlocks];
  int count[SecureMemory::kSizeClasses];
  uint32_t uncounted;  // allocations not yet added to the instance's counter
  bool armed;          // ReleaseAtExit will run
  bool exited;         // ReleaseAtExit has run: cache and batch nothing more
};
thread_local constinit ThreadCache cache{};

struct ReleaseAtExit {
  ~ReleaseAtExit() {
    SecureMemory::Global().ReleaseThreadCache();
    cache.exited = true;
  }
};

// Whether this thread may use its cache; arms ReleaseAtExit on first use.
bool CacheUsable() {
  if (!cache.armed) {
    cache.armed = true;
    static thread_local ReleaseAtExit release_at_exit;  // constructed here, once per thread
  }
  return !cache.exited;
}

std::mutex global_mu;
size_t global_pool_bytes = SecureMemory::kDefaultPoolBytes;  // guarded by global_mu

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t RoundUpToPages(size_t bytes) {
  const size_t page = PageSize();
  return (bytes + page - 1) / page * page;
}

int ClassOf(size_t size) {
  return size <= SecureMemory::kMinBlockBytes ? 0 : std::bit_width(size - 1) - 4;
}

constexpr size_t ClassBytes(int size_class) { return SecureMemory::kMinBlockBytes << size_class; }

int CacheLimit(int size_class) {  // shifts, not a division: this is on the hot path
  const auto blocks =
      static_cast<int>((kMaxCachedBytes / SecureMemory::kMinBlockBytes) >> size_class);
  return std::clamp(blocks, 1, kMaxCachedBlocks);
}

// Excludes [p, p + bytes) from core dumps and locks it; returns whether it is locked. Failures
// are logged once per process: they repeat for every mapping once the limit is reached.
bool Protect(void* p, size_t bytes) {
  static std::atomic<bool> dump_warned{false};
  static std::atomic<bool> lock_warned{false};
  if (madvise(p, bytes, MADV_DONTDUMP) != 0 && !dump_warned.exchange(true)) {
    spdlog::warn(
        "secure memory: madvise(MADV_DONTDUMP) failed ({}): secrets may appear in core "
        "dumps",
        std::error_code(errno, std::generic_category()).message());
  }
  if (mlock(p, bytes) == 0) return true;
  if (!lock_warned.exchange(true)) {
    spdlog::warn(
        "secure memory: mlock of {} bytes failed ({}): secrets may be written to swap. "
        "Raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the systemd unit) above the secure "
        "memory pool size",
        bytes, std::error_code(errno, std::generic_category()).message());
  }
  return false;
}

}  // namespace

constinit std::atomic<SecureMemory*> SecureMemory::global_{nullptr};

SecureMemory& SecureMemory::CreateGlobal() {
  std::lock_guard lock(global_mu);
  SecureMemory* memory = global_.load(std::memory_order_relaxed);
  if (memory == nullptr) {
    memory = new SecureMemory(global_pool_bytes, true);  // never deleted; see the header
    global_.store(memory, std::memory_order_release);
  }
  return *memory;
}

absl::Status SecureMemory::Configure(size_t pool_bytes) {
  if (pool_bytes > kMaxPoolBytes) {
    return absl::InvalidArgumentError("the secure memory pool is limited to 1 GiB");
  }
  std::lock_guard lock(global_mu);
  if (global_.load(std::memory_order_relaxed) != nullptr) {
    return absl::FailedPreconditionError(
        "the secure memory pool is already in use; configure it before the first secret");
  }
  global_pool_bytes = pool_bytes;
  return absl::OkStatus();
}

SecureMemory::SecureMemory(size_t pool_bytes, bool thread_cached) : thread_cached_(thread_cached) {
  static_assert(ClassBytes(kSizeClasses - 1) == kMaxBlockBytes);
  pool_bytes = RoundUpToPages(std::min(pool_bytes, kMaxPoolBytes));
  if (pool_bytes == 0) return;
  void* pool =
      mmap(nullptr, pool_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pool == MAP_FAILED) {
    spdlog::warn(
        "secure memory: cannot map a pool of {} bytes ({}); every secret gets its own "
        "mapping",
        pool_bytes, std::error_code(errno, std::generic_category()).message());
    return;
  }
  pool_ = static_cast<uint8_t*>(pool);
  pool_bytes_ = pool_bytes;
  pool_locked_ = Protect(pool_, pool_bytes_);
  if (!pool_locked_) lock_failed_ = true;
  next_ = std::make_unique<std::atomic<uint32_t>[]>(pool_bytes_ / kMinBlockBytes);
}

SecureMemory::~SecureMemory() {
  if (pool_ == nullptr) return;
  ASAN_UNPOISON_MEMORY_REGION(pool_, pool_bytes_);  // the next mapping here starts usable
  munmap(pool_, pool_bytes_);
}

void SecureMemory::CountPoolAllocation() {
  // A shared counter bumped on every allocation would cost an atomic operation on a contended
  // cache line; threads of Global() add theirs in batches instead.
  if (!thread_cached_ || !CacheUsable()) {
    pool_allocations_.fetch_add(1, std::memory_order_relaxed);
  } else if (++cache.uncounted == kCountBatch) {
    pool_allocations_.fetch_add(std::exchange(cache.uncounted, 0), std::memory_order_relaxed);
  }
}

uint8_t* SecureMemory::Allocate(size_t size, size_t* capacity) {
  if (size <= kMaxBlockBytes && pool_ != nullptr) {
    const int size_class = ClassOf(size);
    uint8_t* block = nullptr;
    if (thread_cached_ && cache.count[size_class] > 0) {
      block = cache.blocks[size_class][--cache.count[size_class]];
    }
    if (block == nullptr) block = PopFree(size_class);
    if (block == nullptr) block = Carve(ClassBytes(size_class));
    if (block != nullptr) {
      ASAN_UNPOISON_MEMORY_REGION(block, ClassBytes(size_class));
      CountPoolAllocation();
      *capacity = ClassBytes(size_class);
      return block;
    }
  }
  return AllocateMapping(size, capacity);
}

void SecureMemory::Free(uint8_t* block, size_t capacity, size_t used) {
  if (block == nullptr) return;
  // Free blocks are all zero: this is also what makes Allocate's blocks zeroed.
  OPENSSL_cleanse(block, used);
  if (!InPool(block)) {
    FreeMapping(block);
    return;
  }
  // Free blocks are off limits to ASan builds, as freed heap memory would be.
  ASAN_POISON_MEMORY_REGION(block, capacity);
  const int size_class = ClassOf(capacity);
  if (thread_cached_ && cache.count[size_class] < CacheLimit(size_class) && CacheUsable()) {
    cache.blocks[size_class][cache.count[size_class]++] = block;
    return;
  }
  PushFree(size_class, block);
}

void SecureMemory::ReleaseThreadCache() {
  if (!thread_cached_) return;
  for (int size_class = 0; size_class < kSizeClasses; ++size_class) {
    while (cache.count[size_class] > 0) {
      PushFree(size_class, cache.blocks[size_class][--cache.count[size_class]]);
    }
  }
  pool_allocations_.fetch_add(std::exchange(cache.uncounted, 0), std::memory_order_relaxed);
}

SecureMemory::Stats SecureMemory::stats() const {
  Stats stats;
  stats.pool_bytes = pool_bytes_;
  stats.locked_bytes = (pool_locked_ ? pool_bytes_ : 0) + fallback_locked_bytes_.load();
  stats.pool_allocations = pool_allocations_.load();
  stats.fallback_allocations = fallback_allocations_.load();
  stats.lock_failed = lock_failed_.load();
  return stats;
}

// Not checked by ASan: free blocks are poisoned, and reading them is this hook's purpose.
__attribute__((no_sanitize("address"))) bool SecureMemory::IsPoolMemoryZeroForTesting(
    const uint8_t* p, size_t size) const {
  if (size == 0 || !InPool(p) || !InPool(p + size - 1)) return false;
  for (size_t i = 0; i < size; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

bool SecureMemory::InPool(const uint8_t* p) const {
  // Unsigned wrap-around makes this one comparison; pool_bytes_ is 0 without a pool.
  return reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(pool_) < pool_bytes_;
}

uint8_t* SecureMemory::PopFree(int size_class) {
  std::atomic<uint64_t>& head = lists_[size_class].head;
  uint64_t top = head.load(std::memory_order_acquire);
  while (static_cast<uint32_t>(top) != 0) {
    const uint32_t index = static_cast<uint32_t>(top) - 1;
    // If another thread takes this block meanwhile, the tag has changed and the CAS fails.
    const uint64_t below = next_[index].load(std::memory_order_relaxed);
    if (head.compare_exchange_weak(top, ((top & kTagMask) + kTagOne) | below,
                                   std::memory_order_acquire, std::memory_order_acquire)) {
      return pool_ + size_t{index} * kMinBlockBytes;
    }
  }
  return nullptr;
}

void SecureMemory::PushFree(int size_class, uint8_t* block) {
  std::atomic<uint64_t>& head = lists_[size_class].head;
  const auto index = static_cast<uint32_t>((block - pool_) / kMinBlockBytes);
  uint64_t top = head.load(std::memory_order_relaxed);
  do {
    next_[index].store(static_cast<uint32_t>(top), std::memory_order_relaxed);
    // Release: whoever pops this block sees it wiped.
  } while (!head.compare_exchange_weak(top, ((top & kTagMask) + kTagOne) | (index + 1),
                                       std::memory_order_release, std::memory_order_relaxed));
}

uint8_t* SecureMemory::Carve(size_t bytes) {
  size_t offset = carved_.load(std::memory_order_relaxed);
  do {
    if (offset + bytes > pool_bytes_) return nullptr;
  } while (!carved_.compare_exchange_weak(offset, offset + bytes, std::memory_order_relaxed));
  return pool_ + offset;  // never handed out before: still the zeroed pages of the mapping
}

uint8_t* SecureMemory::AllocateMapping(size_t size, size_t* capacity) {
  if (size > (size_t{1} << 48)) throw std::bad_alloc();
  const size_t bytes = RoundUpToPages(size + kHeaderBytes);
  void* mapping = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) throw std::bad_alloc();
  const bool locked = Protect(mapping, bytes);
  if (locked) {
    fallback_locked_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  } else {
    lock_failed_ = true;
  }
  new (mapping) MappingHeader{bytes, locked};
  fallback_allocations_.fetch_add(1, std::memory_order_relaxed);
  *capacity = bytes - kHeaderBytes;
  return static_cast<uint8_t*>(mapping) + kHeaderBytes;
}

void SecureMemory::FreeMapping(uint8_t* block) {
  uint8_t* mapping = block - kHeaderBytes;
  const MappingHeader header = *reinterpret_cast<MappingHeader*>(mapping);
  if (header.locked) fallback_locked_bytes_.fetch_sub(header.bytes, std::memory_order_relaxed);
  munmap(mapping, header.bytes);  // also unlocks
}

}  // namespace custos
