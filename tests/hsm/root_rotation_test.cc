// Several root keys on one token, and root rotation: versions re-wrapped from one root to
// another inside the HSM, and the old root destroyed.
#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

using hsm::WrappedKey;

std::string Missing(const std::string& label) {
  return absl::StrCat("the HSM token has no root key labelled '", label, "'");
}

// A stored version that fails its RFC 5649 check under root `label`: the store (or the root) is
// at fault, never the client, so DATA_LOSS and not INVALID_ARGUMENT.
std::string NoUnwrap(const std::string& cache_id, const std::string& label) {
  return absl::StrCat("stored key version '", cache_id, "' does not unwrap under root key '", label,
                      "' (damaged database or wrong root)");
}

constexpr auto kDataLoss = absl::StatusCode::kDataLoss;

// What RewrapKey says of a version under a root that confines what it unwraps.
std::string Confined(const std::string& cache_id, const std::string& label) {
  return absl::StrCat("stored key version '", cache_id, "' is wrapped under root key '", label,
                      "', which confines what it unwraps: it cannot be re-wrapped");
}

// Legacy roots `labels` on `token` (see RawToken::CreateLegacyRoot).
void LegacyRoots(const SoftHsmToken& token, std::initializer_list<std::string> labels) {
  RawToken raw(token);
  for (const std::string& label : labels) raw.CreateLegacyRoot(label);
}

// True if `status` has exactly this code and message; if not, the failed check shows it.
bool Is(const absl::Status& status, absl::StatusCode code, const std::string& message) {
  const bool same = status.code() == code && status.message() == message;
  if (!same) UNSCOPED_INFO("got " << status.ToString());
  return same;
}

TEST_CASE("two roots on one token: each version works only under its own root's label") {
  SoftHsmToken token;
  auto opened = hsm::OpenPkcs11Hsm(OptionsFor(token));
  REQUIRE(opened.ok());
  hsm::Hsm& hsm = **opened;
  RawToken raw(token);

  REQUIRE(hsm.CreateRootKey("root-a").ok());
  CHECK(hsm.CheckRootKey("root-a").ok());
  CHECK(Is(hsm.CheckRootKey("root-b"), absl::StatusCode::kFailedPrecondition, Missing("root-b")));
  REQUIRE(hsm.CreateRootKey("root-b").ok());  // A second label is creatable...
  CHECK(hsm.CheckRootKey("root-b").ok());
  for (const std::string label : {"root-a", "root-b"}) {  // ...and each exists only once.
    CHECK(Is(hsm.CreateRootKey(label), absl::StatusCode::kAlreadyExists,
             "the HSM token already has a root key labelled '" + label + "'"));
    CK_OBJECT_HANDLE root = raw.FindKey(label);
    REQUIRE(root != CK_INVALID_HANDLE);
    bool extractable = true;
    CHECK(raw.ReadBool(root, CKA_EXTRACTABLE, &extractable) == CKR_OK);
    CHECK_FALSE(extractable);
    CHECK(raw.TryReadValue(root) == CKR_ATTRIBUTE_SENSITIVE);
  }
  CHECK(raw.CountSecretKeys(/*token_objects=*/true) == 2);

  const Bytes a = hsm.GenerateWrappedKey("root-a").value();
  const Bytes b = hsm.GenerateWrappedKey("root-b").value();
  const WrappedKey key_a{"a/1", a, "root-a"};
  const WrappedKey key_b{"b/1", b, "root-b"};
  auto sealed_a = hsm.Encrypt(key_a, AsBytes("under a"), AsBytes("ctx"));
  auto sealed_b = hsm.Encrypt(key_b, AsBytes("under b"), AsBytes("ctx"));
  REQUIRE((sealed_a.ok() && sealed_b.ok()));  // Both are now cached, too.

  // Under the other (existing) root the wrapped bytes fail their RFC 5649 check: the stored
  // version (or its recorded root) is wrong, not the HSM nor the client. A cached copy is not
  // served under a label it did not come from.
  const WrappedKey a_as_b{"a/1", a, "root-b"};
  const WrappedKey b_as_a{"b/1", b, "root-a"};
  CHECK(Is(hsm.Decrypt(a_as_b, sealed_a->iv, sealed_a->ciphertext_and_tag, AsBytes("ctx")).status(),
           kDataLoss, NoUnwrap("a/1", "root-b")));
  CHECK(Is(hsm.Encrypt(b_as_a, AsBytes("x"), {}).status(), kDataLoss, NoUnwrap("b/1", "root-a")));
  CHECK(Is(hsm.RewrapKey(a_as_b, "root-a").status(), absl::StatusCode::kFailedPrecondition,
           Confined("a/1", "root-b")));
  // Under a label the token lacks, the HSM is what is missing something.
  CHECK(Is(hsm.Encrypt(WrappedKey{"a/1", a, "root-c"}, AsBytes("x"), {}).status(),
           absl::StatusCode::kFailedPrecondition, Missing("root-c")));
  CHECK(Is(hsm.GenerateWrappedKey("root-c").status(), absl::StatusCode::kFailedPrecondition,
           Missing("root-c")));
  // An empty label is a caller's bug (a version stored without its root's label).
  const std::string empty_label = "a root key label must not be empty";
  CHECK(Is(hsm.Encrypt(WrappedKey{"a/1", a, ""}, AsBytes("x"), {}).status(),
           absl::StatusCode::kInvalidArgument, empty_label));
  CHECK(Is(hsm.GenerateWrappedKey("").status(), absl::StatusCode::kInvalidArgument, empty_label));
  CHECK(Is(hsm.CreateRootKey(""), absl::StatusCode::kInvalidArgument, empty_label));
  CHECK(Is(hsm.CheckRootKey(""), absl::StatusCode::kInvalidArgument, empty_label));
  CHECK(Is(hsm.DestroyRootKey(""), absl::StatusCode::kInvalidArgument, empty_label));

  // Each still works under its own label.
  auto opened_a = hsm.Decrypt(key_a, sealed_a->iv, sealed_a->ciphertext_and_tag, AsBytes("ctx"));
  auto opened_b = hsm.Decrypt(key_b, sealed_b->iv, sealed_b->ciphertext_and_tag, AsBytes("ctx"));
  REQUIRE((opened_a.ok() && opened_b.ok()));
  CHECK(AsString(*opened_a) == "under a");
  CHECK(AsString(*opened_b) == "under b");
  CHECK(raw.CountSecretKeys(true) == 2);
}

TEST_CASE("RewrapKey moves a version to another root; what it sealed still opens") {
  SoftHsmToken token;
  LegacyRoots(token, {kRoot, "root-b"});  // back and forth: both must allow re-wrapping
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  const Bytes under_a = hsm->GenerateWrappedKey(kRoot).value();
  const WrappedKey key_a{"k/1", under_a, kRoot};
  std::vector<hsm::GcmCiphertext> sealed;
  for (int i = 0; i < 5; ++i) {
    sealed.push_back(
        hsm->Encrypt(key_a, AsBytes("message " + std::to_string(i)), AsBytes("ctx")).value());
  }

  auto rewrapped = hsm->RewrapKey(key_a, "root-b");
  REQUIRE(rewrapped.ok());
  const Bytes under_b = *rewrapped;
  CHECK(under_b.size() == 40);
  CHECK(under_b != under_a);
  // Same cache id (its entry from root A is replaced) and a fresh one.
  for (const std::string id : {"k/1", "k/1-fresh"}) {
    const WrappedKey key_b{id, under_b, "root-b"};
    for (int i = 0; i < 5; ++i) {
      auto opened = hsm->Decrypt(key_b, sealed[i].iv, sealed[i].ciphertext_and_tag, AsBytes("ctx"));
      REQUIRE(opened.ok());
      CHECK(AsString(*opened) == "message " + std::to_string(i));
    }
  }
  // The same key material both ways: sealed under the new form, opened under the old one.
  auto sealed_b = hsm->Encrypt(WrappedKey{"k/1", under_b, "root-b"}, AsBytes("after"), {});
  REQUIRE(sealed_b.ok());
  auto opened_a = hsm->Decrypt(key_a, sealed_b->iv, sealed_b->ciphertext_and_tag, {});
  REQUIRE(opened_a.ok());
  CHECK(AsString(*opened_a) == "after");
  // The new bytes under the old label are refused.
  CHECK(Is(hsm->Encrypt(WrappedKey{"k/1", under_b, kRoot}, AsBytes("x"), {}).status(), kDataLoss,
           NoUnwrap("k/1", kRoot)));

  // Many rewraps, back and forth: the token gains no objects, and no transient copy lingers.
  const size_t token_objects = raw.CountSecretKeys(/*token_objects=*/true);
  const size_t session_objects = raw.CountSecretKeys(/*token_objects=*/false);
  CHECK(token_objects == 2);
  Bytes current = under_b;
  std::string label = "root-b";
  for (int i = 0; i < 101; ++i) {
    const std::string next = label == "root-b" ? kRoot : "root-b";
    auto moved = hsm->RewrapKey(WrappedKey{"k/1", current, label}, next);
    REQUIRE(moved.ok());
    CHECK(*moved != current);
    current = std::move(*moved);
    label = next;
  }
  CHECK(raw.CountSecretKeys(true) == token_objects);
  CHECK(raw.CountSecretKeys(false) == session_objects);
  // RFC 5649 wrapping is deterministic: back under root A (101 moves from B), the very
  // bytes GenerateWrappedKey gave.
  CHECK(label == kRoot);
  CHECK(current == under_a);
  auto opened = hsm->Decrypt(WrappedKey{"k/2", current, label}, sealed[0].iv,
                             sealed[0].ciphertext_and_tag, AsBytes("ctx"));
  REQUIRE(opened.ok());
  CHECK(AsString(*opened) == "message 0");
}

TEST_CASE("RewrapKey refuses tampered, malformed or misdirected versions and leaves nothing") {
  SoftHsmToken token;
  LegacyRoots(token, {kRoot, "root-b"});
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const size_t token_objects = raw.CountSecretKeys(/*token_objects=*/true);
  const size_t session_objects = raw.CountSecretKeys(/*token_objects=*/false);

  for (size_t at : {0, 7, 8, 20, 39}) {
    Bytes flipped = a;
    flipped[at] ^= 0x01;
    INFO("byte " << at);
    CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", flipped, kRoot}, "root-b").status(), kDataLoss,
             NoUnwrap("k/1", kRoot)));
  }
  CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", Bytes(24, 0), kRoot}, "root-b").status(), kDataLoss,
           "stored key version 'k/1' is 24 bytes, not the 40 of a wrapped key (damaged database)"));
  CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", Bytes(48, 0), kRoot}, "root-b").status(), kDataLoss,
           "stored key version 'k/1' is 48 bytes, not the 40 of a wrapped key (damaged database)"));
  CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", a, "root-b"}, kRoot).status(), kDataLoss,
           NoUnwrap("k/1", "root-b")));
  CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", a, "root-c"}, "root-b").status(),
           absl::StatusCode::kFailedPrecondition, Missing("root-c")));
  CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", a, kRoot}, "root-c").status(),
           absl::StatusCode::kFailedPrecondition, Missing("root-c")));
  CHECK(Is(hsm->RewrapKey(WrappedKey{"k/1", a, kRoot}, "").status(),
           absl::StatusCode::kInvalidArgument, "a root key label must not be empty"));

  CHECK(raw.CountSecretKeys(true) == token_objects);
  CHECK(raw.CountSecretKeys(false) == session_objects);
  CHECK(hsm->RewrapKey(WrappedKey{"k/1", a, kRoot}, "root-b").ok());  // No harm done.
}

TEST_CASE("DestroyRootKey ends every version under that root, and only those") {
  SoftHsmToken token;
  LegacyRoots(token, {"root-b"});
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  const Bytes a = hsm->GenerateWrappedKey(kRoot).value();
  const Bytes b = hsm->GenerateWrappedKey("root-b").value();
  const WrappedKey key_a{"a/1", a, kRoot};
  const WrappedKey key_b{"b/1", b, "root-b"};
  auto sealed_a = hsm->Encrypt(key_a, AsBytes("under a"), {});
  auto sealed_b = hsm->Encrypt(key_b, AsBytes("under b"), {});
  REQUIRE((sealed_a.ok() && sealed_b.ok()));
  CHECK(raw.CountSecretKeys(/*token_objects=*/true) == 2);
  CHECK(raw.CountSecretKeys(/*token_objects=*/false) == 2);  // Both versions cached.

  REQUIRE(hsm->DestroyRootKey(kRoot).ok());
  CHECK(raw.CountSecretKeys(true) == 1);
  CHECK(raw.FindKey(kRoot) == CK_INVALID_HANDLE);
  CHECK(raw.CountSecretKeys(false) == 1);  // The copy unwrapped under it is gone too.

  const std::string missing = Missing(kRoot);
  const auto kFailed = absl::StatusCode::kFailedPrecondition;
  CHECK(Is(hsm->CheckRootKey(kRoot), kFailed, missing));
  CHECK(Is(hsm->Encrypt(key_a, AsBytes("x"), {}).status(), kFailed, missing));
  CHECK(Is(hsm->Decrypt(key_a, sealed_a->iv, sealed_a->ciphertext_and_tag, {}).status(), kFailed,
           missing));
  CHECK(Is(hsm->GenerateWrappedKey(kRoot).status(), kFailed, missing));
  CHECK(Is(hsm->RewrapKey(key_a, "root-b").status(), kFailed, missing));
  CHECK(Is(hsm->RewrapKey(key_b, kRoot).status(), kFailed, missing));
  {  // A new instance (as after a restart) sees the same.
    auto again = hsm::OpenPkcs11Hsm(OptionsFor(token));
    REQUIRE(again.ok());
    CHECK(Is((*again)->CheckRootKey(kRoot), kFailed, missing));
    CHECK(Is((*again)->Encrypt(key_a, AsBytes("x"), {}).status(), kFailed, missing));
  }

  // The other root carries on.
  CHECK(hsm->CheckRootKey("root-b").ok());
  auto opened_b = hsm->Decrypt(key_b, sealed_b->iv, sealed_b->ciphertext_and_tag, {});
  REQUIRE(opened_b.ok());
  CHECK(AsString(*opened_b) == "under b");
  CHECK(hsm->GenerateWrappedKey("root-b").ok());

  // Destroying what is not there.
  CHECK(Is(hsm->DestroyRootKey(kRoot), absl::StatusCode::kNotFound, missing));
  CHECK(Is(hsm->DestroyRootKey("never-made"), absl::StatusCode::kNotFound, Missing("never-made")));

  // A new root under the old label is another key: the old versions stay dead for good, and
  // say so (a re-created root must not look like a client's wrong context).
  REQUIRE(hsm->CreateRootKey(kRoot).ok());
  CHECK(Is(hsm->Decrypt(key_a, sealed_a->iv, sealed_a->ciphertext_and_tag, {}).status(), kDataLoss,
           NoUnwrap("a/1", kRoot)));
  CHECK(Is(hsm->Encrypt(key_a, AsBytes("x"), {}).status(), kDataLoss, NoUnwrap("a/1", kRoot)));
  CHECK(raw.CountSecretKeys(true) == 2);
}

TEST_CASE("roots are checked per label; a key made outside the Hsm is neither used nor destroyed") {
  SoftHsmToken token;
  auto opened = hsm::OpenPkcs11Hsm(OptionsFor(token));
  REQUIRE(opened.ok());
  hsm::Hsm& hsm = **opened;
  RawToken raw(token);
  raw.CreateLegacyRoot("good");  // whose versions can be re-wrapped
  const Bytes version = hsm.GenerateWrappedKey("good").value();

  raw.CreateAesKey("loose", /*extractable=*/true);
  const std::string loose =
      "root key 'loose' is not a sensitive, non-extractable AES-256 wrapping key; refusing to "
      "use it";
  const auto kFailed = absl::StatusCode::kFailedPrecondition;
  CHECK(Is(hsm.CheckRootKey("loose"), kFailed, loose));
  CHECK(Is(hsm.GenerateWrappedKey("loose").status(), kFailed, loose));
  CHECK(Is(hsm.RewrapKey(WrappedKey{"v/1", version, "good"}, "loose").status(), kFailed, loose));
  CHECK(Is(hsm.DestroyRootKey("loose"), kFailed, loose));
  CHECK(raw.FindKey("loose") != CK_INVALID_HANDLE);
  CHECK(absl::IsAlreadyExists(hsm.CreateRootKey("loose")));

  raw.CreateAesKey("twice", /*extractable=*/false);
  raw.CreateAesKey("twice", /*extractable=*/false);
  const std::string twice =
      "the HSM token has several keys labelled 'twice'; expected exactly one root key";
  CHECK(Is(hsm.CheckRootKey("twice"), kFailed, twice));
  CHECK(Is(hsm.GenerateWrappedKey("twice").status(), kFailed, twice));
  CHECK(Is(hsm.DestroyRootKey("twice"), kFailed, twice));
  CHECK(raw.CountSecretKeys(/*token_objects=*/true) == 4);
  CHECK(hsm.CheckRootKey("good").ok());
  CHECK_FALSE(*hsm.RootKeyConfinesVersions("good"));
}

TEST_CASE("a root made by another tool is used only if private and able only to wrap and unwrap") {
  SoftHsmToken token;
  auto opened = hsm::OpenPkcs11Hsm(OptionsFor(token));
  REQUIRE(opened.ok());
  hsm::Hsm& hsm = **opened;
  RawToken raw(token);
  raw.CreateLegacyRoot("good");
  const Bytes version = hsm.GenerateWrappedKey("good").value();
  const auto kFailed = absl::StatusCode::kFailedPrecondition;

  // One with every attribute the Hsm gives its own roots is a root like any other.
  raw.CreateAesKey("external", RawToken::AesKeyAttributes{});
  CHECK(hsm.CheckRootKey("external").ok());
  auto moved = hsm.RewrapKey(WrappedKey{"v/1", version, "good"}, "external");
  REQUIRE(moved.ok());
  auto sealed = hsm.Encrypt(WrappedKey{"v/1", *moved, "external"}, AsBytes("x"), {});
  REQUIRE(sealed.ok());
  CHECK(hsm.Decrypt(WrappedKey{"v/1", version, "good"}, sealed->iv, sealed->ciphertext_and_tag, {})
            .ok());

  struct Bad {
    std::string label;
    RawToken::AesKeyAttributes attributes;
    std::string message;
  };
  std::vector<Bad> bad;
  bad.push_back({"public",
                 {.is_private = false},
                 "root key 'public' has CKA_PRIVATE=false (anyone with access to the token can "
                 "use it without the PIN); refusing to use it"});
  bad.push_back({"decrypts",
                 {.decrypt = true},
                 "root key 'decrypts' has CKA_DECRYPT=true (decrypting a wrapped key version "
                 "with it would reveal the version's key); refusing to use it"});
  bad.push_back({"encrypts",
                 {.encrypt = true},
                 "root key 'encrypts' has CKA_ENCRYPT=true (a root key must only wrap and "
                 "unwrap); refusing to use it"});
  bad.push_back({"modifiable",
                 {.modifiable = true},
                 "root key 'modifiable' has CKA_MODIFIABLE=true (its use could later be widened "
                 "to decryption); refusing to use it"});
  bad.push_back({"imported",
                 {.imported = true},
                 "root key 'imported' was not generated inside the HSM and kept there "
                 "(CKA_LOCAL=false, CKA_ALWAYS_SENSITIVE=false, CKA_NEVER_EXTRACTABLE=false): its "
                 "value was known outside the token; refusing to use it (custosd init generates "
                 "it on the token)"});
  for (const Bad& root : bad) {
    INFO("root " << root.label);
    raw.CreateAesKey(root.label, root.attributes);
    CHECK(Is(hsm.CheckRootKey(root.label), kFailed, root.message));
    CHECK(Is(hsm.GenerateWrappedKey(root.label).status(), kFailed, root.message));
    CHECK(Is(hsm.RewrapKey(WrappedKey{"v/1", version, "good"}, root.label).status(), kFailed,
             root.message));
    CHECK(Is(hsm.Encrypt(WrappedKey{"v/1", version, root.label}, AsBytes("x"), {}).status(),
             kFailed, root.message));
    CHECK(Is(hsm.Decrypt(WrappedKey{"v/1", version, root.label}, sealed->iv,
                         sealed->ciphertext_and_tag, {})
                 .status(),
             kFailed, root.message));
    CHECK(Is(hsm.DestroyRootKey(root.label), kFailed, root.message));
    CHECK(raw.FindKey(root.label) != CK_INVALID_HANDLE);  // Neither used nor destroyed.
  }
  // Each is refused afresh by another instance (as after a restart), not only from a cache.
  {
    auto again = hsm::OpenPkcs11Hsm(OptionsFor(token));
    REQUIRE(again.ok());
    for (const Bad& root : bad)
      CHECK(Is((*again)->CheckRootKey(root.label), kFailed, root.message));
  }

  // A private key blocks the label; a public one is not a root key at all, so the Hsm makes
  // its own, private root beside it, and uses only that.
  for (const std::string label : {"decrypts", "encrypts", "modifiable", "imported"}) {
    CHECK(absl::IsAlreadyExists(hsm.CreateRootKey(label)));
  }
  const size_t token_objects = raw.CountSecretKeys(/*token_objects=*/true);
  REQUIRE(hsm.CreateRootKey("public").ok());
  CHECK(raw.CountSecretKeys(true) == token_objects + 1);
  CHECK(hsm.CheckRootKey("public").ok());
  CHECK(hsm.GenerateWrappedKey("public").ok());
  REQUIRE(hsm.DestroyRootKey("public").ok());
  CHECK(raw.CountSecretKeys(true) == token_objects);  // The public key is still there...
  CHECK(Is(hsm.CheckRootKey("public"), kFailed, bad[0].message));  // ...and still refused.
  CHECK(hsm.CheckRootKey("good").ok());
}

TEST_CASE("a root rotation while threads encrypt and decrypt: nothing fails") {
  SoftHsmToken token;
  LegacyRoots(token, {kRoot});  // a migration: versions leave a legacy root
  auto hsm = OpenHsm(token, /*pool_size=*/4, /*cache_capacity=*/4);
  REQUIRE(hsm->CreateRootKey("root-b").ok());
  RawToken raw(token);
  const size_t token_objects = raw.CountSecretKeys(/*token_objects=*/true);

  // The "store": each version's wrapped bytes and root label, replaced as a whole.
  struct Stored {
    Bytes wrapped;
    std::string label;
  };
  std::mutex mu;
  std::vector<Stored> store;
  for (int i = 0; i < 6; ++i) store.push_back({hsm->GenerateWrappedKey(kRoot).value(), kRoot});
  // Names built with StrCat: GCC 12 at -O3 gave a false -Wrestrict for `"v" + std::to_string(v)`.
  auto cache_id = [](size_t v) { return absl::StrCat("v/", v); };
  auto payload = [](size_t v) { return absl::StrCat("v", v); };
  std::vector<hsm::GcmCiphertext> sealed;
  for (size_t i = 0; i < 6; ++i) {
    const WrappedKey key{cache_id(i), store[i].wrapped, kRoot};
    sealed.push_back(hsm->Encrypt(key, AsBytes(payload(i)), {}).value());
  }

  std::atomic<int> failures{0};
  auto worker = [&](int t) {
    for (int i = 0; i < 60; ++i) {
      const size_t v = (t + i) % store.size();
      Stored stored;
      {
        std::lock_guard lock(mu);
        stored = store[v];
      }
      const WrappedKey key{cache_id(v), stored.wrapped, stored.label};
      auto opened = hsm->Decrypt(key, sealed[v].iv, sealed[v].ciphertext_and_tag, {});
      if (!opened.ok() || AsString(*opened) != payload(v)) ++failures;
      if (!hsm->Encrypt(key, AsBytes("more"), {}).ok()) ++failures;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  threads.emplace_back([&] {
    for (size_t v = 0; v < store.size(); ++v) {
      Stored stored;
      {
        std::lock_guard lock(mu);
        stored = store[v];
      }
      auto moved = hsm->RewrapKey(WrappedKey{cache_id(v), stored.wrapped, stored.label}, "root-b");
      if (!moved.ok()) {
        ++failures;
        continue;
      }
      std::lock_guard lock(mu);
      store[v] = {std::move(*moved), "root-b"};
    }
  });
  for (auto& thread : threads) thread.join();
  REQUIRE(failures == 0);
  for (const Stored& stored : store) CHECK(stored.label == "root-b");

  REQUIRE(hsm->DestroyRootKey(kRoot).ok());  // Nothing refers to it any more.
  threads.clear();
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  for (auto& thread : threads) thread.join();
  CHECK(failures == 0);
  CHECK(raw.CountSecretKeys(true) == token_objects - 1);
}

}  // namespace
}  // namespace custos::testing
