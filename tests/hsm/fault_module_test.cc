// The fault-injection PKCS#11 module (tests/fault_module), driven through the real HSM layer:
// an Hsm opened with OpenPkcs11Hsm on the shim, over a real SoftHSM2 token, as custosd would
// open it. Checks that the shim forwards faithfully, and that its control file fails, delays
// and releases calls as documented, so that end-to-end tests can rely on it.
//
// Only the shim is loaded here, never libsofthsm2.so directly (RawToken): the shim initialises
// SoftHSM2 itself, so a direct instance alive at the same time would share that state and
// could see it finalised under its feet.
#include <p11-kit/pkcs11.h>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "hsm/pkcs11_module.h"
#include "tests/hsm/fault_control.h"
#include "tests/hsm/hsm_test_util.h"

namespace custos::testing {
namespace {

using hsm::WrappedKey;
using namespace std::chrono_literals;

// OpenHsm() (hsm_test_util.h), through the shim instead of SoftHSM2 itself.
std::unique_ptr<hsm::Hsm> OpenThroughShim(const SoftHsmToken& token, size_t pool_size = 4) {
  hsm::Pkcs11Options options = OptionsFor(token, pool_size);
  options.module_path = CUSTOS_FAULT_MODULE_PATH;
  auto opened = hsm::OpenPkcs11Hsm(std::move(options));
  INFO(opened.status().ToString());
  REQUIRE(opened.ok());
  std::unique_ptr<hsm::Hsm> hsm = std::move(opened).value();
  REQUIRE(hsm->CreateRootKey(kRoot).ok());
  return hsm;
}

TEST_CASE("fault module: the function list is complete and reaches SoftHSM2", "[fault_module]") {
  SoftHsmToken token;
  FaultControl control;
  auto module = hsm::Pkcs11Module::Load(CUSTOS_FAULT_MODULE_PATH);
  REQUIRE(module.ok());
  CK_FUNCTION_LIST* api = (*module)->api();
  CHECK(api->version.major == 2);
  // 68 function pointers follow the version; every one must be set.
  for (size_t offset = offsetof(CK_FUNCTION_LIST, C_Initialize); offset < sizeof *api;
       offset += sizeof(CK_C_Initialize)) {
    CK_C_Initialize entry = nullptr;
    std::memcpy(&entry, reinterpret_cast<const char*>(api) + offset, sizeof entry);
    INFO("offset " << offset);
    CHECK(entry != nullptr);
  }
  CK_FUNCTION_LIST* again = nullptr;
  CHECK(api->C_GetFunctionList(&again) == CKR_OK);
  CHECK(again == api);
  CK_INFO info{};
  REQUIRE(api->C_GetInfo(&info) == CKR_OK);
  CHECK(std::string(reinterpret_cast<const char*>(info.manufacturerID), 7) == "SoftHSM");
  CHECK((*module)->FindSlot(token.label()).ok());
}

TEST_CASE("fault module: without a control file every call goes through", "[fault_module]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = OpenThroughShim(token);
  auto wrapped = hsm->GenerateWrappedKey(kRoot);
  REQUIRE(wrapped.ok());
  const WrappedKey key{"k/1", *wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("payload"), AsBytes("ctx"));
  REQUIRE(sealed.ok());
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes("ctx"));
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "payload");
  CHECK(hsm->CheckRootKey(kRoot).ok());
  CHECK(control.Log().empty());  // No rule, no event.
}

// CreateRootKey reads a new root's attributes back (its first C_GetAttributeValue); a root
// that fails there is destroyed, not left under its label for the next attempt to meet.
TEST_CASE("a root refused when read back after its generation is not left on the token",
          "[fault_module][root]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = OpenThroughShim(token);
  control.Set("C_GetAttributeValue CKR_FUNCTION_FAILED times=1\n");
  const absl::Status refused = hsm->CreateRootKey("root-b");
  CHECK(refused.message() == "PKCS#11 C_GetAttributeValue failed: CKR_FUNCTION_FAILED");
  CHECK(control.Count("fired C_GetAttributeValue CKR_FUNCTION_FAILED") == 1);
  control.Remove();
  CHECK(hsm->CreateRootKey("root-b").ok());  // not ALREADY_EXISTS
  CHECK(hsm->GenerateWrappedKey("root-b").ok());
}

TEST_CASE("a token data replacement cut short by a lost session is finished by its retry",
          "[fault_module][token_data]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = OpenThroughShim(token);
  REQUIRE(hsm->WriteTokenData("custos-instance", "first").ok());
  // The new object is created; destroying the older one then meets a dead session (or a
  // device error, which re-initialises the module). The retry finds its own first write
  // beside the older value, and finishes the replacement rather than refuse it.
  const std::string rv = GENERATE("CKR_SESSION_HANDLE_INVALID", "CKR_DEVICE_ERROR");
  control.Set("C_DestroyObject " + rv + " times=1\n");
  const absl::Status replaced = hsm->ReplaceTokenData("custos-instance", {"first"}, "second");
  INFO(replaced.ToString());
  CHECK(replaced.ok());
  CHECK(control.Count("fired C_DestroyObject " + rv) == 1);
  control.Remove();
  CHECK(hsm->ReadTokenData("custos-instance").value() == std::vector<std::string>{"second"});
  // A value other than its own in place of the one read is still a change since the read.
  CHECK(absl::IsFailedPrecondition(hsm->ReplaceTokenData("custos-instance", {"first"}, "third")));
  CHECK(hsm->ReadTokenData("custos-instance").value() == std::vector<std::string>{"second"});
}

TEST_CASE("fault module: an error rule fails the call until it is removed", "[fault_module]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = OpenThroughShim(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("before"), {});
  REQUIRE(sealed.ok());

  control.Set("# the device breaks\nC_Encrypt CKR_DEVICE_ERROR\n");
  auto failed = hsm->Encrypt(key, AsBytes("during"), {});
  // CKR_DEVICE_ERROR means a dead session: the Hsm retries once on a fresh one, which fails
  // too, and reports UNAVAILABLE (retry later).
  CHECK(absl::IsUnavailable(failed.status()));
  CHECK(failed.status().message() == "PKCS#11 C_Encrypt failed: CKR_DEVICE_ERROR");
  CHECK(control.Count("fired C_Encrypt CKR_DEVICE_ERROR") == 2);
  // Other functions are untouched.
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "before");

  control.Remove();
  auto after = hsm->Encrypt(key, AsBytes("after"), {});
  REQUIRE(after.ok());
  opened = hsm->Decrypt(key, after->iv, after->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "after");
  CHECK(control.Count("fired C_Encrypt CKR_DEVICE_ERROR") == 2);
}

TEST_CASE("fault module: a hang blocks one call until its rule goes", "[fault_module]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = OpenThroughShim(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("payload"), {});  // Encrypt draws its IV: before.
  REQUIRE(sealed.ok());

  control.Set("C_GenerateRandom hang\n");
  std::atomic<bool> done{false};
  absl::StatusOr<SecureBytes> random = absl::UnknownError("not run");
  std::thread caller([&] {
    random = hsm->GenerateRandom(16);
    done = true;
  });
  Finally join([&] {  // Even if a check below throws: release the call, then wait for it.
    control.Remove();
    caller.join();
  });

  REQUIRE(control.WaitFor("hanging C_GenerateRandom", 5s));
  std::this_thread::sleep_for(300ms);
  CHECK_FALSE(done);
  // The shim still serves other calls, on other sessions, meanwhile.
  CHECK(hsm->GenerateWrappedKey(kRoot).ok());
  auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "payload");
  CHECK_FALSE(done);

  control.Set("# no rules\n");
  REQUIRE(control.WaitFor("released C_GenerateRandom", 5s));
  for (auto deadline = std::chrono::steady_clock::now() + 5s;
       !done && std::chrono::steady_clock::now() < deadline;) {
    std::this_thread::sleep_for(5ms);
  }
  REQUIRE(done);
  REQUIRE(random.ok());
  CHECK(random->size() == 16);
  CHECK(control.Count("fired C_GenerateRandom hang") == 1);
}

TEST_CASE("fault module: after= and times= pick which calls fail", "[fault_module]") {
  SoftHsmToken token;
  FaultControl control;
  auto hsm = OpenThroughShim(token);
  // Records which of `calls` GenerateRandom calls succeed: "+" for OK, "-" for a failure.
  auto outcomes = [&](int calls, absl::StatusCode failure) {
    std::string seen;
    for (int i = 0; i < calls; ++i) {
      absl::StatusOr<SecureBytes> random = hsm->GenerateRandom(8);
      if (!random.ok()) {
        INFO(random.status().ToString());
        CHECK(random.status().code() == failure);
      }
      seen += random.ok() ? "+" : "-";
    }
    return seen;
  };

  SECTION("CKR_FUNCTION_FAILED is not retried: each firing is one failed call") {
    control.Set("C_GenerateRandom CKR_FUNCTION_FAILED after=2 times=2\n");
    CHECK(outcomes(6, absl::StatusCode::kUnavailable) == "++--++");
    CHECK(control.Count("fired C_GenerateRandom CKR_FUNCTION_FAILED") == 2);

    // A new version of the file starts counting afresh; without times= there is no limit.
    control.Set("C_GenerateRandom CKR_FUNCTION_FAILED after=1\n");
    CHECK(outcomes(4, absl::StatusCode::kUnavailable) == "+---");
    // The same rule as a number (0x6) and several rules: the first that may fire does.
    control.Set(
        "C_GenerateRandom 0x6 times=1\n"
        "C_GenerateRandom CKR_ARGUMENTS_BAD after=1 times=1\n");
    CHECK(outcomes(1, absl::StatusCode::kUnavailable) == "-");
    CHECK(outcomes(2, absl::StatusCode::kInternal) == "-+");
    CHECK(control.Count("fired C_GenerateRandom 0x6") == 1);
    CHECK(control.Count("fired C_GenerateRandom CKR_ARGUMENTS_BAD") == 1);
  }
  SECTION("CKR_DEVICE_ERROR is retried on a fresh session: one firing is absorbed") {
    control.Set("C_GenerateRandom CKR_DEVICE_ERROR times=1\n");
    CHECK(outcomes(2, absl::StatusCode::kUnavailable) == "++");
    CHECK(control.Count("fired C_GenerateRandom CKR_DEVICE_ERROR") == 1);
    control.Set("C_GenerateRandom CKR_DEVICE_ERROR after=1 times=2\n");
    CHECK(outcomes(3, absl::StatusCode::kUnavailable) == "+-+");
    CHECK(control.Count("fired C_GenerateRandom CKR_DEVICE_ERROR") == 3);
  }
  SECTION("'*' matches every function; malformed lines are ignored") {
    control.Set(
        "C_Nonsense CKR_DEVICE_ERROR\n"
        "C_GenerateRandom CKR_NO_SUCH_CODE\n"
        "* CKR_FUNCTION_FAILED after=0 times=1\n");
    CHECK(outcomes(2, absl::StatusCode::kUnavailable) == "-+");
    CHECK(control.Count("ignored C_Nonsense CKR_DEVICE_ERROR") == 1);
    CHECK(control.Count("ignored C_GenerateRandom CKR_NO_SUCH_CODE") == 1);
    CHECK(control.Count("fired C_GenerateRandom CKR_FUNCTION_FAILED") == 1);
  }
  control.Remove();
  CHECK(outcomes(2, absl::StatusCode::kOk) == "++");
}

}  // namespace
}  // namespace custos::testing
