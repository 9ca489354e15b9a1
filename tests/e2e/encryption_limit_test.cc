// The AES-GCM encryption limit end to end, with a tiny budget: it triggers rotation, it
// refuses past the limit, and kill -9 never rewinds the count.
#include <catch2/catch.hpp>
#include <chrono>
#include <thread>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

// 6 encryptions per version; rotation wanted at 100 % (so the limit is really reached);
// reservations of 2; the timer never fires by itself within the test.
constexpr char kTinyBudget[] = R"(
[keys]
encryption_limit = 6
rotate_at_percent = 100
reservation_block = 2
)";

grpc::Status Encrypt(CustosServer& server, const std::string& key, pb::EncryptResponse* reply) {
  pb::EncryptRequest req;
  req.set_key(key);
  req.set_plaintext("card 4111");
  return server.Keys("app")->Encrypt(Context().get(), req, reply);
}

uint32_t PrimaryVersion(CustosServer& server, const std::string& key) {
  pb::DescribeKeyRequest req;
  req.set_key(key);
  pb::KeyMetadata reply;
  REQUIRE(server.Admin("officer1")->DescribeKey(Context().get(), req, &reply).ok());
  return reply.primary_version();
}

// Waits (bounded) until the server's own rotation has made `version` primary.
void AwaitPrimary(CustosServer& server, const std::string& key, uint32_t version) {
  for (int i = 0; i < 200 && PrimaryVersion(server, key) != version; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE(PrimaryVersion(server, key) == version);
}

TEST_CASE("The encryption limit refuses, rotates, and survives kill -9", "[e2e][limit]") {
  CustosServer server(kTinyBudget);
  const std::string alias = "limit/key";
  CreateKey(server, alias, true, true);
  pb::EncryptResponse reply;
  for (int i = 0; i < 5; ++i) {
    REQUIRE(Encrypt(server, alias, &reply).ok());
    CHECK(reply.key_version() == 1);
  }
  // Five used, six reserved. A crash now must not hand out five more under version 1.
  server.CrashAndRestart();
  grpc::Status status = Encrypt(server, alias, &reply);
  CHECK(status.error_code() == StatusCode::RESOURCE_EXHAUSTED);
  CHECK_THAT(status.error_message(), Catch::Contains("has reached its limit of 6 encryptions"));
  // Reaching the limit woke the server's rotation: version 2 takes over by itself.
  AwaitPrimary(server, alias, 2);
  REQUIRE(Encrypt(server, alias, &reply).ok());
  CHECK(reply.key_version() == 2);
  CHECK(server.Alive());
}

TEST_CASE("Encryptions back to back cross the rotation threshold once: one rotation",
          "[e2e][limit]") {
  CustosServer server(R"(
[keys]
encryption_limit = 10
rotate_at_percent = 50
reservation_block = 3
)");
  const std::string alias = "limit/once";
  CreateKey(server, alias, true, true);
  pb::EncryptResponse reply;
  for (int i = 0; i < 8; ++i) REQUIRE(Encrypt(server, alias, &reply).ok());
  AwaitPrimary(server, alias, 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // time for a second one
  pb::DescribeKeyRequest req;
  req.set_key(alias);
  pb::KeyMetadata key;
  REQUIRE(server.Admin("officer1")->DescribeKey(Context().get(), req, &key).ok());
  CHECK(key.primary_version() == 2);
  CHECK(key.versions_size() == 2);
}

}  // namespace
}  // namespace custos::testing
