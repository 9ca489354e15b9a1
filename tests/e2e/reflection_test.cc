// gRPC server reflection against the real custosd: generic gRPC tools can list the Custos
// services and fetch their descriptors, over the same mutual TLS as every call; nothing about
// it is audited; `server.reflection = false` turns it off.
#include <google/protobuf/descriptor.pb.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

namespace reflection = grpc::reflection::v1alpha;

// One request on a fresh reflection stream as `client`; the stream's status if it failed.
grpc::Status Ask(const CustosServer& server, const reflection::ServerReflectionRequest& request,
                 reflection::ServerReflectionResponse* response,
                 const std::string& client = "app") {
  const auto context = Context();
  auto stream = reflection::ServerReflection::NewStub(server.Channel(client))
                    ->ServerReflectionInfo(context.get());
  if (stream->Write(request) && stream->WritesDone() && stream->Read(response)) {
    while (stream->Read(response)) {
    }
  }
  return stream->Finish();
}

std::vector<std::string> ListServices(const CustosServer& server, const std::string& client) {
  reflection::ServerReflectionRequest request;
  request.set_list_services("");
  reflection::ServerReflectionResponse response;
  const grpc::Status status = Ask(server, request, &response, client);
  INFO(status.error_code() << ": " << status.error_message());
  REQUIRE(status.ok());
  std::vector<std::string> names;
  for (const auto& service : response.list_services_response().service()) {
    names.push_back(service.name());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST_CASE("Reflection lists the Custos services and describes them", "[e2e][reflection]") {
  CustosServer& server = CustosServer::Shared();
  const size_t records_before = AuditRecords(server).size();
  const std::vector<std::string> expected = {
      "custos.v1.AdminService",    "custos.v1.AuditService",
      "custos.v1.DatabaseService", "custos.v1.KeyService",
      "grpc.health.v1.Health",     "grpc.reflection.v1alpha.ServerReflection"};
  // Any principal the CA vouches for, whatever its role: the API's shape is no secret.
  CHECK(ListServices(server, "app") == expected);
  CHECK(ListServices(server, "auditor") == expected);

  reflection::ServerReflectionRequest request;
  request.set_file_containing_symbol("custos.v1.KeyService");
  reflection::ServerReflectionResponse response;
  REQUIRE(Ask(server, request, &response).ok());
  REQUIRE(response.has_file_descriptor_response());
  bool described = false;
  for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    REQUIRE(file.ParseFromString(bytes));
    for (const auto& service : file.service()) {
      if (service.name() != "KeyService") continue;
      described = std::any_of(service.method().begin(), service.method().end(),
                              [](const auto& m) { return m.name() == "GenerateDataKey"; });
    }
  }
  CHECK(described);

  request.set_file_containing_symbol("custos.v1.NoSuchService");
  REQUIRE(Ask(server, request, &response).ok());
  CHECK(response.error_response().error_code() == static_cast<int>(grpc::StatusCode::NOT_FOUND));

  // The handshake refuses a certificate of another CA, as for every call on this port.
  request.set_list_services("");
  CHECK(Ask(server, request, &response, "other-ca").error_code() == grpc::StatusCode::UNAVAILABLE);
  // Not audited: no record names a reflection call. Other tests' tallies may land meanwhile,
  // so the new records are searched by action, not counted.
  const std::vector<pb::AuditRecord> records = AuditRecords(server);
  for (size_t i = records_before; i < records.size(); ++i) {
    CHECK(records[i].action() != "ServerReflectionInfo");
  }
}

TEST_CASE("server.reflection = false turns reflection off", "[e2e][reflection]") {
  CustosServer server;
  server.Stop();
  server.EditConfig("[server]\n", "[server]\nreflection = false\n");
  server.Start();
  reflection::ServerReflectionRequest request;
  request.set_list_services("");
  reflection::ServerReflectionResponse response;
  CHECK(Ask(server, request, &response).error_code() == grpc::StatusCode::UNIMPLEMENTED);
}

}  // namespace
}  // namespace custos::testing
