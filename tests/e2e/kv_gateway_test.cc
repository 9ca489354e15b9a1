// The key/value gateway against the real custosd, as a Vault key/value client (MariaDB's
// hashicorp_key_management plugin) uses it: officers make a mount's key ids and issue a token
// by dual control, the database claims the token over mutual TLS, then fetches its keys over
// HTTPS with the token alone; exact statuses and bodies, TLS 1.2+ with AEAD suites only,
// refusals coalesced in the audit log, revocation at once.
#include <httplib.h>

#include <catch2/catch.hpp>
#include <regex>
#include <string>

#include "custos/v1/database_service.grpc.pb.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

constexpr char kDatabasePrincipal[] = "spiffe://custos.local/db/mariadb";

pb::ChangeRequest Execute(const CustosServer& server, pb::ProposeRequest proposal) {
  proposal.set_justification("TDE for the clinical database, ticket DBA-7");
  return ProposeAndApprove(server, proposal);
}

pb::ProposeRequest TdeKey(pb::Operation operation, uint32_t key_id, const std::string& key = "") {
  pb::ProposeRequest proposal;
  proposal.set_operation(operation);
  proposal.mutable_tde_key()->set_mount("mariadb");
  proposal.mutable_tde_key()->set_key_id(key_id);
  proposal.mutable_tde_key()->set_key(key);
  return proposal;
}

// Issues a token on key ids 1 and 2 of mount "mariadb"; returns its id.
std::string IssueToken(const CustosServer& server) {
  pb::ProposeRequest proposal;
  proposal.set_operation(pb::ISSUE_DATABASE_TOKEN);
  pb::DatabaseTokenParams* token = proposal.mutable_database_token();
  token->set_principal(kDatabasePrincipal);
  token->set_mount("mariadb");
  token->add_key_ids(1);
  token->add_key_ids(2);
  token->set_ttl_days(30);
  const std::string reason = Execute(server, proposal).reason();
  const std::string marker = "executed; token ";
  const size_t at = reason.find(marker);
  REQUIRE(at != std::string::npos);
  return reason.substr(at + marker.size(), 36);
}

grpc::Status Claim(const CustosServer& server, const std::string& client, const std::string& id,
                   std::string* token) {
  pb::ClaimDatabaseTokenRequest request;
  request.set_token_id(id);
  pb::ClaimDatabaseTokenResponse reply;
  grpc::Status status = pb::DatabaseService::NewStub(server.Channel(client))
                            ->ClaimDatabaseToken(Context().get(), request, &reply);
  *token = reply.token();
  return status;
}

// An HTTPS client that trusts the state's CA and checks the server's name, as the plugin does.
struct Gateway {
  explicit Gateway(const CustosServer& server) : client("localhost", server.gateway_port()) {
    client.set_ca_cert_path((server.state_dir() + "/pki/ca.crt").c_str());
    client.enable_server_certificate_verification(true);
    client.set_connection_timeout(5);
    client.set_read_timeout(5);
  }
  httplib::Result Get(const std::string& path, const std::string& token) {
    httplib::Headers headers;
    if (!token.empty()) headers.emplace("X-Vault-Token", token);
    return client.Get(path.c_str(), headers);
  }
  httplib::SSLClient client;
};

const std::regex kKeyBody(
    R"re(\{"data":\{"data":\{"data":"([0-9a-f]{64})"\},"metadata":\{"version":(\d+)\}\}\})re");

// The hex key and version a 200 carries.
std::pair<std::string, int> KeyOf(const httplib::Result& result) {
  REQUIRE(result);
  INFO(result->body);
  REQUIRE(result->status == 200);
  CHECK(result->get_header_value("Content-Type") == "application/json");
  std::smatch match;
  REQUIRE(std::regex_match(result->body, match, kKeyBody));
  return {match[1], std::stoi(match[2])};
}

TEST_CASE("A database fetches its table-space keys through the gateway with its token alone",
          "[e2e][gateway]") {
  CustosServer server(ServerOptions{.extra_config = "[gateway]\nlisten = \"127.0.0.1:0\"\n"});
  REQUIRE(server.gateway_port() > 0);
  pb::CreateKeyRequest seal;
  seal.set_alias(UniqueAlias("tde-seal"));
  pb::KeyMetadata sealing;
  REQUIRE(server.Admin("officer1")->CreateKey(Context().get(), seal, &sealing).ok());
  Execute(server, TdeKey(pb::CREATE_TDE_KEY, 1, seal.alias()));
  Execute(server, TdeKey(pb::CREATE_TDE_KEY, 2, sealing.key_id()));
  const std::string id = IssueToken(server);

  // Only the database claims it, once; officers never see it.
  std::string token;
  CHECK(Claim(server, "officer1", id, &token).error_code() == grpc::StatusCode::PERMISSION_DENIED);
  REQUIRE(Claim(server, "mariadb", id, &token).ok());
  CHECK(token.rfind("cdt." + id + ".", 0) == 0);
  std::string again;
  CHECK(Claim(server, "mariadb", id, &again).error_code() == grpc::StatusCode::FAILED_PRECONDITION);
  CHECK(again.empty());

  Gateway gateway(server);
  // The plugin's start-up check.
  httplib::Result tune = gateway.Get("/v1/sys/mounts/mariadb/tune", token);
  REQUIRE(tune);
  CHECK(tune->status == 200);
  CHECK(tune->body == R"({"data":{"options":{"version":"2"}},"options":{"version":"2"}})");

  const auto [key1, version1] = KeyOf(gateway.Get("/v1/mariadb/data/1", token));
  CHECK(version1 == 1);
  const auto [key2, version2] = KeyOf(gateway.Get("/v1/mariadb/data/2?version=1", token));
  CHECK(version2 == 1);
  CHECK(key1 != key2);
  CHECK(KeyOf(gateway.Get("/v1/mariadb/data/1?version=1", token)).first == key1);

  // A rotation: the newest is version 2; version 1 stays exactly as it was.
  Execute(server, TdeKey(pb::ROTATE_TDE_KEY, 1));
  const auto [rotated, version] = KeyOf(gateway.Get("/v1/mariadb/data/1", token));
  CHECK(version == 2);
  CHECK(rotated != key1);
  CHECK(KeyOf(gateway.Get("/v1/mariadb/data/1?version=1", token)).first == key1);
  CHECK(KeyOf(gateway.Get("/v1/mariadb/data/1?version=2", token)).first == rotated);

  // What does not exist and what the token is not bound to look alike; a bad token is 403
  // whatever it asks for; nothing else is served.
  struct Case {
    std::string path;
    std::string token;
    int status;
  };
  std::string wrong = token;
  wrong.back() = wrong.back() == 'a' ? 'b' : 'a';
  for (const Case& c : std::vector<Case>{
           {"/v1/mariadb/data/3", token, 404},
           {"/v1/mariadb/data/1?version=3", token, 404},
           {"/v1/other/data/1", token, 404},
           {"/v1/mariadb/data/1", "", 403},
           {"/v1/mariadb/data/1", wrong, 403},
           {"/v1/mariadb/data/9", wrong, 403},
           {"/v1/mariadb/data/1", "hvs.CAESIJ", 403},
           {"/v1/mariadb/data/1?version=0", token, 400},
           {"/v1/mariadb/data/one", token, 404},
           {"/v1/mariadb/metadata/1", token, 404},
           {"/v1/sys/mounts", token, 404},
       }) {
    INFO(c.path << " " << c.token.substr(0, 8));
    httplib::Result result = gateway.Get(c.path, c.token);
    REQUIRE(result);
    CHECK(result->status == c.status);
    CHECK(result->body.find(token) == std::string::npos);
    if (c.status == 403) CHECK(result->body == R"({"errors":["permission denied"]})");
    if (c.status == 404 && c.path.find("/data/") != std::string::npos &&
        c.path.find("one") == std::string::npos) {
      CHECK(result->body == R"({"errors":[]})");
    }
  }
  httplib::Result posted = gateway.client.Post("/v1/mariadb/data/1", "{}", "application/json");
  REQUIRE(posted);
  CHECK(posted->status == 404);

  // Every fetch recorded as the database's, with where the key belongs; the wrong tokens'
  // refusals coalesced (at most one record for the repeated reason, however many calls).
  for (int i = 0; i < 20; ++i) CHECK(gateway.Get("/v1/mariadb/data/1", wrong)->status == 403);
  size_t fetched = 0, refused = 0;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.action() != "FetchTdeKey") continue;
    if (r.outcome() == "OK") {
      ++fetched;
      CHECK(r.principal() == kDatabasePrincipal);
      CHECK(r.role() == "database");
      CHECK(r.key_id() == sealing.key_id());
      CHECK(std::regex_match(r.detail(), std::regex("mount=mariadb key_id=[12] version=[12]")));
    } else if (r.outcome() == "PERMISSION_DENIED") {
      ++refused;
    }
  }
  CHECK(fetched == 6);
  CHECK(refused <= 4);

  // Revoked: refused from the next call on.
  pb::ProposeRequest revoke;
  revoke.set_operation(pb::REVOKE_DATABASE_TOKEN);
  revoke.set_token_id(id);
  Execute(server, revoke);
  CHECK(gateway.Get("/v1/mariadb/data/1", token)->status == 403);
}

TEST_CASE("The gateway speaks TLS 1.2 or later with AEAD suites only", "[e2e][gateway]") {
  CustosServer server(ServerOptions{.extra_config = "[gateway]\nlisten = \"127.0.0.1:0\"\n"});
  const std::string connect =
      "echo | openssl s_client -connect 127.0.0.1:" + std::to_string(server.gateway_port()) +
      " -CAfile " + server.state_dir() + "/pki/ca.crt ";
  int code = -1;
  RunCommand(connect + "-tls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256 >/dev/null 2>&1", &code);
  CHECK(code == 0);
  RunCommand(connect + "-tls1_3 >/dev/null 2>&1", &code);
  CHECK(code == 0);
  for (const std::string refused :
       {"-tls1_1 -cipher DEFAULT@SECLEVEL=0", "-tls1_2 -cipher ECDHE-ECDSA-AES128-SHA256",
        "-tls1_2 -cipher ECDHE-ECDSA-AES256-SHA"}) {
    INFO(refused);
    RunCommand(connect + refused + " >/dev/null 2>&1", &code);
    CHECK(code != 0);
  }
}

TEST_CASE("Without a [gateway] listen setting nothing listens for it", "[e2e][gateway]") {
  CustosServer& server = CustosServer::Shared();
  CHECK(server.gateway_port() == 0);
}

}  // namespace
}  // namespace custos::testing
