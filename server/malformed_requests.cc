#include "server/malformed_requests.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "server/peer_identity.h"

namespace custos::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

class Interceptor final : public grpc::experimental::Interceptor {
 public:
  Interceptor(grpc::experimental::ServerRpcInfo* info, RefusalRecorder* refusals)
      : info_(info), refusals_(refusals) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // gRPC hands the method no request when it did not parse, and answers UNIMPLEMENTED.
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() == nullptr) {
      malformed_ = true;
    }
    if (malformed_ &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      // "/custos.v1.KeyService/Decrypt" is recorded as its services' own refusals are: "Decrypt".
      const std::string method = info_->method();
      const std::string rpc = method.substr(method.rfind('/') + 1);
      const std::string reason =
          absl::StrCat("the request is not a well-formed ", rpc,
                       " request: it does not parse as the method's protobuf message");
      const grpc::ServerContextBase& context = *info_->server_context();
      absl::StatusOr<core::Caller> caller = CallerOf(context);
      refusals_->Refused(rpc, caller.ok() ? std::move(caller->principal) : std::string(),
                         context.peer(), absl::StatusCode::kInvalidArgument, reason);
      methods->ModifySendStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, reason));
    }
    methods->Proceed();
  }

 private:
  grpc::experimental::ServerRpcInfo* const info_;
  RefusalRecorder* const refusals_;
  bool malformed_ = false;
};

class Factory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit Factory(RefusalRecorder* refusals) : refusals_(refusals) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    using Type = grpc::experimental::ServerRpcInfo::Type;
    // Streams from the client parse each message as the method reads it, not before.
    if (info->type() != Type::UNARY && info->type() != Type::SERVER_STREAMING) return nullptr;
    return new Interceptor(info, refusals_);
  }

 private:
  RefusalRecorder* const refusals_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MalformedRequestRefusals(
    RefusalRecorder* refusals) {
  return std::make_unique<Factory>(refusals);
}

}  // namespace custos::server
