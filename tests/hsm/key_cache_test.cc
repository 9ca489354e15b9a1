#include "hsm/key_cache.h"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <set>
#include <thread>
#include <vector>

#include "hsm/pkcs11_module.h"
#include "hsm/session_pool.h"
#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

using hsm::WrappedKey;

// Seals and opens one message under `key`; true if both worked.
bool RoundTrip(hsm::Hsm& hsm, const WrappedKey& key) {
  auto sealed = hsm.Encrypt(key, AsBytes("m"), AsBytes("a"));
  if (!sealed.ok()) return false;
  auto opened = hsm.Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes("a"));
  return opened.ok() && AsString(*opened) == "m";
}

TEST_CASE("the cache keeps at most its capacity of unwrapped keys, and Forget destroys them") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token, /*pool_size=*/2, /*cache_capacity=*/2);
  RawToken raw(token);
  std::vector<WrappedKey> keys;
  std::vector<Bytes> versions;
  for (int i = 0; i < 5; ++i) versions.push_back(hsm->GenerateWrappedKey(kRoot).value());
  for (int i = 0; i < 5; ++i) keys.push_back({"k/" + std::to_string(i), versions[i], kRoot});
  for (int round = 0; round < 3; ++round) {
    for (const WrappedKey& key : keys) CHECK(RoundTrip(*hsm, key));
  }
  CHECK(raw.CountSecretKeys(/*token_objects=*/false) == 2);

  hsm->Forget("k/4");
  CHECK(raw.CountSecretKeys(false) == 1);
  hsm->Forget("k/4");  // Already gone: nothing happens.
  hsm->Forget("never-cached");
  CHECK(RoundTrip(*hsm, keys[4]));
  CHECK(raw.CountSecretKeys(false) == 2);
}

TEST_CASE("eviction while other threads use the key is safe") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token, /*pool_size=*/4, /*cache_capacity=*/1);
  std::vector<Bytes> versions;
  for (int i = 0; i < 4; ++i) versions.push_back(hsm->GenerateWrappedKey(kRoot).value());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        const size_t v = (t + i) % versions.size();
        if (!RoundTrip(*hsm, WrappedKey{"k/" + std::to_string(v), versions[v], kRoot})) ++failures;
        if (i % 10 == 0) hsm->Forget("k/" + std::to_string(v));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
  RawToken raw(token);
  CHECK(raw.CountSecretKeys(/*token_objects=*/false) <= 1);
}

TEST_CASE("an id is never served from other wrapped bytes") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const Bytes b = hsm->GenerateWrappedKey(kRoot).value();
  auto sealed_a = hsm->Encrypt(WrappedKey{"same-id", a, kRoot}, AsBytes("under a"), {});
  REQUIRE(sealed_a.ok());
  auto sealed_b = hsm->Encrypt(WrappedKey{"same-id", b, kRoot}, AsBytes("under b"), {});
  REQUIRE(sealed_b.ok());
  auto opened_b =
      hsm->Decrypt(WrappedKey{"same-id", b, kRoot}, sealed_b->iv, sealed_b->ciphertext_and_tag, {});
  REQUIRE(opened_b.ok());
  CHECK(AsString(*opened_b) == "under b");
  CHECK(absl::IsInvalidArgument(
      hsm->Decrypt(WrappedKey{"same-id", b, kRoot}, sealed_a->iv, sealed_a->ciphertext_and_tag, {})
          .status()));
}

// Drives a KeyCache directly, beside an Hsm that made the root key and a wrapped version.
struct CacheFixture {
  explicit CacheFixture(size_t capacity) : hsm(OpenHsm(token)), raw(token) {
    wrapped = hsm->GenerateWrappedKey(kRoot).value();
    other = hsm->GenerateWrappedKey(kRoot).value();
    root = raw.FindKey(kRoot);
    auto module = hsm::Pkcs11Module::Load(kSoftHsmModule);
    REQUIRE(module.ok());
    auto created =
        hsm::SessionPool::Create(*module, token.label(), SecureBytes::FromString(token.pin()), {});
    REQUIRE(created.ok());
    pool = std::move(created).value();
    cache = hsm::KeyCache::Create(pool.get(), capacity).value();
  }

  SoftHsmToken token;
  std::unique_ptr<hsm::Hsm> hsm;
  RawToken raw;
  Bytes wrapped, other;
  CK_OBJECT_HANDLE root;
  std::unique_ptr<hsm::SessionPool> pool;
  std::unique_ptr<hsm::KeyCache> cache;
};

TEST_CASE("concurrent misses for one id unwrap once") {
  CacheFixture f(8);
  std::vector<CK_OBJECT_HANDLE> handles(8, CK_INVALID_HANDLE);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < handles.size(); ++t) {
    threads.emplace_back([&, t] {
      auto key = f.cache->Get("one", f.wrapped, f.root);
      if (key.ok()) handles[t] = (*key)->handle();
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(std::set<CK_OBJECT_HANDLE>(handles.begin(), handles.end()).size() == 1);
  CHECK(handles[0] != CK_INVALID_HANDLE);
  CHECK(f.cache->size() == 1);
  CHECK(f.raw.CountSecretKeys(/*token_objects=*/false) == 1);
}

TEST_CASE("churn from several threads leaves no object behind") {
  CacheFixture f(/*capacity=*/2);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const std::string id = "k/" + std::to_string((t + i) % 5);
        // Every other id alternates its bytes, as a root rotation's rewrap would.
        const Bytes& wrapped = ((t + i) % 5) % 2 == 0 && i % 3 == 0 ? f.other : f.wrapped;
        auto key = f.cache->Get(id, wrapped, f.root);
        if (!key.ok() || (*key)->handle() == CK_INVALID_HANDLE) ++failures;
        if (i % 17 == t) f.cache->Forget(id);
        if (i % 61 == t) f.cache->Clear();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
  CHECK(f.cache->size() <= 2);
  CHECK(f.raw.CountSecretKeys(/*token_objects=*/false) == f.cache->size());
  f.cache->Clear();
  CHECK(f.raw.CountSecretKeys(/*token_objects=*/false) == 0);
}

TEST_CASE("an evicted key lives until its last user lets go") {
  CacheFixture f(1);
  auto first = f.cache->Get("first", f.wrapped, f.root);
  REQUIRE(first.ok());
  auto second = f.cache->Get("second", f.other, f.root);  // Evicts "first".
  REQUIRE(second.ok());
  CHECK(f.cache->size() == 1);
  CHECK(f.raw.CountSecretKeys(false) == 2);

  bool encrypt = false;  // The evicted handle still names a usable key.
  CHECK(f.raw.ReadBool((*first)->handle(), CKA_ENCRYPT, &encrypt) == CKR_OK);
  CHECK(encrypt);
  first->reset();
  CHECK(f.raw.CountSecretKeys(false) == 1);

  f.cache->Clear();
  CHECK(f.cache->size() == 0);
  CHECK(f.raw.CountSecretKeys(false) == 1);  // `second` still holds its key.
  second->reset();
  CHECK(f.raw.CountSecretKeys(false) == 0);
}

TEST_CASE("unwrapped copies are sensitive, non-extractable session objects") {
  CacheFixture f(1);
  auto key = f.cache->Get("k", f.wrapped, f.root);
  REQUIRE(key.ok());
  const std::pair<CK_ATTRIBUTE_TYPE, bool> expected[] = {
      {CKA_TOKEN, false},  {CKA_PRIVATE, true}, {CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, false},
      {CKA_ENCRYPT, true}, {CKA_DECRYPT, true}, {CKA_WRAP, false},     {CKA_UNWRAP, false}};
  for (const auto& [type, value] : expected) {
    bool actual = !value;
    INFO("attribute 0x" << std::hex << type);
    CHECK(f.raw.ReadBool((*key)->handle(), type, &actual) == CKR_OK);
    CHECK(actual == value);
  }
  CHECK(f.raw.TryReadValue((*key)->handle()) == CKR_ATTRIBUTE_SENSITIVE);
  CHECK(absl::IsInvalidArgument(hsm::KeyCache::Create(f.pool.get(), 0).status()));
}

// A micro-measurement, not a check (hidden: run it with test_hsm "[.cache_bench]"). Two threads
// call Get, all hits: on one hot id, then on random ids of a working set that fits the cache.
// A hit takes only the cache's lock, so the two rates show what that lock (and, for the hot
// id, the one reference count both threads bump) costs.
TEST_CASE("cache hit rate: one hot id against random ids", "[.cache_bench]") {
  constexpr size_t kWorkingSet = 256;
  constexpr int kThreads = 2;
  constexpr auto kPhase = std::chrono::seconds(2);
  CacheFixture f(/*capacity=*/1024);
  std::vector<std::string> ids;
  for (size_t i = 0; i < kWorkingSet; ++i) ids.push_back("key/" + std::to_string(i) + "/1");
  for (const std::string& id : ids) REQUIRE(f.cache->Get(id, f.wrapped, f.root).ok());
  REQUIRE(f.cache->size() == kWorkingSet);

  auto measure = [&](bool hot) {
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> gets{0}, failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        uint64_t state = 0x9e3779b97f4a7c15ULL * (t + 1), n = 0, failed = 0;
        while (!stop.load(std::memory_order_relaxed)) {
          state ^= state << 13;  // xorshift64: cheap next to a Get
          state ^= state >> 7;
          state ^= state << 17;
          const std::string& id = ids[hot ? 0 : state % kWorkingSet];
          if (!f.cache->Get(id, f.wrapped, f.root).ok()) ++failed;
          ++n;
        }
        gets += n;
        failures += failed;
      });
    }
    const auto start = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(kPhase);
    stop = true;
    for (auto& thread : threads) thread.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CHECK(failures == 0);
    return static_cast<double>(gets) / seconds;
  };
  const double hot = measure(true);
  const double random = measure(false);
  std::printf("KeyCache::Get hits, %d threads, %zu ids cached: hot id %.0f/s, random id %.0f/s\n",
              kThreads, kWorkingSet, hot, random);
  CHECK(f.cache->size() == kWorkingSet);
}

}  // namespace
}  // namespace custos::testing
