// Root key rotation end to end, through custosctl as officers run it, and the restarts that
// follow it. Over a confining root (what `custosd init` makes) a rotation puts new versions
// under a new root and keeps the old one for the versions it wraps. Over a legacy root it is
// the migration: every version moves to a confining root and the legacy root is destroyed, so
// the configured root is gone; custosd restarts on the rotated one, also after the migration
// was cut short by kill -9 mid-way through re-wrapping or just before the old root's
// destruction. Old blobs decrypt throughout.
#include <catch2/catch.hpp>
#include <chrono>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "audit/record.h"
#include "tests/e2e/e2e_util.h"
#include "tests/support/files.h"

namespace custos::testing {
namespace {

constexpr char kSoftHsm[] = "/usr/lib/softhsm/libsofthsm2.so";
// The token's secret keys once a legacy root's migration is complete.
const std::set<std::string> kRotatedToken = {"custos-audit-hmac", "custos-catalog-hmac",
                                             "custos-root.2"};

constexpr char kLegacyWarning[] = "root key 'custos-root' is a legacy root";

// Labels of the secret keys on the state's token (read by pkcs11-tool, not Custos).
std::set<std::string> TokenSecretKeys(const CustosServer& server) {
  const std::string dir = server.state_dir();
  int code = 0;
  const std::string listing =
      RunCommand("SOFTHSM2_CONF=" + dir + "/hsm/softhsm2.conf pkcs11-tool --module " + kSoftHsm +
                     " --token-label custos --login --pin \"$(cat " + dir +
                     "/hsm/pin)\" --list-objects --type secrkey 2>&1",
                 &code);
  REQUIRE(code == 0);
  std::set<std::string> labels;
  size_t at = 0;
  while ((at = listing.find("label:", at)) != std::string::npos) {
    const size_t start = listing.find_first_not_of(' ', at + 6);
    const size_t end = listing.find('\n', start);
    labels.insert(listing.substr(start, end - start));
    at = end;
  }
  return labels;
}

Bytes NewBlob(CustosServer& server, const std::string& alias) {
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  pb::GenerateDataKeyResponse reply;
  const grpc::Status status = server.Keys("app")->GenerateDataKey(Context().get(), req, &reply);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return Bytes(reply.ciphertext_blob().begin(), reply.ciphertext_blob().end());
}

void CheckDecrypts(CustosServer& server, const std::vector<Bytes>& blobs) {
  auto keys = server.Keys("app");
  for (const Bytes& blob : blobs) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(std::string(blob.begin(), blob.end()));
    pb::DecryptResponse reply;
    const grpc::Status status = keys->Decrypt(Context().get(), req, &reply);
    INFO(status.error_message());
    CHECK(status.ok());
  }
}

// Proposes a root rotation as officer1 through custosctl; returns its id and digest.
std::pair<std::string, std::string> ProposeRootRotation(CustosServer& server) {
  const Output proposed =
      Ctl(server, "officer1", "propose rotate-root-key --justification 'yearly root rotation'");
  INFO(proposed.text);
  REQUIRE(proposed.exit_code == 0);
  CHECK(Field(proposed.text, "operation") == "ROTATE_ROOT_KEY");
  CHECK(Field(proposed.text, "state") == "PENDING");
  return {Field(proposed.text, "request_id"), Field(proposed.text, "digest")};
}

// get-request for `id` once its background work is over (no progress shown), waiting up to
// 30 s.
Output AwaitRotation(CustosServer& server, const std::string& id) {
  Output request;
  for (int i = 0; i < 300; ++i) {
    request = Ctl(server, "officer1", "get-request " + id);
    REQUIRE(request.exit_code == 0);
    if (Field(request.text, "progress").empty()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  INFO(request.text);
  CHECK(Field(request.text, "progress").empty());
  return request;
}

constexpr char kMigratedThree[] =
    "root key rotated from 'custos-root' to 'custos-root.2'; 3 key versions re-wrapped from "
    "legacy roots; 0 stay under the confining roots that wrapped them";

// True if the audit log holds a record of `action` with outcome OK and `detail`.
bool Audited(CustosServer& server, const std::string& action, const std::string& detail) {
  int code = 0;
  std::istringstream lines(RunCommand(CtlCommand(server, "auditor", "audit export"), &code));
  std::string line;
  while (code == 0 && std::getline(lines, line)) {
    if (audit::IsCheckpointLine(line)) continue;
    absl::StatusOr<audit::Record> record = audit::FromJsonLine(line);
    REQUIRE(record.ok());
    if (record->action == action && record->outcome == "OK" && record->detail == detail) {
      return true;
    }
  }
  return false;
}

TEST_CASE("custosctl lists and runs rotate-root-key over a confining root", "[e2e][root]") {
  int code = 0;
  CHECK_THAT(RunCommand(std::string(CUSTOSCTL_PATH) + " propose --help", &code),
             Catch::Contains("rotate-root-key"));
  CustosServer server;
  CHECK_THAT(server.Log(), !Catch::Contains("legacy root"));
  std::vector<Bytes> blobs;
  for (const char* alias : {"root/a", "root/b"}) {
    CreateKey(server, alias, true, true);
    blobs.push_back(NewBlob(server, alias));
  }
  const auto [id, digest] = ProposeRootRotation(server);
  const Output approved = Ctl(server, "officer2", "approve " + id + " --digest " + digest);
  INFO(approved.text);
  REQUIRE(approved.exit_code == 0);
  CHECK(Field(approved.text, "state") == "EXECUTED");
  CHECK(Field(approved.text, "reason") ==
        "root key rotated from 'custos-root' to 'custos-root.2'; 0 key versions re-wrapped from "
        "legacy roots; 2 stay under the confining roots that wrapped them");
  blobs.push_back(NewBlob(server, "root/a"));  // a new blob, under version 1 still
  server.Restart();
  CheckDecrypts(server, blobs);
  server.Stop();
  // The old root stays for the versions it wraps; no version can be moved off it.
  CHECK(TokenSecretKeys(server) == std::set<std::string>{"custos-audit-hmac", "custos-catalog-hmac",
                                                         "custos-root", "custos-root.2"});
  server.Start();
}

TEST_CASE("A legacy root is migrated by a root rotation; custosd restarts on the new root",
          "[e2e][root]") {
  CustosServer server(
      ServerOptions{.extra_config = "", .fault_module = false, .legacy_root = true});
  CHECK_THAT(server.Log(), Catch::Contains(kLegacyWarning));
  std::vector<Bytes> blobs;
  for (const char* alias : {"root/a", "root/b"}) {
    CreateKey(server, alias, true, true);
    blobs.push_back(NewBlob(server, alias));
  }
  const auto [id, digest] = ProposeRootRotation(server);
  const Output approved = Ctl(server, "officer2", "approve " + id + " --digest " + digest);
  INFO(approved.text);
  REQUIRE(approved.exit_code == 0);
  CHECK(Field(approved.text, "state") == "EXECUTED");
  CHECK(Field(approved.text, "reason") ==
        "root key rotated from 'custos-root' to 'custos-root.2'; 2 key versions under legacy "
        "roots are being re-wrapped under it in the background; 0 stay under the confining "
        "roots that wrapped them");
  CHECK_THAT(Field(approved.text, "progress"),
             Catch::StartsWith("re-wrapping key versions off legacy roots under 'custos-root.2'"));
  CHECK(Field(AwaitRotation(server, id).text, "reason") ==
        "root key rotated from 'custos-root' to 'custos-root.2'; 2 key versions re-wrapped from "
        "legacy roots; 0 stay under the confining roots that wrapped them");
  CheckDecrypts(server, blobs);

  // The configured root (custos-root) is destroyed; the store names the one in use.
  const size_t log_before = server.Log().size();
  server.Restart();
  CHECK_THAT(server.Log().substr(log_before), !Catch::Contains("legacy root"));
  CheckDecrypts(server, blobs);
  blobs.push_back(NewBlob(server, "root/a"));
  server.Stop();
  CHECK(TokenSecretKeys(server) == kRotatedToken);
  // init on a rotated state checks the rotated root and never makes a stray custos-root.
  std::string output;
  CHECK(RunCustosd("--config " + server.state_dir() + "/custosd.toml init", &output) == 0);
  CHECK_THAT(output, Catch::Contains("root key 'custos-root.2' (named by the last root "
                                     "rotation) is present"));
  CHECK(TokenSecretKeys(server) == kRotatedToken);
  server.Start();
  CheckDecrypts(server, blobs);
}

// Starts a root rotation whose `hung` PKCS#11 call never returns, kills custosd there, and
// restarts it with the fault gone. Returns the rotation's request id and digest.
std::pair<std::string, std::string> KillRotationAt(CustosServer& server, const std::string& hung) {
  const auto request = ProposeRootRotation(server);
  server.SetFaults(hung + "\n");
  std::thread approver([&] {
    pb::ApproveRequest req;
    req.set_request_id(request.first);
    req.set_digest(request.second);
    pb::ChangeRequest reply;
    auto context = Context();  // ends with the server's death or its deadline
    (void)server.Admin("officer2")->Approve(context.get(), req, &reply);
  });
  const std::string function = hung.substr(0, hung.find(' '));
  for (int i = 0; i < 500 && server.FaultLog().find("hanging " + function) == std::string::npos;
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  INFO(server.FaultLog());
  REQUIRE(server.FaultLog().find("hanging " + function) != std::string::npos);
  server.Kill();
  approver.join();
  server.SetFaults("");
  server.Start();
  return request;
}

TEST_CASE("custosd restarts after a legacy root's migration cut short by kill -9", "[e2e][root]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true, .legacy_root = true});
  server.Stop();
  server.EditConfig("[server]\n", "[server]\nmaintenance_interval_seconds = 1\n");
  server.Start();
  std::vector<Bytes> blobs;
  for (const char* alias : {"cut/a", "cut/b", "cut/c"}) {
    CreateKey(server, alias, true, true);
    blobs.push_back(NewBlob(server, alias));
  }

  SECTION("while versions are being re-wrapped") {
    // The second C_WrapKey of the background work (re-wrapping the second version) never
    // returns. The rotation itself committed before: the new root is in use, and the
    // restarted server's maintenance resumes the re-wrapping.
    const auto [id, digest] = KillRotationAt(server, "C_WrapKey hang after=1");
    CheckDecrypts(server, blobs);
    const Output request = AwaitRotation(server, id);
    CHECK(Field(request.text, "state") == "EXECUTED");
    CHECK(Field(request.text, "reason") == kMigratedThree);
  }
  SECTION("after the versions moved, before the old root is destroyed") {
    // Re-wrapping three versions destroys three transient objects; the fourth C_DestroyObject
    // is the old root's, once the re-wrapping is recorded as done.
    const auto [id, digest] = KillRotationAt(server, "C_DestroyObject hang after=3");
    CheckDecrypts(server, blobs);
    const Output request = AwaitRotation(server, id);
    CHECK(Field(request.text, "state") == "EXECUTED");
    CHECK(Field(request.text, "reason") == kMigratedThree);
  }
  // Either way: the restarted server (maintenance, every second) destroys the retired root,
  // records it, and keeps serving every blob.
  for (int i = 0; i < 100 && !Audited(server, "DestroyRootKey", "root custos-root"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(Audited(server, "DestroyRootKey", "root custos-root"));
  server.Restart();
  CheckDecrypts(server, blobs);
  server.Stop();
  CHECK(TokenSecretKeys(server) == kRotatedToken);
}

}  // namespace
}  // namespace custos::testing
