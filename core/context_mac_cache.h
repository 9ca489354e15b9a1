// ContextMacCache: the audit HMAC of recently seen encryption contexts, so that a context an
// application sends again and again costs one HSM call, not one per request.
//
// Each record binds its context as an HMAC under an HSM key (Kms::ContextHmac); on SoftHSM2
// that call (C_SignInit on a token key) was a quarter of a GenerateDataKey's server CPU. The
// cache maps a salted SHA-256 of the canonical context (the salt random per process and held
// in locked, undumpable memory) to that HMAC, so it holds no context value and nothing that
// can be checked against a guessed one without the salt. Bounded: the least recently used
// entry goes first. Thread-safe.
#pragma once

#include <atomic>
#include <cstddef>
#include <list>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>

#include "common/secure_bytes.h"

namespace custos::core {

class ContextMacCache {
 public:
  // Up to `capacity` entries; 0 turns the cache off (every lookup misses).
  explicit ContextMacCache(size_t capacity);

  // The cache's name for `principal`'s canonical context (a salted digest).
  std::string KeyOf(std::string_view principal, std::span<const uint8_t> canonical) const;
  std::optional<std::string> Find(const std::string& key);
  void Insert(const std::string& key, const std::string& hmac);
  size_t size() const;
  // Find calls answered from the cache, and the others, since it was made.
  uint64_t hits() const { return hits_.load(std::memory_order_relaxed); }
  uint64_t misses() const { return misses_.load(std::memory_order_relaxed); }

 private:
  using Recency = std::list<std::pair<std::string, std::string>>;  // key, hmac; newest first

  const size_t capacity_;
  const SecureBytes salt_;
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
  mutable std::mutex mu_;
  Recency recency_;                                             // guarded by mu_
  std::unordered_map<std::string, Recency::iterator> entries_;  // guarded by mu_
};

}  // namespace custos::core
