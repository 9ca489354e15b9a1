#include "server/services.h"

#include "server/grpc_status.h"
#include "server/peer_identity.h"

namespace custos::server {
namespace {

using core::EncryptionContext;
namespace pb = custos::v1;

EncryptionContext ToContext(const google::protobuf::Map<std::string, std::string>& map) {
  return EncryptionContext(map.begin(), map.end());
}

std::span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

std::string ToString(const Bytes& b) { return std::string(b.begin(), b.end()); }

// The reply needs its own copy of a plaintext. Custos wipes every copy it owns; the reply
// message and gRPC's serialised and TLS buffers belong to gRPC, which frees them unwiped (see
// docs/ARCHITECTURE.md, "Plaintext in memory").
void SetPlaintext(const SecureBytes& plaintext, std::string* field) {
  field->assign(plaintext.view());
}

size_t DataKeyBytes(pb::DataKeySpec spec) { return spec == pb::AES_128 ? 16 : 32; }

void FillMetadata(const storage::KeyRecord& key, pb::KeyMetadata* out) {
  out->set_key_id(key.id);
  out->set_alias(key.alias);
  out->set_description(key.description);
  out->mutable_tags()->insert(key.tags.begin(), key.tags.end());
  out->set_state(static_cast<pb::KeyState>(key.state));
  out->set_create_time(key.created_at);
  out->set_created_by(key.created_by);
  out->set_primary_version(key.primary_version);
  for (const storage::KeyVersion& v : key.versions) {
    pb::KeyVersionMetadata* version = out->add_versions();
    version->set_version(v.version);
    version->set_create_time(v.created_at);
  }
  for (const std::string& p : key.encrypt_grants) out->add_encrypt_principals(p);
  for (const std::string& p : key.decrypt_grants) out->add_decrypt_principals(p);
}

#define CUSTOS_CALLER_OR_RETURN(caller, context)              \
  absl::StatusOr<core::Caller> caller = CallerOf(*(context)); \
  if (!caller.ok()) return ToGrpcStatus(caller.status())

}  // namespace

grpc::Status KeyServiceImpl::GenerateDataKey(grpc::ServerContext* context,
                                             const pb::GenerateDataKeyRequest* request,
                                             pb::GenerateDataKeyResponse* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  absl::StatusOr<core::DataKey> key =
      kms_->GenerateDataKey(*caller, request->key(), ToContext(request->encryption_context()),
                            DataKeyBytes(request->key_spec()), /*with_plaintext=*/true);
  if (!key.ok()) return ToGrpcStatus(key.status());
  SetPlaintext(key->plaintext, response->mutable_plaintext());
  response->set_ciphertext_blob(ToString(key->ciphertext_blob));
  response->set_key_id(key->key_id);
  response->set_key_version(key->key_version);
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::GenerateDataKeyWithoutPlaintext(
    grpc::ServerContext* context, const pb::GenerateDataKeyRequest* request,
    pb::GenerateDataKeyWithoutPlaintextResponse* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  absl::StatusOr<core::DataKey> key =
      kms_->GenerateDataKey(*caller, request->key(), ToContext(request->encryption_context()),
                            DataKeyBytes(request->key_spec()), /*with_plaintext=*/false);
  if (!key.ok()) return ToGrpcStatus(key.status());
  response->set_ciphertext_blob(ToString(key->ciphertext_blob));
  response->set_key_id(key->key_id);
  response->set_key_version(key->key_version);
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::Encrypt(grpc::ServerContext* context,
                                     const pb::EncryptRequest* request,
                                     pb::EncryptResponse* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  absl::StatusOr<core::Ciphertext> sealed =
      kms_->Encrypt(*caller, request->key(), AsBytes(request->plaintext()),
                    ToContext(request->encryption_context()));
  if (!sealed.ok()) return ToGrpcStatus(sealed.status());
  response->set_ciphertext_blob(ToString(sealed->ciphertext_blob));
  response->set_key_id(sealed->key_id);
  response->set_key_version(sealed->key_version);
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::Decrypt(grpc::ServerContext* context,
                                     const pb::DecryptRequest* request,
                                     pb::DecryptResponse* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  absl::StatusOr<core::Plaintext> opened = kms_->Decrypt(
      *caller, AsBytes(request->ciphertext_blob()), ToContext(request->encryption_context()));
  if (!opened.ok()) return ToGrpcStatus(opened.status());
  SetPlaintext(opened->plaintext, response->mutable_plaintext());
  response->set_key_id(opened->key_id);
  response->set_key_version(opened->key_version);
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::ReEncrypt(grpc::ServerContext* context,
                                       const pb::ReEncryptRequest* request,
                                       pb::ReEncryptResponse* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  absl::StatusOr<core::ReEncrypted> result = kms_->ReEncrypt(
      *caller, AsBytes(request->ciphertext_blob()), ToContext(request->source_encryption_context()),
      request->destination_key(), ToContext(request->destination_encryption_context()));
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_ciphertext_blob(ToString(result->destination.ciphertext_blob));
  response->set_source_key_id(result->source_key_id);
  response->set_source_key_version(result->source_key_version);
  response->set_key_id(result->destination.key_id);
  response->set_key_version(result->destination.key_version);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::CreateKey(grpc::ServerContext* context,
                                         const pb::CreateKeyRequest* request,
                                         pb::KeyMetadata* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  core::CreateKeyParams params;
  params.alias = request->alias();
  params.description = request->description();
  params.tags.insert(request->tags().begin(), request->tags().end());
  params.encrypt_principals.insert(request->encrypt_principals().begin(),
                                   request->encrypt_principals().end());
  params.decrypt_principals.insert(request->decrypt_principals().begin(),
                                   request->decrypt_principals().end());
  absl::StatusOr<core::KeyRef> key = kms_->CreateKey(*caller, params);
  if (!key.ok()) return ToGrpcStatus(key.status());
  FillMetadata(**key, response);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::DescribeKey(grpc::ServerContext* context,
                                           const pb::DescribeKeyRequest* request,
                                           pb::KeyMetadata* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  absl::StatusOr<core::KeyRef> key = kms_->DescribeKey(*caller, request->key());
  if (!key.ok()) return ToGrpcStatus(key.status());
  FillMetadata(**key, response);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ListKeys(grpc::ServerContext* context,
                                        const pb::ListKeysRequest* request,
                                        pb::ListKeysResponse* response) {
  CUSTOS_CALLER_OR_RETURN(caller, context);
  const size_t page_size = request->page_size() == 0 ? 100 : request->page_size();
  absl::StatusOr<storage::KeyPage> page = kms_->ListKeys(*caller, page_size, request->page_token());
  if (!page.ok()) return ToGrpcStatus(page.status());
  for (const auto& key : page->keys) FillMetadata(*key, response->add_keys());
  response->set_next_page_token(page->next_page_token);
  return grpc::Status::OK;
}

}  // namespace custos::server
