// The gRPC front door: KeyService and AdminService on gRPC's callback API, AuditService
// synchronous. Each method reads the request, calls the matching core::Kms use case with the
// caller taken from the client certificate, and maps the result; nothing else happens here.
//
// No gRPC thread waits on a call: a callback method hands its work to the CallRunner and
// returns. The runner's threads do the blocking part (HSM calls, the audit commit); calls
// beyond them wait in a queue, in arrival order, and only a call arriving while
// server.max_waiting_calls wait already is refused (RESOURCE_EXHAUSTED, logged and audited
// through the RefusalRecorder). A call whose client gave up (cancelled, or past its deadline)
// while it waited is dropped without doing any work.
//
// The runner has three lanes, each with threads and a queue of its own, chosen by the caller's
// role: officers' calls, auditors' calls, and everyone else's (the data lane). No backlog of
// applications' calls holds up an approval, a key's description or an audit read, and no
// auditor reading the log as fast as it can holds up an officer. (The lanes share the HSM
// layer's threads.)
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>

#include "common/metrics.h"
#include "common/work_queue.h"
#include "core/kms.h"
#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "custos/v1/database_service.grpc.pb.h"
#include "custos/v1/key_service.grpc.pb.h"
#include "server/rate_limiter.h"
#include "server/refusals.h"
#include "server/wiped_messages.h"

namespace custos::server {

class CallRunner {
 public:
  enum class Lane { kData, kOfficer, kAuditor };
  struct Threads {
    size_t data = 16;  // server.worker_threads
    size_t admin = 4;  // server.admin_worker_threads: for officers, and as many for auditors
  };
  // `kms` and `refusals` must outlive the runner. `threads` run calls, in each lane; at most
  // `max_waiting` calls wait for one, in each lane.
  CallRunner(core::Kms* kms, RefusalRecorder* refusals, Threads threads, size_t max_waiting);

  // Refuses calls beyond a rate per peer address and per principal (either may be null: no
  // limit), with RESOURCE_EXHAUSTED before they queue, counted by the RefusalRecorder. Set
  // before serving; the limiters must outlive the runner.
  void LimitRates(RateLimiter* per_peer, RateLimiter* per_principal) {
    per_peer_ = per_peer;
    per_principal_ = per_principal;
  }

  // Counts every call's answer by method and status code, and times it from arrival to
  // answer (custos_requests_total, custos_request_duration_seconds). Set before serving;
  // `registry` must outlive the runner.
  void Measure(metrics::Registry* registry) { metrics_ = registry; }

  // The use case a call runs once its caller is authenticated; it fills the response.
  using Work = std::function<grpc::Status(core::Kms&, const core::Caller&)>;

  // Queues `work` for `context`'s call to `rpc` in its caller's lane and returns the call's
  // reactor, finished once the work ran (or at once, if the lane's queue is full).
  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* context, const char* rpc, Work work);
  // Queues `work` for a worker of `context`'s lane like a call's, for a stream's next page;
  // false if the queue is full.
  bool Post(const grpc::ServerContextBase& context, std::function<void()> work) {
    return QueueOf(context).TrySubmit(std::move(work));
  }
  core::Kms& kms() const { return *kms_; }
  RefusalRecorder& refusals() const { return *refusals_; }

  // Refuses `context`'s call to `rpc` at once with `refusal`, before it queues (a request no
  // worker should hold); recorded through the RefusalRecorder, counted.
  grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* context, const char* rpc,
                                   const absl::Status& refusal);

  struct Counts {
    uint64_t refused = 0;       // the queue was full
    uint64_t abandoned = 0;     // cancelled or past their deadline before they ran
    uint64_t rate_limited = 0;  // over server.rate_limit_per_peer or _per_principal
  };
  Counts counts() const { return {refused_.load(), abandoned_.load(), rate_limited_.load()}; }
  size_t waiting(Lane lane) const {
    return lane == Lane::kOfficer   ? officer_queue_.waiting()
           : lane == Lane::kAuditor ? auditor_queue_.waiting()
                                    : data_queue_.waiting();
  }

 private:
  grpc::Status Execute(const grpc::CallbackServerContext& context, const char* rpc,
                       const Work& work);
  // The queue of `context`'s lane, by its caller's role.
  WorkQueue& QueueOf(const grpc::ServerContextBase& context);
  // Why `context`'s call is over its rate, or OK.
  absl::Status RateLimited(grpc::CallbackServerContext& context);
  // Counts the answer `code` to a call of `rpc` that arrived at `arrived`, if measured.
  void Answered(const char* rpc, grpc::StatusCode code,
                std::chrono::steady_clock::time_point arrived) const;

  core::Kms* const kms_;
  RefusalRecorder* const refusals_;
  std::atomic<uint64_t> refused_{0};
  std::atomic<uint64_t> abandoned_{0};
  std::atomic<uint64_t> rate_limited_{0};
  RateLimiter* per_peer_ = nullptr;       // set before serving
  RateLimiter* per_principal_ = nullptr;  // set before serving
  metrics::Registry* metrics_ = nullptr;  // set before serving
  // Last: their destructors run what waits, which uses the members above.
  WorkQueue data_queue_;
  WorkQueue officer_queue_;
  WorkQueue auditor_queue_;
};

// Its messages that carry plaintexts or context values are wiped before gRPC frees them.
class KeyServiceImpl final : public custos::v1::KeyService::CallbackService {
 public:
  explicit KeyServiceImpl(CallRunner* runner);

  grpc::ServerUnaryReactor* GenerateDataKey(grpc::CallbackServerContext* context,
                                            const custos::v1::GenerateDataKeyRequest* request,
                                            custos::v1::GenerateDataKeyResponse* response) override;
  grpc::ServerUnaryReactor* GenerateDataKeyWithoutPlaintext(
      grpc::CallbackServerContext* context, const custos::v1::GenerateDataKeyRequest* request,
      custos::v1::GenerateDataKeyWithoutPlaintextResponse* response) override;
  grpc::ServerUnaryReactor* Encrypt(grpc::CallbackServerContext* context,
                                    const custos::v1::EncryptRequest* request,
                                    custos::v1::EncryptResponse* response) override;
  grpc::ServerUnaryReactor* Decrypt(grpc::CallbackServerContext* context,
                                    const custos::v1::DecryptRequest* request,
                                    custos::v1::DecryptResponse* response) override;
  grpc::ServerUnaryReactor* ReEncrypt(grpc::CallbackServerContext* context,
                                      const custos::v1::ReEncryptRequest* request,
                                      custos::v1::ReEncryptResponse* response) override;
  grpc::ServerUnaryReactor* BatchGenerateDataKey(
      grpc::CallbackServerContext* context, const custos::v1::BatchGenerateDataKeyRequest* request,
      custos::v1::BatchGenerateDataKeyResponse* response) override;
  grpc::ServerUnaryReactor* BatchDecrypt(grpc::CallbackServerContext* context,
                                         const custos::v1::BatchDecryptRequest* request,
                                         custos::v1::BatchDecryptResponse* response) override;
  grpc::ServerUnaryReactor* BatchReEncrypt(grpc::CallbackServerContext* context,
                                           const custos::v1::BatchReEncryptRequest* request,
                                           custos::v1::BatchReEncryptResponse* response) override;

 private:
  template <typename Request, typename Response>
  using Wiping = WipingAllocator<Request, Response>;

  CallRunner* runner_;
  Wiping<custos::v1::GenerateDataKeyRequest, custos::v1::GenerateDataKeyResponse> generate_;
  Wiping<custos::v1::GenerateDataKeyRequest, custos::v1::GenerateDataKeyWithoutPlaintextResponse>
      generate_without_plaintext_;
  Wiping<custos::v1::EncryptRequest, custos::v1::EncryptResponse> encrypt_;
  Wiping<custos::v1::DecryptRequest, custos::v1::DecryptResponse> decrypt_;
  Wiping<custos::v1::ReEncryptRequest, custos::v1::ReEncryptResponse> re_encrypt_;
  Wiping<custos::v1::BatchGenerateDataKeyRequest, custos::v1::BatchGenerateDataKeyResponse>
      batch_generate_;
  Wiping<custos::v1::BatchDecryptRequest, custos::v1::BatchDecryptResponse> batch_decrypt_;
  Wiping<custos::v1::BatchReEncryptRequest, custos::v1::BatchReEncryptResponse> batch_re_encrypt_;
};

class AdminServiceImpl final : public custos::v1::AdminService::CallbackService {
 public:
  explicit AdminServiceImpl(CallRunner* runner) : runner_(runner) {}

  grpc::ServerUnaryReactor* CreateKey(grpc::CallbackServerContext* context,
                                      const custos::v1::CreateKeyRequest* request,
                                      custos::v1::KeyMetadata* response) override;
  grpc::ServerUnaryReactor* DescribeKey(grpc::CallbackServerContext* context,
                                        const custos::v1::DescribeKeyRequest* request,
                                        custos::v1::KeyMetadata* response) override;
  grpc::ServerUnaryReactor* ListKeys(grpc::CallbackServerContext* context,
                                     const custos::v1::ListKeysRequest* request,
                                     custos::v1::ListKeysResponse* response) override;
  grpc::ServerUnaryReactor* Propose(grpc::CallbackServerContext* context,
                                    const custos::v1::ProposeRequest* request,
                                    custos::v1::ChangeRequest* response) override;
  grpc::ServerUnaryReactor* Approve(grpc::CallbackServerContext* context,
                                    const custos::v1::ApproveRequest* request,
                                    custos::v1::ChangeRequest* response) override;
  grpc::ServerUnaryReactor* Reject(grpc::CallbackServerContext* context,
                                   const custos::v1::RejectRequest* request,
                                   custos::v1::ChangeRequest* response) override;
  grpc::ServerUnaryReactor* GetRequest(grpc::CallbackServerContext* context,
                                       const custos::v1::GetRequestRequest* request,
                                       custos::v1::ChangeRequest* response) override;
  grpc::ServerUnaryReactor* ListRequests(grpc::CallbackServerContext* context,
                                         const custos::v1::ListRequestsRequest* request,
                                         custos::v1::ListRequestsResponse* response) override;

 private:
  CallRunner* runner_;
};

// The databases' service: claiming the gateway token issued to the caller (docs/TDE.md).
// Its reply, a database's token, is wiped before gRPC frees it.
class DatabaseServiceImpl final : public custos::v1::DatabaseService::CallbackService {
 public:
  explicit DatabaseServiceImpl(CallRunner* runner) : runner_(runner) {
    SetMessageAllocatorFor_ClaimDatabaseToken(&claim_);
  }

  grpc::ServerUnaryReactor* ClaimDatabaseToken(
      grpc::CallbackServerContext* context, const custos::v1::ClaimDatabaseTokenRequest* request,
      custos::v1::ClaimDatabaseTokenResponse* response) override;

 private:
  CallRunner* runner_;
  WipingAllocator<custos::v1::ClaimDatabaseTokenRequest, custos::v1::ClaimDatabaseTokenResponse>
      claim_;
};

// The auditors' service, on gRPC's callback API like the others: its streams hold no thread
// while a client reads slowly, or not at all. Pages of records are read on the CallRunner's
// workers; between pages a stream only waits for its client. At most `max_streams` streams are
// open at once; a new one past that is refused (RESOURCE_EXHAUSTED) unless some stream has had
// a write waiting on its client for `stall_limit`, which is then cancelled to make room.
class AuditServiceImpl final : public custos::v1::AuditService::CallbackService {
 public:
  struct Limits {
    size_t max_streams = 16;
    std::chrono::seconds stall_limit{30};
  };
  // `runner` and `refusals` must outlive the service; every stream must be done before it goes
  // (gRPC's Server::Shutdown sees to that).
  AuditServiceImpl(CallRunner* runner, RefusalRecorder* refusals, Limits limits);
  ~AuditServiceImpl() override;

  grpc::ServerWriteReactor<custos::v1::AuditRecord>* ReadRecords(
      grpc::CallbackServerContext* context, const custos::v1::ReadRecordsRequest* request) override;
  grpc::ServerUnaryReactor* GetCheckpoint(grpc::CallbackServerContext* context,
                                          const custos::v1::GetCheckpointRequest* request,
                                          custos::v1::Checkpoint* response) override;
  grpc::ServerWriteReactor<custos::v1::Checkpoint>* ReadCheckpoints(
      grpc::CallbackServerContext* context,
      const custos::v1::ReadCheckpointsRequest* request) override;

  // The streams open now, and how many have been cancelled as stalled.
  class Streams;

 private:
  CallRunner* runner_;
  RefusalRecorder* refusals_;
  std::unique_ptr<Streams> streams_;
};

}  // namespace custos::server
