// Batch calls: each item runs as its single call would, with its own outcome and record, and
// the records commit together before any result is returned.
#include <catch2/catch.hpp>

#include "core/kms.h"
#include "tests/core/kms_fixture.h"

namespace custos::core {
namespace {

using testing::Fixture;

std::vector<audit::Record> RecordsAfter(Fixture& f, uint64_t seq) {
  return *f.store->ReadAudit(seq + 1, 10000);
}

TEST_CASE("A batch runs each item on its own, records one event per item under one call id",
          "[kms][batch]") {
  Fixture f;
  const KeyRef key = f.NewKey("batch");
  const KeyRef ungranted = f.NewKeyWithoutGrants("batch-ungranted");
  const EncryptionContext context = {{"table", "patients"}};
  const EncryptionContext other = {{"table", "visits"}};
  const uint64_t before = f.store->AuditHead()->first;
  const std::vector<DataKeyItem> items = {
      {"batch", context, 32}, {"batch-ungranted", context, 32}, {"batch", other, 7}};
  absl::StatusOr<std::vector<absl::StatusOr<DataKey>>> results =
      f.kms->BatchGenerateDataKey(f.app, items, /*with_plaintext=*/true);
  REQUIRE(results.ok());
  REQUIRE(results->size() == 3);
  REQUIRE((*results)[0].ok());
  CHECK((*results)[0]->plaintext.size() == 32);
  CHECK((*results)[0]->key_id == key->id);
  CHECK((*results)[1].status().code() == absl::StatusCode::kPermissionDenied);
  CHECK((*results)[1].status().message() ==
        "principal 'spiffe://t/app/a' has no encrypt grant on key 'batch-ungranted', or no such "
        "key exists");
  CHECK((*results)[2].status().code() == absl::StatusCode::kInvalidArgument);

  std::vector<audit::Record> records = RecordsAfter(f, before);
  std::erase_if(records, [](const audit::Record& r) { return r.action != "GenerateDataKey"; });
  REQUIRE(records.size() == 3);
  CHECK(records[0].outcome == "OK");
  CHECK(records[0].key_id == key->id);
  CHECK(records[0].detail == "batch item 1 of 3");
  CHECK(records[1].outcome == "PERMISSION_DENIED");
  CHECK(records[1].detail == "batch item 2 of 3");
  CHECK(records[2].outcome == "INVALID_ARGUMENT");
  CHECK(records[2].detail == "batch item 3 of 3");
  CHECK(records[0].call_id == records[1].call_id);
  CHECK(records[1].call_id == records[2].call_id);
  CHECK(records[0].context_hmac != records[2].context_hmac);  // each item's own context

  // Decrypt and ReEncrypt take what GenerateDataKey gave, item by item.
  const Bytes blob = (*results)[0]->ciphertext_blob;
  const Bytes tampered = [&] {
    Bytes b = blob;
    b.back() ^= 1;
    return b;
  }();
  const std::vector<DecryptItem> opened_items = {
      {blob, context}, {tampered, context}, {blob, other}};
  absl::StatusOr<std::vector<absl::StatusOr<Plaintext>>> opened =
      f.kms->BatchDecrypt(f.app, opened_items);
  REQUIRE(opened.ok());
  REQUIRE(opened->size() == 3);
  REQUIRE((*opened)[0].ok());
  CHECK((*opened)[0]->plaintext.view() == (*results)[0]->plaintext.view());
  CHECK((*opened)[1].status().code() == absl::StatusCode::kInvalidArgument);
  CHECK((*opened)[2].status().code() == absl::StatusCode::kInvalidArgument);

  const EncryptionContext moved = {{"table", "archive"}};
  const std::vector<ReEncryptItem> rewrap = {{blob, context, "", moved}};
  absl::StatusOr<std::vector<absl::StatusOr<ReEncrypted>>> rewrapped =
      f.kms->BatchReEncrypt(f.app, rewrap);
  REQUIRE(rewrapped.ok());
  REQUIRE((*rewrapped)[0].ok());
  const Bytes& new_blob = (*rewrapped)[0]->destination.ciphertext_blob;
  absl::StatusOr<Plaintext> again = f.kms->Decrypt(f.app, new_blob, moved);
  REQUIRE(again.ok());
  CHECK(again->plaintext.view() == (*results)[0]->plaintext.view());
}

TEST_CASE("An empty, oversized or unauthorized batch is refused whole, as one record",
          "[kms][batch]") {
  Fixture f;
  f.NewKey("batch");
  const EncryptionContext context;
  uint64_t before = f.store->AuditHead()->first;
  CHECK(f.kms->BatchGenerateDataKey(f.app, {}, true).status() ==
        absl::InvalidArgumentError("a batch holds 1 to 1000 items; this one holds 0"));
  const std::vector<DataKeyItem> items(kMaxBatchItems + 1, DataKeyItem{"batch", context, 32});
  CHECK(f.kms->BatchGenerateDataKey(f.app, items, true).status() ==
        absl::InvalidArgumentError("a batch holds 1 to 1000 items; this one holds 1001"));
  // An officer's batch of 1,000 data keys: one refusal, not a thousand.
  const std::vector<DataKeyItem> full(kMaxBatchItems, DataKeyItem{"batch", context, 32});
  CHECK(f.kms->BatchGenerateDataKey(f.officer, full, true).status().code() ==
        absl::StatusCode::kPermissionDenied);
  const std::vector<audit::Record> records = RecordsAfter(f, before);
  REQUIRE(records.size() == 3);
  CHECK(records[0].outcome == "INVALID_ARGUMENT");
  CHECK(records[0].detail == "batch of 0 items");
  CHECK(records[1].outcome == "INVALID_ARGUMENT");
  CHECK(records[1].detail == "batch of 1001 items");
  CHECK(records[2].outcome == "PERMISSION_DENIED");
  CHECK(records[2].principal == f.officer.principal);
  CHECK(records[2].detail == "batch of 1000 items");
}

TEST_CASE("A batch's items reserve their encryptions durably before any is counted into them",
          "[kms][batch][usage]") {
  UsageLimits limits;
  limits.reservation_block = 2;
  Fixture f(policy::DualControlConfig::Defaults(), limits);
  const KeyRef key = f.NewKey("cold");
  const uint64_t before = f.store->AuditHead()->first;
  const EncryptionContext context;  // outlives the items, which refer to it
  const std::vector<DataKeyItem> items(3, DataKeyItem{"cold", context, 32});
  absl::StatusOr<std::vector<absl::StatusOr<DataKey>>> results =
      f.kms->BatchGenerateDataKey(f.app, items, true);
  REQUIRE(results.ok());
  for (const absl::StatusOr<DataKey>& result : *results) CHECK(result.ok());
  // Each block is committed on its own as it is needed (the items' records commit together
  // at the end, so none can carry one), before the items' records.
  const std::vector<audit::Record> records = RecordsAfter(f, before);
  REQUIRE(records.size() == 5);
  CHECK(records[0].action == "ReserveEncryptions");
  CHECK(records[0].detail == "encryptions reserved up to 2");
  CHECK(records[1].action == "ReserveEncryptions");
  CHECK(records[1].detail == "encryptions reserved up to 4");
  for (size_t i = 2; i < 5; ++i) CHECK(records[i].action == "GenerateDataKey");
  absl::StatusOr<std::vector<storage::VersionUsage>> stored = f.store->GetUsage(key->id);
  REQUIRE(stored.ok());
  REQUIRE(stored->size() == 1);
  CHECK((*stored)[0].encryptions_reserved == 4);
}

TEST_CASE("A batch whose records cannot be written returns no item", "[kms][batch]") {
  Fixture f;
  f.NewKey("batch");
  const EncryptionContext context;
  const std::vector<DataKeyItem> items(3, DataKeyItem{"batch", context, 32});
  const uint64_t before = f.store->AuditHead()->first;
  f.store->InjectWriteFault(absl::UnavailableError("disk full"));
  absl::StatusOr<std::vector<absl::StatusOr<DataKey>>> results =
      f.kms->BatchGenerateDataKey(f.app, items, true);
  CHECK(absl::IsUnavailable(results.status()));
  CHECK(results.status().message() ==
        "batch refused, its records could not be written: audit log unavailable: disk full");
  CHECK(f.store->AuditHead()->first == before);
}

}  // namespace
}  // namespace custos::core
