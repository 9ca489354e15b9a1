// Dual control and key lifecycle over the real HSM and store, with a manual clock so expiry
// and waiting periods are tested without sleeping.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <future>

#include "core/operation_params.h"
#include "hsm/ck_error.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/sqlite_file.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::KeyState;
using storage::RequestState;
using testing::Fixture;

Proposal Propose(Operation operation, const std::string& key) {
  Proposal proposal;
  proposal.operation = operation;
  proposal.key = key;
  proposal.justification = "quarterly rotation, ticket SEC-42";
  return proposal;
}

// The digest an approver reviews, read back from the store.
std::string DigestOf(Fixture& f, const std::string& id) {
  return RequestDigest(*f.store->GetRequest(id));
}

// Proposes as officer and approves as officer2 and officer3; REQUIREs execution.
Request Execute(Fixture& f, const Proposal& proposal) {
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, proposal);
  INFO(request.status().ToString());
  REQUIRE(request.ok());
  REQUIRE(f.kms->Approve(f.officer2, request->id, DigestOf(f, request->id)).ok());
  absl::StatusOr<Request> done = f.kms->Approve(f.officer3, request->id, DigestOf(f, request->id));
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  REQUIRE(done->state == RequestState::kExecuted);
  return *done;
}

Bytes Blob(Fixture& f, const std::string& key) {
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, key, {}, 32, true);
  REQUIRE(dk.ok());
  return dk->ciphertext_blob;
}

TEST_CASE("Direct key creations run side by side, not one at a time", "[requests]") {
  Fixture f;
  auto create = [&](const std::string& alias) {
    CreateKeyParams params;
    params.alias = alias;
    return f.kms->CreateKey(f.officer, params);
  };
  std::future<absl::StatusOr<KeyRef>> second;
  bool overlapped = false;
  // The first creation's first HSM call (generating its version) holds it inside the HSM
  // until a second creation has completed, or 5 s.
  f.hsm->BeforeNextCall([&] {
    second = std::async(std::launch::async, [&] { return create("side-by-side-2"); });
    overlapped = second.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  });
  const absl::StatusOr<KeyRef> first = create("side-by-side-1");
  CHECK(overlapped);
  REQUIRE(first.ok());
  const absl::StatusOr<KeyRef> other = second.get();
  REQUIRE(other.ok());
  CHECK((*first)->id != (*other)->id);
  // A taken alias is still refused when two creations race for it.
  CHECK(absl::IsAlreadyExists(create("side-by-side-1").status()));
}

TEST_CASE("A change inside the HSM holds up changes to its own key only", "[requests]") {
  Fixture f;
  const KeyRef held_key = f.NewKey("held");
  const KeyRef other_key = f.NewKey("other");
  absl::StatusOr<Request> held = f.kms->Propose(f.officer, Propose(Operation::kRotateKey, "held"));
  REQUIRE(held.ok());
  REQUIRE(f.kms->Approve(f.officer2, held->id, DigestOf(f, held->id)).ok());
  // The last approval executes the rotation: its new version is made in the HSM, where this
  // holds it until a whole rotation of the other key has been proposed, approved and executed
  // (or 5 s), and a proposal for the held key has waited 300 ms.
  std::future<Request> other;
  std::future<absl::StatusOr<Request>> same_key;
  bool other_done = false;
  bool same_key_waited = false;
  f.hsm->BeforeNextCallTo("GenerateWrappedKey", [&] {
    other = std::async(std::launch::async,
                       [&] { return Execute(f, Propose(Operation::kRotateKey, "other")); });
    other_done = other.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
    same_key = std::async(std::launch::async, [&] {
      return f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "held"));
    });
    same_key_waited =
        same_key.wait_for(std::chrono::milliseconds(300)) == std::future_status::timeout;
  });
  absl::StatusOr<Request> executed = f.kms->Approve(f.officer3, held->id, DigestOf(f, held->id));
  CHECK(other_done);
  CHECK(same_key_waited);
  REQUIRE(executed.ok());
  CHECK(executed->state == RequestState::kExecuted);
  CHECK(other.get().state == RequestState::kExecuted);
  // The proposal for the held key went on after the rotation, against the key as it was then.
  absl::StatusOr<Request> after = same_key.get();
  REQUIRE(after.ok());
  CHECK(after->state == RequestState::kPending);
  CHECK((*f.store->GetKey(held_key->id))->primary_version == 2);
  CHECK((*f.store->GetKey(other_key->id))->primary_version == 2);
}

TEST_CASE("Maintenance inside the HSM for one key holds up no officer change to another",
          "[requests][rotation]") {
  Fixture f;
  CreateKeyParams params;
  params.alias = "periodic";
  params.rotation_period_days = 90;
  const absl::StatusOr<KeyRef> periodic = f.kms->CreateKey(f.officer, params);
  REQUIRE(periodic.ok());
  const KeyRef other_key = f.NewKey("other");
  f.clock.Advance(90 * policy::kDay);
  std::future<Request> other;
  bool other_done = false;
  f.hsm->BeforeNextCallTo("GenerateWrappedKey", [&] {
    other = std::async(std::launch::async,
                       [&] { return Execute(f, Propose(Operation::kRotateKey, "other")); });
    other_done = other.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  });
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(other_done);
  CHECK(other.get().state == RequestState::kExecuted);
  CHECK((*f.store->GetKey((*periodic)->id))->primary_version == 2);
  CHECK((*f.store->GetKey(other_key->id))->primary_version == 2);
}

TEST_CASE("A rotation executes exactly when two other officers approved it", "[requests]") {
  Fixture f;
  const KeyRef key = f.NewKey("orders");
  const Bytes old_blob = Blob(f, "orders");

  absl::StatusOr<Request> proposed =
      f.kms->Propose(f.officer, Propose(Operation::kRotateKey, "orders"));
  REQUIRE(proposed.ok());
  CHECK(proposed->state == RequestState::kPending);
  CHECK(proposed->key_id == key->id);
  CHECK(proposed->proposer == testing::kOfficer);
  CHECK(proposed->expires_at == f.clock.NowSeconds() + 24 * 3600);

  absl::StatusOr<Request> one = f.kms->Approve(f.officer2, proposed->id, RequestDigest(*proposed));
  REQUIRE(one.ok());
  CHECK(one->state == RequestState::kPending);
  CHECK((*f.store->GetKey(key->id))->primary_version == 1);

  absl::StatusOr<Request> two = f.kms->Approve(f.officer3, proposed->id, DigestOf(f, proposed->id));
  REQUIRE(two.ok());
  CHECK(two->state == RequestState::kExecuted);
  REQUIRE(two->approvals.size() == 2);
  CHECK(two->approvals[0].principal == testing::kOfficer2);
  CHECK(two->approvals[1].principal == testing::kOfficer3);
  CHECK(two->reason == "RotateKey executed; key " + key->id + " is ENABLED, primary version 2");
  const KeyRef rotated = *f.store->GetKey(key->id);
  CHECK(rotated->primary_version == 2);
  CHECK(rotated->versions.size() == 2);

  // New data keys use version 2; version 1 still decrypts.
  absl::StatusOr<DataKey> fresh = f.kms->GenerateDataKey(f.app, "orders", {}, 32, true);
  REQUIRE(fresh.ok());
  CHECK(fresh->key_version == 2);
  CHECK(f.kms->Decrypt(f.app, old_blob, {}).ok());

  // Executed: it accepts nothing more, and a further approval executes nothing again.
  absl::StatusOr<Request> again =
      f.kms->Approve(f.officer3, proposed->id, DigestOf(f, proposed->id));
  CHECK(absl::IsFailedPrecondition(again.status()));
  CHECK(again.status().message() == "request " + proposed->id +
                                        " is EXECUTED; only PENDING requests accept approvals "
                                        "or rejections");
  CHECK((*f.store->GetKey(key->id))->primary_version == 2);
}

TEST_CASE("The proposer cannot approve, and an approval counts once", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));

  absl::StatusOr<Request> self = f.kms->Approve(f.officer, request.id, DigestOf(f, request.id));
  CHECK(absl::IsPermissionDenied(self.status()));
  CHECK(self.status().message() ==
        "the proposer of request " + request.id + " cannot approve it; another officer must");
  CHECK(f.store->GetRequest(request.id)->approvals.empty());

  REQUIRE(f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id)).ok());
  absl::StatusOr<Request> retried = f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id));
  REQUIRE(retried.ok());
  CHECK(retried->state == RequestState::kPending);
  CHECK(retried->approvals.size() == 1);
  CHECK((*f.store->FindKeyByAlias("k"))->state == KeyState::kEnabled);
}

TEST_CASE("A request expires and then accepts nothing", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  REQUIRE(f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id)).ok());
  f.clock.Advance(24 * 3600);

  absl::StatusOr<Request> late = f.kms->Approve(f.officer3, request.id, DigestOf(f, request.id));
  CHECK(absl::IsFailedPrecondition(late.status()));
  CHECK(late.status().message() == "request " + request.id +
                                       " is EXPIRED; only PENDING requests accept approvals or "
                                       "rejections");
  CHECK(f.store->GetRequest(request.id)->state == RequestState::kExpired);
  CHECK(absl::IsFailedPrecondition(f.kms->Reject(f.officer3, request.id, "too late").status()));
  CHECK((*f.store->FindKeyByAlias("k"))->state == KeyState::kEnabled);
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::any_of(events.begin(), events.end(), [&](const audit::Event& e) {
    return e.action == "ExpireRequest" && e.request_id == request.id;
  }));
}

TEST_CASE("Maintenance expires requests nobody touches", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  f.clock.Advance(24 * 3600 - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.store->GetRequest(request.id)->state == RequestState::kPending);
  f.clock.Advance(1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.store->GetRequest(request.id)->state == RequestState::kExpired);
}

TEST_CASE("A wall clock stepped back reopens no expired request", "[requests][clock]") {
  Fixture f;
  f.NewKey("k");
  f.NewKey("k2");
  const Request asked = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  const Request waiting = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k2"));
  f.clock.Advance(24 * 3600);        // their day is over
  f.clock.StepWallClock(-2 * 3600);  // and someone sets the clock two hours back

  absl::StatusOr<Request> late = f.kms->Approve(f.officer2, asked.id, DigestOf(f, asked.id));
  CHECK(absl::IsFailedPrecondition(late.status()));
  CHECK(f.store->GetRequest(asked.id)->state == RequestState::kExpired);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.store->GetRequest(waiting.id)->state == RequestState::kExpired);

  // A request proposed now still has its whole day, by the time this server has seen pass.
  absl::StatusOr<Request> proposed =
      f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  INFO(proposed.status().ToString());
  REQUIRE(proposed.ok());
  const Request fresh = *std::move(proposed);
  f.clock.Advance(24 * 3600 - 1);
  REQUIRE(f.kms->Approve(f.officer2, fresh.id, DigestOf(f, fresh.id)).ok());
  CHECK(f.store->GetRequest(fresh.id)->state == RequestState::kPending);
  f.clock.Advance(1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.store->GetRequest(fresh.id)->state == RequestState::kExpired);
}

TEST_CASE("A request proposed while the wall clock ran ahead lives its day, not more",
          "[requests][clock]") {
  Fixture f;
  f.NewKey("k");
  f.clock.StepWallClock(2 * 3600);  // two hours ahead
  const Request asked = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  f.clock.StepWallClock(-2 * 3600);  // and set right
  f.clock.Advance(24 * 3600 - 1);
  REQUIRE(f.kms->Approve(f.officer2, asked.id, DigestOf(f, asked.id)).ok());
  f.clock.Advance(1);  // a day since it was proposed, by any clock
  absl::StatusOr<Request> late = f.kms->Approve(f.officer3, asked.id, DigestOf(f, asked.id));
  INFO(late.status().ToString());
  CHECK(absl::IsFailedPrecondition(late.status()));
  CHECK(f.store->GetRequest(asked.id)->state == RequestState::kExpired);
}

TEST_CASE("A rejected request accepts nothing, and approvals do not carry over", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request first = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  REQUIRE(f.kms->Approve(f.officer2, first.id, DigestOf(f, first.id)).ok());
  absl::StatusOr<Request> rejected = f.kms->Reject(f.officer3, first.id, "not during month end");
  REQUIRE(rejected.ok());
  CHECK(rejected->state == RequestState::kRejected);
  CHECK(rejected->rejected_by == testing::kOfficer3);
  CHECK(rejected->reason == "not during month end");
  CHECK(absl::IsFailedPrecondition(
      f.kms->Approve(f.officer3, first.id, DigestOf(f, first.id)).status()));

  // A fresh request for the same change starts from zero approvals.
  const Request second = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  REQUIRE(f.kms->Approve(f.officer3, second.id, DigestOf(f, second.id)).ok());
  CHECK(f.store->GetRequest(second.id)->approvals.size() == 1);
  CHECK((*f.store->FindKeyByAlias("k"))->state == KeyState::kEnabled);
}

TEST_CASE("An approval is bound to the request as reviewed", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  Request other = request;
  other.operation = "RotateKey";
  absl::StatusOr<Request> approved = f.kms->Approve(f.officer2, request.id, RequestDigest(other));
  CHECK(absl::IsFailedPrecondition(approved.status()));
  CHECK(approved.status().message() ==
        "request " + request.id +
            " is not the request you reviewed (digest mismatch); fetch it again and review it "
            "before approving");
  CHECK(f.store->GetRequest(request.id)->approvals.empty());
  absl::StatusOr<Request> blind = f.kms->Approve(f.officer2, request.id, "");
  CHECK(absl::IsInvalidArgument(blind.status()));
  CHECK(blind.status().message() ==
        "an approval must name the digest of the request as reviewed (GetRequest shows it)");
  CHECK(f.store->GetRequest(request.id)->approvals.empty());
}

TEST_CASE("Conflicting requests for one key are refused at proposal", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request rotate = *f.kms->Propose(f.officer, Propose(Operation::kRotateKey, "k"));
  for (Operation operation : {Operation::kRotateKey, Operation::kScheduleKeyDeletion}) {
    absl::StatusOr<Request> second = f.kms->Propose(f.officer2, Propose(operation, "k"));
    CHECK(absl::IsFailedPrecondition(second.status()));
    CHECK(second.status().message() == "key " + rotate.key_id + " already has pending request " +
                                           rotate.id +
                                           " (RotateKey); approve, reject or let it expire first");
    CHECK(f.sink.events().back().request_id.empty());  // none was stored
  }
  // Once the first has expired, the key takes a new request.
  f.clock.Advance(24 * 3600);
  CHECK(f.kms->Propose(f.officer2, Propose(Operation::kScheduleKeyDeletion, "k")).ok());
  CHECK(f.store->GetRequest(rotate.id)->state == RequestState::kExpired);
}

TEST_CASE("A pending new key's alias takes no second request and no direct creation",
          "[requests]") {
  Fixture f;
  Proposal create = Propose(Operation::kCreateKey, "");
  create.params.create.alias = "granted";
  create.params.create.encrypt_principals = {testing::kApp};  // two approvals: it waits
  const Request first = *f.kms->Propose(f.officer, create);
  REQUIRE(first.state == RequestState::kPending);
  absl::StatusOr<Request> second = f.kms->Propose(f.officer2, create);
  CHECK(absl::IsFailedPrecondition(second.status()));
  CHECK(second.status().message() == "alias 'granted' already has pending request " + first.id +
                                         " (CreateKey); approve, reject or let it expire first");
  CHECK(f.store->PendingRequests()->size() == 1);
  // Its record names no request: none was stored.
  const audit::Event refused = f.sink.events().back();
  CHECK(refused.action == "Propose");
  CHECK(refused.outcome == absl::StatusCode::kFailedPrecondition);
  CHECK(refused.request_id.empty());
  // Another alias, or none, is another key.
  create.params.create.alias = "other";
  CHECK(f.kms->Propose(f.officer2, create).ok());
  create.params.create.alias = "";
  CHECK(f.kms->Propose(f.officer2, create).ok());
  CHECK(f.kms->Propose(f.officer2, create).ok());
  // Nor does a key created directly, without grants, take the alias from under the request
  // (which would then fail at its quorum).
  CreateKeyParams direct;
  direct.alias = "granted";
  const size_t events = f.sink.events().size();
  const absl::StatusOr<KeyRef> taken = f.kms->CreateKey(f.officer2, direct);
  CHECK(absl::IsFailedPrecondition(taken.status()));
  CHECK(taken.status().message() == "alias 'granted' already has pending request " + first.id +
                                        " (CreateKey); approve, reject or let it expire first");
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("granted").status()));
  REQUIRE(f.sink.events().size() == events + 1);
  CHECK(f.sink.events().back().action == "CreateKey");
  CHECK(f.sink.events().back().outcome == absl::StatusCode::kFailedPrecondition);
  CHECK(f.sink.events().back().key_id.empty());
  // Once the first is rejected, the alias takes a new request.
  REQUIRE(f.kms->Reject(f.officer2, first.id, "wrong grants").ok());
  create.params.create.alias = "granted";
  const absl::StatusOr<Request> again = f.kms->Propose(f.officer2, create);
  REQUIRE(again.ok());
  CHECK(f.sink.events().back().request_id == again->id);
  // Once that one has expired, a direct creation takes the alias, and expires it on the way.
  f.clock.Advance(int64_t{24} * 3600);
  const absl::StatusOr<KeyRef> created = f.kms->CreateKey(f.officer2, direct);
  INFO(created.status().ToString());
  REQUIRE(created.ok());
  CHECK((*created)->alias == "granted");
  CHECK(f.store->GetRequest(again->id)->state == RequestState::kExpired);
  // The expired request stays expired: it cannot execute onto the alias now taken.
  CHECK(absl::IsFailedPrecondition(
      f.kms->Approve(f.officer3, again->id, DigestOf(f, again->id)).status()));
}

TEST_CASE("A direct creation that cannot read the pending requests creates nothing", "[requests]") {
  Fixture f;
  Proposal create = Propose(Operation::kCreateKey, "");
  create.params.create.alias = "granted";
  create.params.create.encrypt_principals = {testing::kApp};  // two approvals: it waits
  const Request pending = *f.kms->Propose(f.officer, create);
  REQUIRE(pending.state == RequestState::kPending);
  CreateKeyParams direct;
  direct.alias = "granted";
  // The pending request's row cannot be checked: the catalogue key is out of reach.
  const int64_t hsm_calls = f.hsm->calls();
  f.catalog_hsm->SetDown(true);
  const absl::StatusOr<KeyRef> refused = f.kms->CreateKey(f.officer2, direct);
  f.catalog_hsm->SetDown(false);
  INFO(refused.status().ToString());
  CHECK(absl::IsUnavailable(refused.status()));
  CHECK(f.hsm->calls() == hsm_calls);  // no key version was made
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("granted").status()));
  const audit::Event record = f.sink.events().back();
  CHECK(record.action == "CreateKey");
  CHECK(record.outcome == absl::StatusCode::kUnavailable);
  CHECK(record.key_id.empty());
  // Once the key is back, the pending request is found again.
  CHECK(absl::IsFailedPrecondition(f.kms->CreateKey(f.officer2, direct).status()));
  CHECK(f.store->GetRequest(pending.id)->state == RequestState::kPending);
}

TEST_CASE("A proposal executed at once that cannot execute names no request in its record",
          "[requests]") {
  Fixture f;
  Proposal create = Propose(Operation::kCreateKey, "");  // without grants: no approval needed
  create.params.create.alias = "unreached";
  const auto last_proposal = [&f] {
    const std::vector<audit::Event> events = f.sink.events();
    const auto found = std::find_if(events.rbegin(), events.rend(),
                                    [](const audit::Event& e) { return e.action == "Propose"; });
    REQUIRE(found != events.rend());
    return *found;
  };
  // Inside its execution: the new key's version cannot be made.
  f.hsm->FailNext(1, absl::UnavailableError("the HSM is unplugged"));
  const absl::StatusOr<Request> failed = f.kms->Propose(f.officer, create);
  CHECK(absl::IsUnavailable(failed.status()));
  CHECK(f.hsm->calls() >= 1);
  const audit::Event refused = last_proposal();
  CHECK(refused.outcome == absl::StatusCode::kUnavailable);
  CHECK(refused.request_id.empty());
  CHECK(refused.key_id.empty());
  CHECK(f.store->PendingRequests()->empty());
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("unreached").status()));
  // Once the HSM answers, it executes, and its record names the request it stored.
  const absl::StatusOr<Request> done = f.kms->Propose(f.officer, create);
  INFO(done.status().ToString());
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
  CHECK(last_proposal().request_id == done->id);
  CHECK(f.store->GetRequest(done->id)->state == RequestState::kExecuted);
}

TEST_CASE("Apps and auditors cannot propose, approve or reject", "[requests][authz]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  for (const Caller* who : {&f.app, &f.auditor}) {
    CHECK(absl::IsPermissionDenied(
        f.kms->Propose(*who, Propose(Operation::kRotateKey, "k")).status()));
    CHECK(absl::IsPermissionDenied(f.kms->Approve(*who, request.id, "").status()));
    CHECK(absl::IsPermissionDenied(f.kms->Reject(*who, request.id, "no").status()));
    CHECK(absl::IsPermissionDenied(f.kms->GetRequest(*who, request.id).status()));
  }
  const Request stored = *f.store->GetRequest(request.id);
  CHECK(stored.state == RequestState::kPending);
  CHECK(stored.approvals.empty());
}

TEST_CASE("A refused approval, rejection or read names its request in the audit record",
          "[requests][authz]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  const auto last = [&f] { return f.sink.events().back(); };
  // Refused before the request is read: who tried what on which request shows in the log.
  CHECK(absl::IsPermissionDenied(f.kms->Approve(f.app, request.id, "").status()));
  CHECK((last().action == "Approve" && last().request_id == request.id));
  CHECK(absl::IsPermissionDenied(f.kms->Reject(f.auditor, request.id, "no").status()));
  CHECK((last().action == "Reject" && last().request_id == request.id));
  CHECK(absl::IsPermissionDenied(f.kms->GetRequest(f.app, request.id).status()));
  CHECK((last().action == "GetRequest" && last().request_id == request.id));
  CHECK(f.kms->Reject(f.officer2, request.id, "").status().message() ==
        "a rejection needs a reason");
  CHECK((last().action == "Reject" && last().request_id == request.id &&
         last().outcome == absl::StatusCode::kInvalidArgument));
  // What is not a request id is refused as such, and not written to the log, whatever its
  // size.
  const std::string not_an_id =
      "request_id is not a request id: Propose returns them as lower-case UUIDs";
  const std::string junk(4096, 'x');
  const absl::Status rejected = f.kms->Reject(f.officer2, junk, "no").status();
  CHECK((absl::IsInvalidArgument(rejected) && rejected.message() == not_an_id));
  CHECK((last().action == "Reject" && last().request_id.empty()));
  const absl::Status approved = f.kms->Approve(f.officer2, junk, "00").status();
  CHECK((absl::IsInvalidArgument(approved) && approved.message() == not_an_id));
  CHECK((last().action == "Approve" && last().request_id.empty()));
  const absl::Status got = f.kms->GetRequest(f.officer2, junk).status();
  CHECK((absl::IsInvalidArgument(got) && got.message() == not_an_id));
  CHECK((last().action == "GetRequest" && last().request_id.empty()));
  CHECK(absl::IsInvalidArgument(f.kms->GetRequest(f.officer2, "").status()));
  // Nor is an id in another case: lookups match only the canonical form.
  std::string upper = request.id;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  REQUIRE(upper != request.id);
  const absl::Status got_upper = f.kms->GetRequest(f.officer2, upper).status();
  CHECK((absl::IsInvalidArgument(got_upper) && got_upper.message() == not_an_id));
  CHECK((last().action == "GetRequest" && last().request_id.empty()));
  CHECK(f.store->GetRequest(request.id)->state == RequestState::kPending);
}

TEST_CASE("Unknown requests are NOT_FOUND; bad proposals are refused", "[requests]") {
  Fixture f;
  f.NewKey("k");
  CHECK(absl::IsNotFound(
      f.kms->Approve(f.officer2, "0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00", "00").status()));
  // An approval without a digest is refused as such, before any lookup.
  CHECK(absl::IsInvalidArgument(
      f.kms->Approve(f.officer2, "0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00", "").status()));
  CHECK(
      absl::IsNotFound(f.kms->Propose(f.officer, Propose(Operation::kRotateKey, "nope")).status()));
  Proposal unjustified = Propose(Operation::kRotateKey, "k");
  unjustified.justification.clear();
  CHECK(f.kms->Propose(f.officer, unjustified).status().message() ==
        "a proposal needs a justification for the approvers");
  CHECK(f.kms->Propose(f.officer, Propose(Operation::kEnableKey, "k")).status().message() ==
        "EnableKey needs key " + (*f.store->FindKeyByAlias("k"))->id +
            " to be DISABLED; it is ENABLED");
  Proposal short_wait = Propose(Operation::kScheduleKeyDeletion, "k");
  short_wait.params.deletion_waiting_days = 6;
  CHECK(absl::IsInvalidArgument(f.kms->Propose(f.officer, short_wait).status()));
}

TEST_CASE("A proposal carrying a parameter its operation does not use is refused, naming it",
          "[requests]") {
  Fixture f;
  f.NewKey("k");
  // Each would have been stored without the field: officers would approve, and the server
  // execute, something other than what the proposer asked for.
  struct Case {
    Proposal proposal;
    std::string field;
  };
  std::vector<Case> cases;
  Proposal rotate = Propose(Operation::kRotateKey, "k");
  rotate.params.deletion_waiting_days = 30;
  cases.push_back({rotate, "deletion_waiting_days"});
  Proposal disable = Propose(Operation::kDisableKey, "k");
  disable.params.decrypt_principals = {"app/other"};
  cases.push_back({disable, "decrypt_principals"});
  Proposal grants = Propose(Operation::kUpdateKeyGrants, "k");
  grants.params.min_decrypt_version = 2;
  cases.push_back({grants, "min_decrypt_version"});
  Proposal schedule = Propose(Operation::kScheduleKeyDeletion, "k");
  schedule.params.create.alias = "other";
  cases.push_back({schedule, "create_key"});
  Proposal rotate_tde;
  rotate_tde.operation = Operation::kRotateTdeKey;
  rotate_tde.justification = "quarterly";
  rotate_tde.params.tde = {"db1", 1, "k"};  // the sealing key is CreateTdeKey's only
  cases.push_back({rotate_tde, "tde_key.key"});
  Proposal root = Propose(Operation::kRotateRootKey, "");
  root.params.archive_through = 5;
  cases.push_back({root, "archive_through"});
  Proposal archive = Propose(Operation::kArchiveAuditLog, "");
  archive.params.archive_through = 1;
  archive.params.token_id = "10000000-0000-4000-8000-000000000001";
  cases.push_back({archive, "token_id"});
  Proposal revoke = Propose(Operation::kRevokeDatabaseToken, "");
  revoke.params.token_id = "10000000-0000-4000-8000-000000000001";
  revoke.params.token.principal = "db/emr";
  cases.push_back({revoke, "database_token"});
  Proposal issue = Propose(Operation::kIssueDatabaseToken, "");
  issue.params.token = {"db/emr", "emr", {1}, 30};
  issue.params.tde.mount = "emr";
  cases.push_back({issue, "tde_key.mount"});
  Proposal root_with_key = Propose(Operation::kRotateRootKey, "k");
  cases.push_back({root_with_key, "key"});
  Proposal create = Propose(Operation::kCreateKey, "k");
  create.params.create.alias = "new";
  cases.push_back({create, "key"});

  for (const Case& c : cases) {
    INFO(policy::OperationName(c.proposal.operation) << " with " << c.field);
    const size_t events = f.sink.events().size();
    const absl::Status refused = f.kms->Propose(f.officer, c.proposal).status();
    CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
    CHECK(refused.message() ==
          c.field + " does not apply to " +
              std::string(policy::OperationName(c.proposal.operation)) +
              ": the request would be stored, approved and executed without it");
    REQUIRE(f.sink.events().size() == events + 1);  // recorded
    CHECK(f.sink.events().back().outcome == absl::StatusCode::kInvalidArgument);
  }
  CHECK(f.store->PendingRequests()->empty());  // nothing was stored
  // The same proposals without the stray field are taken.
  rotate.params.deletion_waiting_days = 0;
  CHECK(f.kms->Propose(f.officer, rotate).ok());
}

TEST_CASE("A request state outside the enum is INVALID_ARGUMENT, and recorded", "[requests]") {
  Fixture f;
  storage::RequestFilter filter;
  filter.state = static_cast<storage::RequestState>(99);
  const absl::Status listed = f.kms->ListRequests(f.officer, filter, 10, "").status();
  CHECK(absl::IsInvalidArgument(listed));
  CHECK(listed.message() ==
        "state must be PENDING, EXECUTED, REJECTED, EXPIRED or FAILED (or unset, for all)");
  const audit::Event last = f.sink.events().back();
  CHECK(last.action == "ListRequests");
  CHECK(last.outcome == absl::StatusCode::kInvalidArgument);
  filter.state = storage::RequestState::kFailed;
  CHECK(f.kms->ListRequests(f.officer, filter, 10, "").ok());
}

TEST_CASE("Disable and enable gate every use of the key", "[lifecycle]") {
  Fixture f;
  f.NewKey("k");
  const Bytes blob = Blob(f, "k");
  Execute(f, Propose(Operation::kDisableKey, "k"));
  absl::StatusOr<Plaintext> refused = f.kms->Decrypt(f.app, blob, {});
  CHECK(absl::IsFailedPrecondition(refused.status()));
  CHECK_THAT(std::string(refused.status().message()),
             Catch::EndsWith("is DISABLED; only ENABLED keys can be used"));
  CHECK(absl::IsFailedPrecondition(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status()));
  Execute(f, Propose(Operation::kEnableKey, "k"));
  CHECK(f.kms->Decrypt(f.app, blob, {}).ok());
}

TEST_CASE("Deletion waits, can be cancelled, then crypto-shreds the key", "[lifecycle]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  const Bytes blob = Blob(f, "k");
  Proposal schedule = Propose(Operation::kScheduleKeyDeletion, "k");
  schedule.params.deletion_waiting_days = 7;
  Execute(f, schedule);
  KeyRef pending = *f.store->GetKey(key->id);
  CHECK(pending->state == KeyState::kPendingDeletion);
  CHECK(pending->deletion_due_at == f.clock.NowSeconds() + 7 * 24 * 3600);
  CHECK(absl::IsFailedPrecondition(f.kms->Decrypt(f.app, blob, {}).status()));

  Execute(f, Propose(Operation::kCancelKeyDeletion, "k"));
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kDisabled);
  Execute(f, Propose(Operation::kEnableKey, "k"));
  CHECK(f.kms->Decrypt(f.app, blob, {}).ok());

  Execute(f, Propose(Operation::kScheduleKeyDeletion, "k"));  // the default: 30 days
  f.clock.Advance(30 * 24 * 3600 - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kPendingDeletion);
  f.clock.Advance(1);
  REQUIRE(f.kms->RunMaintenance().ok());
  const KeyRef destroyed = *f.store->GetKey(key->id);
  CHECK(destroyed->state == KeyState::kDestroyed);
  CHECK(destroyed->destroyed_at == f.clock.NowSeconds());
  CHECK(destroyed->alias == "k");  // the metadata stays as a tombstone
  for (const storage::KeyVersion& v : destroyed->versions) CHECK(v.wrapped.empty());
  absl::StatusOr<Plaintext> gone = f.kms->Decrypt(f.app, blob, {});
  CHECK(absl::IsFailedPrecondition(gone.status()));
  CHECK_THAT(std::string(gone.status().message()), Catch::Contains("is DESTROYED"));
  const std::vector<audit::Event> events = f.sink.events();
  CHECK(std::any_of(events.begin(), events.end(), [&](const audit::Event& e) {
    return e.action == "DestroyKey" && e.key_id == key->id && e.principal == kServerPrincipal;
  }));
  // Nothing more can be proposed for a destroyed key.
  CHECK(absl::IsFailedPrecondition(
      f.kms->Propose(f.officer, Propose(Operation::kRotateKey, "k")).status()));
}

TEST_CASE("A WAL purge that fails after a destruction is retried until it succeeds, recorded",
          "[lifecycle][shred]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  Execute(f, Propose(Operation::kScheduleKeyDeletion, "k"));
  f.clock.Advance(30 * 24 * 3600);
  {
    // Another process checkpointing: the purge after the destruction cannot run now.
    const custos::testing::CheckpointLockHeld checkpointing(f.dir.File("custos.db"));
    CHECK(absl::IsUnavailable(f.kms->RunMaintenance()));
    CHECK((*f.store->GetKey(key->id))->state == KeyState::kDestroyed);
    CHECK(f.store->GetSetting(kPurgePendingSetting).value() == "1");
    CHECK(absl::IsUnavailable(f.kms->RunMaintenance()));  // retried, still held
  }
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(f.store->GetSetting(kPurgePendingSetting).value() == "0");
  REQUIRE(f.kms->RunMaintenance().ok());  // nothing pending: no attempt
  std::vector<std::string> attempts;
  for (const audit::Event& e : f.sink.events()) {
    if (e.action == "PurgePending") CHECK(e.key_id == key->id);
    if (e.action == "PurgeErasedMaterial") attempts.push_back(absl::StatusCodeToString(e.outcome));
  }
  CHECK(attempts == std::vector<std::string>{"UNAVAILABLE", "UNAVAILABLE", "OK"});
}

TEST_CASE("A wall clock stepped forward does not shred a key early", "[lifecycle][clock]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  Proposal schedule = Propose(Operation::kScheduleKeyDeletion, "k");
  schedule.params.deletion_waiting_days = 7;
  Execute(f, schedule);
  CHECK((*f.store->GetKey(key->id))->deletion_due_observed == 7 * 24 * 3600);

  // Someone sets the clock 8 days ahead: by the wall clock alone the key is overdue.
  f.clock.StepWallClock(8 * 24 * 3600);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kPendingDeletion);
  // ...and the jump is an alert: a log line and an audit record.
  std::vector<audit::Event> events = f.sink.events();
  const auto jump = std::find_if(events.begin(), events.end(),
                                 [](const audit::Event& e) { return e.action == "ClockJump"; });
  REQUIRE(jump != events.end());
  CHECK(jump->principal == kServerPrincipal);
  CHECK_THAT(jump->detail, Catch::StartsWith("the wall clock moved 691200 s against the time"));
  // Reported once, not at every turn.
  REQUIRE(f.kms->RunMaintenance().ok());
  events = f.sink.events();
  CHECK(std::count_if(events.begin(), events.end(),
                      [](const audit::Event& e) { return e.action == "ClockJump"; }) == 1);

  // Observed time persists across a restart; downtime does not count.
  f.clock.Advance(3 * 24 * 3600);
  REQUIRE(f.kms->RunMaintenance().ok());
  f.clock.StepWallClock(30 * 24 * 3600);  // a month switched off
  f.Start(*policy::Policy::Parse(testing::kPolicy), policy::DualControlConfig::Defaults(), {});
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kPendingDeletion);
  f.clock.Advance(4 * 24 * 3600 - 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kPendingDeletion);
  f.clock.Advance(1);  // 7 days observed in all
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK((*f.store->GetKey(key->id))->state == KeyState::kDestroyed);
}

// A jump was marked reported before its record was written: with the log unwritable at that
// turn (a full disk), it was never recorded.
TEST_CASE("A clock jump seen while the log cannot be written is recorded once it can",
          "[lifecycle][clock]") {
  Fixture f;
  REQUIRE(f.kms->RunMaintenance().ok());  // observed time loaded
  const auto jumps = [&] {
    const std::vector<audit::Event> events = f.sink.events();
    return std::count_if(events.begin(), events.end(),
                         [](const audit::Event& e) { return e.action == "ClockJump"; });
  };
  f.clock.StepWallClock(3 * 3600);
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  CHECK(absl::IsUnavailable(f.kms->RunMaintenance()));
  f.store->InjectWriteFault(absl::OkStatus());
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(jumps() == 1);
  const std::vector<audit::Record> log = *f.store->ReadAudit(1, 1000);
  CHECK(std::count_if(log.begin(), log.end(), [](const audit::Record& r) {
          return r.action == "ClockJump" &&
                 r.detail.rfind("the wall clock moved 10800 s against the time", 0) == 0;
        }) == 1);
  REQUIRE(f.kms->RunMaintenance().ok());
  CHECK(jumps() == 1);  // and only once
}

TEST_CASE("Grant changes take effect on the next call", "[lifecycle]") {
  Fixture f;
  f.NewKey("k");
  const Bytes blob = Blob(f, "k");
  Proposal grants = Propose(Operation::kUpdateKeyGrants, "k");
  grants.params.encrypt_principals = {testing::kApp};
  Execute(f, grants);
  CHECK(absl::IsPermissionDenied(f.kms->Decrypt(f.app, blob, {}).status()));
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());

  Proposal to_officer = Propose(Operation::kUpdateKeyGrants, "k");
  to_officer.params.decrypt_principals = {testing::kOfficer2};
  absl::StatusOr<Request> refused = f.kms->Propose(f.officer, to_officer);
  CHECK(absl::IsInvalidArgument(refused.status()));
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("only apps may be granted"));
}

TEST_CASE("Retired versions no longer decrypt until un-retired", "[lifecycle]") {
  Fixture f;
  f.NewKey("k");
  const Bytes v1_blob = Blob(f, "k");
  Execute(f, Propose(Operation::kRotateKey, "k"));
  const Bytes v2_blob = Blob(f, "k");
  Proposal retire = Propose(Operation::kSetMinDecryptVersion, "k");
  retire.params.min_decrypt_version = 2;
  Execute(f, retire);
  absl::StatusOr<Plaintext> refused = f.kms->Decrypt(f.app, v1_blob, {});
  CHECK(absl::IsFailedPrecondition(refused.status()));
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("is retired (the minimum decryption version is 2)"));
  CHECK(f.kms->Decrypt(f.app, v2_blob, {}).ok());

  Proposal beyond = Propose(Operation::kSetMinDecryptVersion, "k");
  beyond.params.min_decrypt_version = 3;
  CHECK(absl::IsInvalidArgument(f.kms->Propose(f.officer, beyond).status()));

  Proposal unretire = Propose(Operation::kSetMinDecryptVersion, "k");
  unretire.params.min_decrypt_version = 1;
  Execute(f, unretire);
  CHECK(f.kms->Decrypt(f.app, v1_blob, {}).ok());
}

TEST_CASE("An HSM outage or the module's failure at quorum leaves the request pending",
          "[requests][hsm]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kRotateKey, "k"));
  REQUIRE(f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id)).ok());
  if (GENERATE(false, true)) {
    // The new version's key cannot be made this once ("not necessarily totally hopeless").
    f.hsm->FailNext(1, hsm::CkError("C_GenerateKey", CKR_FUNCTION_FAILED));
  } else {
    f.hsm->SetDown(true);
  }
  CHECK(absl::IsUnavailable(
      f.kms->Approve(f.officer3, request.id, DigestOf(f, request.id)).status()));
  const Request stored = *f.store->GetRequest(request.id);
  CHECK(stored.state == RequestState::kPending);
  CHECK(stored.approvals.size() == 1);
  f.hsm->SetDown(false);
  absl::StatusOr<Request> done = f.kms->Approve(f.officer3, request.id, DigestOf(f, request.id));
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
}

TEST_CASE("Key creation follows the configured quorum", "[requests]") {
  policy::DualControlConfig config = policy::DualControlConfig::Defaults();
  config.approvals[Operation::kCreateKey] = 1;
  Fixture f(config);
  CreateKeyParams params;
  params.alias = "guarded";
  absl::StatusOr<KeyRef> direct = f.kms->CreateKey(f.officer, params);
  CHECK(absl::IsFailedPrecondition(direct.status()));
  CHECK_THAT(std::string(direct.status().message()),
             Catch::Contains("propose it with Propose(CreateKey)"));
  Proposal create = Propose(Operation::kCreateKey, "");
  create.params.create = params;
  const Request request = *f.kms->Propose(f.officer, create);
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("guarded").status()));
  absl::StatusOr<Request> done = f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id));
  REQUIRE(done.ok());
  CHECK(done->state == RequestState::kExecuted);
  const KeyRef key = *f.store->FindKeyByAlias("guarded");
  CHECK(key->created_by == testing::kOfficer);
  CHECK(done->key_id == key->id);
}

TEST_CASE("A key that grants use needs the grants' quorum to be created", "[requests][insider]") {
  Fixture f;  // defaults: CreateKey needs no approval, UpdateKeyGrants needs 2
  CreateKeyParams params;
  params.alias = "granted";
  params.decrypt_principals = {testing::kApp};
  // One officer cannot create a key a colluding app may read.
  absl::StatusOr<KeyRef> direct = f.kms->CreateKey(f.officer, params);
  CHECK(absl::IsFailedPrecondition(direct.status()));
  CHECK(direct.status().message() ==
        "creating a key that grants use of it needs 2 other officer(s) to approve, as "
        "UpdateKeyGrants does; propose it with Propose(CreateKey), or create it without grants "
        "and propose UpdateKeyGrants");
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("granted").status()));
  CHECK(f.sink.events().back().outcome == absl::StatusCode::kFailedPrecondition);
  // Without grants it needs none.
  f.NewKeyWithoutGrants("bare");

  Proposal create = Propose(Operation::kCreateKey, "");
  create.params.create = params;
  const Request request = *f.kms->Propose(f.officer, create);
  CHECK(request.state == RequestState::kPending);
  CHECK(f.kms->ApprovalsFor(request) == 2);
  const Request one = *f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id));
  CHECK(one.state == RequestState::kPending);
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("granted").status()));
  const Request done = *f.kms->Approve(f.officer3, request.id, DigestOf(f, request.id));
  CHECK(done.state == RequestState::kExecuted);
  const KeyRef key = *f.store->FindKeyByAlias("granted");
  CHECK(key->decrypt_grants == std::set<std::string>{testing::kApp});
  CHECK(key->created_by == testing::kOfficer);
}

TEST_CASE("A key with grants needs the larger of the two quorums", "[requests]") {
  policy::DualControlConfig config = policy::DualControlConfig::Defaults();
  config.approvals[Operation::kUpdateKeyGrants] = 1;
  Fixture f(config);
  Proposal create = Propose(Operation::kCreateKey, "");
  create.params.create.alias = "granted-once";
  create.params.create.encrypt_principals = {testing::kApp};
  const Request once = *f.kms->Propose(f.officer, create);
  CHECK(f.kms->ApprovalsFor(once) == 1);
  CHECK(f.kms->Approve(f.officer2, once.id, RequestDigest(once))->state == RequestState::kExecuted);
  config.approvals[Operation::kCreateKey] = 2;
  f.Start(*policy::Policy::Parse(testing::kPolicy), config, {});
  create.params.create.alias = "granted-twice";
  CHECK(f.kms->ApprovalsFor(*f.kms->Propose(f.officer, create)) == 2);
}

// A CreateKey request for key `alias` granting the app encryption, approved by one of the two
// officers its quorum needs.
Request HalfApprovedKeyWithGrant(Fixture& f, const std::string& alias) {
  Proposal create = Propose(Operation::kCreateKey, "");
  create.params.create.alias = alias;
  create.params.create.encrypt_principals = {testing::kApp};
  const Request request = *f.kms->Propose(f.officer, create);
  REQUIRE(f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id)).ok());
  return request;
}

// The last approval of `request` executes nothing: FAILED_PRECONDITION saying `why`, and the
// request closes FAILED.
void CheckFailsAtQuorum(Fixture& f, const Request& request, const std::string& why) {
  const absl::StatusOr<Request> executed =
      f.kms->Approve(f.officer3, request.id, DigestOf(f, request.id));
  CHECK(absl::IsFailedPrecondition(executed.status()));
  CHECK(executed.status().message() ==
        "request " + request.id + " reached its quorum but could not execute: " + why);
  CHECK(f.store->GetRequest(request.id)->state == RequestState::kFailed);
}

TEST_CASE("A request whose proposer is no longer an officer fails at quorum", "[requests]") {
  Fixture f;
  f.NewKey("k");
  const Request request = *f.kms->Propose(f.officer, Propose(Operation::kDisableKey, "k"));
  REQUIRE(f.kms->Approve(f.officer2, request.id, DigestOf(f, request.id)).ok());
  // The proposer leaves; four officers remain so every quorum stays reachable.
  REQUIRE(f.kms
              ->ReplacePolicy(*policy::Policy::Parse(
                  "[roles]\napp = [\"spiffe://t/app/a\"]\nauditor = [\"spiffe://t/officer/o\"]\n"
                  "officer = [\"spiffe://t/officer/o2\", \"spiffe://t/officer/o3\", "
                  "\"spiffe://t/officer/o4\"]\n"))
              .ok());
  CheckFailsAtQuorum(f, request, "its proposer 'spiffe://t/officer/o' is no longer an officer");
  CHECK((*f.store->FindKeyByAlias("k"))->state == KeyState::kEnabled);
}

// Officers may create a key without grants directly. Doing so under the alias of a key with
// grants whose request waited for its quorum made the last approval answer ALREADY_EXISTS (after
// generating a key version for nothing) and leave the request pending; then it failed at
// quorum. Now the direct creation is refused; the quorum still checks the alias, against a
// store changed behind Kms's back.
TEST_CASE("A key request's alias cannot be taken while it waits, and is checked at quorum",
          "[requests]") {
  Fixture f;
  const Request request = HalfApprovedKeyWithGrant(f, "emr");
  CreateKeyParams direct;
  direct.alias = "emr";
  const absl::StatusOr<KeyRef> refused = f.kms->CreateKey(f.officer, direct);
  CHECK(absl::IsFailedPrecondition(refused.status()));
  CHECK(refused.status().message() == "alias 'emr' already has pending request " + request.id +
                                          " (CreateKey); approve, reject or let it expire first");
  // Written behind Kms's back, as by someone holding the catalogue key.
  storage::KeyRecord renamed = *f.NewKeyWithoutGrants("other");
  renamed.alias = "emr";
  storage::WriteBatch batch;
  batch.keys.push_back(renamed);
  REQUIRE(f.store->Apply(batch).ok());
  CheckFailsAtQuorum(f, request, "alias 'emr' was taken after it was proposed");
  CHECK((*f.store->FindKeyByAlias("emr"))->id == renamed.id);
  CHECK((*f.store->FindKeyByAlias("emr"))->encrypt_grants.empty());
}

TEST_CASE("A key request is checked again at quorum against the policy then", "[requests]") {
  Fixture f;
  const Request request = HalfApprovedKeyWithGrant(f, "later");
  // The grantee is no longer an app when the last approval arrives.
  REQUIRE(f.kms
              ->ReplacePolicy(*policy::Policy::Parse(
                  "[roles]\nofficer = [\"spiffe://t/officer/o\", \"spiffe://t/officer/o2\", "
                  "\"spiffe://t/officer/o3\"]\n"))
              .ok());
  absl::StatusOr<Request> executed =
      f.kms->Approve(f.officer3, request.id, DigestOf(f, request.id));
  CHECK(absl::IsFailedPrecondition(executed.status()));
  CHECK_THAT(std::string(executed.status().message()),
             Catch::EndsWith("principal 'spiffe://t/app/a' in encrypt_principals is not an app "
                             "in the policy; only apps may be granted use of a key"));
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("later").status()));
}

TEST_CASE("A policy that cannot be recorded never takes effect", "[policy][audit]") {
  Fixture f;
  f.NewKey("k");
  const auto without_app = *policy::Policy::Parse(
      "[roles]\nofficer = [\"spiffe://t/officer/o\", \"spiffe://t/officer/o2\", "
      "\"spiffe://t/officer/o3\"]\n");
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  CHECK(absl::IsUnavailable(f.kms->ReplacePolicy(without_app)));
  f.store->InjectWriteFault(absl::OkStatus());
  // The app is still an app: the old policy is in force.
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.store->ReadAudit(1, 100)->back().action == "GenerateDataKey");
}

TEST_CASE("An app cannot tell a key that does not exist from one it may not use",
          "[requests][authz]") {
  Fixture f;
  f.NewKey("mine");
  f.NewKeyWithoutGrants("theirs");
  const std::string theirs_id = (*f.store->FindKeyByAlias("theirs"))->id;
  for (const std::string name : {"theirs", "nothing-here"}) {
    const absl::Status refused = f.kms->GenerateDataKey(f.app, name, {}, 32, true).status();
    CHECK(absl::IsPermissionDenied(refused));
    CHECK(refused.message() == "principal 'spiffe://t/app/a' has no encrypt grant on key '" + name +
                                   "', or no such key exists");
  }
  const std::string unknown_id = "0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00";
  CHECK(f.kms->GenerateDataKey(f.app, unknown_id, {}, 32, true).status() ==
        policy::NoGrant(testing::kApp, policy::KeyUse::kEncrypt, unknown_id));
  CHECK(f.kms->GenerateDataKey(f.app, theirs_id, {}, 32, true).status() ==
        policy::NoGrant(testing::kApp, policy::KeyUse::kEncrypt, theirs_id));

  // A blob naming a key the app may not decrypt with, and the same blob naming a key that
  // does not exist: one answer, naming the key id the blob carries.
  Bytes blob = Blob(f, "mine");
  const std::string mine_id = (*f.store->FindKeyByAlias("mine"))->id;
  Proposal revoke = Propose(Operation::kUpdateKeyGrants, "mine");
  revoke.params.encrypt_principals = {testing::kApp};
  Execute(f, revoke);
  CHECK(f.kms->Decrypt(f.app, blob, {}).status() ==
        policy::NoGrant(testing::kApp, policy::KeyUse::kDecrypt, mine_id));
  blob[5] ^= 0x01;  // inside the key id
  const absl::Status unknown = f.kms->Decrypt(f.app, blob, {}).status();
  CHECK(absl::IsPermissionDenied(unknown));
  CHECK_THAT(std::string(unknown.message()),
             Catch::StartsWith("principal 'spiffe://t/app/a' has no decrypt grant on key '"));
  CHECK_THAT(std::string(unknown.message()), Catch::EndsWith("', or no such key exists"));
}

TEST_CASE("Every start records the dual-control settings in force", "[requests][config]") {
  policy::DualControlConfig config = policy::DualControlConfig::Defaults();
  config.approvals[Operation::kRotateKey] = 1;  // lowered in the config: it shows
  Fixture f(config);
  REQUIRE(f.kms->RecordServerStart().ok());
  const audit::Event start = f.sink.events().at(0);
  CHECK(start.action == "ServerStart");
  CHECK(start.detail ==
        "root custos-root (confining); dual control approvals CreateKey=0 RotateKey=1 "
        "DisableKey=2 EnableKey=2 ScheduleKeyDeletion=2 CancelKeyDeletion=2 UpdateKeyGrants=2 "
        "SetMinDecryptVersion=2 RotateRootKey=2 ReAnchorAuditLog=2 CreateTdeKey=2 RotateTdeKey=2 "
        "IssueDatabaseToken=2 RevokeDatabaseToken=2 ArchiveAuditLog=2; request_ttl=86400s; "
        "deletion_waiting=2592000s");
}

TEST_CASE("Dual control never fails open", "[requests][config]") {
  policy::DualControlConfig config = policy::DualControlConfig::Defaults();
  CHECK(config.Validate().ok());
  config.approvals[Operation::kRotateKey] = 0;
  CHECK(config.Validate().message() ==
        "dual_control: RotateKey needs at least 1 approval besides the proposer; got 0 (dual "
        "control never fails open)");
  config = policy::DualControlConfig::Defaults();
  config.approvals.erase(Operation::kDisableKey);
  CHECK(config.Validate().message() == "dual_control: no approval count for DisableKey");
  config = policy::DualControlConfig::Defaults();
  config.deletion_waiting_seconds = 6 * policy::kDay;
  CHECK(absl::IsInvalidArgument(config.Validate()));
}

TEST_CASE("A policy reload that breaks separation of duties is refused", "[policy]") {
  Fixture f;
  f.NewKey("k");  // grants kApp
  auto promoted = *policy::Policy::Parse(
      "[roles]\nofficer = [\"spiffe://t/app/a\", \"spiffe://t/officer/o\", "
      "\"spiffe://t/officer/o2\"]\n");
  absl::Status refused = f.kms->ReplacePolicy(promoted);
  CHECK(absl::IsFailedPrecondition(refused));
  CHECK_THAT(std::string(refused.message()),
             Catch::StartsWith("principal 'spiffe://t/app/a' would hold role 'officer'"));
  auto too_few = *policy::Policy::Parse(
      "[roles]\napp = [\"spiffe://t/app/a\"]\nofficer = [\"spiffe://t/officer/o\", "
      "\"spiffe://t/officer/o2\"]\n");
  CHECK(f.kms->ReplacePolicy(too_few).message() ==
        "RotateKey needs 3 distinct officers (proposer and approvers) but the policy names 2");
  // The old policy is still in force.
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
}

}  // namespace
}  // namespace custos::core
