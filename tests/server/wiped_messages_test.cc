// The secret fields of the messages a WipingAllocator releases: plaintexts, encryption-context
// values and database tokens are zeroed in place; what is not secret is left as it was.
#include "server/wiped_messages.h"

#include <catch2/catch.hpp>

#include <string>

namespace custos::server {
namespace {

namespace pb = custos::v1;

bool Zeroed(const std::string& field, size_t size) {
  return field.size() == size && field.find_first_not_of('\0') == std::string::npos;
}

TEST_CASE("Plaintexts, context values and tokens are wiped in place; the rest is kept",
          "[wiped_messages]") {
  const std::string key(32, 'k');
  const std::string value = "patient-4711";

  pb::GenerateDataKeyResponse generated;
  generated.set_plaintext(key);
  generated.set_ciphertext_blob("blob");
  generated.set_key_id("k1");
  WipeSecrets(generated);
  CHECK(Zeroed(generated.plaintext(), 32));
  CHECK(generated.ciphertext_blob() == "blob");
  CHECK(generated.key_id() == "k1");

  pb::EncryptRequest encrypt;
  encrypt.set_key("k1");
  encrypt.set_plaintext("secret record");
  (*encrypt.mutable_encryption_context())["record"] = value;
  WipeSecrets(encrypt);
  CHECK(Zeroed(encrypt.plaintext(), 13));
  CHECK(Zeroed(encrypt.encryption_context().at("record"), value.size()));  // the name is kept
  CHECK(encrypt.key() == "k1");

  pb::ReEncryptRequest re_encrypt;
  (*re_encrypt.mutable_source_encryption_context())["a"] = value;
  (*re_encrypt.mutable_destination_encryption_context())["b"] = value;
  WipeSecrets(re_encrypt);
  CHECK(Zeroed(re_encrypt.source_encryption_context().at("a"), value.size()));
  CHECK(Zeroed(re_encrypt.destination_encryption_context().at("b"), value.size()));

  pb::BatchDecryptRequest batch_request;
  for (int i = 0; i < 3; ++i) {
    (*batch_request.add_items()->mutable_encryption_context())["record"] = value;
  }
  WipeSecrets(batch_request);
  for (const pb::DecryptRequest& item : batch_request.items()) {
    CHECK(Zeroed(item.encryption_context().at("record"), value.size()));
  }

  pb::BatchDecryptResponse batch_reply;
  batch_reply.add_results()->mutable_status()->set_code(5);  // an item that failed: no plaintext
  batch_reply.add_results()->mutable_plaintext()->set_plaintext(key);
  WipeSecrets(batch_reply);
  CHECK_FALSE(batch_reply.results(0).has_plaintext());
  CHECK(Zeroed(batch_reply.results(1).plaintext().plaintext(), 32));

  pb::BatchGenerateDataKeyResponse batch_generated;
  batch_generated.add_results()->mutable_data_key()->set_plaintext(key);
  WipeSecrets(batch_generated);
  CHECK(Zeroed(batch_generated.results(0).data_key().plaintext(), 32));

  pb::ClaimDatabaseTokenResponse claimed;
  claimed.set_token("hvs.token-secret");
  WipeSecrets(claimed);
  CHECK(Zeroed(claimed.token(), 16));
}

TEST_CASE("A WipingAllocator's messages are fresh for each call", "[wiped_messages]") {
  WipingAllocator<pb::DecryptRequest, pb::DecryptResponse> allocator;
  grpc::MessageHolder<pb::DecryptRequest, pb::DecryptResponse>* first =
      allocator.AllocateMessages();
  first->response()->set_plaintext(std::string(32, 'k'));
  grpc::MessageHolder<pb::DecryptRequest, pb::DecryptResponse>* second =
      allocator.AllocateMessages();
  CHECK(second->response()->plaintext().empty());
  CHECK(second->request() != first->request());
  first->Release();  // wipes, then frees (LeakSanitizer: nothing left)
  second->Release();
}

}  // namespace
}  // namespace custos::server
