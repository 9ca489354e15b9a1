// The insider against the real custosd: someone who can write custos.db while custosd is
// stopped (a DBA, root on the host) adds a grant with SQL, deletes the stored checkpoints, or
// puts back an older copy of the database. Each is caught by the next start or the next use,
// said in the operator's log and in the audit log; a restore from backup is accepted only by
// officers approving a re-anchoring.
#include <catch2/catch.hpp>
#include <filesystem>

#include "custos/v1/audit_service.grpc.pb.h"
#include "tests/e2e/e2e_util.h"
#include "tests/support/sqlite_file.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

std::string Db(const CustosServer& server) { return server.state_dir() + "/custos.db"; }

grpc::Status GenerateDataKey(const CustosServer& server, const std::string& key) {
  pb::GenerateDataKeyRequest req;
  req.set_key(key);
  pb::GenerateDataKeyResponse reply;
  return server.Keys("app")->GenerateDataKey(Context().get(), req, &reply);
}

// Signs a checkpoint of the log as it stands (an auditor asking for one), so that the HSM
// holds that head.
void Checkpoint(const CustosServer& server) {
  pb::Checkpoint checkpoint;
  REQUIRE(pb::AuditService::NewStub(server.Channel("auditor"))
              ->GetCheckpoint(Context().get(), pb::GetCheckpointRequest(), &checkpoint)
              .ok());
}

TEST_CASE("A grant added with SQL is refused by custosd, alarmed and audited", "[e2e][insider]") {
  CustosServer server;
  const pb::KeyMetadata key = CreateKey(server, "insider/no-grants", false, false);
  server.Stop();
  REQUIRE(SqlExec(Db(server), "INSERT INTO key_grants VALUES ('" + key.key_id() + "', '" +
                                  kAppPrincipal + "', 'encrypt');")
              .empty());
  server.Start();

  const std::string refusal = "catalogue row key:" + key.key_id() +
                              " failed its integrity check: its MAC does not match its content";
  for (int i = 0; i < 2; ++i) {
    const grpc::Status status = GenerateDataKey(server, "insider/no-grants");
    CHECK(status.error_code() == StatusCode::DATA_LOSS);
    CHECK_THAT(status.error_message(), Catch::StartsWith(refusal));
  }
  // Officers see which key and why; the key stays listed, unusable.
  pb::ListKeysRequest list;
  list.set_page_size(1000);
  pb::ListKeysResponse listed;
  REQUIRE(server.Admin("officer1")->ListKeys(Context().get(), list, &listed).ok());
  bool seen = false;
  for (const pb::KeyMetadata& k : listed.keys()) {
    if (k.key_id() != key.key_id()) {
      CHECK(k.integrity_problem().empty());
      continue;
    }
    seen = true;
    CHECK_THAT(k.integrity_problem(), Catch::Contains("its MAC does not match its content"));
  }
  CHECK(seen);
  // One alarm for the row, however many calls met it: in the audit log and the operator's log.
  int alarms = 0;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.action() != "IntegrityFailure") continue;
    ++alarms;
    CHECK(r.key_id() == key.key_id());
    CHECK(r.outcome() == "DATA_LOSS");
    CHECK(r.principal() == "custosd");
  }
  CHECK(alarms == 1);
  CHECK_THAT(server.Log(), Catch::Contains("integrity alarm: " + refusal));
}

TEST_CASE("Deleted checkpoints stop custosd at start, naming what was done", "[e2e][insider]") {
  CustosServer server;
  CreateKey(server, "insider/checkpoints", true, true);
  REQUIRE(GenerateDataKey(server, "insider/checkpoints").ok());
  Checkpoint(server);
  server.Stop();
  REQUIRE(SqlExec(Db(server),
                  "DROP TRIGGER audit_checkpoints_append_only_update;"
                  "DROP TRIGGER audit_checkpoints_append_only_delete;"
                  "DELETE FROM audit_checkpoints;")
              .empty());
  std::string output;
  CHECK(RunCustosd("--config " + server.state_dir() + "/custosd.toml", &output) == 1);
  CHECK_THAT(output, Catch::Contains("stored checkpoints were deleted"));
  CHECK_THAT(output, Catch::Contains("--allow-re-anchor"));
}

TEST_CASE("An older copy of the database stops custosd until officers re-anchor the log",
          "[e2e][insider]") {
  CustosServer server;
  CreateKey(server, "insider/restored", true, true);
  REQUIRE(GenerateDataKey(server, "insider/restored").ok());
  server.Stop();
  const std::string backup = server.state_dir() + "/backup.db";
  REQUIRE(SqlExec(Db(server), "VACUUM INTO '" + backup + "'").empty());
  server.Start();
  for (int i = 0; i < 3; ++i) REQUIRE(GenerateDataKey(server, "insider/restored").ok());
  Checkpoint(server);  // the HSM now holds a head the backup does not reach
  server.Stop();
  std::filesystem::remove(Db(server) + "-wal");
  std::filesystem::remove(Db(server) + "-shm");
  std::filesystem::copy_file(backup, Db(server), std::filesystem::copy_options::overwrite_existing);

  std::string output;
  CHECK(RunCustosd("--config " + server.state_dir() + "/custosd.toml", &output) == 1);
  CHECK_THAT(output, Catch::Contains("an older copy of the database was restored"));

  // The restore was on purpose: custosd serves nothing but the officers' decision.
  server.Start({"--allow-re-anchor"});
  const grpc::Status waiting = GenerateDataKey(server, "insider/restored");
  CHECK(waiting.error_code() == StatusCode::UNAVAILABLE);
  Output proposed =
      Ctl(server, "officer1", "propose re-anchor-audit-log --justification 'restored from backup'");
  INFO(proposed.text);
  REQUIRE(proposed.exit_code == 0);
  CHECK(Field(proposed.text, "state") == "PENDING");
  CHECK(Field(proposed.text, "operation") == "RE_ANCHOR_AUDIT_LOG");
  // A restart ends it: approvals count only in the run whose start-up check they answer.
  server.Stop();
  server.Start({"--allow-re-anchor"});
  const Output stale = Ctl(server, "officer2", "get-request " + Field(proposed.text, "request_id"));
  INFO(stale.text);
  CHECK(Field(stale.text, "state") == "EXPIRED");
  proposed =
      Ctl(server, "officer1", "propose re-anchor-audit-log --justification 'restored from backup'");
  REQUIRE(proposed.exit_code == 0);
  Output approved = Ctl(server, "officer2",
                        "approve " + Field(proposed.text, "request_id") + " --digest " +
                            Field(proposed.text, "digest"));
  INFO(approved.text);
  REQUIRE(approved.exit_code == 0);
  CHECK(Field(approved.text, "state") == "EXECUTED");
  CHECK(GenerateDataKey(server, "insider/restored").ok());
  bool recorded = false;
  for (const pb::AuditRecord& r : AuditRecords(server)) {
    if (r.action() != "ReAnchorAuditLog") continue;
    recorded = true;
    CHECK(r.request_id() == Field(proposed.text, "request_id"));
    CHECK_THAT(r.detail(), Catch::Contains("an older copy of the database was restored"));
  }
  CHECK(recorded);

  // From now on the restored log is the one the HSM vouches for: a plain start serves.
  server.Stop();
  server.Start();
  CHECK(GenerateDataKey(server, "insider/restored").ok());
}

}  // namespace
}  // namespace custos::testing
