#include "hsm/pkcs11_hsm.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>
#include <vector>

#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

using hsm::WrappedKey;

TEST_CASE("OpenPkcs11Hsm reports what is wrong") {
  SoftHsmToken token;
  SECTION("right PIN") { CHECK(hsm::OpenPkcs11Hsm(OptionsFor(token)).ok()); }
  SECTION("wrong PIN") {
    hsm::Pkcs11Options options = OptionsFor(token);
    options.pin = SecureBytes::FromString("not-the-pin");
    auto opened = hsm::OpenPkcs11Hsm(std::move(options));
    CHECK(absl::IsPermissionDenied(opened.status()));
    CHECK(opened.status().message() == "PKCS#11 C_Login failed: CKR_PIN_INCORRECT");
  }
  SECTION("unknown token label") {
    hsm::Pkcs11Options options = OptionsFor(token);
    options.token_label = "no-such-token";
    CHECK(absl::IsNotFound(hsm::OpenPkcs11Hsm(std::move(options)).status()));
  }
  SECTION("bad module path") {
    hsm::Pkcs11Options options = OptionsFor(token);
    options.module_path = "/nonexistent/libpkcs11.so";
    CHECK(absl::IsNotFound(hsm::OpenPkcs11Hsm(std::move(options)).status()));
  }
  SECTION("a library that is not a PKCS#11 module") {
    hsm::Pkcs11Options options = OptionsFor(token);
    options.module_path = "libm.so.6";
    CHECK(absl::IsNotFound(hsm::OpenPkcs11Hsm(std::move(options)).status()));
  }
  SECTION("empty pool") {
    CHECK(absl::IsInvalidArgument(hsm::OpenPkcs11Hsm(OptionsFor(token, 0)).status()));
  }
}

TEST_CASE("the root key is created once, inside the HSM, and cannot leave it") {
  SoftHsmToken token;
  auto opened = hsm::OpenPkcs11Hsm(OptionsFor(token));
  REQUIRE(opened.ok());
  hsm::Hsm& hsm = **opened;

  CHECK(absl::IsFailedPrecondition(hsm.CheckRootKey(kRoot)));
  CHECK(absl::IsFailedPrecondition(hsm.GenerateWrappedKey(kRoot).status()));
  REQUIRE(hsm.CreateRootKey(kRoot).ok());
  CHECK(hsm.CheckRootKey(kRoot).ok());
  CHECK(absl::IsAlreadyExists(hsm.CreateRootKey(kRoot)));

  RawToken raw(token);
  CHECK(raw.CountSecretKeys(/*token_objects=*/true) == 1);
  CK_OBJECT_HANDLE root = raw.FindKey(kRoot);
  REQUIRE(root != CK_INVALID_HANDLE);
  const std::pair<CK_ATTRIBUTE_TYPE, bool> expected[] = {{CKA_TOKEN, true},
                                                         {CKA_PRIVATE, true},
                                                         {CKA_SENSITIVE, true},
                                                         {CKA_EXTRACTABLE, false},
                                                         {CKA_WRAP, true},
                                                         {CKA_UNWRAP, true},
                                                         {CKA_ENCRYPT, false},
                                                         {CKA_DECRYPT, false},
                                                         {CKA_MODIFIABLE, false},
                                                         {CKA_ALWAYS_SENSITIVE, true},
                                                         {CKA_NEVER_EXTRACTABLE, true},
                                                         {CKA_LOCAL, true}};
  for (const auto& [type, value] : expected) {
    bool actual = !value;
    INFO("attribute 0x" << std::hex << type);
    CHECK(raw.ReadBool(root, type, &actual) == CKR_OK);
    CHECK(actual == value);
  }
  CHECK(raw.TryReadValue(root) == CKR_ATTRIBUTE_SENSITIVE);
}

TEST_CASE("a new instance on the same token finds the root key") {
  SoftHsmToken token;
  { REQUIRE(OpenHsm(token)->CheckRootKey(kRoot).ok()); }
  auto again = hsm::OpenPkcs11Hsm(OptionsFor(token));
  REQUIRE(again.ok());
  CHECK((*again)->CheckRootKey(kRoot).ok());
  CHECK(absl::IsAlreadyExists((*again)->CreateRootKey(kRoot)));
}

TEST_CASE("wrapped key versions are RFC 5649 blobs of fresh keys, and leave nothing behind") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  const size_t token_objects = raw.CountSecretKeys(true);

  auto first = hsm->GenerateWrappedKey(kRoot);
  auto second = hsm->GenerateWrappedKey(kRoot);
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  CHECK(first->size() == 40);
  CHECK(*first != *second);

  for (int i = 0; i < 100; ++i) {
    auto wrapped = hsm->GenerateWrappedKey(kRoot);
    REQUIRE(wrapped.ok());
    const WrappedKey key{"k/" + std::to_string(i), *wrapped, kRoot};
    auto sealed = hsm->Encrypt(key, AsBytes("payload"), AsBytes("ctx"));
    REQUIRE(sealed.ok());
    auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes("ctx"));
    REQUIRE(opened.ok());
  }
  CHECK(raw.CountSecretKeys(true) == token_objects);
  CHECK(raw.CountSecretKeys(false) <= 64);  // Only the cached key versions.
}

TEST_CASE("AES-GCM round trips and binds the AAD") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto wrapped = hsm->GenerateWrappedKey(kRoot);
  REQUIRE(wrapped.ok());
  const WrappedKey key{"key/1", *wrapped, kRoot};

  for (const std::string& plaintext :
       {std::string(), std::string("hello"), std::string(100000, 'x')}) {
    for (const std::string& aad : {std::string(), std::string("tenant=a")}) {
      auto sealed = hsm->Encrypt(key, AsBytes(plaintext), AsBytes(aad));
      REQUIRE(sealed.ok());
      CHECK(sealed->iv.size() == hsm::kGcmIvBytes);
      CHECK(sealed->ciphertext_and_tag.size() == plaintext.size() + hsm::kGcmTagBytes);
      auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes(aad));
      REQUIRE(opened.ok());
      CHECK(AsString(*opened) == plaintext);
    }
  }
  auto a = hsm->Encrypt(key, AsBytes("same"), {});
  auto b = hsm->Encrypt(key, AsBytes("same"), {});
  REQUIRE((a.ok() && b.ok()));
  CHECK(a->iv != b->iv);
  CHECK(a->ciphertext_and_tag != b->ciphertext_and_tag);
}

TEST_CASE("tampered, misdirected or malformed ciphertexts are refused") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto wrapped = hsm->GenerateWrappedKey(kRoot);
  auto other_wrapped = hsm->GenerateWrappedKey(kRoot);
  REQUIRE((wrapped.ok() && other_wrapped.ok()));
  const WrappedKey key{"key/1", *wrapped, kRoot};
  const WrappedKey other{"key/2", *other_wrapped, kRoot};
  auto sealed = hsm->Encrypt(key, AsBytes("attack at dawn"), AsBytes("context"));
  REQUIRE(sealed.ok());
  Bytes iv = sealed->iv;
  Bytes data = sealed->ciphertext_and_tag;

  auto decrypt = [&](const WrappedKey& k, const Bytes& i, const Bytes& d, std::string_view aad) {
    return hsm->Decrypt(k, i, d, AsBytes(aad));
  };
  auto refused = [](const absl::StatusOr<SecureBytes>& result) {
    INFO(result.status().ToString());
    return absl::IsInvalidArgument(result.status());
  };
  CHECK(decrypt(key, iv, data, "context").ok());

  CHECK(refused(decrypt(key, iv, data, "other context")));
  CHECK(refused(decrypt(key, iv, data, "")));
  CHECK(refused(decrypt(other, iv, data, "context")));
  CHECK(decrypt(key, iv, data, "wrong").status().message() == "ciphertext failed authentication");
  for (size_t at : {size_t{0}, data.size() - hsm::kGcmTagBytes - 1, data.size() - 1}) {
    Bytes flipped = data;
    flipped[at] ^= 0x01;
    CHECK(refused(decrypt(key, iv, flipped, "context")));
  }
  Bytes flipped_iv = iv;
  flipped_iv[5] ^= 0x80;
  CHECK(refused(decrypt(key, flipped_iv, data, "context")));
  CHECK(refused(decrypt(key, Bytes(8, 0), data, "context")));
  CHECK(refused(decrypt(key, Bytes(16, 0), data, "context")));
  CHECK(refused(decrypt(key, iv, Bytes(15, 0), "context")));
  CHECK(refused(decrypt(key, iv, Bytes(data.begin(), data.end() - 1), "context")));

  CHECK(decrypt(key, Bytes(8, 0), data, "context").status().message() ==
        "AES-GCM IV must be 12 bytes, not 8");
  CHECK(decrypt(key, iv, Bytes(15, 0), "context").status().message() ==
        "AES-GCM ciphertext is shorter than its 16-byte tag");

  // A damaged stored version is not the client's doing: DATA_LOSS, whatever the ciphertext.
  Bytes bad_wrap = *wrapped;
  bad_wrap[3] ^= 0x01;
  const std::string bad_message =
      "stored key version 'key/bad' does not unwrap under root key 'custos-root' (damaged "
      "database or wrong root)";
  auto data_loss = [](const absl::Status& status, const std::string& message) {
    INFO(status.ToString());
    return absl::IsDataLoss(status) && status.message() == message;
  };
  const WrappedKey bad{"key/bad", bad_wrap, kRoot};
  CHECK(data_loss(decrypt(bad, iv, data, "context").status(), bad_message));
  CHECK(data_loss(decrypt(bad, iv, data, "other context").status(), bad_message));
  CHECK(data_loss(hsm->Encrypt(bad, AsBytes("x"), {}).status(), bad_message));
  CHECK(
      data_loss(decrypt(WrappedKey{"key/short", Bytes(24, 0), kRoot}, iv, data, "context").status(),
                "stored key version 'key/short' is 24 bytes, not the 40 of a wrapped key (damaged "
                "database)"));
  // The refusals did not hurt the HSM or the good key.
  CHECK(decrypt(key, iv, data, "context").ok());
}

TEST_CASE("GenerateRandom returns the requested number of fresh bytes") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  for (size_t size : {0, 1, 12, 32, 4096, 100000}) {
    auto random = hsm->GenerateRandom(size);
    REQUIRE(random.ok());
    CHECK(random->size() == size);
  }
  auto a = hsm->GenerateRandom(32);
  auto b = hsm->GenerateRandom(32);
  REQUIRE((a.ok() && b.ok()));
  CHECK(a->view() != b->view());
}

TEST_CASE("GenerateDataKey draws a fresh data key and seals it, binding the AAD") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto wrapped = hsm->GenerateWrappedKey(kRoot);
  REQUIRE(wrapped.ok());
  const WrappedKey key{"key/1", *wrapped, kRoot};
  for (size_t bytes : {16, 32}) {
    auto drawn = hsm->GenerateDataKey(key, bytes, AsBytes("tenant=a"));
    REQUIRE(drawn.ok());
    CHECK(drawn->plaintext.size() == bytes);
    CHECK(drawn->sealed.iv.size() == hsm::kGcmIvBytes);
    CHECK(drawn->sealed.ciphertext_and_tag.size() == bytes + hsm::kGcmTagBytes);
    // The IV is not a slice of the key it seals.
    CHECK(drawn->plaintext.view().find(std::string_view(
              reinterpret_cast<const char*>(drawn->sealed.iv.data()), drawn->sealed.iv.size())) ==
          std::string_view::npos);
    auto opened =
        hsm->Decrypt(key, drawn->sealed.iv, drawn->sealed.ciphertext_and_tag, AsBytes("tenant=a"));
    REQUIRE(opened.ok());
    CHECK(opened->view() == drawn->plaintext.view());
    CHECK(absl::IsInvalidArgument(
        hsm->Decrypt(key, drawn->sealed.iv, drawn->sealed.ciphertext_and_tag, AsBytes("tenant=b"))
            .status()));
  }
  auto a = hsm->GenerateDataKey(key, 32, {});
  auto b = hsm->GenerateDataKey(key, 32, {});
  REQUIRE((a.ok() && b.ok()));
  CHECK(a->plaintext.view() != b->plaintext.view());
  CHECK(a->sealed.iv != b->sealed.iv);
  // A version that does not unwrap is stored damage, as for Encrypt.
  Bytes damaged = *wrapped;
  damaged[5] ^= 1;
  CHECK(hsm->GenerateDataKey(WrappedKey{"key/damaged", damaged, kRoot}, 32, {}).status().code() ==
        absl::StatusCode::kDataLoss);
}

// Not a test: what drawing a data key and its IV in one HSM call saves over GenerateRandom
// then Encrypt, through the layer custosd uses (each call handed to the HSM executor). The two
// alternate in rounds, so a machine that slows down mid-run slows both.
//   ./build/tests/hsm/test_hsm "[.data_key_bench]"
TEST_CASE("data key: one HSM call against two", "[.data_key_bench]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  const Bytes wrapped = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key{"key/1", wrapped, kRoot};
  const Bytes aad(40, 7);
  const auto cpu_now = [] {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
  };
  const auto wall_now = [] {
    return std::chrono::duration<double, std::micro>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  constexpr int kRounds = 20;
  constexpr int kCalls = 2000;
  std::vector<double> two_wall, two_cpu, one_wall, one_cpu;
  for (int round = 0; round < kRounds; ++round) {
    double wall = wall_now(), cpu = cpu_now();
    for (int i = 0; i < kCalls; ++i) {
      auto plaintext = hsm->GenerateRandom(32);
      REQUIRE(plaintext.ok());
      REQUIRE(hsm->Encrypt(key, plaintext->span(), aad).ok());
    }
    two_wall.push_back((wall_now() - wall) / kCalls);
    two_cpu.push_back((cpu_now() - cpu) / kCalls);
    wall = wall_now();
    cpu = cpu_now();
    for (int i = 0; i < kCalls; ++i) REQUIRE(hsm->GenerateDataKey(key, 32, aad).ok());
    one_wall.push_back((wall_now() - wall) / kCalls);
    one_cpu.push_back((cpu_now() - cpu) / kCalls);
  }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("GenerateRandom + Encrypt: %.1f us/call, %.1f us CPU/call\n", median(two_wall),
              median(two_cpu));
  std::printf("GenerateDataKey:          %.1f us/call, %.1f us CPU/call\n", median(one_wall),
              median(one_cpu));
}

TEST_CASE("8 threads x 200 encrypt/decrypt share a pool of 4 sessions") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token, /*pool_size=*/4);
  std::vector<Bytes> versions;
  for (int i = 0; i < 3; ++i) versions.push_back(hsm->GenerateWrappedKey(kRoot).value());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const WrappedKey key{"v/" + std::to_string(i % 3), versions[i % 3], kRoot};
        const std::string message = "thread " + std::to_string(t) + " message " + std::to_string(i);
        auto sealed = hsm->Encrypt(key, AsBytes(message), AsBytes("aad"));
        if (!sealed.ok()) {
          ++failures;
          continue;
        }
        auto opened = hsm->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, AsBytes("aad"));
        if (!opened.ok() || AsString(*opened) != message) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
}

TEST_CASE("a reopened Hsm (as after a restart) decrypts what the first one encrypted") {
  SoftHsmToken token;
  Bytes wrapped;
  hsm::GcmCiphertext sealed;
  {
    auto first = OpenHsm(token);
    wrapped = first->GenerateWrappedKey(kRoot).value();
    sealed =
        first->Encrypt(WrappedKey{"k/1", wrapped, kRoot}, AsBytes("kept"), AsBytes("a")).value();
  }  // The module is finalised and unloaded here: nothing else holds it.
  auto second = OpenHsm(token);
  auto opened = second->Decrypt(WrappedKey{"k/1", wrapped, kRoot}, sealed.iv,
                                sealed.ciphertext_and_tag, AsBytes("a"));
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "kept");
}

TEST_CASE("two instances share the module; closing one leaves the other working") {
  SoftHsmToken token;
  auto first = OpenHsm(token);
  auto second = OpenHsm(token);
  const Bytes wrapped = first->GenerateWrappedKey(kRoot).value();  // WrappedKey only points at it.
  const WrappedKey key{"k/1", wrapped, kRoot};
  auto sealed = first->Encrypt(key, AsBytes("shared"), {});
  INFO(sealed.status().ToString());
  REQUIRE(sealed.ok());
  first.reset();  // Closes its sessions, but must neither log out nor finalise the module.
  auto opened = second->Decrypt(key, sealed->iv, sealed->ciphertext_and_tag, {});
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "shared");
}

}  // namespace
}  // namespace custos::testing
