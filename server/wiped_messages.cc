#include "server/wiped_messages.h"

#include <openssl/crypto.h>

#include <string>

namespace custos::server {
namespace {

namespace pb = custos::v1;

void Wipe(std::string& field) {
  if (!field.empty()) OPENSSL_cleanse(field.data(), field.size());
}

// Context values only: their names are not secret (the audit log keeps only an HMAC of both).
void Wipe(google::protobuf::Map<std::string, std::string>& context) {
  for (auto& entry : context) Wipe(entry.second);
}

}  // namespace

void WipeSecrets(pb::GenerateDataKeyRequest& message) {
  Wipe(*message.mutable_encryption_context());
}
void WipeSecrets(pb::GenerateDataKeyResponse& message) { Wipe(*message.mutable_plaintext()); }
void WipeSecrets(pb::GenerateDataKeyWithoutPlaintextResponse&) {}
void WipeSecrets(pb::EncryptRequest& message) {
  Wipe(*message.mutable_plaintext());
  Wipe(*message.mutable_encryption_context());
}
void WipeSecrets(pb::EncryptResponse&) {}
void WipeSecrets(pb::DecryptRequest& message) { Wipe(*message.mutable_encryption_context()); }
void WipeSecrets(pb::DecryptResponse& message) { Wipe(*message.mutable_plaintext()); }
void WipeSecrets(pb::ReEncryptRequest& message) {
  Wipe(*message.mutable_source_encryption_context());
  Wipe(*message.mutable_destination_encryption_context());
}
void WipeSecrets(pb::ReEncryptResponse&) {}

void WipeSecrets(pb::BatchGenerateDataKeyRequest& message) {
  for (pb::GenerateDataKeyRequest& item : *message.mutable_items()) WipeSecrets(item);
}
void WipeSecrets(pb::BatchGenerateDataKeyResponse& message) {
  for (auto& result : *message.mutable_results()) {
    if (result.has_data_key()) WipeSecrets(*result.mutable_data_key());
  }
}
void WipeSecrets(pb::BatchDecryptRequest& message) {
  for (pb::DecryptRequest& item : *message.mutable_items()) WipeSecrets(item);
}
void WipeSecrets(pb::BatchDecryptResponse& message) {
  for (auto& result : *message.mutable_results()) {
    if (result.has_plaintext()) WipeSecrets(*result.mutable_plaintext());
  }
}
void WipeSecrets(pb::BatchReEncryptRequest& message) {
  for (pb::ReEncryptRequest& item : *message.mutable_items()) WipeSecrets(item);
}
void WipeSecrets(pb::BatchReEncryptResponse&) {}

void WipeSecrets(pb::ClaimDatabaseTokenRequest&) {}
void WipeSecrets(pb::ClaimDatabaseTokenResponse& message) { Wipe(*message.mutable_token()); }

}  // namespace custos::server
