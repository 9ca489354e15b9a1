// The audit log end to end: auditors export it and a signed checkpoint; the chain recomputes
// from the export alone, and plain openssl verifies the checkpoint signature.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/audit_seal.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

std::string Run(const std::string& command, int* exit_code) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[4096];
  while (fgets(buf, sizeof buf, pipe) != nullptr) out += buf;
  const int status = pclose(pipe);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

Bytes FromHex(const std::string& hex) {
  Bytes out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

TEST_CASE("Auditors export a log whose chain and checkpoint verify", "[e2e][audit]") {
  CustosServer server;
  const std::string alias = "audited/key";
  CreateKey(server, alias, true, true);
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  (*gdk.mutable_encryption_context())["mrn"] = "patient-42";
  pb::GenerateDataKeyResponse dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());

  const std::string ctl = std::string(CUSTOSCTL_PATH) +
                          " --addr localhost:" + std::to_string(server.port()) + " --state " +
                          server.state_dir();
  int code = 0;
  const std::string dir = server.state_dir();
  const std::string checkpoint =
      Run(ctl + " --as auditor audit checkpoint --out-dir " + dir + " 2>&1", &code);
  INFO(checkpoint);
  REQUIRE(code == 0);
  Run("openssl dgst -sha256 -verify " + dir + "/audit-public.pem -signature " + dir +
          "/checkpoint.sig " + dir + "/checkpoint.msg 2>&1",
      &code);
  CHECK(code == 0);  // plain openssl, no Custos code
  Run("printf x >> " + dir + "/checkpoint.msg; openssl dgst -sha256 -verify " + dir +
          "/audit-public.pem -signature " + dir + "/checkpoint.sig " + dir + "/checkpoint.msg 2>&1",
      &code);
  CHECK(code != 0);

  const std::string exported = Run(ctl + " --as auditor audit export", &code);
  REQUIRE(code == 0);
  std::istringstream lines(exported);
  std::string line;
  Bytes prev(32, 0);
  uint64_t expected_seq = 1;
  std::map<uint64_t, std::string> hash_at;
  bool saw_gdk = false;
  while (std::getline(lines, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    storage::AuditRow row;
    row.seq = std::stoull(j.at("seq").get<std::string>());
    row.time = std::stoll(j.at("time").get<std::string>());
    row.principal = j.at("principal");
    row.role = j.at("role");
    row.action = j.at("action");
    row.key_id = j.at("key_id");
    row.key_version = j.at("key_version");
    row.source_key_id = j.at("source_key_id");
    row.source_key_version = j.at("source_key_version");
    row.request_id = j.at("request_id");
    row.outcome = j.at("outcome");
    row.peer = j.at("peer");
    row.context_hmac = j.at("context_hmac");
    row.detail = j.at("detail");
    CHECK(row.seq == expected_seq++);
    const Bytes hash = core::SealAuditRecord(prev, row);
    CHECK(core::Hex(hash) == j.at("hash").get<std::string>());
    hash_at[row.seq] = core::Hex(hash);
    prev = hash;
    if (row.action == "GenerateDataKey") {
      saw_gdk = true;
      CHECK(row.context_hmac.size() == 64);
      CHECK(line.find("patient-42") == std::string::npos);
    }
  }
  CHECK(saw_gdk);
  const nlohmann::json cp = nlohmann::json::parse(checkpoint);
  const uint64_t cp_seq = std::stoull(cp.at("seq").get<std::string>());
  REQUIRE(hash_at.count(cp_seq));
  CHECK(hash_at[cp_seq] == cp.at("hash").get<std::string>());

  // Only auditors read the log.
  for (const char* who : {"app", "officer1"}) {
    Run(ctl + " --as " + who + " audit checkpoint 2>&1", &code);
    CHECK(code == 2);
  }
}

}  // namespace
}  // namespace custos::testing
