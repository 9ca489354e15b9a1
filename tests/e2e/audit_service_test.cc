// The audit log end to end: auditors export it and a signed checkpoint; the chain recomputes
// from the export alone, and plain openssl verifies the checkpoint signature.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include <fstream>
#include "audit/record.h"
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
  std::vector<std::string> all;
  bool saw_gdk = false;
  while (std::getline(lines, line)) {
    absl::StatusOr<audit::Record> record = audit::FromJsonLine(line);
    REQUIRE(record.ok());
    CHECK(record->seq == all.size() + 1);
    if (record->action == "GenerateDataKey") {
      saw_gdk = true;
      CHECK(record->context_hmac.size() == 64);
      CHECK(line.find("patient-42") == std::string::npos);
    }
    all.push_back(line);
  }
  CHECK(saw_gdk);

  // custosctl verifies the export offline against the anchor kept from `audit checkpoint`.
  const std::string verify = std::string(CUSTOSCTL_PATH) + " audit verify " + dir +
                             "/audit.jsonl --anchor " + dir + "/checkpoint.json --public-key " +
                             dir + "/audit-public.pem 2>&1";
  std::ofstream(dir + "/audit.jsonl") << exported;
  const std::string report = Run(verify, &code);
  INFO(report);
  CHECK(code == 0);
  // An edited record is named.
  std::string edited = exported;
  const size_t at = edited.find("\"GenerateDataKey\"");
  REQUIRE(at != std::string::npos);
  edited.replace(at, 16, "\"GenerateDataKez");
  std::ofstream(dir + "/audit.jsonl") << edited;
  const std::string caught = Run(verify, &code);
  INFO(caught);
  CHECK(code == 3);
  CHECK_THAT(caught, Catch::Contains("record"));
  // A tail cut back past the anchor is caught too (the last record is the checkpoint read).
  std::string cut;
  for (size_t n = 0; n + 2 < all.size(); ++n) cut += all[n] + "\n";  // ends before the anchor
  std::ofstream(dir + "/audit.jsonl") << cut;
  Run(verify, &code);
  CHECK(code == 3);

  // Only auditors read the log.
  for (const char* who : {"app", "officer1"}) {
    Run(ctl + " --as " + who + " audit checkpoint 2>&1", &code);
    CHECK(code == 2);
  }
}

}  // namespace
}  // namespace custos::testing
