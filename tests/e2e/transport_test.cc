// Transport end to end: mutual TLS is required, only the configured CA is trusted, TLS below
// 1.2 is refused, keys survive a restart, and a client certificate that expires or is revoked
// (CRL installed, SIGHUP) is refused at its next call, even on a connection opened before.
#include <signal.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <sstream>
#include <thread>

#include "custos/v1/audit_service.grpc.pb.h"
#include "tests/e2e/e2e_util.h"
#include "tests/support/files.h"

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

// The state's development CA (pki/ca.{crt,key}) as an `openssl ca` database, so that tests
// revoke certificates, publish CRLs and issue short-lived certificates as an operator would.
class DevCa {
 public:
  explicit DevCa(const CustosServer& server) : state_(server.state_dir()) {
    const std::string db = state_ + "/pki/ca-db";
    if (mkdir(db.c_str(), 0700) != 0) return;  // made before, for this state
    std::ofstream(db + "/index.txt").flush();
    std::ofstream(db + "/crlnumber") << "01\n";
    std::ofstream(db + "/openssl.cnf") << "[ca]\ndefault_ca = dev\n[dev]\n"
                                       << "database = " << db << "/index.txt\n"
                                       << "crlnumber = " << db << "/crlnumber\n"
                                       << "serial = " << db << "/serial\n"
                                       << "new_certs_dir = " << db << "\n"
                                       << "rand_serial = yes\nunique_subject = no\n"
                                       << "default_md = sha256\ndefault_crl_days = 1\n"
                                       << "policy = any\n[any]\ncommonName = optional\n";
    mkdir((state_ + "/crl").c_str(), 0755);
  }

  // Writes a CRL of every revocation so far to crl/<hash>.r0, the name `openssl rehash` gives
  // it (so gRPC's own lookup finds it too), replacing the previous one in one rename.
  void PublishCrl() const {
    Openssl("-gencrl -out " + state_ + "/crl/new.pem");
    const std::string hash = Run("openssl crl -hash -noout -in " + state_ + "/crl/new.pem");
    REQUIRE(std::rename((state_ + "/crl/new.pem").c_str(),
                        (state_ + "/crl/" + hash.substr(0, hash.find('\n')) + ".r0").c_str()) == 0);
  }

  void Revoke(const std::string& client) const {
    Openssl("-revoke " + state_ + "/pki/clients/" + client + ".crt");
  }

  // Issues pki/clients/<name>.{crt,key} (clientAuth, URI SAN `uri`) valid from a minute ago
  // until `not_after` (seconds since the epoch).
  void IssueUntil(const std::string& name, const std::string& uri, time_t not_after) const {
    const std::string base = state_ + "/pki/clients/" + name;
    std::ofstream(base + ".ext") << "extendedKeyUsage = clientAuth\nsubjectAltName = URI:" << uri
                                 << "\n";
    Run("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + base +
        ".key && openssl req -new -key " + base + ".key -subj /CN=" + name + " -out " + base +
        ".csr");
    Openssl("-batch -in " + base + ".csr -startdate " + Asn1Time(std::time(nullptr) - 60) +
            " -enddate " + Asn1Time(not_after) + " -extfile " + base + ".ext -notext -out " + base +
            ".crt");
  }

  // The certificate's serial number as `openssl x509 -serial` prints it.
  std::string Serial(const std::string& client) const {
    const std::string out =
        Run("openssl x509 -noout -serial -in " + state_ + "/pki/clients/" + client + ".crt");
    return out.substr(out.find('=') + 1, out.find('\n') - out.find('=') - 1);
  }

  // The certificate's SHA-256 fingerprint as Custos writes it (lower-case hex, no colons).
  std::string Fingerprint(const std::string& client) const {
    const std::string out = Run("openssl x509 -noout -fingerprint -sha256 -in " + state_ +
                                "/pki/clients/" + client + ".crt");
    std::string hex;
    for (char c : out.substr(out.find('=') + 1)) {
      if (std::isxdigit(static_cast<unsigned char>(c))) {
        hex.push_back(static_cast<char>(std::tolower(c)));
      }
    }
    return hex;
  }

 private:
  static std::string Asn1Time(time_t t) {
    char text[32];
    struct tm tm {};
    strftime(text, sizeof text, "%Y%m%d%H%M%SZ", gmtime_r(&t, &tm));
    return text;
  }
  static std::string Run(const std::string& command) {
    int code = 0;
    const std::string out = RunCommand(command + " 2>&1", &code);
    INFO(command << "\n" << out);
    REQUIRE(code == 0);
    return out;
  }
  void Openssl(const std::string& args) const {
    Run("openssl ca -config " + state_ + "/pki/ca-db/openssl.cnf -keyfile " + state_ +
        "/pki/ca.key -cert " + state_ + "/pki/ca.crt " + args);
  }

  std::string state_;
};

// Waits (bounded) until custosd's log holds `text` `count` times.
bool AwaitLog(const CustosServer& server, const std::string& text, int count = 1) {
  for (int i = 0; i < 400; ++i) {
    const std::string log = server.Log();
    int seen = 0;
    for (size_t at = log.find(text); at != std::string::npos; at = log.find(text, at + 1)) ++seen;
    if (seen >= count) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  return false;
}

grpc::Status Generate(pb::KeyService::Stub& keys, const std::string& alias) {
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  pb::GenerateDataKeyResponse reply;
  return keys.GenerateDataKey(Context().get(), req, &reply);
}

void EnableCrlDir(CustosServer& server) {
  server.EditConfig("client_ca = \"pki/ca.crt\"", "client_ca = \"pki/ca.crt\"\ncrl_dir = \"crl\"");
}

// custosd restarted checking revocation against `ca`'s CRL, which revokes nothing yet.
void RestartWithCrl(CustosServer& server, const DevCa& ca) {
  ca.PublishCrl();
  EnableCrlDir(server);
  server.Restart();
}

TEST_CASE("A revoked certificate is refused at its next call on a connection opened before",
          "[e2e][tls][revocation]") {
  CustosServer server;
  DevCa ca(server);
  RestartWithCrl(server, ca);
  const std::string alias = "revocation/key";
  CreateKey(server, alias, true, true);

  // One channel for the whole test: one connection, one handshake.
  const std::shared_ptr<grpc::Channel> channel = server.Channel("app");
  const std::unique_ptr<pb::KeyService::Stub> app = pb::KeyService::NewStub(channel);
  REQUIRE(Generate(*app, alias).ok());
  REQUIRE(channel->GetState(false) == GRPC_CHANNEL_READY);

  // A reload that finds no current CRL keeps the lists in force.
  const std::string crl = server.state_dir() + "/crl";
  RunOrThrow("mkdir " + crl + "-old && mv " + crl + "/*.r0 " + crl + "-old/");
  server.Signal(SIGHUP);
  REQUIRE(AwaitLog(server, "client CRL reload refused, keeping the current CRLs"));
  CHECK_THAT(server.Log(), Catch::Contains("CA 'CN=Custos Development CA' has no current CRL"));
  CHECK(Generate(*app, alias).ok());

  // Revoked and the CRL installed: nothing changes until custosd is told to reload.
  ca.Revoke("app");
  ca.PublishCrl();
  CHECK(Generate(*app, alias).ok());

  server.Signal(SIGHUP);
  REQUIRE(AwaitLog(server, "client CRLs reloaded: 1 client CA, 1 revoked serial"));
  const grpc::Status refused = Generate(*app, alias);
  INFO(server.Log());
  // UNAUTHENTICATED, not UNAVAILABLE: the call reached custosd on the connection it had.
  CHECK(refused.error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(refused.error_message() == "client certificate revoked (serial " + ca.Serial("app") +
                                       ") (certificate sha256 " + ca.Fingerprint("app") + ")");
  CHECK(channel->GetState(false) == GRPC_CHANNEL_READY);
  // A new connection with it is refused too, one way or the other.
  CHECK_FALSE(Generate(*server.Keys("app"), alias).ok());
  // Nobody else is affected.
  pb::ListKeysRequest list;
  pb::ListKeysResponse keys;
  CHECK(server.Admin("officer1")->ListKeys(Context().get(), list, &keys).ok());
  CHECK(server.Alive());
}

TEST_CASE("An audit stream opened before its certificate was revoked ends at its next page",
          "[e2e][tls][revocation]") {
  CustosServer server;
  DevCa ca(server);
  RestartWithCrl(server, ca);
  // A log longer than a page (1,000 records), so the stream has a page to read after the
  // revocation.
  const pb::KeyMetadata key = CreateKey(server, "revocation/stream", true, false);
  pb::BatchGenerateDataKeyRequest batch;
  batch.set_without_plaintext(true);
  for (int i = 0; i < 1000; ++i) batch.add_items()->set_key(key.key_id());
  pb::BatchGenerateDataKeyResponse generated;
  REQUIRE(server.Keys("app")->BatchGenerateDataKey(Context().get(), batch, &generated).ok());

  // The auditor's stream reads its first record (its first page is read), then the
  // certificate is revoked. Flow control at its initial 64 KiB window (no bandwidth probe):
  // the client's transport takes a few hundred records ahead of its reader, not a page.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  const auto audit = pb::AuditService::NewStub(server.Channel("auditor", args));
  grpc::ClientContext context;  // a deadline past the CRL's publication and reload
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = audit->ReadRecords(&context, pb::ReadRecordsRequest());
  pb::AuditRecord record;
  REQUIRE(reader->Read(&record));
  ca.Revoke("auditor");
  ca.PublishCrl();
  server.Signal(SIGHUP);
  REQUIRE(AwaitLog(server, "client CRLs reloaded: 1 client CA, 1 revoked serial"));

  // The page read before is sent; the next is not read for a revoked caller.
  uint64_t read = 1;
  while (reader->Read(&record)) ++read;
  const grpc::Status ended = reader->Finish();
  INFO(server.Log());
  CHECK(read == 1000);
  CHECK(ended.error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(ended.error_message() == "client certificate revoked (serial " + ca.Serial("auditor") +
                                     ") (certificate sha256 " + ca.Fingerprint("auditor") + ")");
  CHECK(server.Alive());
}

TEST_CASE("custosd with a crl_dir but no CRL for the client CA refuses to start",
          "[e2e][tls][revocation]") {
  CustosServer server;
  server.Stop();
  DevCa ca(server);  // makes the empty crl/ folder
  EnableCrlDir(server);
  std::string output;
  const int code = RunCustosd("--config " + server.state_dir() + "/custosd.toml", &output);
  INFO(output);
  CHECK(code != 0);
  CHECK_THAT(output,
             Catch::Contains("CA 'CN=Custos Development CA' has no current CRL (none in the "
                             "folder)"));
  // With the CRL published, it starts.
  ca.PublishCrl();
  server.Start();
  CHECK(server.Alive());
}

TEST_CASE("An expired certificate is refused at its next call on a connection opened before",
          "[e2e][tls][expiry]") {
  CustosServer& server = CustosServer::Shared();  // no crl_dir: expiry is checked regardless
  const std::string alias = UniqueAlias("expiry");
  CreateKey(server, alias, true, true);
  DevCa ca(server);
  const time_t not_after = std::time(nullptr) + 8;
  ca.IssueUntil("app-short", kAppPrincipal, not_after);

  const std::shared_ptr<grpc::Channel> channel = server.Channel("app-short");
  const std::unique_ptr<pb::KeyService::Stub> app = pb::KeyService::NewStub(channel);
  REQUIRE(Generate(*app, alias).ok());
  std::this_thread::sleep_until(std::chrono::system_clock::from_time_t(not_after) +
                                std::chrono::milliseconds(1500));
  const grpc::Status refused = Generate(*app, alias);
  char expired[32];
  struct tm tm {};
  strftime(expired, sizeof expired, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&not_after, &tm));
  CHECK(refused.error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(refused.error_message() == std::string("client certificate expired at ") + expired +
                                       " (certificate sha256 " + ca.Fingerprint("app-short") + ")");
  CHECK(server.Alive());
}

TEST_CASE("A connection is closed after max_connection_age_seconds, and the client reconnects",
          "[e2e][tls]") {
  CustosServer server;
  server.Stop();
  server.EditConfig("client_ca = \"pki/ca.crt\"",
                    "client_ca = \"pki/ca.crt\"\nmax_connection_age_seconds = 1");
  server.Start();
  const std::string alias = "aged/key";
  CreateKey(server, alias, true, false);
  const std::shared_ptr<grpc::Channel> channel = server.Channel("app");
  const std::unique_ptr<pb::KeyService::Stub> app = pb::KeyService::NewStub(channel);
  REQUIRE(Generate(*app, alias).ok());
  REQUIRE(channel->GetState(false) == GRPC_CHANNEL_READY);
  // The server says GOAWAY once the connection is past its age (gRPC adds jitter and checks
  // on its own timer): the channel leaves READY, and the next call opens a new connection.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (channel->GetState(false) == GRPC_CHANNEL_READY &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(channel->GetState(false) != GRPC_CHANNEL_READY);
  REQUIRE(Generate(*app, alias).ok());
  // The two calls' records name the client's address: the second came on a new connection.
  std::vector<std::string> peers;
  for (const pb::AuditRecord& record : AuditRecords(server)) {
    if (record.action() == "GenerateDataKey" && record.outcome() == "OK") {
      peers.push_back(record.peer());
    }
  }
  REQUIRE(peers.size() == 2);
  CHECK(peers[0] != peers[1]);
}

TEST_CASE("custosd runs with core dumps off", "[e2e][hygiene]") {
  CustosServer& server = CustosServer::Shared();
  std::ifstream limits("/proc/" + std::to_string(server.pid()) + "/limits");
  std::string line, core;
  while (std::getline(limits, line)) {
    if (line.rfind("Max core file size", 0) == 0) core = line;
  }
  INFO(core);
  std::istringstream fields(core.substr(std::string("Max core file size").size()));
  std::string soft, hard;
  fields >> soft >> hard;
  CHECK(soft == "0");
  CHECK(hard == "0");
}

}  // namespace
}  // namespace custos::testing
