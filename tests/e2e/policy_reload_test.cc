// SIGHUP reloads the policy file, unless the new policy would break separation of duties.
#include <signal.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <thread>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

void WritePolicy(CustosServer& server, const std::string& roles) {
  std::ofstream(server.state_dir() + "/policy.toml") << "[roles]\n" << roles;
}

// Waits (bounded) for `text` to appear in custosd's log.
bool AwaitLog(CustosServer& server, const std::string& text) {
  for (int i = 0; i < 200; ++i) {
    if (server.Log().find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  return false;
}

grpc::Status Generate(CustosServer& server, const std::string& alias) {
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  pb::GenerateDataKeyResponse reply;
  return server.Keys("app")->GenerateDataKey(Context().get(), req, &reply);
}

TEST_CASE("A policy reload that breaks separation of duties is refused", "[e2e][policy]") {
  CustosServer server;
  const std::string alias = "reload/key";
  CreateKey(server, alias, true, true);

  // The app, which holds grants on a key, would become an officer.
  WritePolicy(server,
              "officer = [\"spiffe://custos.local/app/demo\", "
              "\"spiffe://custos.local/officer/officer1\", "
              "\"spiffe://custos.local/officer/officer2\"]\n");
  server.Signal(SIGHUP);
  REQUIRE(AwaitLog(server, "policy reload refused, keeping the current policy"));
  CHECK(server.Log().find("principal 'spiffe://custos.local/app/demo' would hold role "
                          "'officer'") != std::string::npos);
  CHECK(Generate(server, alias).ok());  // the old policy is still in force

  // A principal in two roles does not even parse.
  WritePolicy(server,
              "app = [\"spiffe://custos.local/app/demo\"]\n"
              "officer = [\"spiffe://custos.local/app/demo\", "
              "\"spiffe://custos.local/officer/officer1\"]\n");
  server.Signal(SIGHUP);
  REQUIRE(AwaitLog(server, "each principal must hold exactly one role"));
  CHECK(Generate(server, alias).ok());

  // A sound policy that drops the app takes effect at the next call.
  WritePolicy(server,
              "officer = [\"spiffe://custos.local/officer/officer1\", "
              "\"spiffe://custos.local/officer/officer2\"]\n");
  server.Signal(SIGHUP);
  REQUIRE(AwaitLog(server, "policy reloaded"));
  const grpc::Status refused = Generate(server, alias);
  CHECK(refused.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK_THAT(refused.error_message(), Catch::Contains("holds no role in the policy"));
  CHECK(server.Alive());
}

TEST_CASE("A policy edited while custosd was stopped that breaks separation of duties stops it",
          "[e2e][policy]") {
  CustosServer server;
  CreateKey(server, "start/key", true, true);
  server.Stop();
  // The app, which holds grants on a key, made an officer while nobody could refuse it.
  WritePolicy(server,
              "officer = [\"spiffe://custos.local/app/demo\", "
              "\"spiffe://custos.local/officer/officer1\", "
              "\"spiffe://custos.local/officer/officer2\"]\n");
  std::string output;
  CHECK(RunCustosd("--config " + server.state_dir() + "/custosd.toml", &output) == 1);
  CHECK_THAT(output, Catch::Contains("principal 'spiffe://custos.local/app/demo' would hold role "
                                     "'officer' but key ") &&
                         Catch::Contains(" grants it use of key material; revoke the grant first"));
}
}  // namespace
}  // namespace custos::testing
