// MutualTlsCredentials' start-up checks (the key file's owner and mode, CRLs that fail
// closed), ReloadClientCrls and LimitConnectionAge.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <string>

#include <grpcpp/server_builder.h>

#include "common/clock.h"
#include "server/tls.h"
#include "tests/server/test_pki.h"
#include "tests/support/temp_dir.h"

namespace custos::server {
namespace {

using custos::testing::TempDir;
using testing::CrlSpec;
using testing::LeafSpec;
using testing::TestCa;
using testing::WriteFile;

constexpr int64_t kNow = 1'800'000'000;
constexpr int64_t kDay = 86400;

// A server certificate and key, a client CA and an (empty) CRL folder in a temp dir, and the
// config naming them.
struct TlsFiles {
  TempDir dir;
  TestCa ca{"Custos Test CA", kNow - 100 * kDay, kNow + 1000 * kDay};
  Config config;

  TlsFiles() {
    LeafSpec server;
    server.cn = "custosd";
    server.eku = "serverAuth";
    server.not_before = kNow - kDay;
    server.not_after = kNow + 100 * kDay;
    std::string key;
    WriteFile(dir.File("server.crt"), ca.Issue(server, &key));
    WriteFile(dir.File("server.key"), key, 0600);
    WriteFile(dir.File("ca.crt"), ca.CertPem());
    REQUIRE(mkdir(dir.File("crl").c_str(), 0755) == 0);
    config.tls_cert = dir.File("server.crt");
    config.tls_key = dir.File("server.key");
    config.client_ca = dir.File("ca.crt");
  }
};

void RequireFails(const absl::Status& status, absl::StatusCode code, const std::string& part) {
  INFO(status.ToString());
  REQUIRE_FALSE(status.ok());
  CHECK(status.code() == code);
  CHECK_THAT(std::string(status.message()), Catch::Contains(part));
}

TEST_CASE("The TLS key file must be private to this user", "[tls]") {
  TlsFiles files;
  const std::string& key = files.config.tls_key;
  for (mode_t mode : {0600, 0400}) {
    REQUIRE(chmod(key.c_str(), mode) == 0);
    CHECK(CheckPrivateKeyFile(key, "tls.key").ok());
  }
  for (mode_t mode : {0640, 0644, 0604, 0660, 0602, 0620}) {
    INFO(mode);
    REQUIRE(chmod(key.c_str(), mode) == 0);
    RequireFails(
        CheckPrivateKeyFile(key, "tls.key"), absl::StatusCode::kPermissionDenied,
        "private key file " + key + " (tls.key) must be a file of this user with mode 0600");
  }
  REQUIRE(chmod(key.c_str(), 0600) == 0);
  RequireFails(CheckPrivateKeyFile(files.dir.File("absent.key"), "tls.key"),
               absl::StatusCode::kFailedPrecondition, "cannot read tls.key");
  RequireFails(CheckPrivateKeyFile(files.dir.path(), "tls.key"),
               absl::StatusCode::kPermissionDenied, "must be a file of this user");
  // A symbolic link is judged by the file it names (gRPC reads the key by path).
  const std::string link = files.dir.File("link.key");
  REQUIRE(symlink(key.c_str(), link.c_str()) == 0);
  CHECK(CheckPrivateKeyFile(link, "tls.key").ok());
  REQUIRE(chmod(key.c_str(), 0644) == 0);
  CHECK(CheckPrivateKeyFile(link, "tls.key").code() == absl::StatusCode::kPermissionDenied);
  REQUIRE(chmod(key.c_str(), 0600) == 0);
  if (geteuid() == 0) {  // only root can give the file away
    REQUIRE(chown(key.c_str(), 4242, static_cast<gid_t>(-1)) == 0);
    RequireFails(CheckPrivateKeyFile(key, "tls.key"), absl::StatusCode::kPermissionDenied,
                 "must be a file of this user");
  }
}

TEST_CASE("MutualTlsCredentials refuses a TLS key readable by others", "[tls]") {
  TlsFiles files;
  ManualClock clock(kNow);
  PeerAuthenticator authenticator(&clock, 16);
  CHECK(MutualTlsCredentials(files.config, authenticator).ok());
  REQUIRE(chmod(files.config.tls_key.c_str(), 0644) == 0);
  const auto credentials = MutualTlsCredentials(files.config, authenticator);
  RequireFails(credentials.status(), absl::StatusCode::kPermissionDenied,
               "private key file " + files.config.tls_key + " (tls.key)");
}

TEST_CASE("MutualTlsCredentials fails closed without a current CRL for the client CA", "[tls]") {
  TlsFiles files;
  ManualClock clock(kNow);
  PeerAuthenticator authenticator(&clock, 16);
  files.config.crl_dir = files.dir.File("crl");
  RequireFails(MutualTlsCredentials(files.config, authenticator).status(),
               absl::StatusCode::kFailedPrecondition,
               "CA 'CN=Custos Test CA,O=Custos tests' has no current CRL (none in the folder)");
  CHECK(authenticator.revocation_list() == nullptr);

  WriteFile(files.config.crl_dir + "/ca.crl.pem",
            files.ca.Crl(CrlSpec{{0x99}, kNow - kDay, kNow + kDay}));
  REQUIRE(MutualTlsCredentials(files.config, authenticator).ok());
  const std::shared_ptr<const RevocationList> started = authenticator.revocation_list();
  REQUIRE(started != nullptr);

  // SIGHUP: an invalid set keeps the lists in force; a valid one replaces them.
  std::remove((files.config.crl_dir + "/ca.crl.pem").c_str());
  RequireFails(ReloadClientCrls(files.config, authenticator).status(),
               absl::StatusCode::kFailedPrecondition, "has no current CRL");
  CHECK(authenticator.revocation_list() == started);
  WriteFile(files.config.crl_dir + "/ca.crl.pem",
            files.ca.Crl(CrlSpec{{0x99, 0x98}, kNow - 60, kNow + kDay}));
  const absl::StatusOr<std::string> reloaded = ReloadClientCrls(files.config, authenticator);
  INFO(reloaded.status().ToString());
  REQUIRE(reloaded.ok());
  CHECK_THAT(*reloaded, Catch::StartsWith("1 client CA, 2 revoked serials"));
  CHECK(authenticator.revocation_list() != started);

  // Without a crl_dir, revocation checking is off.
  files.config.crl_dir.clear();
  REQUIRE(MutualTlsCredentials(files.config, authenticator).ok());
  CHECK(authenticator.revocation_list() == nullptr);
}

TEST_CASE("LimitConnectionAge takes 1..86400 seconds", "[tls]") {
  grpc::ServerBuilder builder;
  CHECK(LimitConnectionAge(builder, 1).ok());
  CHECK(LimitConnectionAge(builder, kDefaultMaxConnectionAgeSeconds).ok());
  CHECK(LimitConnectionAge(builder, 86400).ok());
  for (int seconds : {0, -1, 86401}) {
    RequireFails(LimitConnectionAge(builder, seconds), absl::StatusCode::kInvalidArgument,
                 "tls.max_connection_age_seconds must be 1..86400");
  }
}

}  // namespace
}  // namespace custos::server
