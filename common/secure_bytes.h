// SecureBytes: a byte buffer for secrets (plaintext data keys, PINs, decrypted payloads).
//
// Its memory comes from SecureMemory (common/secure_memory.h): locked into RAM so it is never
// written to swap, excluded from core dumps, and wiped with OPENSSL_cleanse when it is destroyed,
// cleared, reassigned or truncated. It cannot be copied by accident: copies must be spelled out
// with Clone(), and moves hand over the pointer, so the bytes never leave locked memory.
// Allocation is cheap (a lock-free pool, no syscall) for secrets up to 8 KiB.
//
// Not thread-safe: one SecureBytes must not be used from two threads at once. Different
// SecureBytes may be created and destroyed on any threads concurrently.
#pragma once

#include <openssl/crypto.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace custos {

using Bytes = std::vector<uint8_t>;

// An allocator that wipes memory before `Upstream` frees it. A vector of it leaves no copy of
// its bytes behind, neither when it grows nor when it goes. For what must not outlive its use
// but need not be locked (encryption-context values in a GCM AAD); keys are SecureBytes.
template <typename T, typename Upstream = std::allocator<T>>
struct CleansingAllocator {
  static_assert(std::is_empty_v<Upstream>, "each call makes its own Upstream");
  using value_type = T;
  template <typename U>
  struct rebind {
    using other =
        CleansingAllocator<U, typename std::allocator_traits<Upstream>::template rebind_alloc<U>>;
  };
  CleansingAllocator() = default;
  template <typename U, typename V>
  CleansingAllocator(const CleansingAllocator<U, V>& /*other*/) noexcept {}  // NOLINT: rebinding

  T* allocate(size_t n) { return Upstream().allocate(n); }
  void deallocate(T* p, size_t n) noexcept {
    OPENSSL_cleanse(p, n * sizeof(T));
    Upstream().deallocate(p, n);
  }
  bool operator==(const CleansingAllocator& /*other*/) const { return true; }
};

using WipedBytes = std::vector<uint8_t, CleansingAllocator<uint8_t>>;

// Zeroes `s` in place, over its whole capacity (an earlier, longer value may linger past its
// size); its size is unchanged. For a secret held in a std::string of someone else's making.
inline void WipeString(std::string& s) { OPENSSL_cleanse(s.data(), s.capacity()); }

class SecureBytes {
 public:
  SecureBytes() = default;
  // `size` zero bytes.
  explicit SecureBytes(size_t size);
  explicit SecureBytes(std::span<const uint8_t> bytes);
  static SecureBytes FromString(std::string_view s);
  ~SecureBytes() {
    if (data_ != nullptr) Wipe();
  }

  SecureBytes(SecureBytes&& other) noexcept;
  SecureBytes& operator=(SecureBytes&& other) noexcept;
  SecureBytes(const SecureBytes&) = delete;  // Secrets are never copied implicitly.
  SecureBytes& operator=(const SecureBytes&) = delete;

  SecureBytes Clone() const { return SecureBytes(span()); }

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<const uint8_t> span() const { return {data_, size_}; }
  std::string_view view() const { return {reinterpret_cast<const char*>(data_), size_}; }

  // Shrinks to `size` bytes, wiping the cut-off tail.
  void Truncate(size_t size);
  // Wipes and empties the buffer, returning its memory to the pool.
  void Wipe();

 private:
  uint8_t* data_ = nullptr;  // null when nothing is allocated
  size_t size_ = 0;
  size_t capacity_ = 0;  // usable size of the block from SecureMemory, for Free
};

}  // namespace custos
