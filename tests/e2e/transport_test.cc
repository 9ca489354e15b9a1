// Transport end to end: mutual TLS is required, only the configured CA is trusted, TLS below
// 1.2 is refused, and keys survive a restart.
#include <catch2/catch.hpp>
#include <cstdio>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

grpc::Status TryGenerate(CustosServer& server, const std::string& who) {
  pb::GenerateDataKeyRequest req;
  req.set_key("anything");
  pb::GenerateDataKeyResponse reply;
  return server.Keys(who)->GenerateDataKey(Context().get(), req, &reply);
}

TEST_CASE("A client without a certificate, or with one from another CA, is refused", "[e2e][tls]") {
  CustosServer& server = CustosServer::Shared();
  const std::string before = CatalogSnapshot(server);
  for (const char* who : {"none", "other-ca"}) {
    INFO(who);
    // The TLS handshake fails, so the call never reaches the server's handlers.
    const grpc::Status status = TryGenerate(server, who);
    CHECK(status.error_code() == StatusCode::UNAVAILABLE);
  }
  CHECK(server.Alive());
  CHECK(CatalogSnapshot(server) == before);
}

// Runs openssl s_client against the server (as the app, offering HTTP/2 as gRPC requires)
// and returns the protocol line it printed, e.g. "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384",
// or "New, (NONE), Cipher is (NONE)" when no session was established.
std::string Handshake(CustosServer& server, const std::string& flags) {
  const std::string pki = server.state_dir() + "/pki";
  const std::string command =
      "echo | timeout 10 openssl s_client -connect 127.0.0.1:" + std::to_string(server.port()) +
      " -alpn h2 -CAfile " + pki + "/ca.crt -cert " + pki + "/clients/app.crt -key " + pki +
      "/clients/app.key " + flags + " 2>/dev/null | grep -a '^New, '";
  std::string line;
  if (FILE* out = popen(command.c_str(), "r")) {
    char buf[256];
    while (fgets(buf, sizeof buf, out) != nullptr) line += buf;
    pclose(out);
  }
  return line;
}

TEST_CASE("TLS 1.2 and 1.3 are accepted; older versions are refused", "[e2e][tls]") {
  CustosServer& server = CustosServer::Shared();
  CHECK_THAT(Handshake(server, "-tls1_3"), Catch::StartsWith("New, TLSv1.3, Cipher is TLS_"));
  CHECK_THAT(Handshake(server, "-tls1_2"), Catch::StartsWith("New, TLSv1.2, Cipher is ECDHE-"));
  // OpenSSL 3 will not offer TLS 1.0/1.1 at its default security level; lower it so the client
  // really offers them and the refusal is the server's.
  CHECK_THAT(Handshake(server, "-tls1_1 -cipher DEFAULT@SECLEVEL=0"),
             Catch::StartsWith("New, (NONE), Cipher is (NONE)"));
  CHECK_THAT(Handshake(server, "-tls1 -cipher DEFAULT@SECLEVEL=0"),
             Catch::StartsWith("New, (NONE), Cipher is (NONE)"));
  CHECK(server.Alive());
}

TEST_CASE("Keys made before a restart still decrypt after it", "[e2e][restart]") {
  CustosServer server;  // its own state folder, so the restart disturbs no other test
  const std::string alias = "restart/key";
  CreateKey(server, alias, true, true);
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  req.mutable_encryption_context()->insert({"k", "v"});
  pb::GenerateDataKeyResponse dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), req, &dk).ok());

  server.Restart();

  pb::DecryptRequest decrypt;
  decrypt.set_ciphertext_blob(dk.ciphertext_blob());
  decrypt.mutable_encryption_context()->insert({"k", "v"});
  pb::DecryptResponse opened;
  grpc::Status status = server.Keys("app")->Decrypt(Context().get(), decrypt, &opened);
  INFO(status.error_message() << "\n" << server.Log());
  REQUIRE(status.ok());
  CHECK(opened.plaintext() == dk.plaintext());
}

}  // namespace
}  // namespace custos::testing
