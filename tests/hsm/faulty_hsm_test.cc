#include "hsm/faulty_hsm.h"

#include <catch2/catch.hpp>

#include <atomic>
#include <thread>
#include <vector>

#include "tests/hsm/hsm_test_util.h"

namespace custos::testing {
namespace {

TEST_CASE("FaultyHsm forwards, fails the next n calls, and goes down on command") {
  SoftHsmToken token;
  std::unique_ptr<hsm::Hsm> real = OpenHsm(token);
  hsm::FaultyHsm faulty(real.get());

  auto wrapped = faulty.GenerateWrappedKey();
  REQUIRE(wrapped.ok());
  const hsm::WrappedKey key{"k/1", *wrapped};
  auto sealed = faulty.Encrypt(key, AsBytes("secret"), AsBytes("aad"));
  REQUIRE(sealed.ok());

  faulty.FailNext(2, absl::DeadlineExceededError("slow"));
  CHECK(absl::IsDeadlineExceeded(faulty.GenerateRandom(8).status()));
  CHECK(absl::IsDeadlineExceeded(faulty.CheckRootKey()));
  CHECK(faulty.CheckRootKey().ok());

  faulty.SetDown(true);
  CHECK(absl::IsUnavailable(faulty.CheckRootKey()));
  CHECK(absl::IsUnavailable(faulty.CreateRootKey()));
  CHECK(absl::IsUnavailable(faulty.GenerateWrappedKey().status()));
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

TEST_CASE("FaultyHsm can own the Hsm it wraps and is thread-safe") {
  SoftHsmToken token;
  hsm::FaultyHsm faulty(OpenHsm(token));
  faulty.FailNext(50, absl::InternalError("boom"));
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
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
