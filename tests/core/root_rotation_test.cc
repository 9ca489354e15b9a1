// Root key rotation: the new root in use at once; versions under a legacy root re-wrapped in
// the background (officers served meanwhile, progress in GetRequest, outages waited out, a
// restart resuming it); retired roots destroyed once nothing they wrap is left.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <future>
#include <thread>

#include "core/operation_params.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/raw_token.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::RequestState;
using testing::Fixture;

absl::StatusOr<Ciphertext> Encrypt(Fixture& f, const std::string& key) {
  return f.kms->Encrypt(f.app, key, SecureBytes::FromString("x").span(), {});
}

// A root rotation proposed and approved once: one approval short of its quorum.
struct PendingRotation {
  std::string id;
  std::string digest;
};
PendingRotation ProposeRootRotation(Fixture& f) {
  Proposal proposal;
  proposal.operation = Operation::kRotateRootKey;
  proposal.justification = "annual root rotation";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  REQUIRE(request.ok());
  CHECK(request->key_id.empty());
  CHECK(absl::IsFailedPrecondition(f.kms->Propose(f.officer2, proposal).status()));
  const std::string digest = RequestDigest(*request);
  REQUIRE(f.kms->Approve(f.officer2, request->id, digest).ok());
  return {request->id, digest};
}

absl::StatusOr<Request> RotateRoot(Fixture& f) {
  const PendingRotation pending = ProposeRootRotation(f);
  return f.kms->Approve(f.officer3, pending.id, pending.digest);
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

// A rotation cut short by a kill may leave its new root half written (SoftHSM2 stores a
// generated key's value after its label), and a PIN holder may import a key under the next
// label: either way, the key already there is neither adopted nor destroyed.
TEST_CASE("A key already under the next root label is passed over, never adopted",
          "[rotation][root][insider]") {
  Fixture f;
  f.NewKey("a");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "a");
  REQUIRE(sealed.ok());
  custos::testing::RawToken token(f.token);
  // Made outside Custos: a root that does not confine what it unwraps gives it away if used.
  const CK_OBJECT_HANDLE planted = token.CreateLegacyRoot("custos-root.2");

  absl::StatusOr<Request> done = RotateRoot(f);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->reason ==
        "root key rotated from 'custos-root' to 'custos-root.3'; 0 key versions re-wrapped from "
        "legacy roots; 1 stay under the confining roots that wrapped them");
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("") == "custos-root.3");
  CHECK(*f.hsm->RootKeyConfinesVersions("custos-root.3"));
  CHECK(Count(f, "RotateRootKey",
              R"(new root custos-root.3; 0 versions to re-wrap, 1 kept; labels passed over, )"
              R"(taken already: ["custos-root.2"])") == 1);
  bool is_private = false;  // still there: nothing proves what it wraps
  CHECK(token.ReadBool(planted, CKA_PRIVATE, &is_private) == CKR_OK);
  CHECK(token.FindKey("custos-root.2") == planted);
  CHECK(f.NewKey("b")->versions[0].root_key_label == "custos-root.3");
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  // The next rotation goes on from the label in use.
  absl::StatusOr<Request> next = RotateRoot(f);
  REQUIRE(next.ok());
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("") == "custos-root.4");
}

TEST_CASE("Past 16 taken root labels in a row the rotation is refused and stays pending",
          "[rotation][root][insider]") {
  Fixture f;
  f.NewKey("a");
  custos::testing::RawToken token(f.token);
  for (int n = 2; n <= 18; ++n) token.CreateLegacyRoot("custos-root." + std::to_string(n));
  const PendingRotation request = ProposeRootRotation(f);
  const std::string& digest = request.digest;
  absl::StatusOr<Request> refused = f.kms->Approve(f.officer3, request.id, digest);
  CHECK(absl::IsFailedPrecondition(refused.status()));
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("already has keys labelled 'custos-root.2' to 'custos-root.18'"));
  CHECK(f.kms->GetRequest(f.officer, request.id)->state == RequestState::kPending);
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("").empty());
  CHECK(token.FindKey("custos-root.19") == CK_INVALID_HANDLE);  // nothing made
}

TEST_CASE(
    "A rotation that fails after making its root destroys it; approved again, it reuses "
    "the label",
    "[rotation][root]") {
  Fixture f;
  f.NewKey("a");
  const PendingRotation request = ProposeRootRotation(f);
  const std::string& digest = request.digest;
  // The new root is made; the HSM then fails the next step (reading the old root's attributes).
  f.hsm->BeforeNextCallTo("RootKeyConfinesVersions", [&] {
    REQUIRE(f.hsm->CheckRootKey("custos-root.2").ok());
    f.hsm->FailNext(1, absl::UnavailableError("HSM blinked"));
  });
  absl::StatusOr<Request> failed = f.kms->Approve(f.officer3, request.id, digest);
  CHECK(absl::IsUnavailable(failed.status()));
  CHECK_THAT(std::string(failed.status().message()), Catch::Contains("HSM blinked"));
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("").empty());
  CHECK(custos::testing::RawToken(f.token).FindKey("custos-root.2") == CK_INVALID_HANDLE);

  absl::StatusOr<Request> done = f.kms->Approve(f.officer3, request.id, digest);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("") == "custos-root.2");
  CHECK(Count(f, "RotateRootKey", "new root custos-root.2; 0 versions to re-wrap, 1 kept") == 1);
}

// A fixture whose root is a legacy one (made before roots confined what they unwrap: a PIN
// holder could unwrap its versions as extractable); a root rotation is its migration.
void StartOnLegacyRoot(Fixture& f) {
  custos::testing::RawToken(f.token).CreateLegacyRoot("legacy-root");
  f.root_label = "legacy-root";
  f.Start(*policy::Policy::Parse(testing::kPolicy), policy::DualControlConfig::Defaults(), {});
  REQUIRE_FALSE(*f.hsm->RootKeyConfinesVersions("legacy-root"));
}

// The request once its background work is over (GetRequest shows no progress), waiting up
// to 20 s.
Request Finished(Fixture& f, const std::string& id) {
  for (int i = 0; i < 2000; ++i) {
    absl::StatusOr<Request> request = f.kms->GetRequest(f.officer, id);
    REQUIRE(request.ok());
    if (request->progress.empty()) return *request;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  FAIL("the root rotation's background work did not finish");
  return {};
}

std::string Progress(Fixture& f, const std::string& id) {
  absl::StatusOr<Request> request = f.kms->GetRequest(f.officer, id);
  REQUIRE(request.ok());
  return request->progress;
}

// Waits until GetRequest's progress for `id` contains `text`.
void AwaitProgress(Fixture& f, const std::string& id, const std::string& text) {
  for (int i = 0; i < 2000 && Progress(f, id).find(text) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK_THAT(Progress(f, id), Catch::Contains(text));
}

// Holds the background work inside its next re-wrap until released.
struct RewrapGate {
  explicit RewrapGate(Fixture& f) {
    f.hsm->BeforeNextCallTo("RewrapKey", [this] {
      entered.set_value();
      released.wait();
    });
  }
  void AwaitEntered() { entered.get_future().wait(); }
  void Release() { release.set_value(); }

  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
};

constexpr char kMovingTwo[] =
    "root key rotated from 'legacy-root' to 'legacy-root.2'; 2 key versions under legacy roots "
    "are being re-wrapped under it in the background; 0 stay under the confining roots that "
    "wrapped them";
constexpr char kMovedTwo[] =
    "root key rotated from 'legacy-root' to 'legacy-root.2'; 2 key versions re-wrapped from "
    "legacy roots; 0 stay under the confining roots that wrapped them";

TEST_CASE(
    "A root rotation moves every version off a legacy root in the background, officers served "
    "meanwhile, and destroys it",
    "[rotation][root]") {
  Fixture f;
  StartOnLegacyRoot(f);
  const KeyRef a = f.NewKey("a");
  const KeyRef b = f.NewKey("b");
  REQUIRE(a->versions[0].root_key_label == "legacy-root");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "a");
  REQUIRE(sealed.ok());

  RewrapGate gate(f);  // the background work is held inside its first re-wrap
  absl::StatusOr<Request> done = RotateRoot(f);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
  CHECK(done->reason == kMovingTwo);
  CHECK_THAT(done->progress,
             Catch::StartsWith("re-wrapping key versions off legacy roots under 'legacy-root.2'"));
  gate.AwaitEntered();
  CHECK(Progress(f, done->id) ==
        "re-wrapping key versions off legacy roots under 'legacy-root.2': 0 of 2 done");
  CHECK(f.store->GetSetting(kRootKeySetting)->value_or("") == "legacy-root.2");

  // Meanwhile: new keys go under the new root, requests execute, maintenance runs, blobs
  // decrypt; a second root rotation waits for this one.
  const KeyRef c = f.NewKey("c");
  CHECK(c->versions[0].root_key_label == "legacy-root.2");
  CHECK(f.kms->RunMaintenance().ok());
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  Proposal again;
  again.operation = Operation::kRotateRootKey;
  again.justification = "another";
  absl::StatusOr<Request> refused = f.kms->Propose(f.officer, again);
  CHECK(absl::IsFailedPrecondition(refused.status()));
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("still re-wrapping"));

  gate.Release();
  const Request finished = Finished(f, done->id);
  CHECK(finished.reason == kMovedTwo);
  for (const KeyRef& key : {a, b}) {
    const KeyRef now = *f.store->GetKey(key->id);
    CHECK(now->versions[0].root_key_label == "legacy-root.2");
    CHECK(now->versions[0].wrapped != key->versions[0].wrapped);
  }
  CHECK((*f.store->GetKey(c->id))->versions[0].wrapped == c->versions[0].wrapped);
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("legacy-root")));
  CHECK(*f.hsm->RootKeyConfinesVersions("legacy-root.2"));
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == "[]");
  CHECK(f.store->GetSetting(kRootMigrationSetting)->value_or("x").empty());
  CHECK(Count(f, "RootMigrationStarted", "2 versions to re-wrap under legacy-root.2") == 1);
  CHECK(Count(f, "RewrapKeyVersions",
              "1 versions re-wrapped from a legacy root under legacy-root.2") == 2);  // per key
  CHECK(Count(f, "RootRotationFinished", kMovedTwo) == 1);
  CHECK(Count(f, "RootMigrationDone", "nothing left to re-wrap") == 1);
  CHECK(Count(f, "DestroyRootKey", "root legacy-root") == 1);
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
}

TEST_CASE("A key rotated while its versions are re-wrapped keeps its new version",
          "[rotation][root]") {
  Fixture f;
  StartOnLegacyRoot(f);
  const KeyRef a = f.NewKey("a");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "a");
  REQUIRE(sealed.ok());
  RewrapGate gate(f);
  absl::StatusOr<Request> done = RotateRoot(f);
  REQUIRE(done.ok());
  gate.AwaitEntered();
  // Version 1 is being re-wrapped; an officer rotation adds version 2 (under the new root).
  Proposal rotate;
  rotate.operation = Operation::kRotateKey;
  rotate.key = "a";
  rotate.justification = "scheduled";
  absl::StatusOr<Request> proposed = f.kms->Propose(f.officer, rotate);
  REQUIRE(proposed.ok());
  REQUIRE(f.kms->Approve(f.officer2, proposed->id, RequestDigest(*proposed)).ok());
  REQUIRE(f.kms->Approve(f.officer3, proposed->id, RequestDigest(*proposed)).ok());
  const KeyRef rotated = *f.store->GetKey(a->id);
  REQUIRE(rotated->versions.size() == 2);
  gate.Release();
  CHECK(Finished(f, done->id).reason ==
        "root key rotated from 'legacy-root' to 'legacy-root.2'; 1 key versions re-wrapped from "
        "legacy roots; 0 stay under the confining roots that wrapped them");
  const KeyRef now = *f.store->GetKey(a->id);
  REQUIRE(now->versions.size() == 2);
  CHECK(now->primary_version == 2);
  CHECK(now->versions[0].root_key_label == "legacy-root.2");
  CHECK(now->versions[0].wrapped != a->versions[0].wrapped);
  CHECK(now->versions[1].wrapped == rotated->versions[1].wrapped);
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
  CHECK(Encrypt(f, "a").ok());
}

TEST_CASE("An HSM outage during re-wrapping is waited out; a restart resumes the work",
          "[rotation][root]") {
  Fixture f;
  StartOnLegacyRoot(f);
  const KeyRef a = f.NewKey("a");
  f.NewKey("b");
  absl::StatusOr<Ciphertext> sealed = Encrypt(f, "a");
  REQUIRE(sealed.ok());
  f.hsm->BeforeNextCallTo("RewrapKey", [&] { f.hsm->SetDown(true); });
  absl::StatusOr<Request> done = RotateRoot(f);
  REQUIRE(done.ok());
  CHECK(done->reason == kMovingTwo);
  AwaitProgress(f, done->id, "0 of 2 done; waiting: HSM is down (FaultyHsm)");

  SECTION("the HSM returns") {
    f.hsm->SetDown(false);
    CHECK(Finished(f, done->id).reason == kMovedTwo);
  }
  SECTION("custosd stops meanwhile, and starts again") {
    f.Restart();  // stops the background work, mid-pause
    f.hsm->SetDown(false);
    CHECK(Progress(f, done->id) ==
          "re-wrapping key versions off legacy roots under 'legacy-root.2': paused; the next "
          "maintenance turn resumes it");
    CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
    REQUIRE(f.kms->RunMaintenance().ok());  // resumes it
    CHECK(Finished(f, done->id).reason == kMovedTwo);
  }
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("legacy-root")));
  CHECK((*f.store->GetKey(a->id))->versions[0].root_key_label == "legacy-root.2");
  CHECK(Count(f, "RootRotationFinished", kMovedTwo) == 1);
  CHECK(f.kms->Decrypt(f.app, sealed->ciphertext_blob, {}).ok());
}

TEST_CASE("A retired root that cannot be destroyed now is retried by maintenance",
          "[rotation][root]") {
  Fixture f;
  StartOnLegacyRoot(f);
  f.NewKey("a");
  // The HSM goes away just as the re-wrapping is done and turns to the old root.
  f.hsm->BeforeNextCallTo("DestroyRootKey", [&] { f.hsm->SetDown(true); });
  absl::StatusOr<Request> done = RotateRoot(f);
  REQUIRE(done.ok());
  CHECK_THAT(Finished(f, done->id).reason, Catch::Contains("1 key versions re-wrapped"));
  f.hsm->SetDown(false);
  CHECK(f.hsm->CheckRootKey("legacy-root").ok());  // not destroyed yet...
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["legacy-root"])");
  REQUIRE(f.kms->RunMaintenance().ok());  // ...but at the next turn
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("legacy-root")));
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == "[]");
}

TEST_CASE("A retired root the HSM will not destroy holds up no other maintenance or rotation",
          "[rotation][root]") {
  Fixture f;
  f.NewKey("a");
  REQUIRE(RotateRoot(f).ok());
  f.NewKey("c");  // under custos-root.2
  Proposal schedule;
  schedule.operation = Operation::kScheduleKeyDeletion;
  schedule.key = "a";
  schedule.justification = "leave the old root nothing to wrap";
  absl::StatusOr<Request> scheduled = f.kms->Propose(f.officer, schedule);
  REQUIRE(scheduled.ok());
  REQUIRE(f.kms->Approve(f.officer2, scheduled->id, RequestDigest(*scheduled)).ok());
  REQUIRE(f.kms->Approve(f.officer3, scheduled->id, RequestDigest(*scheduled)).ok());
  f.clock.Advance(30 * policy::kDay);
  REQUIRE(f.kms->RunMaintenance().ok());  // destroys a: custos-root now wraps nothing
  // A request that falls due in the same turn as the root's destruction fails.
  Proposal rotate;
  rotate.operation = Operation::kRotateKey;
  rotate.key = "c";
  rotate.justification = "left to expire";
  const absl::StatusOr<Request> waiting = f.kms->Propose(f.officer, rotate);
  REQUIRE(waiting.ok());
  f.clock.Advance(2 * policy::kDay);
  const auto refuse_destruction = [&f] {
    f.hsm->BeforeNextCallTo("DestroyRootKey", [&f] {
      f.hsm->FailNext(1, absl::InternalError("CKR_ACTION_PROHIBITED"));
    });
  };
  refuse_destruction();
  const absl::Status turn = f.kms->RunMaintenance();
  CHECK(absl::IsInternal(turn));                                             // reported...
  CHECK(f.store->GetRequest(waiting->id)->state == RequestState::kExpired);  // ...after the rest
  CHECK(f.hsm->CheckRootKey("custos-root").ok());
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["custos-root"])");
  // Nor is the next root rotation refused for it; once committed, the rotation tries again.
  refuse_destruction();
  absl::StatusOr<Request> rotated = RotateRoot(f);
  INFO(rotated.status().ToString());
  REQUIRE(rotated.ok());
  CHECK(rotated->state == RequestState::kExecuted);
  CHECK(absl::IsFailedPrecondition(f.hsm->CheckRootKey("custos-root")));
  CHECK(Count(f, "DestroyRootKey", "root custos-root") == 1);
  // The root c's version needs stays.
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.hsm->CheckRootKey("custos-root.2").ok());
  CHECK(f.store->GetSetting(kRetiredRootsSetting)->value_or("") == R"(["custos-root.2"])");
}

}  // namespace
}  // namespace custos::core
