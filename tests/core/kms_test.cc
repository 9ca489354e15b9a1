// Kms use cases over a real SoftHSM2 token and a real SQLite file, with a recording audit sink
// and a FaultyHsm decorator to inject HSM failures.
#include "core/kms.h"

#include <catch2/catch.hpp>

#include "common/strings.h"
#include "core/ciphertext_blob.h"
#include "tests/core/kms_fixture.h"

namespace custos::core {
namespace {

using testing::Fixture;
using testing::kApp;
using testing::kOfficer;

TEST_CASE("Each use case records one audit event with the facts and outcome", "[kms][audit]") {
  Fixture f;
  const KeyRef key = f.NewKey("orders");
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "orders", {{"row", "7"}}, 32, true);
  REQUIRE(dk.ok());
  absl::StatusOr<Plaintext> opened = f.kms->Decrypt(f.app, dk->ciphertext_blob, {{"row", "8"}});
  CHECK(absl::IsInvalidArgument(opened.status()));
  CHECK(absl::IsPermissionDenied(f.kms->Decrypt(f.officer, dk->ciphertext_blob, {}).status()));

  std::vector<audit::Event> events = f.sink.events();
  REQUIRE(events.size() == 8);
  // A key with grants is a request: proposed, approved twice, then created by the server.
  CHECK(events[0].action == "Propose");
  CHECK(events[0].principal == kOfficer);
  CHECK(events[1].action == "Approve");
  CHECK(events[2].action == "Approve");
  CHECK(events[2].request_id == events[0].request_id);
  CHECK(events[3].request_id == events[0].request_id);
  // Each call has its own id; the server's record of what the approving call did carries it.
  CHECK(events[2].call_id.size() == 36);
  CHECK(events[3].call_id == events[2].call_id);
  CHECK(events[1].call_id != events[2].call_id);
  CHECK(events[0].call_id != events[1].call_id);
  events.erase(events.begin(), events.begin() + 3);
  // The first encryption under a version reserves a block of its GCM budget, recorded too.
  CHECK(events[1].action == "ReserveEncryptions");
  CHECK(events[1].principal == kServerPrincipal);
  CHECK(events[1].key_id == key->id);
  CHECK(events[1].key_version == 1);
  CHECK(events[1].detail == "encryptions reserved up to 10000");
  CHECK(events[1].row == "usage:" + key->id + "/1");
  events.erase(events.begin() + 1);
  CHECK(events[0].action == "CreateKey");
  CHECK(events[0].row == "key:" + key->id);
  CHECK(events[0].principal == kServerPrincipal);
  CHECK(events[0].role == "server");
  CHECK(events[0].key_id == key->id);
  CHECK(events[0].key_version == 1);
  CHECK(events[0].outcome == absl::StatusCode::kOk);
  REQUIRE(key->versions.size() == 1);
  CHECK(key->versions[0].root_key_label == "custos-root");
  CHECK(key->versions[0].wrapped.size() == 40);  // RFC 5649 wrap of a 32-byte key
  CHECK(events[1].action == "GenerateDataKey");
  CHECK(events[1].principal == kApp);
  CHECK(events[1].role == "app");
  CHECK(events[1].key_id == key->id);
  CHECK(events[1].key_version == 1);
  CHECK(events[1].peer == "ipv4:127.0.0.1:5000");
  CHECK(events[1].time == 1'800'000'000);
  CHECK(events[2].action == "Decrypt");
  CHECK(events[2].key_id == key->id);
  CHECK(events[2].outcome == absl::StatusCode::kInvalidArgument);
  CHECK(events[3].action == "Decrypt");
  CHECK(events[3].role == "officer");
  CHECK(events[3].key_id.empty());  // refused before the blob was even read
  CHECK(events[3].outcome == absl::StatusCode::kPermissionDenied);
  // No event carries a context value or key material.
  for (const audit::Event& e : events)
    CHECK(audit::FormatEvent(e).find("row") == std::string::npos);
}

TEST_CASE("A key created under a taken alias is refused and recorded against the key holding it",
          "[kms][audit]") {
  Fixture f;
  const KeyRef key = f.NewKey("orders");
  const size_t before = f.sink.events().size();
  CreateKeyParams params;
  params.alias = "orders";
  const absl::StatusOr<KeyRef> again = f.kms->CreateKey(f.officer, params);
  CHECK(again.status().code() == absl::StatusCode::kAlreadyExists);
  CHECK(again.status().message() == "alias 'orders' is already in use");
  const std::vector<audit::Event> events = f.sink.events();
  REQUIRE(events.size() == before + 1);
  CHECK(events.back().action == "CreateKey");
  CHECK(events.back().outcome == absl::StatusCode::kAlreadyExists);
  CHECK(events.back().key_id == key->id);  // not the id a new key would have had
}

TEST_CASE("ReEncrypt records source and destination keys", "[kms][audit]") {
  Fixture f;
  const KeyRef a = f.NewKey("a");
  const KeyRef b = f.NewKey("b");
  absl::StatusOr<Ciphertext> sealed =
      f.kms->Encrypt(f.app, "a", SecureBytes::FromString("hello").span(), {});
  REQUIRE(sealed.ok());
  absl::StatusOr<ReEncrypted> moved = f.kms->ReEncrypt(f.app, sealed->ciphertext_blob, {}, "b", {});
  REQUIRE(moved.ok());
  const audit::Event e = f.sink.events().back();
  CHECK(e.action == "ReEncrypt");
  CHECK(e.source_key_id == a->id);
  CHECK(e.source_key_version == 1);
  CHECK(e.key_id == b->id);
  CHECK(e.key_version == 1);
  absl::StatusOr<Plaintext> opened = f.kms->Decrypt(f.app, moved->destination.ciphertext_blob, {});
  REQUIRE(opened.ok());
  CHECK(opened->plaintext.view() == "hello");
}

TEST_CASE("A call refused for its grant costs the HSM nothing", "[kms][authz][hsm]") {
  Fixture f;
  f.NewKey("open");
  const KeyRef closed = f.NewKeyWithoutGrants("closed");
  absl::StatusOr<Ciphertext> sealed =
      f.kms->Encrypt(f.app, "open", SecureBytes::FromString("x").span(), {});
  REQUIRE(sealed.ok());
  // A blob naming the closed key (the header is only authenticated when decrypting).
  Bytes forged = sealed->ciphertext_blob;
  const KeyIdBytes closed_id = *ParseKeyId(closed->id);
  std::copy(closed_id.begin(), closed_id.end(), forged.begin() + 1);  // after the format byte
  REQUIRE(FormatKeyId(ParseBlob(forged)->header.key_id) == closed->id);
  // Contexts never seen: their HMACs are not cached, so computing one would be an HSM call.
  const EncryptionContext fresh = {{"mrn", "448812"}};
  const int64_t before = f.hsm->calls();
  CHECK(
      absl::IsPermissionDenied(f.kms->GenerateDataKey(f.app, "closed", fresh, 32, true).status()));
  CHECK(absl::IsPermissionDenied(
      f.kms->Encrypt(f.app, "closed", SecureBytes::FromString("x").span(), fresh).status()));
  CHECK(absl::IsPermissionDenied(f.kms->Decrypt(f.app, forged, fresh).status()));
  // The destination's grant is checked before the source is decrypted.
  CHECK(absl::IsPermissionDenied(
      f.kms->ReEncrypt(f.app, sealed->ciphertext_blob, {}, "closed", fresh).status()));
  CHECK(f.hsm->calls() == before);
  // A ReEncrypt refused on its source still names both keys, as the blob and the call do.
  const KeyRef open = *f.store->FindKeyByAlias("open");
  CHECK(absl::IsPermissionDenied(f.kms->ReEncrypt(f.app, forged, fresh, "open", {}).status()));
  CHECK(f.sink.events().back().source_key_id == closed->id);
  CHECK(f.sink.events().back().key_id == open->id);
  CHECK(f.hsm->calls() == before);
  std::vector<audit::Event> events = f.sink.events();
  events.pop_back();
  REQUIRE(events.size() >= 4);
  for (auto e = events.end() - 4; e != events.end(); ++e) {
    CHECK(e->outcome == absl::StatusCode::kPermissionDenied);
    CHECK(e->context_hmac.empty());  // recorded without it: computing it is HSM work
    CHECK(e->key_id == closed->id);
  }
  // Allowed calls still bind their contexts.
  REQUIRE(f.kms->GenerateDataKey(f.app, "open", fresh, 32, true).ok());
  CHECK_FALSE(f.sink.events().back().context_hmac.empty());
}

TEST_CASE("A refusal the counter takes as a repeat gets no record of its own", "[kms][authz]") {
  Fixture f;
  f.NewKeyWithoutGrants("closed");
  std::vector<std::string> asked;
  f.kms->SetRefusalCounter([&](const audit::Event& record, std::string_view reason) {
    asked.push_back(record.action + " " + record.principal + ": " + std::string(reason));
    return asked.size() > 1;  // the first is recorded, the rest counted
  });
  const size_t before = f.sink.events().size();
  for (int i = 0; i < 3; ++i) {
    CHECK(absl::IsPermissionDenied(f.kms->GenerateDataKey(f.app, "closed", {}, 32, true).status()));
  }
  REQUIRE(asked.size() == 3);
  CHECK(asked[0] == StrCat("GenerateDataKey ", testing::kApp, ": principal '", testing::kApp,
                           "' has no encrypt grant on key 'closed', or no such key exists"));
  CHECK(f.sink.events().size() == before + 1);
  // Only refusals are asked about.
  REQUIRE(f.kms->ListKeys(f.officer, 10, "").ok());
  CHECK(asked.size() == 3);
  CHECK(f.sink.events().size() == before + 2);
}

// A client retrying at once while the HSM's threads are stuck hears "HSM busy" at once: one
// audit record per attempt would have flooded the log. No HSM call was started for them.
TEST_CASE("A call refused with the HSM busy is counted as denials are; other failures are not",
          "[kms][hsm_fault]") {
  Fixture f;
  f.NewKey("k");
  std::vector<std::string> asked;
  f.kms->SetRefusalCounter([&](const audit::Event& record, std::string_view reason) {
    asked.push_back(record.action + " " + absl::StatusCodeToString(record.outcome) + ": " +
                    std::string(reason));
    return asked.size() > 1;
  });
  const std::string kind = "HSM busy: no HSM thread was free for GenerateDataKey";
  const size_t before = f.sink.events().size();
  for (int i = 0; i < 3; ++i) {
    f.hsm->FailNext(1, hsm::BusyError(kind, StrCat(kind, " within 1000 ms (", i, " stuck)")));
    const absl::Status busy = f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status();
    CHECK(busy.code() == absl::StatusCode::kUnavailable);
    CHECK(busy.message() == StrCat(kind, " within 1000 ms (", i, " stuck)"));
  }
  REQUIRE(asked.size() == 3);
  CHECK(asked[0] == "GenerateDataKey UNAVAILABLE: " + kind);
  CHECK(asked[2] == asked[0]);
  REQUIRE(f.sink.events().size() == before + 1);
  CHECK(f.sink.events().back().action == "GenerateDataKey");
  CHECK(f.sink.events().back().outcome == absl::StatusCode::kUnavailable);
  // An HSM that answered with an error is not busy: every such failure has its record.
  f.hsm->FailNext(1, absl::UnavailableError("C_Encrypt: CKR_DEVICE_REMOVED"));
  CHECK(absl::IsUnavailable(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status()));
  CHECK(asked.size() == 3);
  CHECK(f.sink.events().size() == before + 2);
}

TEST_CASE("A principal missing from the policy is refused and audited", "[kms][authz]") {
  Fixture f;
  f.NewKey("k");
  Caller stranger{"spiffe://t/app/stranger", "peer"};
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(stranger, "k", {}, 32, true);
  CHECK(absl::IsPermissionDenied(dk.status()));
  CHECK(dk.status().message() ==
        "principal 'spiffe://t/app/stranger' holds no role in the policy; an administrator must "
        "add it to the policy file");
  CHECK(f.sink.events().back().role.empty());
  CHECK(f.sink.events().back().outcome == absl::StatusCode::kPermissionDenied);
}

TEST_CASE("Auditors may not use or manage keys", "[kms][authz]") {
  Fixture f;
  f.NewKey("k");
  CHECK(absl::IsPermissionDenied(f.kms->GenerateDataKey(f.auditor, "k", {}, 32, true).status()));
  CHECK(absl::IsPermissionDenied(f.kms->CreateKey(f.auditor, {}).status()));
  CHECK(absl::IsPermissionDenied(f.kms->ListKeys(f.auditor, 10, "").status()));
}

TEST_CASE("A policy swap applies to the next call", "[kms][authz]") {
  Fixture f;
  f.NewKey("k");
  REQUIRE(f.kms
              ->ReplacePolicy(*policy::Policy::Parse(
                  "[roles]\nofficer = [\"spiffe://t/officer/o\", \"spiffe://t/officer/o2\", "
                  "\"spiffe://t/officer/o3\"]\n"))
              .ok());
  CHECK(absl::IsPermissionDenied(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status()));
}

TEST_CASE("If the audit log cannot be written, operations fail closed and change nothing",
          "[kms][audit]") {
  Fixture f;
  f.NewKey("k");
  const size_t records = f.store->AuditHead()->first;
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, true);
  CHECK(absl::IsUnavailable(dk.status()));
  CHECK(dk.status().message() ==
        "operation refused, its record could not be written: audit log unavailable: disk full");
  CreateKeyParams params;
  params.alias = "while-down";
  CHECK(absl::IsUnavailable(f.kms->CreateKey(f.officer, params).status()));
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("while-down").status()));
  CHECK(f.store->AuditHead()->first == records);
  // It recovers by itself once the log can be written again.
  f.store->InjectWriteFault(absl::OkStatus());
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.store->AuditHead()->first == records + 2);  // the reservation, then the call
}

TEST_CASE("A first encryption's reservation commits with the call's record, or not at all",
          "[kms][audit][usage]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  const uint64_t records = f.store->AuditHead()->first;
  const uint64_t applies = f.store->GetCommitStats().batches;

  // The commit fails: no data key leaves, and no reservation was written either.
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  CHECK(absl::IsUnavailable(
      f.kms->Encrypt(f.app, "k", SecureBytes::FromString("x").span(), {}).status()));
  f.store->InjectWriteFault(absl::OkStatus());
  CHECK(f.store->AuditHead()->first == records);
  absl::StatusOr<std::vector<storage::VersionUsage>> stored = f.store->GetUsage(key->id);
  REQUIRE(stored.ok());
  CHECK(stored->empty());

  // It commits: one transaction holds the reservation and the call's record, in that order.
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.store->GetCommitStats().batches == applies + 1);  // the failed one is not counted
  std::vector<audit::Record> rows = *f.store->ReadAudit(records + 1, 10);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].action == "ReserveEncryptions");
  CHECK(rows[0].principal == kServerPrincipal);
  CHECK(rows[0].detail == "encryptions reserved up to 10000");
  CHECK(rows[0].row == "usage:" + key->id + "/1");
  CHECK(rows[1].action == "GenerateDataKey");
  CHECK(rows[1].call_id == rows[0].call_id);  // the server's record of what the call needed
  stored = f.store->GetUsage(key->id);
  REQUIRE(stored.ok());
  REQUIRE(stored->size() == 1);
  CHECK((*stored)[0].encryptions_reserved == 10000);

  // The next encryption counts into that block: one transaction, its own record only.
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.store->GetCommitStats().batches == applies + 2);
  CHECK(f.store->AuditHead()->first == records + 3);
}

TEST_CASE("A first encryption whose reservation cannot be sealed fails, and is still recorded",
          "[kms][audit][usage]") {
  Fixture f;
  const KeyRef key = f.NewKey("k");
  const uint64_t records = f.store->AuditHead()->first;
  // The catalogue's HMAC key becomes unreachable once the data key is made: the reservation's
  // row cannot be sealed, the call's record needs no seal.
  f.hsm->BeforeNextCallTo("GenerateDataKey", [&] { f.catalog_hsm->SetDown(true); });
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, true);
  CHECK(absl::IsUnavailable(dk.status()));
  CHECK(dk.status().message() ==
        "operation refused, its key's encryptions could not be reserved: a row could not be "
        "sealed: HSM is down (FaultyHsm)");
  std::vector<audit::Record> rows = *f.store->ReadAudit(records + 1, 10);
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].action == "GenerateDataKey");
  CHECK(rows[0].key_id == key->id);
  CHECK(rows[0].outcome == "UNAVAILABLE");
  absl::StatusOr<std::vector<storage::VersionUsage>> stored = f.store->GetUsage(key->id);
  REQUIRE(stored.ok());
  CHECK(stored->empty());

  // Once the key is back, the next call reserves and succeeds, by itself.
  f.catalog_hsm->SetDown(false);
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  rows = *f.store->ReadAudit(records + 2, 10);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].action == "ReserveEncryptions");
  CHECK(rows[1].action == "GenerateDataKey");
  CHECK(rows[1].outcome == "OK");
}

TEST_CASE(
    "A cold key's decryption checks its key row, not its reservations; its next "
    "encryption checks them",
    "[kms][usage]") {
  Fixture f;
  f.NewKey("k");
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, true);
  REQUIRE(dk.ok());
  f.Restart();  // nothing cached
  const int64_t before = f.catalog_hsm->calls();
  REQUIRE(f.kms->Decrypt(f.app, dk->ciphertext_blob, {}).ok());
  // The key row's MAC, and the key marking the run's records (made at its first write).
  CHECK(f.catalog_hsm->calls() == before + 2);
  // The encryption checks the reservation (an HMAC), then seals the next block's row.
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.catalog_hsm->calls() == before + 4);
  // The decryptions counted meanwhile are kept, with the checked reservation.
  absl::StatusOr<Kms::KeyDescription> described = f.kms->DescribeKey(f.officer, "k");
  REQUIRE(described.ok());
  REQUIRE(described->usage.size() == 1);
  CHECK(described->usage[0].decryptions == 1);
  CHECK(described->usage[0].encryptions_reserved == 20000);
  CHECK(described->usage[0].encryptions == 10001);  // resumed from the first block's end
}

TEST_CASE("Authentication refusals are recorded, and fail closed", "[kms][audit]") {
  Fixture f;
  REQUIRE(f.kms
              ->RecordAuthenticationRefusal("Decrypt", "ipv4:10.0.0.9:4711",
                                            "client certificate names several URI SANs")
              .ok());
  const std::vector<audit::Record> rows = *f.store->ReadAudit(1, 10);
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].action == "Decrypt");
  CHECK(rows[0].principal.empty());  // nobody was authenticated
  CHECK(rows[0].role.empty());
  CHECK(rows[0].outcome == "UNAUTHENTICATED");
  CHECK(rows[0].peer == "ipv4:10.0.0.9:4711");
  CHECK(rows[0].detail == "client certificate names several URI SANs");
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  CHECK(absl::IsUnavailable(f.kms->RecordAuthenticationRefusal("Decrypt", "p", "r")));
  CHECK(f.store->AuditHead()->first == 1);
}

TEST_CASE("Calls refused for capacity are recorded as counted tallies, and fail closed",
          "[kms][audit]") {
  Fixture f;
  Kms::RefusedCalls busy;
  busy.rpc = "GenerateDataKey";
  busy.principal = "spiffe://custos.local/app/demo";
  busy.peer = "ipv4:10.0.0.9";
  busy.reason = "custosd is at capacity";
  busy.count = 41;
  busy.first = 1700000000;
  busy.last = 1700000009;
  Kms::RefusedCalls once = busy;
  once.rpc = "Decrypt";
  once.principal.clear();
  once.count = 1;
  REQUIRE(f.kms->RecordRefusedCalls({busy, once}).ok());
  const std::vector<audit::Record> rows = *f.store->ReadAudit(1, 10);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].action == "GenerateDataKey");
  CHECK(rows[0].principal == "spiffe://custos.local/app/demo");
  CHECK(rows[0].outcome == "RESOURCE_EXHAUSTED");
  CHECK(rows[0].peer == "ipv4:10.0.0.9");
  CHECK(rows[0].detail == "41 calls refused from 1700000000 to 1700000009: custosd is at capacity");
  CHECK(rows[1].action == "Decrypt");
  CHECK(rows[1].principal.empty());
  CHECK(rows[1].detail == "1 call refused from 1700000000 to 1700000009: custosd is at capacity");
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  CHECK(absl::IsUnavailable(f.kms->RecordRefusedCalls({busy})));
  CHECK(f.store->AuditHead()->first == 2);
}

TEST_CASE("Every event lands in the durable, hash-chained log", "[kms][audit]") {
  Fixture f;
  const KeyRef key = f.NewKey("chain");
  REQUIRE(f.kms->GenerateDataKey(f.app, "chain", {{"mrn", "448812"}}, 32, true).ok());
  std::vector<audit::Record> rows = *f.store->ReadAudit(1, 100);
  REQUIRE(rows.size() == 6);  // Propose, Approve, Approve, CreateKey, Reserve..., Generate...
  Bytes prev(32, 0);
  for (const audit::Record& row : rows) {
    CHECK(audit::ChainHash(prev, row) == row.hash);
    prev = row.hash;
  }
  rows.erase(rows.begin(), rows.begin() + 3);
  CHECK(rows[1].action == "ReserveEncryptions");
  CHECK(rows[1].row == "usage:" + key->id + "/1");
  CHECK(rows[1].row_digest.size() == 64);
  CHECK(rows[0].row == "key:" + key->id);
  CHECK(rows[0].row_digest.size() == 64);
  rows.erase(rows.begin() + 1);
  CHECK(rows[0].action == "CreateKey");
  CHECK(rows[1].action == "GenerateDataKey");
  CHECK(rows[1].key_id == key->id);
  CHECK(rows[1].outcome == "OK");
  CHECK(rows[1].context_hmac.size() == 64);  // an HMAC, never the value
  CHECK(rows[0].context_hmac.empty());
}

TEST_CASE("An HSM outage fails closed and recovers by itself", "[kms][hsm]") {
  Fixture f;
  f.NewKey("k");
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, true);
  REQUIRE(dk.ok());
  f.hsm->SetDown(true);
  CHECK(absl::IsUnavailable(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).status()));
  CHECK(absl::IsUnavailable(f.kms->Decrypt(f.app, dk->ciphertext_blob, {}).status()));
  CreateKeyParams params;
  params.alias = "during-outage";
  CHECK(absl::IsUnavailable(f.kms->CreateKey(f.officer, params).status()));
  CHECK(absl::IsNotFound(f.store->FindKeyByAlias("during-outage").status()));
  CHECK(f.sink.events().back().outcome == absl::StatusCode::kUnavailable);
  f.hsm->SetDown(false);
  absl::StatusOr<Plaintext> opened = f.kms->Decrypt(f.app, dk->ciphertext_blob, {});
  REQUIRE(opened.ok());
  CHECK(opened->plaintext.view() == dk->plaintext.view());
}

TEST_CASE("GenerateDataKeyWithoutPlaintext returns no plaintext", "[kms]") {
  Fixture f;
  f.NewKey("k");
  absl::StatusOr<DataKey> dk = f.kms->GenerateDataKey(f.app, "k", {}, 32, false);
  REQUIRE(dk.ok());
  CHECK(dk->plaintext.empty());
  CHECK(f.sink.events().back().action == "GenerateDataKeyWithoutPlaintext");
  absl::StatusOr<Plaintext> opened = f.kms->Decrypt(f.app, dk->ciphertext_blob, {});
  REQUIRE(opened.ok());
  CHECK(opened->plaintext.size() == 32);
}

TEST_CASE("Data key sizes other than 16 and 32 are refused", "[kms]") {
  Fixture f;
  f.NewKey("k");
  CHECK(f.kms->GenerateDataKey(f.app, "k", {}, 24, true).status().message() ==
        "data keys are 16 (AES-128) or 32 (AES-256) bytes");
  // A key spec the front door did not know arrives as 0 and is named as such.
  const absl::Status unknown = f.kms->GenerateDataKey(f.app, "k", {}, 0, true).status();
  CHECK(absl::IsInvalidArgument(unknown));
  CHECK(unknown.message() ==
        "key_spec is not one this server knows: ask for AES_256 (32 bytes) or AES_128 (16 bytes)");
}

TEST_CASE("Every checkpoint_every records wake maintenance to sign a checkpoint", "[kms][audit]") {
  Fixture f;
  f.checkpoint_every = 3;
  f.Start(*policy::Policy::Parse(testing::kPolicy), policy::DualControlConfig::Defaults(), {});
  f.NewKeyWithoutGrants("k");  // record 1
  // Granting the app use: the proposal is record 2, the first approval record 3.
  Proposal grant;
  grant.operation = policy::Operation::kUpdateKeyGrants;
  grant.key = "k";
  grant.params.encrypt_principals = {kApp};
  grant.justification = "the app needs it";
  absl::StatusOr<Request> request = f.kms->Propose(f.officer, grant);
  REQUIRE(request.ok());
  CHECK(f.maintenance_wakes == 0);
  request = f.kms->Approve(f.officer2, request->id, RequestDigest(*request));
  REQUIRE(request.ok());
  CHECK(f.maintenance_wakes == 1);
  // The second approval and the execution, records 4 and 5: due already, no new wake.
  REQUIRE(f.kms->Approve(f.officer3, request->id, RequestDigest(*request)).ok());
  CHECK(f.maintenance_wakes == 1);
  REQUIRE(f.kms->Checkpoint().ok());
  CHECK(f.store->LatestCheckpoint().value()->seq == 5);
  // A reservation and an encryption, records 6 and 7: the count starts again from there.
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.maintenance_wakes == 1);
  REQUIRE(f.kms->GenerateDataKey(f.app, "k", {}, 32, true).ok());
  CHECK(f.maintenance_wakes == 2);
}

TEST_CASE("Checkpoint signs the log's head", "[kms][audit]") {
  Fixture f;
  f.NewKey("k");
  REQUIRE(f.kms->Checkpoint().ok());
  const auto checkpoint = f.store->LatestCheckpoint().value();
  REQUIRE(checkpoint.has_value());
  const auto head = f.store->AuditHead().value();
  CHECK(checkpoint->seq == head.first);
  CHECK(checkpoint->hash == head.second);
  CHECK(checkpoint->key_label == "custos-audit-signing");
  CHECK(checkpoint->signature.size() >= 8);
  // Nothing new, nothing signed; auditors reading the checkpoint are recorded.
  REQUIRE(f.kms->Checkpoint().ok());
  CHECK(f.store->Checkpoints()->size() == 1);
  absl::StatusOr<Kms::SignedCheckpoint> read = f.kms->LatestCheckpoint(f.auditor);
  REQUIRE(read.ok());
  CHECK(read->message == audit::CheckpointMessage(*checkpoint));
  CHECK_THAT(read->public_key_pem, Catch::StartsWith("-----BEGIN PUBLIC KEY-----"));
  CHECK(absl::IsPermissionDenied(f.kms->LatestCheckpoint(f.officer).status()));
  CHECK(absl::IsPermissionDenied(f.kms->ReadAudit(f.app, 1, 10).status()));
  CHECK(f.kms->ReadAudit(f.auditor, 1, 10)->front().action == "Propose");
}

}  // namespace
}  // namespace custos::core
