// Fault recovery: the Hsm must carry on by itself when the token drops its sessions or its
// login (as on removal and reinsertion), without a restart.
#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

using hsm::WrappedKey;

TEST_CASE("the Hsm recovers by itself when its sessions vanish (token pulled and back)") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();  // WrappedKey only points at it.
  const WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("before"), {});
  REQUIRE(sealed.ok());
  RawToken raw(token);

  for (int round = 0; round < 3; ++round) {
    raw.CloseAllSessions();  // Every session and the login are gone, as on token removal.
    auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
    REQUIRE(opened.ok());
    CHECK(AsString(*opened) == "before");
    CHECK(hsm->Encrypt(key, AsBytes("after"), {}).ok());
    CHECK(hsm->GenerateWrappedKey(kRoot).ok());
    CHECK(hsm->CheckRootKey(kRoot).ok());
  }
}

TEST_CASE("the Hsm logs in again when the login was lost") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();  // WrappedKey only points at it.
  const WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("before"), {});
  REQUIRE(sealed.ok());
  RawToken raw(token);

  raw.Logout();
  CHECK(hsm->CheckRootKey(kRoot).ok());
  raw.Logout();
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  raw.Logout();
  CHECK(hsm->GenerateWrappedKey(kRoot).ok());
}

TEST_CASE("root rotation calls recover from lost sessions and a lost login") {
  SoftHsmToken token;
  {  // Legacy roots, whose versions can be re-wrapped back and forth.
    RawToken legacy(token);
    legacy.CreateLegacyRoot(kRoot);
    legacy.CreateLegacyRoot("root-b");
  }
  auto hsm = OpenHsm(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();
  auto sealed = hsm->Encrypt(WrappedKey{"k/1", wrapped, kRoot}, AsBytes("before"), {});
  REQUIRE(sealed.ok());
  RawToken raw(token);
  const size_t token_objects = raw.CountSecretKeys(/*token_objects=*/true);

  raw.CloseAllSessions();
  auto under_b = hsm->RewrapKey(WrappedKey{"k/1", wrapped, kRoot}, "root-b");
  INFO(under_b.status().ToString());
  REQUIRE(under_b.ok());
  raw.Logout();
  CHECK(hsm->RewrapKey(WrappedKey{"k/1", *under_b, "root-b"}, kRoot).ok());
  raw.CloseAllSessions();
  REQUIRE(hsm->DestroyRootKey(kRoot).ok());
  raw.Logout();
  CHECK(absl::IsFailedPrecondition(hsm->CheckRootKey(kRoot)));
  auto opened = hsm->Decrypt(WrappedKey{"k/1", *under_b, "root-b"}, sealed->iv,
                             sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "before");
  CHECK(raw.CountSecretKeys(true) == token_objects - 1);
}

// PERMISSION_DENIED would read as "no grant" to every caller: at run time a refused PIN is the
// operator's problem, and UNAVAILABLE says so. Only start-up reports PERMISSION_DENIED.
TEST_CASE("a PIN changed under a running Hsm is refused once, not presented again, UNAVAILABLE") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();  // WrappedKey only points at it.
  const WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("before"), {});
  REQUIRE(sealed.ok());
  RawToken raw(token);
  std::string old_pin = token.pin();
  std::string new_pin = "another-pin-5678";
  REQUIRE(raw.api()->C_SetPIN(raw.session(), reinterpret_cast<CK_UTF8CHAR*>(old_pin.data()),
                              old_pin.size(), reinterpret_cast<CK_UTF8CHAR*>(new_pin.data()),
                              new_pin.size()) == CKR_OK);
  raw.CloseAllSessions();

  absl::Status first = hsm->CheckRootKey(kRoot);
  CHECK(absl::IsUnavailable(first));
  CHECK(first.message() ==
        "the HSM refused the configured PIN on re-login (PKCS#11 C_Login failed: "
        "CKR_PIN_INCORRECT); fix the PIN and restart custosd");
  const std::string again =
      "the HSM refused the configured PIN on an earlier re-login; not presenting it again (it "
      "could lock the token); fix the PIN and restart custosd";
  const absl::Status later[] = {
      hsm->CheckRootKey(kRoot),
      hsm->Encrypt(key, AsBytes("x"), {}).status(),
      hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {}).status(),
      hsm->GenerateWrappedKey(kRoot).status(),
      hsm->GenerateRandom(8).status(),
  };
  for (const absl::Status& status : later) {
    CHECK(absl::IsUnavailable(status));
    CHECK(status.message() == again);
  }

  // A server started with the old PIN is told at start-up, as PERMISSION_DENIED.
  auto restarted = hsm::OpenPkcs11Hsm(OptionsFor(token));
  CHECK(absl::IsPermissionDenied(restarted.status()));
  CHECK(restarted.status().message() == "PKCS#11 C_Login failed: CKR_PIN_INCORRECT");
}

// Sessions are closed between bursts, not during them: SoftHSM2 2.6.1 itself crashes when a
// session is closed while another thread uses objects (softhsm/SoftHSMv2#688).
TEST_CASE("busy threads recover together after the sessions vanish") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token, /*pool_size=*/3, /*cache_capacity=*/2);
  std::vector<Bytes> versions;
  for (int i = 0; i < 3; ++i) versions.push_back(hsm->GenerateWrappedKey(kRoot).value());
  RawToken raw(token);
  std::atomic<int> failures{0};
  std::mutex mu;
  std::string failure;  // the last one, for the report
  for (int round = 0; round < 5; ++round) {
    raw.CloseAllSessions();
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 20; ++i) {
          const size_t v = (t + i) % versions.size();
          const WrappedKey key{"k/" + std::to_string(v), versions[v], kRoot};
          auto sealed = hsm->Encrypt(key, AsBytes("burst"), {});
          auto opened = sealed.ok() ? hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {})
                                    : absl::StatusOr<SecureBytes>(sealed.status());
          if (!opened.ok() || AsString(*opened) != "burst") {
            ++failures;
            std::lock_guard lock(mu);
            failure = opened.status().ToString();
          }
        }
      });
    }
    for (auto& thread : threads) thread.join();
  }
  INFO(failure);
  CHECK(failures == 0);
}

}  // namespace
}  // namespace custos::testing
