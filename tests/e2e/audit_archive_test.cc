// Audit log archival end to end, as an operator runs it: custosctl proposes archiving up to a
// signed checkpoint, a second officer approves, custosd writes the archive beside the database
// and removes those records; then the archive and the live file verify offline, each alone and
// together, with custosctl and with plain tools (openssl for the signature, Python's standard
// library for the chain), and custosd starts again on the archived log.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>

#include "absl/strings/str_format.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

// The server signs a checkpoint after every record.
const ServerOptions kSignEveryRecord{.extra_config = "[audit]\ncheckpoint_every = 1\n"};

Output Checked(const Output& out, int expected_exit) {
  INFO(out.text);
  REQUIRE(out.exit_code == expected_exit);
  return out;
}

Output Shell(const std::string& command) {
  Output out;
  out.text = RunCommand(command + " 2>&1", &out.exit_code);
  return out;
}

void UseKey(CustosServer& server, const std::string& alias, int calls) {
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  pb::GenerateDataKeyResponse reply;
  for (int i = 0; i < calls; ++i) {
    REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), req, &reply).ok());
  }
}

// Proposes archiving up to `through` as officer1 and approves it as officer2, with custosctl.
Output ArchiveWithCtl(CustosServer& server, uint64_t through) {
  const Output proposed =
      Checked(Ctl(server, "officer1",
                  "propose archive-audit-log --through " + std::to_string(through) +
                      " --justification 'the first month goes to write-once storage'"),
              0);
  CHECK(Field(proposed.text, "state") == "PENDING");
  CHECK_THAT(proposed.text, Catch::Contains("through_seq\\\":" + std::to_string(through)));
  return Ctl(server, "officer2",
             "approve " + Field(proposed.text, "request_id") + " --digest " +
                 Field(proposed.text, "digest"));
}

TEST_CASE("Officers archive the audit log; archive and live log verify offline",
          "[e2e][audit][archive]") {
  CustosServer server(kSignEveryRecord);
  CreateKey(server, "archived/key", true, true);
  UseKey(server, "archived/key", 5);
  const std::string dir = server.state_dir();
  const std::string key = " --public-key " + dir + "/audit-public.pem";
  const std::string verify = std::string(CUSTOSCTL_PATH) + " audit verify";

  // The checkpoint to archive up to, and the auditor's public key.
  const Output saved = Checked(Ctl(server, "auditor", "audit checkpoint --out-dir " + dir), 0);
  REQUIRE(NumberField(saved.text, "seq"));
  const uint64_t through = *NumberField(saved.text, "seq");
  REQUIRE(through >= 8);

  // An app cannot propose it, nor can an officer archive what has no checkpoint.
  const Output by_app =
      Ctl(server, "app", "propose archive-audit-log --through 3 --justification x");
  CHECK(by_app.exit_code == 2);  // refused by custosd
  CHECK_THAT(by_app.text, Catch::StartsWith("error: PERMISSION_DENIED: "));
  const Output unsigned_point =
      Ctl(server, "officer1", "propose archive-audit-log --through 99999 --justification x");
  CHECK(unsigned_point.exit_code != 0);
  CHECK_THAT(unsigned_point.text,
             Catch::Contains("no signed checkpoint is stored at record 99999"));

  const Output approved = Checked(ArchiveWithCtl(server, through), 0);
  CHECK(Field(approved.text, "state") == "EXECUTED");
  const std::string archive =
      absl::StrFormat("%s/audit-archive/audit-%012u-%012u.jsonl", dir, 1, through);
  CHECK_THAT(approved.text, Catch::Contains("archived to " + archive));
  struct stat st {};
  REQUIRE(stat(archive.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  UseKey(server, "archived/key", 2);  // the live log goes on

  // custosctl: the archive alone, the live file alone (read while custosd writes it), both.
  const Output alone = Checked(Shell(verify + " " + archive + key), 0);
  CHECK_THAT(alone.text,
             Catch::StartsWith("OK: records 1 to " + std::to_string(through) + " verified"));
  const Output live = Checked(Shell(verify + " --db " + dir + "/custos.db" + key), 0);
  CHECK_THAT(live.text, Catch::StartsWith("OK: records " + std::to_string(through + 1) + " to ") &&
                            Catch::Contains("Starts after the signed checkpoint at " +
                                            std::to_string(through) + ": records 1 to " +
                                            std::to_string(through) + " were archived"));
  const Output both = Checked(Shell(verify + " " + archive + " --db " + dir + "/custos.db" + key +
                                    " --anchor " + dir + "/checkpoint.json"),
                              0);
  CHECK_THAT(both.text, Catch::StartsWith("OK: records 1 to "));

  // An export of the live log starts from the same checkpoint and verifies beside the archive.
  const std::string exported = dir + "/live.jsonl";
  Checked(Shell(CtlCommand(server, "auditor", "audit export") + " > " + exported), 0);
  Checked(Shell(verify + " " + archive + " " + exported + key), 0);

  // Plain tools: openssl for the archive's last checkpoint, Python for the chain.
  const std::string last_checkpoint = dir + "/archive-end.json";
  Checked(Shell("tail -n 1 " + archive +
                " | /usr/bin/python3 -c 'import json, sys, base64; "
                "c = json.load(sys.stdin)[\"checkpoint\"]; "
                "open(\"" +
                dir +
                "/end.msg\", \"w\", newline=\"\").write(c[\"message\"]); "
                "open(\"" +
                dir + "/end.sig\", \"wb\").write(base64.b64decode(c[\"signature\"]))'"),
          0);
  Checked(Shell("openssl dgst -sha256 -verify " + dir + "/audit-public.pem -signature " + dir +
                "/end.sig " + dir + "/end.msg"),
          0);
  const std::string chain =
      std::string("/usr/bin/python3 ") + CUSTOS_SOURCE_DIR + "/tools/verify_audit_chain.py ";
  const Output script = Checked(Shell(chain + archive + " " + exported), 0);
  CHECK_THAT(script.text, Catch::StartsWith("chain OK: records 1 to "));
  const Output rest = Checked(Shell(chain + exported), 0);
  CHECK_THAT(rest.text, Catch::Contains("(after the checkpoint at " + std::to_string(through) +
                                        ", named by record "));

  // A copy whose records after the archive were cut off does not meet the archive.
  const std::string copy = dir + "/cut.db";
  Checked(Shell("sqlite3 -bail " + dir + "/custos.db \".backup " + copy + "\""), 0);
  Checked(Shell("sqlite3 -bail " + copy +
                " 'DROP TRIGGER audit_log_append_only_delete; DELETE FROM audit_log WHERE seq = " +
                std::to_string(through + 1) + "'"),
          0);
  const Output cut = Checked(Shell(verify + " " + archive + " --db " + copy + key), 3);
  CHECK_THAT(cut.text, Catch::StartsWith("FAILED: record " + std::to_string(through) +
                                         " is followed by " + std::to_string(through + 2)));

  // A copy cut at a later checkpoint looks archived there, alone; no signed record says so.
  const std::string cut_start = dir + "/cut-start.db";
  Checked(Shell("sqlite3 -bail " + dir + "/custos.db \".backup " + cut_start + "\""), 0);
  Checked(Shell("sqlite3 -bail " + cut_start +
                " 'DROP TRIGGER audit_log_append_only_delete; DROP TRIGGER "
                "audit_checkpoints_append_only_delete; CREATE TEMP TABLE x AS SELECT seq FROM "
                "audit_checkpoints ORDER BY seq DESC LIMIT 1 OFFSET 1; DELETE FROM audit_log "
                "WHERE seq <= (SELECT seq FROM x); DELETE FROM audit_checkpoints WHERE seq < "
                "(SELECT seq FROM x)'"),
          0);
  const Output cut_alone = Checked(Shell(verify + " --db " + cut_start + key), 3);
  CHECK_THAT(cut_alone.text, Catch::Contains("may have been cut off"));

  // custosd starts again on the archived log and serves.
  server.Restart();
  UseKey(server, "archived/key", 1);
  Checked(Shell(verify + " " + archive + " --db " + dir + "/custos.db" + key), 0);
}

}  // namespace
}  // namespace custos::testing
