// Automatic rotation (by period and by the AES-GCM encryption limit), usage counts that
// survive a restart, and root key rotation.
#include <catch2/catch.hpp>

#include <algorithm>

#include "core/operation_params.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/raw_token.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::RequestState;
using testing::Fixture;

UsageLimits Tiny() {
  UsageLimits limits;
  limits.max_encryptions = 10;
  limits.rotate_at = 8;
  limits.reservation_block = 4;
  return limits;
}

absl::StatusOr<Ciphertext> Encrypt(Fixture& f, const std::string& key) {
  return f.kms->Encrypt(f.app, key, SecureBytes::FromString("x").span(), {});
}

TEST_CASE("Nearing the encryption limit triggers rotation; at it, encryption stops",
          "[rotation][usage]") {
  Fixture f(policy::DualControlConfig::Defaults(), Tiny());
  const KeyRef key = f.NewKey("k");
  for (int i = 0; i < 10; ++i) {
    absl::StatusOr<Ciphertext> sealed = Encrypt(f, "k");
    REQUIRE(sealed.ok());
    CHECK(sealed->key_version == 1);
  }
  absl::StatusOr<Ciphertext> refused = Encrypt(f, "k");
  CHECK(absl::IsResourceExhausted(refused.status()));
  CHECK(refused.status().message() ==
        "version 1 of key " + key->id +
            " has reached its limit of 10 encryptions (AES-GCM random IVs); it is being "
            "rotated, retry shortly");
  // The durable reservation never lags the count.
  CHECK(f.store->GetUsage(key->id)->front().encryptions_reserved == 10);

  REQUIRE(f.kms->RunMaintenance().ok());
  const KeyRef rotated = *f.store->GetKey(key->id);
  CHECK(rotated->primary_version == 2);
  absl::StatusOr<Ciphertext> fresh = Encrypt(f, "k");
  REQUIRE(fresh.ok());
  CHECK(fresh->key_version == 2);
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::any_of(events.begin(), events.end(), [&](const audit::Event& e) {
    return e.action == "AutoRotateKey" && e.key_id == key->id && e.outcome == absl::StatusCode::kOk;
  }));
}

TEST_CASE("One crossing of the rotation threshold makes exactly one rotation",
          "[rotation][usage]") {
  UsageLimits limits;
  limits.max_encryptions = 10;
  limits.rotate_at = 5;
  limits.reservation_block = 3;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  const KeyRef key = f.NewKey("k");
  for (int i = 0; i < 5; ++i) REQUIRE(Encrypt(f, "k").ok());  // flagged at the 5th
  // While the rotation is inside the HSM, encryptions still go to version 1 and pass the
  // threshold again: they must not ask for a second rotation.
  f.hsm->BeforeNextCall([&] {
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<Ciphertext> sealed = Encrypt(f, "k");
      REQUIRE(sealed.ok());
      CHECK(sealed->key_version == 1);
    }
  });
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->primary_version == 2);
  REQUIRE(f.kms->RunMaintenance().ok());
  REQUIRE(f.kms->RunMaintenance().ok());
  const KeyRef after = *f.store->GetKey(key->id);
  CHECK(after->primary_version == 2);
  CHECK(after->versions.size() == 2);
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(),
                      [](const audit::Event& e) { return e.action == "AutoRotateKey"; }) == 1);
}

TEST_CASE("A rotation wanted by usage that fails is retried at the next turn",
          "[rotation][usage]") {
  UsageLimits limits;
  limits.max_encryptions = 10;
  limits.rotate_at = 2;
  limits.reservation_block = 3;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  const KeyRef key = f.NewKey("k");
  for (int i = 0; i < 2; ++i) REQUIRE(Encrypt(f, "k").ok());
  f.hsm->SetDown(true);
  CHECK(absl::IsUnavailable(f.kms->RunMaintenance()));
  f.hsm->SetDown(false);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->primary_version == 2);
}

TEST_CASE("A restart never rewinds the encryption count", "[rotation][usage]") {
  Fixture f(policy::DualControlConfig::Defaults(), Tiny());
  const KeyRef key = f.NewKey("k");
  for (int i = 0; i < 5; ++i) REQUIRE(Encrypt(f, "k").ok());  // reserved: 8
  // A new Kms over the same store is what a crashed and restarted server is: counting
  // resumes at the reservation (8), not at the 5 actually used.
  f.Start(*policy::Policy::Parse(testing::kPolicy), policy::DualControlConfig::Defaults(), Tiny());
  CHECK(Encrypt(f, "k").ok());  // 9
  CHECK(Encrypt(f, "k").ok());  // 10
  CHECK(absl::IsResourceExhausted(Encrypt(f, "k").status()));
  CHECK(f.store->GetUsage(key->id)->front().encryptions_reserved == 10);
}

TEST_CASE("DescribeKey shows per-version usage", "[usage]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "k");
  REQUIRE(sealed.ok());
  f.clock.Advance(60);
  REQUIRE(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  REQUIRE(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  absl::StatusOr<Kms::KeyDescription> described = f.kms->DescribeKey(f.officer, "k");
  REQUIRE(described.ok());
  REQUIRE(described->usage.size() == 1);
  CHECK(described->usage[0].version == 1);
  CHECK(described->usage[0].encryptions == 1);
  CHECK(described->usage[0].decryptions == 2);
  CHECK(described->usage[0].last_used_at == f.clock.NowSeconds());
  // Flushed by maintenance, the counts survive a restart.
  REQUIRE(f.kms->RunMaintenance().ok());
  const std::vector<storage::VersionUsage> stored = *f.store->GetUsage(key->id);
  REQUIRE(stored.size() == 1);
  CHECK(stored[0].decryptions == 2);
}

TEST_CASE("Keys rotate by themselves when their rotation period has passed", "[rotation]") {
  Fixture f;
  CreateKeyParams params;
  params.alias = "periodic";
  params.rotation_period_days = 90;
  absl::StatusOr<KeyRef> key = f.kms->CreateKey(f.officer, params);
  REQUIRE(key.ok());
  f.clock.Advance(90 * policy::kDay - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey((*key)->id))->primary_version == 1);
  f.clock.Advance(1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey((*key)->id))->primary_version == 2);
  // The period restarts from the new version.
  f.clock.Advance(90 * policy::kDay - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey((*key)->id))->primary_version == 2);
}

absl::StatusOr<Request> RotateRoot(Fixture& f) {
  Proposal proposal;
  proposal.operation = Operation::kRotateRootKey;
  proposal.justification = "annual root rotation";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  REQUIRE(request.ok());
  CHECK(request->key_id.empty());
  CHECK(absl::IsFailedPrecondition(f.kms->Propose(f.officer2, proposal).status()));
  const std::string digest = RequestDigest(*request);
  REQUIRE(f.kms->Approve(f.officer2, request->id, digest).ok());
  return f.kms->Approve(f.officer3, request->id, digest);
}

size_t Count(Fixture& f, const std::string& action, const std::string& detail) {
  const std::vector<audit::Event> events = f.sink.events();
  return static_cast<size_t>(std::count_if(events.begin(), events.end(), [&](const auto& e) {
    return e.action == action && e.detail == detail && e.outcome == absl::StatusCode::kOk;
  }));
}

TEST_CASE(
    "A root rotation: new versions under the new root; the old confining root goes when "
    "its last version does",
    "[rotation][root]") {
  Fixture f;
  const KeyRef a = f.NewKey("a");
  const KeyRef b = f.NewKey("b");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "a");
  REQUIRE(sealed.ok());

  absl::StatusOr<Request> done = RotateRoot(f);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
  CHECK(done->reason ==
        "root key rotated from 'custos-root' to 'custos-root.2'; 0 key versions re-wrapped from "
        "legacy roots; 2 stay under the confining roots that wrapped them");
  // A confining root's versions cannot be re-wrapped: they stay, and so does their root.
  for (const KeyRef& key : {a, b}) {
    CHECK((*f.store->GetKey(key->id))->versions[0].root_key_label == "custos-root");
  }
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("") == "custos-root.2");
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["custos-root"])");
  CHECK(f.hsm->CheckRootKey("custos-root").ok());
  CHECK(*f.hsm->RootKeyConfinesVersions("custos-root.2"));
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  const KeyRef c = f.NewKey("c");
  CHECK(c->versions[0].root_key_label == "custos-root.2");
  // Rotating a key puts its new version under the new root; the old one still decrypts.
  Proposal rotate;
  rotate.operation = Operation::kRotateKey;
  rotate.key = "a";
  rotate.justification = "move to the new root";
  absl::StatusOr<Request> proposed = f.kms->Propose(f.officer, rotate);
  REQUIRE(proposed.ok());
  REQUIRE(f.kms->Approve(f.officer2, proposed->id, RequestDigest(*proposed)).ok());
  REQUIRE(f.kms->Approve(f.officer3, proposed->id, RequestDigest(*proposed)).ok());
  CHECK((*f.store->GetKey(a->id))->versions[1].root_key_label == "custos-root.2");
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());

  // Once the last version under the old root is crypto-shredded, maintenance destroys it.
  for (const std::string key : {"a", "b"}) {
    Proposal schedule;
    schedule.operation = Operation::kScheduleKeyDeletion;
    schedule.key = key;
    schedule.justification = "retire the old root";
    absl::StatusOr<Request> scheduled = f.kms->Propose(f.officer, schedule);
    REQUIRE(scheduled.ok());
    REQUIRE(f.kms->Approve(f.officer2, scheduled->id, RequestDigest(*scheduled)).ok());
    REQUIRE(f.kms->Approve(f.officer3, scheduled->id, RequestDigest(*scheduled)).ok());
  }
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.hsm->CheckRootKey("custos-root").ok());  // still wraps versions of a and b
  f.clock.Advance(30 * policy::kDay);
  REQUIRE(f.kms->RunMaintenance().ok());  // destroys a and b, then the root nothing needs
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("custos-root")));
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == "[]");
  CHECK(Count(f, "DestroyRootKey", "root custos-root") == 1);
  CHECK(f.kms->Encrypt(f.app, "c", SecureBytes::FromString("x").span(), {}).ok());
}

TEST_CASE("A root rotation moves every version off a legacy root and destroys it",
          "[rotation][root]") {
  Fixture f;
  // A root made before roots confined what they unwrap: a PIN holder could unwrap its
  // versions as extractable. A rotation is the migration.
  custos::testing::RawToken(f.token).CreateLegacyRoot("legacy-root");
  f.root_label = "legacy-root";
  f.Start(*policy::Policy::Parse(testing::kPolicy), policy::DualControlConfig::Defaults(), {});
  REQUIRE_FALSE(*f.hsm->RootKeyConfinesVersions("legacy-root"));
  const KeyRef a = f.NewKey("a");
  const KeyRef b = f.NewKey("b");
  REQUIRE(a->versions[0].root_key_label == "legacy-root");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "a");
  REQUIRE(sealed.ok());

  absl::StatusOr<Request> done = RotateRoot(f);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->reason ==
        "root key rotated from 'legacy-root' to 'legacy-root.2'; 2 key versions re-wrapped from "
        "legacy roots; 0 stay under the confining roots that wrapped them");
  for (const KeyRef& key : {a, b}) {
    const KeyRef now = *f.store->GetKey(key->id);
    CHECK(now->versions[0].root_key_label == "legacy-root.2");
    CHECK(now->versions[0].wrapped != key->versions[0].wrapped);
  }
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("legacy-root")));
  CHECK(*f.hsm->RootKeyConfinesVersions("legacy-root.2"));
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == "[]");
  CHECK(Count(f, "RewrapKeyVersions",
              "1 versions re-wrapped from a legacy root under legacy-root.2") == 2);  // per key
  CHECK(Count(f, "DestroyRootKey", "root legacy-root") == 1);
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
}

TEST_CASE("A retired root that cannot be destroyed now is retried by maintenance",
          "[rotation][root]") {
  Fixture f;
  custos::testing::RawToken(f.token).CreateLegacyRoot("legacy-root");
  f.root_label = "legacy-root";
  f.Start(*policy::Policy::Parse(testing::kPolicy), policy::DualControlConfig::Defaults(), {});
  f.NewKey("a");
  // The HSM goes away just as the rotation has committed and turns to the old root.
  Proposal proposal;
  proposal.operation = Operation::kRotateRootKey;
  proposal.justification = "annual root rotation";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  REQUIRE(request.ok());
  const std::string digest = RequestDigest(*request);
  REQUIRE(f.kms->Approve(f.officer2, request->id, digest).ok());
  // Calls: CreateRootKey, RootKeyConfinesVersions, RewrapKey, then the destruction.
  f.hsm->BeforeNextCall([&] {
    f.hsm->BeforeNextCall([&] {
      f.hsm->BeforeNextCall([&] { f.hsm->BeforeNextCall([&] { f.hsm->SetDown(true); }); });
    });
  });
  absl::StatusOr<Request> done = f.kms->Approve(f.officer3, request->id, digest);
  f.hsm->SetDown(false);
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
  CHECK(f.hsm->CheckRootKey("legacy-root").ok());  // not destroyed yet...
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["legacy-root"])");
  REQUIRE(f.kms->RunMaintenance().ok());  // ...but at the next turn
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("legacy-root")));
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == "[]");
}

}  // namespace
}  // namespace custos::core
