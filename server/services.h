// The gRPC front door: KeyService and AdminService. Each method reads the request, calls the
// matching core::Kms use case with the caller taken from the client certificate, and maps the
// result; nothing else happens here.
#pragma once

#include "core/kms.h"
#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "custos/v1/key_service.grpc.pb.h"

namespace custos::server {

class KeyServiceImpl final : public custos::v1::KeyService::Service {
 public:
  explicit KeyServiceImpl(core::Kms* kms) : kms_(kms) {}

  grpc::Status GenerateDataKey(grpc::ServerContext* context,
                               const custos::v1::GenerateDataKeyRequest* request,
                               custos::v1::GenerateDataKeyResponse* response) override;
  grpc::Status GenerateDataKeyWithoutPlaintext(
      grpc::ServerContext* context, const custos::v1::GenerateDataKeyRequest* request,
      custos::v1::GenerateDataKeyWithoutPlaintextResponse* response) override;
  grpc::Status Encrypt(grpc::ServerContext* context, const custos::v1::EncryptRequest* request,
                       custos::v1::EncryptResponse* response) override;
  grpc::Status Decrypt(grpc::ServerContext* context, const custos::v1::DecryptRequest* request,
                       custos::v1::DecryptResponse* response) override;
  grpc::Status ReEncrypt(grpc::ServerContext* context, const custos::v1::ReEncryptRequest* request,
                         custos::v1::ReEncryptResponse* response) override;

 private:
  core::Kms* kms_;
};

class AdminServiceImpl final : public custos::v1::AdminService::Service {
 public:
  explicit AdminServiceImpl(core::Kms* kms) : kms_(kms) {}

  grpc::Status CreateKey(grpc::ServerContext* context, const custos::v1::CreateKeyRequest* request,
                         custos::v1::KeyMetadata* response) override;
  grpc::Status DescribeKey(grpc::ServerContext* context,
                           const custos::v1::DescribeKeyRequest* request,
                           custos::v1::KeyMetadata* response) override;
  grpc::Status ListKeys(grpc::ServerContext* context, const custos::v1::ListKeysRequest* request,
                        custos::v1::ListKeysResponse* response) override;
  grpc::Status Propose(grpc::ServerContext* context, const custos::v1::ProposeRequest* request,
                       custos::v1::ChangeRequest* response) override;
  grpc::Status Approve(grpc::ServerContext* context, const custos::v1::ApproveRequest* request,
                       custos::v1::ChangeRequest* response) override;
  grpc::Status Reject(grpc::ServerContext* context, const custos::v1::RejectRequest* request,
                      custos::v1::ChangeRequest* response) override;
  grpc::Status GetRequest(grpc::ServerContext* context,
                          const custos::v1::GetRequestRequest* request,
                          custos::v1::ChangeRequest* response) override;
  grpc::Status ListRequests(grpc::ServerContext* context,
                            const custos::v1::ListRequestsRequest* request,
                            custos::v1::ListRequestsResponse* response) override;

 private:
  core::Kms* kms_;
};

class AuditServiceImpl final : public custos::v1::AuditService::Service {
 public:
  explicit AuditServiceImpl(core::Kms* kms) : kms_(kms) {}

  grpc::Status ReadRecords(grpc::ServerContext* context,
                           const custos::v1::ReadRecordsRequest* request,
                           grpc::ServerWriter<custos::v1::AuditRecord>* writer) override;
  grpc::Status GetCheckpoint(grpc::ServerContext* context,
                             const custos::v1::GetCheckpointRequest* request,
                             custos::v1::Checkpoint* response) override;
  grpc::Status ReadCheckpoints(grpc::ServerContext* context,
                               const custos::v1::ReadCheckpointsRequest* request,
                               grpc::ServerWriter<custos::v1::Checkpoint>* writer) override;

 private:
  core::Kms* kms_;
};

}  // namespace custos::server
