// Batch calls through custosd: 1,000 items a call, each succeeding or failing on its own, one
// audit record per item.
#include <catch2/catch.hpp>
#include <map>
#include <set>
#include <string>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

TEST_CASE("A thousand data keys made, opened and re-wrapped in three batch calls", "[e2e][batch]") {
  CustosServer& server = CustosServer::Shared();
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("batch/source"), true, true);
  const pb::KeyMetadata destination = CreateKey(server, UniqueAlias("batch/dest"), true, true);
  auto app = server.Keys("app");

  pb::BatchGenerateDataKeyRequest generate;
  for (int i = 0; i < 1000; ++i) {
    pb::GenerateDataKeyRequest* item = generate.add_items();
    item->set_key(key.key_id());
    (*item->mutable_encryption_context())["row"] = std::to_string(i);
  }
  pb::BatchGenerateDataKeyResponse generated;
  grpc::Status status = app->BatchGenerateDataKey(Context().get(), generate, &generated);
  INFO(status.error_message());
  REQUIRE(status.ok());
  REQUIRE(generated.results_size() == 1000);
  for (const auto& result : generated.results()) {
    REQUIRE(result.status().code() == 0);
    REQUIRE(result.data_key().plaintext().size() == 32);
  }

  pb::BatchDecryptRequest decrypt;
  for (int i = 0; i < 1000; ++i) {
    pb::DecryptRequest* item = decrypt.add_items();
    item->set_ciphertext_blob(generated.results(i).data_key().ciphertext_blob());
    (*item->mutable_encryption_context())["row"] = std::to_string(i);
  }
  pb::BatchDecryptResponse opened;
  status = app->BatchDecrypt(Context().get(), decrypt, &opened);
  INFO(status.error_message());
  REQUIRE(status.ok());
  REQUIRE(opened.results_size() == 1000);
  for (int i = 0; i < 1000; ++i) {
    REQUIRE(opened.results(i).status().code() == 0);
    REQUIRE(opened.results(i).plaintext().plaintext() ==
            generated.results(i).data_key().plaintext());
  }

  pb::BatchReEncryptRequest rewrap;
  for (int i = 0; i < 1000; ++i) {
    pb::ReEncryptRequest* item = rewrap.add_items();
    item->set_ciphertext_blob(generated.results(i).data_key().ciphertext_blob());
    (*item->mutable_source_encryption_context())["row"] = std::to_string(i);
    item->set_destination_key(destination.key_id());
    (*item->mutable_destination_encryption_context())["row"] = std::to_string(i);
  }
  pb::BatchReEncryptResponse rewrapped;
  status = app->BatchReEncrypt(Context().get(), rewrap, &rewrapped);
  INFO(status.error_message());
  REQUIRE(status.ok());
  REQUIRE(rewrapped.results_size() == 1000);
  for (int i = 0; i < 1000; ++i) {
    REQUIRE(rewrapped.results(i).status().code() == 0);
    REQUIRE(rewrapped.results(i).reencrypted().key_id() == destination.key_id());
    REQUIRE(rewrapped.results(i).reencrypted().source_key_id() == key.key_id());
    decrypt.mutable_items(i)->set_ciphertext_blob(
        rewrapped.results(i).reencrypted().ciphertext_blob());
  }
  status = app->BatchDecrypt(Context().get(), decrypt, &opened);
  REQUIRE(status.ok());
  for (int i = 0; i < 1000; ++i) {
    REQUIRE(opened.results(i).plaintext().plaintext() ==
            generated.results(i).data_key().plaintext());
  }

  // One record per item, each batch under one call id.
  std::map<std::string, std::set<std::string>> call_ids;  // action -> call ids
  std::map<std::string, size_t> records;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.detail().rfind("batch item ", 0) != 0 || r.outcome() != "OK") continue;
    if (r.key_id() != key.key_id() && r.key_id() != destination.key_id()) continue;
    ++records[r.action()];
    call_ids[r.action()].insert(r.call_id());
  }
  CHECK(records["GenerateDataKey"] == 1000);
  CHECK(records["Decrypt"] == 2000);
  CHECK(records["ReEncrypt"] == 1000);
  CHECK(call_ids["GenerateDataKey"].size() == 1);
  CHECK(call_ids["Decrypt"].size() == 2);
  CHECK(call_ids["ReEncrypt"].size() == 1);
}

TEST_CASE("Batch items fail on their own; an oversized batch is refused whole", "[e2e][batch]") {
  CustosServer& server = CustosServer::Shared();
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("batch/mixed"), true, false);
  auto app = server.Keys("app");
  pb::BatchGenerateDataKeyRequest generate;
  generate.set_without_plaintext(true);
  generate.add_items()->set_key(key.key_id());
  generate.add_items()->set_key("no/such/key");
  generate.add_items()->set_key(key.key_id());
  generate.mutable_items(2)->set_key_spec(static_cast<pb::DataKeySpec>(99));
  pb::BatchGenerateDataKeyResponse generated;
  grpc::Status status = app->BatchGenerateDataKey(Context().get(), generate, &generated);
  REQUIRE(status.ok());
  REQUIRE(generated.results_size() == 3);
  CHECK(generated.results(0).status().code() == 0);
  CHECK(generated.results(0).data_key().plaintext().empty());  // without plaintext
  CHECK_FALSE(generated.results(0).data_key().ciphertext_blob().empty());
  CHECK(generated.results(1).status().code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK(generated.results(1).status().message() ==
        "principal 'spiffe://custos.local/app/demo' has no encrypt grant on key 'no/such/key', "
        "or no such key exists");
  CHECK(generated.results(2).status().code() == grpc::StatusCode::INVALID_ARGUMENT);

  pb::BatchDecryptRequest too_many;
  for (int i = 0; i < 1001; ++i) too_many.add_items()->set_ciphertext_blob("x");
  pb::BatchDecryptResponse refused;
  status = app->BatchDecrypt(Context().get(), too_many, &refused);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(status.error_message() == "a batch holds 1 to 1000 items; this one holds 1001");
  CHECK(refused.results_size() == 0);

  // Officers never receive key material, batch or not: the whole batch is refused.
  pb::BatchGenerateDataKeyResponse officer_reply;
  status = server.Keys("officer1")->BatchGenerateDataKey(Context().get(), generate, &officer_reply);
  CHECK(status.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK(officer_reply.results_size() == 0);
}

}  // namespace
}  // namespace custos::testing
