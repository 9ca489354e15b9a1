// The serving layer: calls beyond custosd's workers wait in its queue instead of being refused;
// past server.max_waiting_calls they are refused, logged and audited, coalesced; a call whose
// client gave up while it waited does no work.
#include <signal.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tests/e2e/e2e_util.h"
#include "tests/support/files.h"

#include <grpcpp/impl/client_unary_call.h>

namespace custos::testing {
namespace {

using namespace std::chrono_literals;

// Calls started with the callback API, all in flight at once; Wait() collects their statuses.
class Burst {
 public:
  // Starts one GenerateDataKey on `key` through `stub` with `timeout` as its deadline.
  void Start(pb::KeyService::Stub& stub, const std::string& key,
             std::chrono::milliseconds timeout = 60s) {
    auto call = std::make_unique<Call>();
    call->request.set_key(key);
    call->context.set_deadline(std::chrono::system_clock::now() + timeout);
    Call* started = call.get();
    {
      std::lock_guard lock(mu_);
      calls_.push_back(std::move(call));
    }
    stub.async()->GenerateDataKey(&started->context, &started->request, &started->reply,
                                  [this, started](const grpc::Status& status) {
                                    std::lock_guard lock(mu_);
                                    started->status = status;
                                    ++done_;
                                    cv_.notify_all();
                                  });
  }
  // Waits until `count` calls have finished (all of them by default).
  void Wait(size_t count = SIZE_MAX) {
    std::unique_lock lock(mu_);
    if (count == SIZE_MAX) count = calls_.size();
    REQUIRE(cv_.wait_for(lock, 120s, [&] { return done_ >= count; }));
  }
  // Finished calls by status code, and the first message of each code.
  std::map<grpc::StatusCode, size_t> Codes(std::map<grpc::StatusCode, std::string>* messages) {
    std::lock_guard lock(mu_);
    std::map<grpc::StatusCode, size_t> codes;
    for (const auto& call : calls_) {
      if (!call->status) continue;
      ++codes[call->status->error_code()];
      if (messages != nullptr)
        messages->emplace(call->status->error_code(), call->status->error_message());
    }
    return codes;
  }

 private:
  struct Call {
    grpc::ClientContext context;
    pb::GenerateDataKeyRequest request;
    pb::GenerateDataKeyResponse reply;
    std::optional<grpc::Status> status;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Call>> calls_;
  size_t done_ = 0;
};

// A server with one worker and room for two waiting calls, on the fault module, so that a
// test can hold the worker with a hung C_Encrypt (which the HSM layer lets hang for a minute).
void UseOneWorker(CustosServer& server) {
  server.Stop();
  server.EditConfig("[server]\n", "[server]\nworker_threads = 1\nmax_waiting_calls = 2\n");
  server.EditConfig("[hsm]\n", "[hsm]\ncall_timeout_ms = 60000\nhang_limit_ms = 0\n");
  server.Start();
}

TEST_CASE("A thousand callers at once all wait their turn and are all served and audited",
          "[e2e][serving]") {
  CustosServer server;  // the default config: 16 workers
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("serving/burst"), true, false);
  std::vector<std::unique_ptr<pb::KeyService::Stub>> stubs;
  for (int i = 0; i < 8; ++i) stubs.push_back(server.Keys("app"));  // eight connections
  constexpr int kCallers = 1000;
  constexpr int kRounds = 2;
  for (int round = 0; round < kRounds; ++round) {
    Burst burst;
    for (int i = 0; i < kCallers; ++i) burst.Start(*stubs[i % stubs.size()], key.key_id());
    burst.Wait();
    std::map<grpc::StatusCode, std::string> messages;
    const std::map<grpc::StatusCode, size_t> codes = burst.Codes(&messages);
    for (const auto& [code, message] : messages) INFO(code << ": " << message);
    REQUIRE(codes.size() == 1);
    REQUIRE(codes.at(grpc::StatusCode::OK) == kCallers);
  }
  size_t recorded = 0;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.action() == "GenerateDataKey" && r.key_id() == key.key_id() && r.outcome() == "OK") {
      ++recorded;
    }
  }
  CHECK(recorded == kCallers * kRounds);
  CHECK(server.Log().find("refused") == std::string::npos);
}

TEST_CASE("Past max_waiting_calls calls are refused at once, logged and audited as one tally",
          "[e2e][serving]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true});
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("serving/full"), true, false);
  UseOneWorker(server);
  auto stub = server.Keys("app");
  server.SetFaults("C_Encrypt hang\n");
  Burst held;
  held.Start(*stub, key.key_id());  // takes the one worker and hangs in the HSM
  AwaitLine([&] { return server.FaultLog(); }, "hanging C_Encrypt");
  Burst burst;
  for (int i = 0; i < 9; ++i) burst.Start(*stub, key.key_id());
  burst.Wait(7);  // two wait in the queue; seven are refused without waiting for anything
  std::map<grpc::StatusCode, std::string> messages;
  std::map<grpc::StatusCode, size_t> codes = burst.Codes(&messages);
  REQUIRE(codes[grpc::StatusCode::RESOURCE_EXHAUSTED] == 7);
  CHECK(messages[grpc::StatusCode::RESOURCE_EXHAUSTED] ==
        "custosd is at capacity: 2 calls are waiting already (server.max_waiting_calls); retry "
        "with backoff");
  server.SetFaults("");
  held.Wait();
  burst.Wait();
  codes = burst.Codes(nullptr);
  CHECK(codes[grpc::StatusCode::OK] == 2);  // the two that waited were served
  CHECK(held.Codes(nullptr)[grpc::StatusCode::OK] == 1);

  // One record and one log line for the burst, naming who was refused and how often.
  AwaitLine([&] { return server.Log(); }, "7 calls to GenerateDataKey refused");
  std::vector<pb::AuditRecord> refused;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.outcome() == "RESOURCE_EXHAUSTED") refused.push_back(r);
  }
  REQUIRE(refused.size() == 1);
  CHECK(refused[0].action() == "GenerateDataKey");
  CHECK(refused[0].principal() == kAppPrincipal);
  CHECK(refused[0].peer() == "ipv4:127.0.0.1");  // the address, without the port
  CHECK(refused[0].detail().rfind("7 calls refused from ", 0) == 0);
  CHECK(refused[0].detail().find(": custosd is at capacity: 2 calls are waiting already") !=
        std::string::npos);
  const std::string log = server.Log();
  CHECK(Occurrences(log, "refused (RESOURCE_EXHAUSTED)") == 1);
  CHECK(log.find("7 calls to GenerateDataKey refused (RESOURCE_EXHAUSTED) from ipv") !=
        std::string::npos);
}

TEST_CASE(
    "Officers and auditors have a lane of their own: answered while applications' calls fill "
    "theirs; an application calling AdminService queues with the applications",
    "[e2e][serving]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true});
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("serving/lanes"), true, false);
  UseOneWorker(server);  // worker_threads = 1, max_waiting_calls = 2; admin lane as default
  auto stub = server.Keys("app");
  pb::GenerateDataKeyResponse warm;  // the key unwrapped and its row checked before the hang
  {
    pb::GenerateDataKeyRequest req;
    req.set_key(key.key_id());
    REQUIRE(stub->GenerateDataKey(Context().get(), req, &warm).ok());
  }
  server.SetFaults("C_Encrypt hang\n");
  Burst held;
  held.Start(*stub, key.key_id());  // takes the data lane's one worker and hangs in the HSM
  AwaitLine([&] { return server.FaultLog(); }, "hanging C_Encrypt");
  Burst waiting;
  for (int i = 0; i < 2; ++i) waiting.Start(*stub, key.key_id());  // the data lane is full
  for (int i = 0; i < 200; ++i) {  // until custosd says so (SIGUSR1 logs the queues)
    server.Signal(SIGUSR1);
    std::this_thread::sleep_for(50ms);
    if (server.Log().find("calls: 2 waiting now, 0 of them officers' and 0 auditors'") !=
        std::string::npos) {
      break;
    }
  }
  REQUIRE(server.Log().find("calls: 2 waiting now") != std::string::npos);

  pb::DescribeKeyRequest describe;
  describe.set_key(key.key_id());
  pb::KeyMetadata described;
  // An application calling AdminService is turned away by the full data lane, not let into
  // the officers'.
  const grpc::Status app_call =
      server.Admin("app")->DescribeKey(Context().get(), describe, &described);
  CHECK(app_call.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK(app_call.error_message().rfind("custosd is at capacity: 2 calls are waiting already", 0) ==
        0);
  // Officers and auditors are served meanwhile.
  const grpc::Status officer_call =
      server.Admin("officer1")->DescribeKey(Context().get(), describe, &described);
  INFO(officer_call.error_code() << ": " << officer_call.error_message());
  CHECK(officer_call.ok());
  CHECK(described.key_id() == key.key_id());
  pb::ListRequestsResponse requests;
  CHECK(server.Admin("officer2")
            ->ListRequests(Context().get(), pb::ListRequestsRequest(), &requests)
            .ok());
  auto audit = pb::AuditService::NewStub(server.Channel("auditor"));
  pb::Checkpoint checkpoint;
  const grpc::Status auditor_call = audit->GetCheckpoint(Context().get(), {}, &checkpoint);
  INFO(auditor_call.error_code() << ": " << auditor_call.error_message());
  CHECK((auditor_call.ok() || auditor_call.error_code() == grpc::StatusCode::NOT_FOUND));
  {
    auto context = Context();
    pb::ReadRecordsRequest req;
    req.set_limit(5);
    auto reader = audit->ReadRecords(context.get(), req);
    pb::AuditRecord record;
    int read = 0;
    while (reader->Read(&record)) ++read;
    const grpc::Status finished = reader->Finish();
    INFO(finished.error_code() << ": " << finished.error_message());
    CHECK(finished.ok());
    CHECK(read == 5);
  }

  server.SetFaults("");
  held.Wait();
  waiting.Wait();
  CHECK(held.Codes(nullptr)[grpc::StatusCode::OK] == 1);
  CHECK(waiting.Codes(nullptr)[grpc::StatusCode::OK] == 2);
}

TEST_CASE("A principal over server.rate_limit_per_principal is refused, counted, and others served",
          "[e2e][serving]") {
  CustosServer server;
  const pb::KeyMetadata key = CreateKey(server, UniqueAlias("serving/rate"), true, false);
  server.Stop();
  server.EditConfig("[server]\n", "[server]\nrate_limit_per_principal = 5\n");
  server.Start();
  auto app = server.Keys("app");
  pb::GenerateDataKeyRequest req;
  req.set_key(key.key_id());
  std::map<grpc::StatusCode, size_t> codes;
  std::string refusal;
  for (int i = 0; i < 20; ++i) {
    pb::GenerateDataKeyResponse reply;
    const grpc::Status status = app->GenerateDataKey(Context().get(), req, &reply);
    ++codes[status.error_code()];
    if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      refusal = status.error_message();
    }
  }
  INFO(refusal);
  // A second's worth at once (5), and what refilled while the loop ran.
  CHECK(codes[grpc::StatusCode::OK] >= 5);
  CHECK(codes[grpc::StatusCode::OK] <= 8);
  CHECK(codes[grpc::StatusCode::OK] + codes[grpc::StatusCode::RESOURCE_EXHAUSTED] == 20);
  CHECK(refusal == "rate limit: calls from principal '" + std::string(kAppPrincipal) +
                       "' exceed 5 a second (server.rate_limit_per_principal); retry with backoff");
  // Another principal is not held back by the app's loop.
  pb::ListKeysResponse keys;
  CHECK(server.Admin("officer1")->ListKeys(Context().get(), pb::ListKeysRequest(), &keys).ok());
  // Counted like any refusal before the queue: one tally record, naming the limit.
  AwaitLine([&] { return server.Log(); }, "calls to GenerateDataKey refused (RESOURCE_EXHAUSTED)");
  std::vector<pb::AuditRecord> refused;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.outcome() == "RESOURCE_EXHAUSTED") refused.push_back(r);
  }
  REQUIRE(refused.size() == 1);
  CHECK(refused[0].principal() == kAppPrincipal);
  CHECK(refused[0].detail().find(" calls refused from ") != std::string::npos);
  CHECK(refused[0].detail().find(": " + refusal) != std::string::npos);
  // A second later the app is served again.
  std::this_thread::sleep_for(1100ms);
  pb::GenerateDataKeyResponse reply;
  CHECK(app->GenerateDataKey(Context().get(), req, &reply).ok());
}

TEST_CASE("A call whose client gave up while it waited does no work and leaves no record",
          "[e2e][serving]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true});
  const pb::KeyMetadata busy = CreateKey(server, UniqueAlias("serving/busy"), true, false);
  const pb::KeyMetadata given_up = CreateKey(server, UniqueAlias("serving/given-up"), true, false);
  UseOneWorker(server);
  auto stub = server.Keys("app");
  server.SetFaults("C_Encrypt hang\n");
  Burst held;
  held.Start(*stub, busy.key_id());
  AwaitLine([&] { return server.FaultLog(); }, "hanging C_Encrypt");
  Burst impatient;
  impatient.Start(*stub, given_up.key_id(), 300ms);
  impatient.Wait();
  CHECK(impatient.Codes(nullptr)[grpc::StatusCode::DEADLINE_EXCEEDED] == 1);
  server.SetFaults("");
  held.Wait();
  REQUIRE(held.Codes(nullptr)[grpc::StatusCode::OK] == 1);
  // The queue is empty once a later call is served; the abandoned one ran before it.
  Burst after;
  after.Start(*stub, busy.key_id());
  after.Wait();
  REQUIRE(after.Codes(nullptr)[grpc::StatusCode::OK] == 1);
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    INFO(r.ShortDebugString());
    CHECK_FALSE((r.action() == "GenerateDataKey" && r.key_id() == given_up.key_id()));
  }
  server.Signal(SIGUSR1);
  AwaitLine([&] { return server.Log(); },
            "calls: 0 waiting now, 0 of them officers' and 0 auditors'; 0 refused (queue full), 0 "
            "over a rate limit and 1 abandoned by their clients");
}

}  // namespace
}  // namespace custos::testing

namespace custos::testing {
namespace {

// Calls `method` with `payload` as its serialized request, whatever it holds.
grpc::Status RawUnaryCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                          const std::string& payload) {
  grpc::Slice slice(payload);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::unique_ptr<grpc::ClientContext> context = Context();
  return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
      channel.get(),
      grpc::internal::RpcMethod(method.c_str(), grpc::internal::RpcMethod::NORMAL_RPC),
      context.get(), request, &response);
}

TEST_CASE("A request that does not parse is INVALID_ARGUMENT naming its method, and recorded",
          "[e2e][serving]") {
  CustosServer server;
  const std::string refusal =
      "the request is not a well-formed GenerateDataKey request: it does not parse as the "
      "method's protobuf message";
  const std::shared_ptr<grpc::Channel> app = server.Channel("app");
  // A truncated field, a wrong wire type, bytes that are no protobuf at all.
  for (const std::string& payload : {std::string("\x0a\x05"
                                                 "ab"),
                                     std::string("\x0d", 1), std::string("\xff\xff\xff\xff")}) {
    const grpc::Status status = RawUnaryCall(app, "/custos.v1.KeyService/GenerateDataKey", payload);
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message() == refusal);
  }
  // A server-streaming method's request is parsed before it runs too.
  {
    grpc::Slice slice(std::string("\x08\xff", 2));  // seq's varint cut short
    const grpc::ByteBuffer request(&slice, 1);
    std::unique_ptr<grpc::ClientContext> context = Context();
    const std::shared_ptr<grpc::Channel> channel = server.Channel("auditor");
    std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
        grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
            channel.get(),
            grpc::internal::RpcMethod("/custos.v1.AuditService/ReadRecords",
                                      grpc::internal::RpcMethod::SERVER_STREAMING),
            context.get(), request));
    grpc::ByteBuffer record;
    CHECK_FALSE(reader->Read(&record));
    const grpc::Status status = reader->Finish();
    CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
    CHECK(status.error_message() ==
          "the request is not a well-formed ReadRecords request: it does not parse as the "
          "method's protobuf message");
  }
  // What does not exist is still UNIMPLEMENTED, and a well-formed request still served.
  CHECK(RawUnaryCall(app, "/custos.v1.KeyService/NoSuchMethod", "").error_code() ==
        grpc::StatusCode::UNIMPLEMENTED);
  CHECK(RawUnaryCall(app, "/custos.v1.KeyService/GenerateDataKey", "").error_code() ==
        grpc::StatusCode::INVALID_ARGUMENT);  // no key named: Custos's own
  pb::GenerateDataKeyRequest well_formed;
  well_formed.set_key(CreateKey(server, "serving/parsed", true, false).key_id());
  CHECK(RawUnaryCall(app, "/custos.v1.KeyService/GenerateDataKey", well_formed.SerializeAsString())
            .ok());

  // Recorded as refusals before any use case are: coalesced, naming the caller. A burst makes
  // one record; a slow server may see the three calls fall in two (the burst and a tally).
  std::vector<pb::AuditRecord> generate, read;
  uint64_t counted = 0;
  for (int i = 0; i < 300 && (counted < 3 || read.empty()); ++i) {
    if (i > 0) std::this_thread::sleep_for(50ms);
    generate.clear();
    read.clear();
    counted = 0;
    for (const pb::AuditRecord& r : AuditRecords(server)) {
      if (r.detail().find("does not parse") == std::string::npos) continue;
      if (r.action() == "GenerateDataKey") {
        counted += std::stoull(r.detail());  // "N calls refused from T1 to T2: reason"
        generate.push_back(r);
      } else {
        read.push_back(r);
      }
    }
  }
  CHECK(counted == 3);
  REQUIRE_FALSE(generate.empty());
  CHECK(generate.size() <= 2);
  for (const pb::AuditRecord& r : generate) {
    CHECK(r.outcome() == "INVALID_ARGUMENT");
    CHECK(r.principal() == kAppPrincipal);
    CHECK(r.peer() == "ipv4:127.0.0.1");
    CHECK_THAT(r.detail(), Catch::Matches("(1 call|[23] calls) refused from .*: " + refusal));
  }
  CHECK(Occurrences(server.Log(), " to GenerateDataKey refused (INVALID_ARGUMENT) from ") ==
        generate.size());
  REQUIRE(read.size() == 1);
  CHECK(read[0].action() == "ReadRecords");
  CHECK(read[0].outcome() == "INVALID_ARGUMENT");
  CHECK(read[0].principal() == "spiffe://custos.local/auditor/auditor");
}

}  // namespace
}  // namespace custos::testing
