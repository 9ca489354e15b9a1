// KeyCache under concurrency, with unwraps held up on command: a KeyCache over the fault
// module (tests/fault_module), which forwards to the same SoftHSM2 token and hangs C_UnwrapKey
// until the test lets it go. Checks that a miss in progress blocks no hit, no miss for another
// id and no release of a key; that misses for one id share one unwrap; and that Forget,
// ForgetRoot and Clear win over an unwrap that was under way when they ran.
//
// SoftHSM2 is initialised first by a direct Hsm (which also makes the root key and the wrapped
// versions, and is finalised last), so the shim's instance neither initialises nor finalises
// it and RawToken may look at the same objects (see fault_module_test.cc for the other order).
#include <p11-kit/pkcs11.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <future>
#include <latch>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "hsm/key_cache.h"
#include "hsm/pkcs11_module.h"
#include "hsm/session_pool.h"
#include "tests/hsm/fault_control.h"
#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

using namespace std::chrono_literals;
using GetResult = absl::StatusOr<hsm::KeyCache::Ref>;

// Long enough for a call that does not wait on a hung one, on a loaded two-core machine.
constexpr auto kPrompt = 10s;

// A KeyCache whose sessions go through the fault module. Members are destroyed in reverse:
// the cache and its pool first, the direct Hsm (which finalises SoftHSM2) last.
struct ShimCache {
  explicit ShimCache(size_t capacity = 8) : hsm(OpenHsm(token)), raw(token) {
    for (int i = 0; i < 4; ++i) wrapped.push_back(hsm->GenerateWrappedKey(kRoot).value());
    root = raw.FindKey(kRoot);
    REQUIRE(root != CK_INVALID_HANDLE);
    auto module = hsm::Pkcs11Module::Load(CUSTOS_FAULT_MODULE_PATH);
    REQUIRE(module.ok());
    auto created =
        hsm::SessionPool::Create(*module, token.label(), SecureBytes::FromString(token.pin()), {});
    REQUIRE(created.ok());
    pool = std::move(created).value();
    cache = hsm::KeyCache::Create(pool.get(), capacity).value();
  }

  // Starts cache->Get on a thread of its own.
  std::future<GetResult> StartGet(std::string id, size_t version) {
    return std::async(std::launch::async, [this, id = std::move(id), version] {
      return cache->Get(id, wrapped[version], root);
    });
  }

  // True if `handle` names a live AES-GCM key of this application.
  bool Usable(CK_OBJECT_HANDLE handle) {
    bool encrypt = false;
    return raw.ReadBool(handle, CKA_ENCRYPT, &encrypt) == CKR_OK && encrypt;
  }

  SoftHsmToken token;
  FaultControl control;  // Before the shim's C_Initialize, which reads its variables.
  std::unique_ptr<hsm::Hsm> hsm;
  RawToken raw;
  std::vector<Bytes> wrapped;
  CK_OBJECT_HANDLE root = CK_INVALID_HANDLE;
  std::unique_ptr<hsm::SessionPool> pool;
  std::unique_ptr<hsm::KeyCache> cache;
};

template <typename T>
bool Ready(const std::future<T>& future, std::chrono::milliseconds within) {
  return future.wait_for(within) == std::future_status::ready;
}

TEST_CASE("a hit, and letting go of a key, do not wait for another key's unwrap", "[key_cache]") {
  ShimCache f;
  GetResult cached = f.cache->Get("hot", f.wrapped[0], f.root);
  REQUIRE(cached.ok());
  const CK_OBJECT_HANDLE handle = (*cached)->handle();

  // Declared before `release`, so that the hung call is let go before anything waits for it.
  std::future<GetResult> miss, hit;
  std::future<void> let_go;
  Finally release([&] {
    f.control.Remove();
    for (auto* pending : {&miss, &hit}) {
      if (pending->valid()) pending->wait();
    }
    if (let_go.valid()) let_go.wait();
  });
  f.control.Set("C_UnwrapKey hang\n");
  miss = f.StartGet("cold", 1);
  REQUIRE(f.control.WaitFor("hanging C_UnwrapKey", kPrompt));

  hit = f.StartGet("hot", 0);
  REQUIRE(Ready(hit, kPrompt));
  GetResult served = hit.get();
  REQUIRE(served.ok());
  CHECK((*served)->handle() == handle);

  // The version is forgotten (destroyed) while callers still hold it: the last one to let go
  // does not wait for the unwrap either. The object was made on the session the hung unwrap
  // now uses (the cache's only one until then), so it is destroyed as soon as that call returns.
  f.cache->Forget("hot");
  served->reset();
  CHECK(f.Usable(handle));
  let_go = std::async(std::launch::async, [&] { cached->reset(); });
  CHECK(Ready(let_go, kPrompt));
  CHECK_FALSE(Ready(miss, 0ms));

  f.control.Remove();
  REQUIRE(Ready(miss, kPrompt));
  GetResult unwrapped = miss.get();
  REQUIRE(unwrapped.ok());
  CHECK(f.Usable((*unwrapped)->handle()));
  CHECK_FALSE(f.Usable(handle));
  CHECK(f.cache->size() == 1);
}

TEST_CASE("a miss does not wait for another id's unwrap", "[key_cache]") {
  ShimCache f;
  std::future<GetResult> slow, fast;
  Finally release([&] {
    f.control.Remove();
    for (auto* pending : {&slow, &fast}) {
      if (pending->valid()) pending->wait();
    }
  });
  f.control.Set("C_UnwrapKey hang times=1\n");  // Only the first unwrap hangs.
  slow = f.StartGet("slow", 0);
  REQUIRE(f.control.WaitFor("hanging C_UnwrapKey", kPrompt));

  fast = f.StartGet("fast", 1);
  REQUIRE(Ready(fast, kPrompt));
  GetResult quick = fast.get();
  REQUIRE(quick.ok());
  CHECK(f.Usable((*quick)->handle()));
  CHECK(f.cache->size() == 1);
  CHECK_FALSE(Ready(slow, 0ms));

  f.control.Remove();
  REQUIRE(Ready(slow, kPrompt));
  GetResult late = slow.get();
  REQUIRE(late.ok());
  CHECK(f.Usable((*late)->handle()));
  CHECK((*late)->handle() != (*quick)->handle());
  CHECK(f.cache->size() == 2);
}

TEST_CASE("concurrent misses for one id share one key while another id's unwrap hangs",
          "[key_cache]") {
  ShimCache f;
  constexpr int kThreads = 8;
  std::future<GetResult> slow;
  std::vector<std::future<GetResult>> misses;
  Finally release([&] {
    f.control.Remove();
    if (slow.valid()) slow.wait();
    for (auto& pending : misses) {
      if (pending.valid()) pending.wait();
    }
  });
  f.control.Set("C_UnwrapKey hang times=1\n");
  slow = f.StartGet("slow", 0);
  REQUIRE(f.control.WaitFor("hanging C_UnwrapKey", kPrompt));

  std::latch start(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    misses.push_back(std::async(std::launch::async, [&] {
      start.arrive_and_wait();
      return f.cache->Get("one", f.wrapped[1], f.root);
    }));
  }
  std::set<CK_OBJECT_HANDLE> handles;
  for (auto& miss : misses) {
    REQUIRE(Ready(miss, kPrompt));
    GetResult key = miss.get();  // Let go at once: only the cache's reference stays.
    REQUIRE(key.ok());
    handles.insert((*key)->handle());
  }
  REQUIRE(handles.size() == 1);
  CHECK(f.Usable(*handles.begin()));
  CHECK(f.cache->size() == 1);
  CHECK(f.raw.CountSecretKeys(/*token_objects=*/false) == 1);
  CHECK_FALSE(Ready(slow, 0ms));

  f.control.Remove();
  REQUIRE(Ready(slow, kPrompt));
  CHECK(slow.get().ok());
  CHECK(f.cache->size() == 2);
}

TEST_CASE("misses for the id being unwrapped wait for that unwrap and share its outcome",
          "[key_cache]") {
  ShimCache f;
  constexpr int kThreads = 6;
  std::latch calling(kThreads - 1);  // The callers after the first, about to call Get.
  std::vector<std::future<GetResult>> misses;
  Finally release([&] {
    f.control.Remove();
    for (auto& pending : misses) {
      if (pending.valid()) pending.wait();
    }
  });
  // The first unwrap hangs; any other fails, so that a second unwrap would show.
  f.control.Set("C_UnwrapKey hang times=1\nC_UnwrapKey CKR_FUNCTION_FAILED after=1\n");

  Bytes damaged;
  SECTION("a key") {}
  SECTION("an error") {
    damaged = f.wrapped[1];
    damaged[10] ^= 0x01;  // Fails RFC 5649's integrity check in the HSM.
  }
  const Bytes& wrapped = damaged.empty() ? f.wrapped[1] : damaged;
  misses.push_back(
      std::async(std::launch::async, [&] { return f.cache->Get("k", wrapped, f.root); }));
  REQUIRE(f.control.WaitFor("hanging C_UnwrapKey", kPrompt));
  for (int t = 1; t < kThreads; ++t) {
    misses.push_back(std::async(std::launch::async, [&] {
      calling.count_down();
      return f.cache->Get("k", wrapped, f.root);
    }));
  }
  calling.wait();
  std::this_thread::sleep_for(300ms);  // Time for them all to find the unwrap under way.
  for (auto& miss : misses) CHECK_FALSE(Ready(miss, 0ms));

  // Released; the rule that fails any further unwrap stays.
  f.control.Set("C_UnwrapKey CKR_FUNCTION_FAILED\n");
  std::vector<GetResult> results;
  for (auto& miss : misses) {
    REQUIRE(Ready(miss, kPrompt));
    results.push_back(miss.get());
  }
  CHECK(f.control.Count("fired C_UnwrapKey CKR_FUNCTION_FAILED") == 0);
  for (const GetResult& result : results) {
    INFO(result.status().ToString());
    CHECK(result.ok() == damaged.empty());
    CHECK(result.status() == results[0].status());
    if (result.ok()) CHECK((*result)->handle() == (*results[0])->handle());
  }
  CHECK(f.cache->size() == (damaged.empty() ? 1 : 0));
}

TEST_CASE("Forget, ForgetRoot and Clear win over an unwrap under way", "[key_cache]") {
  ShimCache f;
  std::future<GetResult> miss;
  Finally release([&] {
    f.control.Remove();
    if (miss.valid()) miss.wait();
  });
  f.control.Set("C_UnwrapKey hang times=1\n");
  miss = f.StartGet("k", 0);
  REQUIRE(f.control.WaitFor("hanging C_UnwrapKey", kPrompt));

  SECTION("Forget") { f.cache->Forget("k"); }
  SECTION("ForgetRoot") { f.cache->ForgetRoot(f.root); }
  SECTION("Clear") { f.cache->Clear(); }
  f.control.Remove();
  REQUIRE(Ready(miss, kPrompt));
  GetResult key = miss.get();
  // The caller, which asked before, still gets its key; the cache does not keep it.
  REQUIRE(key.ok());
  CHECK(f.Usable((*key)->handle()));
  CHECK(f.cache->size() == 0);
  key->reset();
  CHECK(f.raw.CountSecretKeys(/*token_objects=*/false) == 0);
}

TEST_CASE("a Get after Forget starts afresh instead of waiting for the forgotten unwrap",
          "[key_cache]") {
  ShimCache f;
  std::future<GetResult> forgotten, fresh;
  Finally release([&] {
    f.control.Remove();
    for (auto* pending : {&forgotten, &fresh}) {
      if (pending->valid()) pending->wait();
    }
  });
  f.control.Set("C_UnwrapKey hang times=1\n");
  forgotten = f.StartGet("k", 0);
  REQUIRE(f.control.WaitFor("hanging C_UnwrapKey", kPrompt));
  f.cache->Forget("k");

  fresh = f.StartGet("k", 0);
  REQUIRE(Ready(fresh, kPrompt));
  GetResult now = fresh.get();
  REQUIRE(now.ok());
  CHECK(f.cache->size() == 1);

  f.control.Remove();
  REQUIRE(Ready(forgotten, kPrompt));
  GetResult old = forgotten.get();
  REQUIRE(old.ok());
  CHECK((*old)->handle() != (*now)->handle());
  // The forgotten unwrap, landing last, did not replace the fresh entry.
  GetResult again = f.cache->Get("k", f.wrapped[0], f.root);
  REQUIRE(again.ok());
  CHECK((*again)->handle() == (*now)->handle());
  CHECK(f.cache->size() == 1);
}

TEST_CASE("after a cache session dies, older entries are misses and the retried key is kept",
          "[key_cache]") {
  ShimCache f;
  GetResult before = f.cache->Get("before", f.wrapped[0], f.root);
  REQUIRE(before.ok());
  const CK_OBJECT_HANDLE old_handle = (*before)->handle();
  before->reset();

  // The next unwrap finds its session dead: the cache closes it (destroying what it made) and
  // unwraps again on a new one.
  f.control.Set("C_UnwrapKey CKR_SESSION_HANDLE_INVALID times=1\n");
  GetResult after = f.cache->Get("after", f.wrapped[1], f.root);
  REQUIRE(after.ok());
  CHECK(f.control.Count("fired C_UnwrapKey CKR_SESSION_HANDLE_INVALID") == 1);
  CHECK(f.Usable((*after)->handle()));
  CHECK_FALSE(f.Usable(old_handle));

  GetResult again = f.cache->Get("before", f.wrapped[0], f.root);
  REQUIRE(again.ok());
  CHECK((*again)->handle() != old_handle);
  CHECK(f.Usable((*again)->handle()));
  GetResult hit = f.cache->Get("after", f.wrapped[1], f.root);
  REQUIRE(hit.ok());
  CHECK((*hit)->handle() == (*after)->handle());
}

}  // namespace
}  // namespace custos::testing
