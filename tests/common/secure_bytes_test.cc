#include "common/secure_bytes.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "common/secure_memory.h"
#include "tests/common/smaps.h"

namespace custos {
namespace {

TEST_CASE("SecureBytes moves leave the source empty", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("secret");
  SecureBytes b = std::move(a);
  CHECK(a.empty());  // NOLINT(bugprone-use-after-move): the moved-from state is the contract.
  CHECK(b.view() == "secret");
}

TEST_CASE("SecureBytes moves hand over the block instead of copying the bytes", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("secret");
  const uint8_t* block = a.data();
  SecureBytes b = std::move(a);
  CHECK(b.data() == block);
  SecureBytes c;
  c = std::move(b);
  CHECK(c.data() == block);
  CHECK(b.data() == nullptr);  // NOLINT(bugprone-use-after-move)
}

TEST_CASE("SecureBytes::Truncate wipes the cut-off tail", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("abcdef");
  const uint8_t* tail = a.data() + 3;
  a.Truncate(3);
  CHECK(a.view() == "abc");
  // The block keeps its capacity, so the bytes past the end are still ours to inspect.
  CHECK(tail[0] == 0);
  CHECK(tail[1] == 0);
  CHECK(tail[2] == 0);
}

TEST_CASE("SecureBytes::Clone is an independent copy", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("key");
  SecureBytes b = a.Clone();
  a.Wipe();
  CHECK(a.empty());
  CHECK(b.view() == "key");
}

TEST_CASE("SecureBytes(size) is zeroed, also when it reuses a freed block", "[secure_bytes]") {
  const uint8_t* used;
  {
    SecureBytes secret = SecureBytes::FromString(std::string(48, 'k'));
    used = secret.data();
  }
  SecureBytes fresh(48);
  CHECK(fresh.data() == used);  // the free lists are LIFO: the same block comes back
  CHECK(fresh.view() == std::string(48, '\0'));
  CHECK(SecureBytes(0).empty());
}

TEST_CASE("SecureBytes memory is wiped when it returns to the pool", "[secure_bytes]") {
  const std::string key = "0123456789abcdef0123456789abcdef";
  SecureMemory& memory = SecureMemory::Global();
  const uint8_t* p;
  {
    SecureBytes secret = SecureBytes::FromString(key);
    p = secret.data();
    REQUIRE_FALSE(memory.IsPoolMemoryZeroForTesting(p, key.size()));
  }
  CHECK(memory.IsPoolMemoryZeroForTesting(p, key.size()));

  SecureBytes wiped = SecureBytes::FromString(key);
  p = wiped.data();
  wiped.Wipe();
  CHECK(wiped.empty());
  CHECK(memory.IsPoolMemoryZeroForTesting(p, key.size()));
}

// Stands in for std::allocator and notes, for each block it frees, whether it was all zero.
struct NotingAllocator {
  using value_type = uint8_t;
  template <typename U>
  struct rebind {
    using other = NotingAllocator;
  };
  static inline std::vector<bool> freed_wiped;
  uint8_t* allocate(size_t n) { return std::allocator<uint8_t>().allocate(n); }
  void deallocate(uint8_t* p, size_t n) {
    freed_wiped.push_back(std::all_of(p, p + n, [](uint8_t b) { return b == 0; }));
    std::allocator<uint8_t>().deallocate(p, n);
  }
};

TEST_CASE("A cleansing vector wipes each block before it is freed, as it grows and as it goes",
          "[secure_bytes]") {
  NotingAllocator::freed_wiped.clear();
  {
    std::vector<uint8_t, CleansingAllocator<uint8_t, NotingAllocator>> bytes;
    // Grown one byte at a time on purpose. NOLINTNEXTLINE(performance-inefficient-vector-operation)
    for (int i = 0; i < 1000; ++i) bytes.push_back(0xa5);
    CHECK(NotingAllocator::freed_wiped.size() >= 5);  // it grew, freeing smaller blocks
  }
  CHECK(NotingAllocator::freed_wiped.size() >= 6);
  CHECK(std::count(NotingAllocator::freed_wiped.begin(), NotingAllocator::freed_wiped.end(),
                   false) == 0);
  static_assert(std::is_same_v<WipedBytes::allocator_type, CleansingAllocator<uint8_t>>);
}

TEST_CASE("SecureBytes memory is locked and left out of core dumps", "[secure_bytes]") {
  const bool can_lock = kMlockIsReal && !SecureMemory::Global().stats().lock_failed;
  if (!can_lock) WARN("mlock is not in effect here (RLIMIT_MEMLOCK, sanitizer): Locked unchecked");
  SecureBytes key(32);
  SecureBytes payload(4096 + 16);                       // a decrypted payload with its tag
  SecureBytes large(SecureMemory::kMaxBlockBytes + 1);  // gets its own mapping
  for (const SecureBytes* bytes : {&key, &payload, &large}) {
    const MappingInfo mapping = MappingOf(bytes->data());
    INFO("size " << bytes->size() << ", VmFlags: " << mapping.vm_flags);
    REQUIRE(mapping.found);
    CHECK(mapping.dont_dump());
    if (can_lock) CHECK(mapping.locked());
  }
}

}  // namespace
}  // namespace custos
