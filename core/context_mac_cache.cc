#include "core/context_mac_cache.h"

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstdlib>

namespace custos::core {
namespace {

SecureBytes RandomSalt() {
  SecureBytes salt(size_t{32});
  // A failing CSPRNG is not something to serve through.
  if (RAND_bytes(salt.data(), static_cast<int>(salt.size())) != 1) std::abort();
  return salt;
}

}  // namespace

ContextMacCache::ContextMacCache(size_t capacity) : capacity_(capacity), salt_(RandomSalt()) {}

std::string ContextMacCache::KeyOf(std::string_view principal,
                                   std::span<const uint8_t> canonical) const {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  // The principal's length first: "ab" + "c..." and "a" + "bc..." differ.
  const uint64_t principal_size = principal.size();
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = ctx != nullptr && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1 &&
                  EVP_DigestUpdate(ctx, salt_.data(), salt_.size()) == 1 &&
                  EVP_DigestUpdate(ctx, &principal_size, sizeof principal_size) == 1 &&
                  EVP_DigestUpdate(ctx, principal.data(), principal.size()) == 1 &&
                  EVP_DigestUpdate(ctx, canonical.data(), canonical.size()) == 1 &&
                  EVP_DigestFinal_ex(ctx, digest, &length) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) std::abort();  // out of memory inside OpenSSL
  return std::string(reinterpret_cast<const char*>(digest), length);
}

std::optional<std::string> ContextMacCache::Find(const std::string& key) {
  if (capacity_ == 0) {
    misses_.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  std::lock_guard lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    misses_.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  hits_.fetch_add(1, std::memory_order_relaxed);
  recency_.splice(recency_.begin(), recency_, it->second);
  return it->second->second;
}

void ContextMacCache::Insert(const std::string& key, const std::string& hmac) {
  if (capacity_ == 0) return;
  std::lock_guard lock(mu_);
  if (auto it = entries_.find(key); it != entries_.end()) {
    recency_.splice(recency_.begin(), recency_, it->second);
    return;
  }
  recency_.emplace_front(key, hmac);
  entries_.emplace(key, recency_.begin());
  if (entries_.size() > capacity_) {
    entries_.erase(recency_.back().first);
    recency_.pop_back();
  }
}

size_t ContextMacCache::size() const {
  std::lock_guard lock(mu_);
  return entries_.size();
}

}  // namespace custos::core
