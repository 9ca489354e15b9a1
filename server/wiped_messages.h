// Request and reply messages that carry plaintext keys, encryption-context values or database
// tokens, wiped (OPENSSL_cleanse) before gRPC frees them.
//
// By default gRPC's callback API places a call's messages on the call's arena and frees them
// as they are. A WipingAllocator, registered per method (SetMessageAllocatorFor_<Method>),
// makes them itself and wipes their secret fields when gRPC releases them, once the reply is
// sent. gRPC's own serialised and TLS buffers stay out of reach (docs/ARCHITECTURE.md,
// "Plaintext in memory").
#pragma once

#include <grpcpp/support/message_allocator.h>

#include "custos/v1/database_service.pb.h"
#include "custos/v1/key_service.pb.h"

namespace custos::server {

// The secret fields of each message, wiped in place (their sizes are kept). Messages with no
// secret field have an overload that does nothing, so a new method must choose.
void WipeSecrets(custos::v1::GenerateDataKeyRequest& message);
void WipeSecrets(custos::v1::GenerateDataKeyResponse& message);
void WipeSecrets(custos::v1::GenerateDataKeyWithoutPlaintextResponse& message);
void WipeSecrets(custos::v1::EncryptRequest& message);
void WipeSecrets(custos::v1::EncryptResponse& message);
void WipeSecrets(custos::v1::DecryptRequest& message);
void WipeSecrets(custos::v1::DecryptResponse& message);
void WipeSecrets(custos::v1::ReEncryptRequest& message);
void WipeSecrets(custos::v1::ReEncryptResponse& message);
void WipeSecrets(custos::v1::BatchGenerateDataKeyRequest& message);
void WipeSecrets(custos::v1::BatchGenerateDataKeyResponse& message);
void WipeSecrets(custos::v1::BatchDecryptRequest& message);
void WipeSecrets(custos::v1::BatchDecryptResponse& message);
void WipeSecrets(custos::v1::BatchReEncryptRequest& message);
void WipeSecrets(custos::v1::BatchReEncryptResponse& message);
void WipeSecrets(custos::v1::ClaimDatabaseTokenRequest& message);
void WipeSecrets(custos::v1::ClaimDatabaseTokenResponse& message);

// Thread-safe; must outlive the server it is registered with.
template <typename Request, typename Response>
class WipingAllocator final : public grpc::MessageAllocator<Request, Response> {
 public:
  grpc::MessageHolder<Request, Response>* AllocateMessages() override { return new Holder(); }

 private:
  class Holder final : public grpc::MessageHolder<Request, Response> {
   public:
    Holder() {
      this->set_request(&request_);
      this->set_response(&response_);
    }
    void Release() override {
      WipeSecrets(request_);
      WipeSecrets(response_);
      delete this;
    }

   private:
    Request request_;
    Response response_;
  };
};

}  // namespace custos::server
