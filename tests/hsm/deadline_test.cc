// The Hsm that OpenPkcs11Hsm returns answers every call within its call_timeout, whatever the
// module does, and climbs the recovery ladder by itself: a hung call is set aside while other
// calls go on; a device error, or a token whose store vanished, makes it re-initialise the
// module, find the token again and carry on, without being reopened.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "hsm/call_executor.h"
#include "hsm/deadline_hsm.h"
#include "hsm/faulty_hsm.h"
#include "tests/hsm/fault_control.h"
#include "tests/hsm/hsm_test_util.h"

namespace custos::testing {
namespace {

using namespace std::chrono_literals;
using hsm::WrappedKey;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

hsm::Pkcs11Options ShimOptions(const SoftHsmToken& token) {
  hsm::Pkcs11Options options = OptionsFor(token);
  options.module_path = CUSTOS_FAULT_MODULE_PATH;
  options.call_timeout = 300ms;
  options.hang_limit = 0ms;
  return options;
}

std::unique_ptr<hsm::Hsm> Open(hsm::Pkcs11Options options) {
  auto opened = hsm::OpenPkcs11Hsm(std::move(options));
  REQUIRE(opened.ok());
  std::unique_ptr<hsm::Hsm> hsm = std::move(opened).value();
  absl::Status root = hsm->CreateRootKey(kRoot);
  REQUIRE((root.ok() || absl::IsAlreadyExists(root)));
  return hsm;
}

// A real token's Hsm under a FaultyHsm (for hooks and the drops it saw), on an executor of one
// thread: a call a hook holds is the only one running.
struct OneThreadOverFaults {
  OneThreadOverFaults(std::chrono::milliseconds call_timeout, size_t max_set_aside) {
    auto faulty_owned = std::make_unique<hsm::FaultyHsm>(real.get());
    faulty = faulty_owned.get();
    hsm::CallExecutor::Options options;
    options.threads = 1;
    options.call_timeout = call_timeout;
    options.max_set_aside = max_set_aside;
    options.hang_limit = 0ms;
    auto executor = hsm::CallExecutor::Create(std::move(options));
    REQUIRE(executor.ok());
    hsm = hsm::WithDeadlines(std::move(faulty_owned), *std::move(executor));
  }

  SoftHsmToken token;
  std::unique_ptr<hsm::Hsm> real = Open(OptionsFor(token));
  std::atomic<bool> let_go{false};  // for hooks; before the Hsm, whose teardown waits for them
  hsm::FaultyHsm* faulty = nullptr;
  std::unique_ptr<hsm::Hsm> hsm;
};

TEST_CASE("a cached version's drop that could not run is retried until it runs", "[deadline]") {
  // Within 1 s the thread has picked a call up, however loaded; a stuck one is not replaced.
  OneThreadOverFaults f(1000ms, 0);
  hsm::FaultyHsm& faulty = *f.faulty;
  std::atomic<bool>& let_go = f.let_go;
  hsm::Hsm* hsm = f.hsm.get();

  // The one thread is stuck in a call: a version destroyed meanwhile cannot be dropped.
  Finally release([&] { let_go = true; });
  faulty.BeforeNextCallTo("GenerateRandom", [&] {
    while (!let_go) std::this_thread::sleep_for(5ms);
  });
  CHECK(absl::IsUnavailable(hsm->GenerateRandom(16).status()));
  hsm->Forget("k/1");
  hsm->Forget("k/2");
  std::this_thread::sleep_for(1500ms);  // a retry or more, refused while the thread is stuck
  CHECK(faulty.forgotten().empty());
  let_go = true;

  // The module answers again: within a retry both are dropped, once, with no call to prompt it.
  const auto deadline = Clock::now() + 3s;
  while (faulty.forgotten().size() < 2 && Clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  CHECK_THAT(faulty.forgotten(), Catch::UnorderedEquals(std::vector<std::string>{"k/1", "k/2"}));
  std::this_thread::sleep_for(2s);  // a retry dropping them again would show by now
  hsm->Forget("k/3");
  CHECK(faulty.forgotten().size() == 3);
  CHECK(faulty.forgotten().back() == "k/3");
}

TEST_CASE("a drop stuck in the module is not tried again; one refused meanwhile is", "[deadline]") {
  OneThreadOverFaults f(300ms, 2);  // one stuck call of a kind refuses the next of that kind
  hsm::FaultyHsm& faulty = *f.faulty;
  std::atomic<bool>& let_go = f.let_go;
  hsm::Hsm* hsm = f.hsm.get();

  Finally release([&] { let_go = true; });
  faulty.BeforeNextCallTo("Forget", [&] {
    while (!let_go) std::this_thread::sleep_for(5ms);
  });
  hsm->Forget("k/1");  // started, stuck in the module, set aside: it finishes by itself
  hsm->Forget("k/2");  // refused before it started: drops are stuck
  std::this_thread::sleep_for(1500ms);  // a retry or more, refused while k/1 is stuck
  CHECK(faulty.forgotten().empty());
  let_go = true;
  const auto deadline = Clock::now() + 3s;
  while (faulty.forgotten().size() < 2 && Clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(2s);  // a retry of k/1 would show by now
  CHECK(faulty.forgotten() == std::vector<std::string>{"k/1", "k/2"});
}

TEST_CASE("a retried batch of drops set aside midway leaves the rest to the retrier",
          "[deadline]") {
  std::atomic<bool> let_go_random{false};
  std::atomic<int> k1_set_aside{-1};  // 1 if k/1's drop was set aside while in the module
  std::atomic<int> k2_set_aside{-1};  // 1 if k/2 was dropped on a set-aside thread
  OneThreadOverFaults f(1000ms, 0);   // after the flags: its teardown waits for the hooks
  hsm::FaultyHsm& faulty = *f.faulty;
  hsm::Hsm* hsm = f.hsm.get();

  // Two drops refused while the one thread is stuck: the retrier tries them in one call.
  Finally release([&] { let_go_random = true; });
  faulty.BeforeNextCallTo("GenerateRandom", [&] {
    while (!let_go_random) std::this_thread::sleep_for(5ms);
  });
  CHECK(absl::IsUnavailable(hsm->GenerateRandom(16).status()));
  hsm->Forget("k/1");
  hsm->Forget("k/2");
  CHECK(faulty.forgotten().empty());

  // That call hangs in k/1's drop until it is set aside. A drop made on a set-aside thread
  // would retire the cache session it touched: k/2 must be left to a later retry.
  faulty.BeforeNextCallTo("Forget", [&] {
    faulty.BeforeNextCallTo("Forget", [&] { k2_set_aside = hsm::CallExecutor::SetAside(); });
    const auto until = Clock::now() + 10s;
    while (!hsm::CallExecutor::SetAside() && Clock::now() < until) {
      std::this_thread::sleep_for(5ms);
    }
    k1_set_aside = hsm::CallExecutor::SetAside();
  });
  let_go_random = true;

  const auto deadline = Clock::now() + 15s;
  while (faulty.forgotten().size() < 2 && Clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(1500ms);  // a second drop of either would show by now
  CHECK(faulty.forgotten() == std::vector<std::string>{"k/1", "k/2"});
  CHECK(k1_set_aside == 1);
  CHECK(k2_set_aside == 0);
}

TEST_CASE("a hung call is answered UNAVAILABLE at call_timeout while other calls go on",
          "[deadline]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = Open(ShimOptions(token));
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const Bytes b = hsm->GenerateWrappedKey(kRoot).value();
  auto sealed = hsm->Encrypt(WrappedKey{"k/2", b, kRoot}, AsBytes("other key"), {});
  REQUIRE(sealed.ok());

  control.Set("C_Encrypt hang\n");
  Finally release([&] { control.Set(""); });
  const auto start = Clock::now();
  const auto hung = hsm->Encrypt(WrappedKey{"k/1", a, kRoot}, AsBytes("secret"), {});
  const auto waited = Clock::now() - start;
  CHECK(absl::IsUnavailable(hung.status()));
  CHECK(hung.status().message() ==
        "the HSM did not answer Encrypt within 300 ms (hsm.call_timeout_ms); retry later");
  CHECK(waited >= 300ms);
  CHECK(waited < 3s);
  REQUIRE(control.WaitFor("hanging C_Encrypt", 1s));

  // Calls that do not need C_Encrypt are served meanwhile, on a fresh thread and session.
  for (int i = 0; i < 10; ++i) {
    auto opened =
        hsm->Decrypt(WrappedKey{"k/2", b, kRoot}, sealed->iv, sealed->ciphertext_and_tag, {});
    REQUIRE(opened.ok());
    CHECK(AsString(*opened) == "other key");
    CHECK(hsm->HmacSha256("no-such-hmac-key", AsBytes("x")).status().code() ==
          absl::StatusCode::kFailedPrecondition);
  }

  control.Set("");
  REQUIRE(control.WaitFor("released C_Encrypt", 2s));
  auto again = hsm->Encrypt(WrappedKey{"k/1", a, kRoot}, AsBytes("secret"), {});
  CHECK(again.ok());
}

TEST_CASE("a data key whose draw hangs is answered UNAVAILABLE at call_timeout", "[deadline]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = Open(ShimOptions(token));
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  REQUIRE(hsm->GenerateDataKey(WrappedKey{"k/1", a, kRoot}, 32, {}).ok());

  control.Set("C_GenerateRandom hang\n");
  Finally release([&] { control.Set(""); });
  const auto start = Clock::now();
  const auto hung = hsm->GenerateDataKey(WrappedKey{"k/1", a, kRoot}, 32, AsBytes("aad"));
  CHECK(Clock::now() - start < 3s);
  CHECK(hung.status().message() ==
        "the HSM did not answer GenerateDataKey within 300 ms (hsm.call_timeout_ms); retry "
        "later");
  REQUIRE(control.WaitFor("hanging C_GenerateRandom", 1s));
  control.Set("");
  REQUIRE(control.WaitFor("released C_GenerateRandom", 2s));
  CHECK(hsm->GenerateDataKey(WrappedKey{"k/1", a, kRoot}, 32, AsBytes("aad")).ok());
}

TEST_CASE("sessions a set-aside call used are closed once nothing of theirs is in use",
          "[deadline]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = Open(ShimOptions(token));
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key{"k/1", a, kRoot};

  control.Set("C_UnwrapKey hang\n");
  CHECK(absl::IsUnavailable(hsm->Encrypt(key, AsBytes("x"), {}).status()));
  REQUIRE(control.WaitFor("hanging C_UnwrapKey", 1s));
  // Closing sessions is only counted from here (the rule answers for the module).
  control.Set("C_CloseSession CKR_OK\n");
  REQUIRE(control.WaitFor("released C_UnwrapKey", 2s));
  // The late call finishes: its pool session is closed on its return, never reused; the
  // cache's session holds the version it unwrapped, now cached, so it stays open.
  for (int i = 0; i < 100 && control.Count("fired C_CloseSession CKR_OK") < 1; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(100ms);
  CHECK(control.Count("fired C_CloseSession CKR_OK") == 1);
  // Once its last object goes, the retired cache session is closed too.
  hsm->Forget("k/1");
  CHECK(control.Count("fired C_CloseSession CKR_OK") == 2);
  control.Set("");
  auto sealed = hsm->Encrypt(key, AsBytes("again"), {});
  REQUIRE(sealed.ok());
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "again");
}

TEST_CASE("a device error re-initialises the module, and calls recover at once", "[deadline]") {
  SoftHsmToken token;
  FaultControl control;
  hsm::Pkcs11Options options = ShimOptions(token);
  options.call_timeout = 5s;  // room for re-initialising SoftHSM2 on a loaded machine
  auto hsm = Open(std::move(options));
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key{"k/1", a, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("before"), {});
  REQUIRE(sealed.ok());

  control.Set("* CKR_DEVICE_ERROR\n");
  auto failed = hsm->Encrypt(key, AsBytes("during"), {});
  CHECK(absl::IsUnavailable(failed.status()));
  // Still failing: every attempt to re-initialise meets the device error too.
  std::this_thread::sleep_for(250ms);
  CHECK(absl::IsUnavailable(hsm->CheckRootKey(kRoot)));
  control.Set("");
  // The next call past the retry interval re-initialises the module, finds the token again,
  // logs in and unwraps the version anew.
  std::this_thread::sleep_for(250ms);
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  INFO(opened.status().ToString());
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "before");
  CHECK(hsm->CheckRootKey(kRoot).ok());
}

TEST_CASE("a token whose store vanishes is UNAVAILABLE, never FAILED_PRECONDITION, and comes back",
          "[deadline]") {
  SoftHsmToken token;
  hsm::Pkcs11Options options = OptionsFor(token);
  options.call_timeout = 2s;
  auto hsm = Open(std::move(options));
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key{"k/1", a, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("before"), {});
  REQUIRE(sealed.ok());
  REQUIRE(hsm->CreateHmacKey("custos-test-hmac").ok());
  REQUIRE(hsm->HmacSha256("custos-test-hmac", AsBytes("row")).ok());

  // The token's folder is moved away, as an operator's mistake or a lost volume would.
  const fs::path tokens = fs::path(token.dir()) / "tokens";
  fs::path store;
  for (const auto& entry : fs::directory_iterator(tokens)) store = entry.path();
  REQUIRE(!store.empty());
  const fs::path away = fs::path(token.dir()) / "away";
  fs::rename(store, away);
  Finally put_back([&] {
    if (fs::exists(away)) fs::rename(away, store);
  });

  for (int i = 0; i < 5; ++i) {
    INFO("round " << i);
    const absl::Status check = hsm->CheckRootKey(kRoot);
    CHECK(absl::IsUnavailable(check));
    const auto hmac = hsm->HmacSha256("custos-test-hmac", AsBytes("row"));
    CHECK(absl::IsUnavailable(hmac.status()));
    const auto gcm = hsm->Encrypt(WrappedKey{"k/1", a, kRoot}, AsBytes("x"), {});
    CHECK(absl::IsUnavailable(gcm.status()));
    // Nor is a root out of sight taken for destroyed already (NOT_FOUND would be).
    CHECK(absl::IsUnavailable(hsm->DestroyRootKey(kRoot)));
    std::this_thread::sleep_for(100ms);
  }

  fs::rename(away, store);
  absl::Status back;
  for (int i = 0; i < 50; ++i) {
    back = hsm->CheckRootKey(kRoot);
    if (back.ok()) break;
    CHECK(absl::IsUnavailable(back));
    std::this_thread::sleep_for(50ms);
  }
  INFO(back.ToString());
  REQUIRE(back.ok());
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "before");
  CHECK(hsm->HmacSha256("custos-test-hmac", AsBytes("row")).ok());
}

}  // namespace
}  // namespace custos::testing
