// Automatic rotation (by period and by the AES-GCM encryption limit), and usage counts that
// survive a restart. Root key rotation: root_rotation_test.cc.
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

TEST_CASE(
    "Usage counters dropped from memory are read back checked, resuming from the "
    "reservation",
    "[rotation][usage]") {
  UsageLimits limits;
  limits.reservation_block = 4;
  limits.tracked_keys = 1;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  const KeyRef k1 = f.NewKey("k1");
  f.NewKey("k2");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "k1");
  REQUIRE(sealed.ok());
  REQUIRE(Encrypt(f, "k1").ok());
  REQUIRE(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  REQUIRE(Encrypt(f, "k2").ok());
  // Maintenance writes the counts, then drops k1's counters (k2 was used last).
  REQUIRE(f.kms->RunMaintenance().ok());
  absl::StatusOr<Kms::KeyDescription> described = f.kms->DescribeKey(f.officer, "k1");
  REQUIRE(described.ok());
  REQUIRE(described->usage.size() == 1);
  CHECK(described->usage[0].encryptions == 4);  // from the reservation: 2 made, never fewer
  CHECK(described->usage[0].decryptions == 1);
  for (int i = 0; i < 3; ++i) REQUIRE(Encrypt(f, "k1").ok());  // 5..7: one more block
  CHECK(f.store->GetUsage(k1->id)->front().encryptions_reserved == 8);
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

// A key without grants, created at once, that rotates every 90 days; and its primary version.
std::string PeriodicKey(Fixture& f) {
  CreateKeyParams params;
  params.alias = "periodic";
  params.rotation_period_days = 90;
  absl::StatusOr<KeyRef> key = f.kms->CreateKey(f.officer, params);
  REQUIRE(key.ok());
  return (*key)->id;
}
uint32_t PrimaryVersion(Fixture& f, const std::string& key_id) {
  return (*f.store->GetKey(key_id))->primary_version;
}

TEST_CASE("Keys rotate by themselves when their rotation period has passed", "[rotation]") {
  Fixture f;
  const std::string key = PeriodicKey(f);
  f.clock.Advance(90 * policy::kDay - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(PrimaryVersion(f, key) == 1);
  f.clock.Advance(1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(PrimaryVersion(f, key) == 2);
  // The period restarts from the new version.
  f.clock.Advance(90 * policy::kDay - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(PrimaryVersion(f, key) == 2);
}

TEST_CASE("A wall clock stepped forward makes no rotation due early", "[rotation][clock]") {
  Fixture f;
  const std::string key = PeriodicKey(f);
  REQUIRE(f.kms->RunMaintenance().ok());
  f.clock.StepWallClock(100 * policy::kDay);  // by the wall clock alone, overdue
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(PrimaryVersion(f, key) == 1);
  f.clock.Advance(90 * policy::kDay);  // and now by both
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(PrimaryVersion(f, key) == 2);
}

}  // namespace
}  // namespace custos::core
