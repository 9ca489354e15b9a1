// custosctl end to end: the README's commands against the real server.
#include <sys/wait.h>
#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

TEST_CASE("custosctl creates a key, generates a data key and decrypts it", "[e2e][ctl]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("ctl");
  const std::string key_args = "--alias " + alias + " --tag owner=ops --encrypt " +
                               std::string(kAppPrincipal) + " --decrypt " + kAppPrincipal;
  // A key the app may use is a grant: one officer cannot make it alone.
  Output alone = Ctl(server, "officer1", "create-key " + key_args);
  CHECK(alone.exit_code == 2);
  CHECK_THAT(alone.text, Catch::StartsWith("error: FAILED_PRECONDITION: creating a key that "
                                           "grants use of it needs 1 other officer(s)"));
  Output proposed =
      Ctl(server, "officer1", "propose create-key " + key_args + " --justification 'TDE key'");
  INFO(proposed.text);
  REQUIRE(proposed.exit_code == 0);
  CHECK(Field(proposed.text, "state") == "PENDING");
  Output created = Ctl(server, "officer2",
                       "approve " + Field(proposed.text, "request_id") + " --digest " +
                           Field(proposed.text, "digest"));
  INFO(created.text);
  REQUIRE(created.exit_code == 0);
  CHECK(Field(created.text, "state") == "EXECUTED");
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

  // A plaintext read from a file or standard input stays out of the process list.
  const std::string secret_file = server.state_dir() + "/ctl-plaintext.txt";
  REQUIRE((std::ofstream(secret_file) << "lab result 42"));
  for (const std::string& source :
       {"--plaintext-file " + secret_file, "--plaintext-file - < " + secret_file}) {
    INFO(source);
    Output sealed =
        Ctl(server, "app", "encrypt --key " + alias + " --context table=patients " + source);
    INFO(sealed.text);
    REQUIRE(sealed.exit_code == 0);
    Output read = Ctl(
        server, "app",
        "decrypt --blob " + Field(sealed.text, "ciphertext_blob") + " --context table=patients");
    CHECK(Field(read.text, "plaintext") == "bGFiIHJlc3VsdCA0Mg==");  // "lab result 42"
  }
  std::filesystem::remove(secret_file);
  Output both = Ctl(server, "app",
                    "encrypt --key " + alias + " --plaintext x --plaintext-file " + secret_file);
  CHECK(both.exit_code != 0);
  CHECK_THAT(both.text, Catch::Contains("excludes"));
  Output neither = Ctl(server, "app", "encrypt --key " + alias);
  CHECK(neither.exit_code != 0);
  CHECK_THAT(neither.text, Catch::Contains("--plaintext or --plaintext-file"));
  Output missing =
      Ctl(server, "app", "encrypt --key " + alias + " --plaintext-file " + secret_file);
  CHECK(missing.exit_code == 2);
  CHECK_THAT(missing.text, Catch::StartsWith("error: cannot read " + secret_file +
                                             ": No such file or directory"));
  Output large = Ctl(server, "app", "encrypt --key " + alias + " --plaintext-file - < /dev/zero");
  CHECK(large.exit_code == 2);
  CHECK_THAT(large.text, Catch::StartsWith("error: - holds more than 4096 bytes"));

  Output wrong = Ctl(server, "app", "decrypt --blob " + blob + " --context table=visits");
  CHECK(wrong.exit_code == 2);
  CHECK_THAT(wrong.text, Catch::StartsWith("error: INVALID_ARGUMENT: ciphertext failed"));

  // A context read from a file or standard input stays out of the process list too, and adds
  // to --context's pairs; a name given twice is refused, naming no value. (Written as an
  // editor may: a byte-order mark, CR LF, a blank line.)
  const std::string context_file = server.state_dir() + "/ctl-context.txt";
  REQUIRE((std::ofstream(context_file) << "\xEF\xBB\xBFtable=patients\r\n\nmrn=0042\n"));
  Output sealed_in =
      Ctl(server, "app", "generate-data-key --key " + alias + " --context-file " + context_file);
  INFO(sealed_in.text);
  REQUIRE(sealed_in.exit_code == 0);
  const std::string in_context = Field(sealed_in.text, "ciphertext_blob");
  Output partial = Ctl(server, "app", "decrypt --blob " + in_context + " --context table=patients");
  CHECK_THAT(partial.text, Catch::StartsWith("error: INVALID_ARGUMENT: ciphertext failed"));
  Output whole =
      Ctl(server, "app",
          "decrypt --blob " + in_context + " --context mrn=0042 --context-file - < /dev/null");
  CHECK_THAT(whole.text, Catch::StartsWith("error: INVALID_ARGUMENT: ciphertext failed"));
  REQUIRE((std::ofstream(server.state_dir() + "/ctl-mrn.txt") << "mrn=0042\n"));
  for (const std::string& source :
       {std::string("--context table=patients --context mrn=0042"),
        "--context-file " + context_file,
        "--context table=patients --context-file - < " + server.state_dir() + "/ctl-mrn.txt"}) {
    INFO(source);
    Output opened_in = Ctl(server, "app", "decrypt --blob " + in_context + " " + source);
    INFO(opened_in.text);
    CHECK(Field(opened_in.text, "plaintext") == Field(sealed_in.text, "plaintext"));
  }
  Output twice =
      Ctl(server, "app",
          "decrypt --blob " + in_context + " --context mrn=0043 --context-file " + context_file);
  CHECK(twice.exit_code != 0);
  CHECK_THAT(twice.text, Catch::Contains("--context/--context-file: 'mrn' is given twice"));
  CHECK_THAT(twice.text, !Catch::Contains("0042") && !Catch::Contains("0043"));
  REQUIRE((std::ofstream(server.state_dir() + "/ctl-bad.txt") << "mrn 0042\n"));
  Output no_equals = Ctl(
      server, "app",
      "decrypt --blob " + in_context + " --context-file " + server.state_dir() + "/ctl-bad.txt");
  CHECK(no_equals.exit_code != 0);
  CHECK_THAT(no_equals.text, Catch::Contains("--context/--context-file: expected NAME=VALUE"));
  CHECK_THAT(no_equals.text, !Catch::Contains("0042"));
  // Checked before anything is read: a plaintext on standard input is not taken for a context.
  Output plaintext_too = Ctl(
      server, "app", "encrypt --key " + alias + " --plaintext-file - --context-file - < /dev/zero");
  CHECK(plaintext_too.exit_code != 0);
  CHECK_THAT(plaintext_too.text,
             Catch::Contains("--plaintext-file and --context-file cannot both read standard"));
  Output both_stdin = Ctl(server, "app",
                          "re-encrypt --blob " + in_context +
                              " --context-file - --to-context-file - < " + context_file);
  CHECK(both_stdin.exit_code != 0);
  CHECK_THAT(both_stdin.text,
             Catch::Contains("--context-file and --to-context-file cannot both read standard"));
  Output moved = Ctl(server, "app",
                     "re-encrypt --blob " + in_context + " --context-file " + context_file +
                         " --to-context-file - < " + server.state_dir() + "/ctl-mrn.txt");
  INFO(moved.text);
  REQUIRE(moved.exit_code == 0);
  Output reopened =
      Ctl(server, "app",
          "decrypt --blob " + Field(moved.text, "ciphertext_blob") + " --context mrn=0042");
  CHECK(Field(reopened.text, "plaintext") == Field(sealed_in.text, "plaintext"));
  std::filesystem::remove(context_file);
  std::filesystem::remove(server.state_dir() + "/ctl-mrn.txt");
  std::filesystem::remove(server.state_dir() + "/ctl-bad.txt");

  Output described = Ctl(server, "officer2", "describe-key " + alias);
  INFO(described.text);
  REQUIRE(described.exit_code == 0);
  CHECK(Field(described.text, "owner") == "ops");
  CHECK(Field(described.text, "state") == "ENABLED");
  // Times in RFC 3339, counts as JSON numbers; "never" left out.
  CHECK(
      std::regex_match(Field(described.text, "create_time"),
                       std::regex(R"(20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)")));
  CHECK(NumberField(described.text, "encryptions").value_or(0) >= 1);
  CHECK(NumberField(described.text, "decryptions").value_or(0) >= 1);
  CHECK_THAT(described.text, !Catch::Contains("deletion_time"));

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

TEST_CASE(
    "custosctl propose sends every flag given, so one its operation does not use is "
    "refused, never dropped",
    "[e2e][ctl][dual]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("ctl-stray");
  REQUIRE(Ctl(server, "officer1", "create-key --alias " + alias).exit_code == 0);
  const std::string tail = " --justification 'stray flag'";
  const std::pair<std::string, std::string> cases[] = {
      {"rotate-key --key " + alias + " --alias other", "create_key does not apply to RotateKey"},
      {"rotate-key --key " + alias + " --tag owner=ops", "create_key does not apply to RotateKey"},
      {"update-key-grants --key " + alias + " --encrypt app --rotation-period-days 90",
       "create_key does not apply to UpdateKeyGrants"},
      {"disable-key --key " + alias + " --mount /tde",
       "tde_key.mount does not apply to DisableKey"},
      {"rotate-key --key " + alias + " --key-id 3", "tde_key.key_id does not apply to RotateKey"},
      {"rotate-root-key --principal mariadb", "database_token does not apply to RotateRootKey"},
      {"rotate-tde-key --mount /tde --key-id 1 --ttl-days 30",
       "database_token does not apply to RotateTdeKey"},
      {"revoke-database-token --token-id 0123 --description x",
       "create_key does not apply to RevokeDatabaseToken"},
  };
  for (const auto& [args, refusal] : cases) {
    Output proposed = Ctl(server, "officer1", "propose " + args + tail);
    INFO(args + "\n" + proposed.text);
    CHECK(proposed.exit_code == 2);
    CHECK_THAT(proposed.text, Catch::StartsWith("error: INVALID_ARGUMENT: " + refusal +
                                                ": the request would be stored, approved and "
                                                "executed without it"));
  }
  Output many = Ctl(server, "officer1",
                    "propose rotate-key --key " + alias + " --key-id 1 --key-id 2" + tail);
  CHECK(many.exit_code != 0);
  CHECK_THAT(many.text, Catch::Contains("give one --key-id"));
  // Nothing was stored for the key, and what is sent without stray flags still goes through.
  Output pending = Ctl(server, "officer2", "list-requests --state pending --key " + alias);
  REQUIRE(pending.exit_code == 0);
  CHECK_THAT(pending.text, !Catch::Contains("request_id"));
  Output proposed = Ctl(server, "officer1", "propose rotate-key --key " + alias + tail);
  INFO(proposed.text);
  CHECK(proposed.exit_code == 0);
  CHECK(Field(proposed.text, "state") == "PENDING");
}

TEST_CASE("custosctl --state dials the port in the state's custosd.toml", "[e2e][ctl]") {
  CustosServer server;
  server.Stop();
  const int port = FreeLoopbackPort();  // fixed in the file, unlike the tests' port 0
  server.EditConfig("127.0.0.1:0", "127.0.0.1:" + std::to_string(port));
  server.Start();
  REQUIRE(server.port() == port);
  int code = 0;
  const std::string listed = RunCommand(std::string(CUSTOSCTL_PATH) + " --state " +
                                            server.state_dir() + " --as officer1 list-keys 2>&1",
                                        &code);
  INFO(listed);
  CHECK(code == 0);
  // An explicit address still wins.
  RunCommand(std::string(CUSTOSCTL_PATH) + " --addr 127.0.0.1:1 --state " + server.state_dir() +
                 " --as officer1 list-keys 2>&1",
             &code);
  CHECK(code == 2);
}

TEST_CASE("An unknown data key spec is refused naming the rule", "[e2e][ctl]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("spec");
  CreateKey(server, alias, true, true);
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  req.set_key_spec(static_cast<pb::DataKeySpec>(99));
  pb::GenerateDataKeyResponse reply;
  const grpc::Status status = server.Keys("app")->GenerateDataKey(Context().get(), req, &reply);
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK(status.error_message() ==
        "key_spec is not one this server knows: ask for AES_256 (32 bytes) or AES_128 (16 bytes)");
}

}  // namespace
}  // namespace custos::testing
