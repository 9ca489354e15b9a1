// custosctl end to end: the README's commands against the real server.
#include <sys/wait.h>
#include <catch2/catch.hpp>
#include <cstdio>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

struct Output {
  int exit_code = -1;
  std::string text;  // stdout and stderr
};

Output Ctl(CustosServer& server, const std::string& as, const std::string& args) {
  const std::string command = std::string(CUSTOSCTL_PATH) +
                              " --addr localhost:" + std::to_string(server.port()) + " --state " +
                              server.state_dir() + " --as " + as + " " + args + " 2>&1";
  Output out;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[4096];
  while (fgets(buf, sizeof buf, pipe) != nullptr) out.text += buf;
  const int status = pclose(pipe);
  out.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

// The string value of `"field": "..."` in custosctl's JSON output.
std::string Field(const std::string& json, const std::string& field) {
  const std::string key = "\"" + field + "\": \"";
  const size_t start = json.find(key);
  if (start == std::string::npos) return "";
  const size_t end = json.find('"', start + key.size());
  return json.substr(start + key.size(), end - start - key.size());
}

TEST_CASE("custosctl creates a key, generates a data key and decrypts it", "[e2e][ctl]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("ctl");
  Output created = Ctl(server, "officer1",
                       "create-key --alias " + alias + " --tag owner=ops --encrypt " +
                           kAppPrincipal + " --decrypt " + kAppPrincipal);
  INFO(created.text);
  REQUIRE(created.exit_code == 0);
  const std::string key_id = Field(created.text, "key_id");
  CHECK(key_id.size() == 36);

  Output dk = Ctl(server, "app", "generate-data-key --key " + alias + " --context table=patients");
  INFO(dk.text);
  REQUIRE(dk.exit_code == 0);
  const std::string blob = Field(dk.text, "ciphertext_blob");
  const std::string plaintext = Field(dk.text, "plaintext");
  REQUIRE_FALSE(blob.empty());
  CHECK(plaintext.size() == 44);  // 32 bytes in base64
  CHECK(Field(dk.text, "key_id") == key_id);

  Output opened = Ctl(server, "app", "decrypt --blob " + blob + " --context table=patients");
  INFO(opened.text);
  REQUIRE(opened.exit_code == 0);
  CHECK(Field(opened.text, "plaintext") == plaintext);

  Output wrong = Ctl(server, "app", "decrypt --blob " + blob + " --context table=visits");
  CHECK(wrong.exit_code == 2);
  CHECK_THAT(wrong.text, Catch::StartsWith("error: INVALID_ARGUMENT: ciphertext failed"));

  Output described = Ctl(server, "officer2", "describe-key " + alias);
  REQUIRE(described.exit_code == 0);
  CHECK(Field(described.text, "owner") == "ops");
  CHECK(Field(described.text, "state") == "ENABLED");

  Output listed = Ctl(server, "app", "list-keys");
  CHECK(listed.exit_code == 2);
  CHECK_THAT(listed.text, Catch::StartsWith("error: PERMISSION_DENIED: role 'app'"));
}

TEST_CASE("custosctl runs the README's two-officer rotation", "[e2e][ctl][dual]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("ctl-rotate");
  REQUIRE(Ctl(server, "officer1", "create-key --alias " + alias).exit_code == 0);

  Output proposed = Ctl(server, "officer1",
                        "propose rotate-key --key " + alias + " --justification 'annual rotation'");
  INFO(proposed.text);
  REQUIRE(proposed.exit_code == 0);
  CHECK(Field(proposed.text, "state") == "PENDING");
  const std::string id = Field(proposed.text, "request_id");
  const std::string digest = Field(proposed.text, "digest");

  Output self = Ctl(server, "officer1", "approve " + id + " --digest " + digest);
  CHECK(self.exit_code == 2);
  CHECK_THAT(self.text, Catch::StartsWith("error: PERMISSION_DENIED: the proposer"));

  Output listed = Ctl(server, "officer2", "list-requests --state pending --key " + alias);
  REQUIRE(listed.exit_code == 0);
  CHECK(Field(listed.text, "request_id") == id);

  Output approved = Ctl(server, "officer2", "approve " + id + " --digest " + digest);
  INFO(approved.text);
  REQUIRE(approved.exit_code == 0);
  CHECK(Field(approved.text, "state") == "EXECUTED");
  CHECK_THAT(Ctl(server, "officer2", "describe-key " + alias).text,
             Catch::Contains("\"primary_version\": 2"));
}

}  // namespace
}  // namespace custos::testing
