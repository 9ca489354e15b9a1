#include "hsm/faulty_hsm.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

// A FaultyHsm over a real SoftHSM2 token, with one version wrapped under the root through it
// (its first call).
struct FaultyOverToken {
  static Bytes Wrap(hsm::FaultyHsm& faulty) {
    absl::StatusOr<Bytes> wrapped = faulty.GenerateWrappedKey(kRoot);
    REQUIRE(wrapped.ok());
    return *std::move(wrapped);
  }

  SoftHsmToken token;
  std::unique_ptr<hsm::Hsm> real = OpenHsm(token);
  hsm::FaultyHsm faulty{real.get()};
  const Bytes wrapped = Wrap(faulty);
  const hsm::WrappedKey key{"k/1", wrapped, kRoot};
};

TEST_CASE("FaultyHsm forwards, fails the next n calls, and goes down on command") {
  FaultyOverToken f;
  hsm::FaultyHsm& faulty = f.faulty;
  const hsm::WrappedKey& key = f.key;
  auto sealed = faulty.Encrypt(key, AsBytes("secret"), AsBytes("aad"));
  REQUIRE(sealed.ok());

  faulty.FailNext(2, absl::DeadlineExceededError("slow"));
  CHECK(absl::IsDeadlineExceeded(faulty.GenerateRandom(8).status()));
  CHECK(absl::IsDeadlineExceeded(faulty.CheckRootKey(kRoot)));
  CHECK(faulty.CheckRootKey(kRoot).ok());

  faulty.SetDown(true);
  CHECK(absl::IsUnavailable(faulty.CheckRootKey(kRoot)));
  CHECK(absl::IsUnavailable(faulty.CreateRootKey(kRoot)));
  CHECK(absl::IsUnavailable(faulty.GenerateWrappedKey(kRoot).status()));
  CHECK(absl::IsUnavailable(faulty.Encrypt(key, AsBytes("x"), {}).status()));
  CHECK(absl::IsUnavailable(
      faulty.Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes("aad")).status()));
  CHECK(absl::IsUnavailable(faulty.GenerateRandom(8).status()));
  faulty.Forget("k/1");  // Still forwarded; nothing to report.

  faulty.SetDown(false);
  auto opened = faulty.Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes("aad"));
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "secret");
  CHECK(faulty.calls() == 12);
}

TEST_CASE("FaultyHsm forwards GenerateDataKey as one call, the wrapped Hsm's own") {
  FaultyOverToken f;
  hsm::FaultyHsm& faulty = f.faulty;
  const hsm::WrappedKey& key = f.key;

  int64_t before = faulty.calls();
  auto made = faulty.GenerateDataKey(key, 32, AsBytes("aad"));
  REQUIRE(made.ok());
  CHECK(faulty.calls() == before + 1);  // not GenerateRandom then Encrypt
  CHECK(made->plaintext.size() == 32);
  auto opened =
      f.real->Decrypt(key, made->sealed.iv, made->sealed.ciphertext_and_tag, AsBytes("aad"));
  REQUIRE(opened.ok());
  CHECK(std::ranges::equal(opened->span(), made->plaintext.span()));

  faulty.FailNext(1, absl::UnavailableError("token pulled"));
  before = faulty.calls();
  CHECK(absl::IsUnavailable(faulty.GenerateDataKey(key, 32, {}).status()));
  CHECK(faulty.calls() == before + 1);
  bool hooked = false;
  faulty.BeforeNextCallTo("GenerateDataKey", [&] { hooked = true; });
  REQUIRE(faulty.GenerateDataKey(key, 32, {}).ok());
  CHECK(hooked);
  faulty.SetDown(true);
  CHECK(absl::IsUnavailable(faulty.GenerateDataKey(key, 32, {}).status()));
}

TEST_CASE("FaultyHsm forwards and fails the root rotation calls") {
  SoftHsmToken token;
  RawToken(token).CreateLegacyRoot(kRoot);  // only a legacy root's versions re-wrap
  std::unique_ptr<hsm::Hsm> real = OpenHsm(token);
  hsm::FaultyHsm faulty(real.get());
  REQUIRE(faulty.CreateRootKey("root-b").ok());
  const Bytes wrapped = faulty.GenerateWrappedKey(kRoot).value();
  const hsm::WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = faulty.Encrypt(key, AsBytes("secret"), {});
  REQUIRE(sealed.ok());

  faulty.FailNext(2, absl::AbortedError("injected"));
  CHECK(absl::IsAborted(faulty.RewrapKey(key, "root-b").status()));
  CHECK(absl::IsAborted(faulty.DestroyRootKey(kRoot)));
  faulty.SetDown(true);
  CHECK(absl::IsUnavailable(faulty.RewrapKey(key, "root-b").status()));
  CHECK(absl::IsUnavailable(faulty.DestroyRootKey(kRoot)));
  CHECK(absl::IsUnavailable(faulty.CheckRootKey("root-b")));
  faulty.SetDown(false);
  CHECK(real->CheckRootKey(kRoot).ok());  // The failed calls never reached the HSM.

  auto rewrapped = faulty.RewrapKey(key, "root-b");
  REQUIRE(rewrapped.ok());
  REQUIRE(faulty.DestroyRootKey(kRoot).ok());
  CHECK(absl::IsNotFound(faulty.DestroyRootKey(kRoot)));  // The HSM's own errors pass through.
  CHECK(absl::IsFailedPrecondition(faulty.CheckRootKey(kRoot)));
  auto opened = faulty.Decrypt(hsm::WrappedKey{"k/1", *rewrapped, "root-b"}, sealed->iv,
                               sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "secret");
  CHECK(faulty.calls() == 13);
}

TEST_CASE("FaultyHsm can own the Hsm it wraps and is thread-safe") {
  SoftHsmToken token;
  hsm::FaultyHsm faulty(OpenHsm(token));
  faulty.FailNext(50, absl::InternalError("boom"));
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        if (!faulty.GenerateRandom(4).ok()) ++failed;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failed == 50);
  CHECK(faulty.calls() == 100);
}

}  // namespace
}  // namespace custos::testing
