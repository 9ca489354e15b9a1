// grpc.health.v1 against the real custosd, over its mutual TLS port: SERVING, for the whole
// server and each Custos service, only while the HSM answers and the key database can commit;
// NOT_SERVING while the HSM hangs or fails, while another connection holds the database's write
// lock, and while the audit log awaits re-anchoring; SERVING again once that ends. Probes run
// every second by default, so each change is awaited by polling, never by a fixed sleep.
#include <signal.h>
#include <sqlite3.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/e2e/e2e_util.h"
#include "tests/support/sqlite_file.h"

namespace custos::testing {
namespace {

using namespace std::chrono_literals;
using Health = grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr const char* kServices[] = {"", "custos.v1.KeyService", "custos.v1.AdminService",
                                     "custos.v1.AuditService"};

// What Check answers for `service` to a client holding `client`'s certificate.
grpc::Status Check(const CustosServer& server, const std::string& service,
                   HealthCheckResponse* response, const std::string& client = "app") {
  HealthCheckRequest request;
  request.set_service(service);
  return Health::NewStub(server.Channel(client))->Check(Context().get(), request, response);
}

// True if Check says SERVING (`serving`) or NOT_SERVING (not `serving`) for every Custos
// service and the whole server.
bool AllAre(const CustosServer& server, bool serving) {
  const auto wanted = serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
  for (const char* service : kServices) {
    HealthCheckResponse response;
    if (!Check(server, service, &response).ok() || response.status() != wanted) return false;
  }
  return true;
}

// Polls until every service is SERVING (or NOT_SERVING); REQUIREs it within 20 s.
void AwaitAll(const CustosServer& server, bool serving) {
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (!AllAre(server, serving) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(100ms);
  }
  INFO(server.Log());
  REQUIRE(AllAre(server, serving));
}

// Audit records of health checks (the health service's RPCs are Check and Watch). Counted by
// name, not as all records: on the shared server, other tests' refusal tallies may still land.
size_t HealthRecords(const CustosServer& server) {
  size_t count = 0;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    count += r.action() == "Check" || r.action() == "Watch";
  }
  return count;
}

grpc::Status GenerateDataKey(const CustosServer& server, const std::string& key) {
  pb::GenerateDataKeyRequest req;
  req.set_key(key);
  pb::GenerateDataKeyResponse reply;
  return server.Keys("app")->GenerateDataKey(Context().get(), req, &reply);
}

TEST_CASE("A healthy custosd is SERVING, to clients with a certificate of its CA only",
          "[e2e][health]") {
  CustosServer& server = CustosServer::Shared();
  CHECK(AllAre(server, true));
  HealthCheckResponse response;
  CHECK(Check(server, "grpc.health.v1.Health", &response).error_code() ==
        grpc::StatusCode::NOT_FOUND);
  // Any principal the CA vouches for may ask, whatever its role: no policy is consulted.
  CHECK(Check(server, "", &response, "officer1").ok());
  // The handshake refuses the rest, as for every call on this port.
  CHECK(Check(server, "", &response, "none").error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK(Check(server, "", &response, "other-ca").error_code() == grpc::StatusCode::UNAVAILABLE);
  // Health checks are not audited.
  for (int i = 0; i < 20; ++i) REQUIRE(Check(server, "", &response).ok());
  CHECK(HealthRecords(server) == 0);

  // custosctl health, the container's check: exit 0 only for SERVING.
  Output healthy = Ctl(server, "app", "health");
  CHECK(healthy.exit_code == 0);
  CHECK(healthy.text == "{\"status\": \"SERVING\"}\n");
  CHECK(Ctl(server, "officer1", "health --service custos.v1.KeyService").exit_code == 0);
  Output unknown = Ctl(server, "app", "health --service custos.v1.NoSuchService");
  CHECK(unknown.exit_code == 1);
  CHECK_THAT(unknown.text, Catch::StartsWith("error: NOT_FOUND: "));
  const std::string pki = server.state_dir() + "/pki";
  Output refused;
  refused.text = RunCommand(std::string(CUSTOSCTL_PATH) +
                                " --addr localhost:" + std::to_string(server.port()) + " --ca " +
                                pki + "/ca.crt --cert " + pki + "/other-ca/client.crt --key " +
                                pki + "/other-ca/client.key health --timeout 2 2>&1",
                            &refused.exit_code);
  CHECK(refused.exit_code == 1);
  CHECK_THAT(refused.text, Catch::StartsWith("error: UNAVAILABLE: "));
}

TEST_CASE("An HSM that hangs or fails is NOT_SERVING until it answers again", "[e2e][health]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true});
  AwaitAll(server, true);

  server.SetFaults("C_GenerateRandom hang\n");
  AwaitAll(server, false);
  Output hung_check = Ctl(server, "app", "health");
  CHECK(hung_check.exit_code == 1);
  CHECK(hung_check.text == "{\"status\": \"NOT_SERVING\"}\n");
  CHECK_THAT(server.Log(), Catch::Contains("[warning] health: NOT_SERVING: "));
  // The probe's own deadline, or the HSM layer's (hsm.call_timeout_ms), whichever ends first.
  const std::string hung = server.Log();
  CHECK((hung.find("HSM: no answer to the health probe for ") != std::string::npos ||
         hung.find("HSM: the HSM did not answer GenerateRandom within 2000 ms") !=
             std::string::npos));
  server.SetFaults("");
  AwaitAll(server, true);
  CHECK(Occurrences(server.Log(), "[info] health: SERVING again") == 1);

  server.SetFaults("C_GenerateRandom CKR_DEVICE_ERROR\n");
  AwaitAll(server, false);
  CHECK_THAT(server.Log(), Catch::Contains("NOT_SERVING: UNAVAILABLE: HSM: PKCS#11 "));
  server.SetFaults("");
  AwaitAll(server, true);
  const std::string log = server.Log();
  INFO(log);
  CHECK(Occurrences(log, "[warning] health: NOT_SERVING: ") == 2);  // once per outage
  CHECK(Occurrences(log, "[info] health: SERVING again") == 2);
}

TEST_CASE("A database another connection holds locked is NOT_SERVING until it lets go",
          "[e2e][health]") {
  CustosServer server;
  CreateKey(server, "health/locked", true, true);
  AwaitAll(server, true);

  // A DBA's session takes the write lock and keeps it.
  sqlite3* dba = nullptr;
  REQUIRE(sqlite3_open_v2((server.state_dir() + "/custos.db").c_str(), &dba, SQLITE_OPEN_READWRITE,
                          nullptr) == SQLITE_OK);
  sqlite3_busy_timeout(dba, 10000);  // custosd may be committing at that moment
  REQUIRE(sqlite3_exec(dba, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  AwaitAll(server, false);
  CHECK_THAT(server.Log(), Catch::Contains("key database: "));
  CHECK_THAT(server.Log(), Catch::Contains("locked"));
  REQUIRE(sqlite3_exec(dba, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(dba);
  AwaitAll(server, true);
  CHECK(GenerateDataKey(server, "health/locked").ok());
}

TEST_CASE(
    "An auditor's session left open on the live database: served on, the WAL's growth "
    "warned about once, and its space given back when the session ends",
    "[e2e][health]") {
  CustosServer server;
  server.EditConfig("[storage]\n", "[storage]\nwal_warn_mb = 16\n");
  server.Restart();
  CreateKey(server, "health/wal", true, true);
  const std::string db = server.state_dir() + "/custos.db";
  const auto wal_bytes = [&db] {
    std::error_code error;
    const uintmax_t size = std::filesystem::file_size(db + "-wal", error);
    return error ? uintmax_t{0} : size;
  };
  const auto call_until = [&](const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    std::atomic<int> failed{0};
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      std::vector<std::thread> callers;
      callers.reserve(4);
      for (int t = 0; t < 4; ++t) {
        callers.emplace_back([&] {
          for (int i = 0; i < 50; ++i) failed += !GenerateDataKey(server, "health/wal").ok();
        });
      }
      for (std::thread& caller : callers) caller.join();
    }
    CHECK(failed == 0);
    REQUIRE(done());
  };
  const std::string warning = "the key database's WAL has grown to ";
  const std::string cleared = "the key database's WAL is back under 16 MiB";
  const auto await_line = [&server](const std::string& line) {
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (server.Log().find(line) == std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(100ms);
    }
    INFO(server.Log());
    REQUIRE(server.Log().find(line) != std::string::npos);
  };

  // An auditor's sqlite3 session, left inside a transaction on the live file.
  sqlite3* auditor = nullptr;
  REQUIRE(sqlite3_open_v2(db.c_str(), &auditor, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_busy_timeout(auditor, 10000);
  REQUIRE(sqlite3_exec(auditor, "BEGIN; SELECT count(*) FROM audit_log;", nullptr, nullptr,
                       nullptr) == SQLITE_OK);
  call_until([&] { return wal_bytes() > (uintmax_t{16} << 20); });
  await_line(warning);
  AwaitAll(server, true);  // a warning, not a refusal: every call above succeeded
  CHECK(server.Log().find(cleared) == std::string::npos);

  REQUIRE(sqlite3_exec(auditor, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(auditor);
  // The next checkpoint reaches the WAL's end; the commit after it starts the WAL over and
  // cuts the file back to 8 MiB.
  call_until([&] { return wal_bytes() <= (uintmax_t{8} << 20); });
  await_line(cleared);
  const std::string log = server.Log();
  CHECK(log.find(warning) == log.rfind(warning));  // once
  CHECK(GenerateDataKey(server, "health/wal").ok());
}

TEST_CASE("An audit log awaiting re-anchoring is NOT_SERVING until officers re-anchor it",
          "[e2e][health]") {
  CustosServer server;
  CreateKey(server, "health/restored", true, true);
  server.Stop();
  const std::string db = server.state_dir() + "/custos.db";
  const std::string backup = server.state_dir() + "/backup.db";
  REQUIRE(SqlExec(db, "VACUUM INTO '" + backup + "'").empty());
  server.Start();
  REQUIRE(GenerateDataKey(server, "health/restored").ok());
  pb::Checkpoint checkpoint;  // the HSM now holds a head the backup does not reach
  REQUIRE(pb::AuditService::NewStub(server.Channel("auditor"))
              ->GetCheckpoint(Context().get(), pb::GetCheckpointRequest(), &checkpoint)
              .ok());
  server.Stop();
  std::filesystem::remove(db + "-wal");
  std::filesystem::remove(db + "-shm");
  std::filesystem::copy_file(backup, db, std::filesystem::copy_options::overwrite_existing);

  server.Start({"--allow-re-anchor"});
  CHECK(AllAre(server, false));  // from the first answer on
  CHECK_THAT(server.Log(), Catch::Contains("the audit log awaits re-anchoring: "));
  Output proposed =
      Ctl(server, "officer1", "propose re-anchor-audit-log --justification 'restored from backup'");
  INFO(proposed.text);
  REQUIRE(proposed.exit_code == 0);
  Output approved = Ctl(server, "officer2",
                        "approve " + Field(proposed.text, "request_id") + " --digest " +
                            Field(proposed.text, "digest"));
  INFO(approved.text);
  REQUIRE(Field(approved.text, "state") == "EXECUTED");
  AwaitAll(server, true);
}

TEST_CASE("A stopping custosd is NOT_SERVING before it stops answering", "[e2e][health]") {
  CustosServer server;
  AwaitAll(server, true);
  HealthCheckRequest request;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 30s);
  auto watch = Health::NewStub(server.Channel("app"))->Watch(&context, request);
  HealthCheckResponse response;
  REQUIRE(watch->Read(&response));
  CHECK(response.status() == HealthCheckResponse::SERVING);
  server.Signal(SIGTERM);
  std::vector<HealthCheckResponse::ServingStatus> seen;
  while (watch->Read(&response)) seen.push_back(response.status());
  const grpc::Status ended = watch->Finish();
  INFO(ended.error_code() << ": " << ended.error_message());
  REQUIRE(seen.size() == 1);
  CHECK(seen[0] == HealthCheckResponse::NOT_SERVING);
  server.Stop();
}

}  // namespace
}  // namespace custos::testing
