// Small helpers shared by the end-to-end tests.
#pragma once

#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "custos/v1/audit_service.grpc.pb.h"
#include "tests/e2e/custos_server.h"

namespace custos::testing {

namespace pb = custos::v1;

// Whether custosd runs under AddressSanitizer (built as the tests are), two to three times
// slower: bounds on latency that a Release build keeps are widened there.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// Runs `command` with /bin/sh and returns its standard output (append 2>&1 for its errors
// too); `*exit_code` is its exit status, or -1 if it did not exit.
inline std::string RunCommand(const std::string& command, int* exit_code) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[4096];
  while (fgets(buf, sizeof buf, pipe) != nullptr) out += buf;
  const int status = pclose(pipe);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

// custosctl against `server` (its address given explicitly) with the state's certificates of
// `as`, then `args`.
inline std::string CtlCommand(const CustosServer& server, const std::string& as,
                              const std::string& args) {
  return std::string(CUSTOSCTL_PATH) + " --addr localhost:" + std::to_string(server.port()) +
         " --state " + server.state_dir() + " --as " + as + " " + args;
}

// What a custosctl run printed (standard output and error) and how it exited.
struct Output {
  int exit_code = -1;
  std::string text;
};

inline Output Ctl(const CustosServer& server, const std::string& as, const std::string& args) {
  Output out;
  out.text = RunCommand(CtlCommand(server, as, args) + " 2>&1", &out.exit_code);
  return out;
}

// The number of `"field": N` in custosctl's JSON output (counts are JSON numbers); nullopt if
// absent or not a number.
inline std::optional<uint64_t> NumberField(const std::string& json, const std::string& field) {
  const std::string key = "\"" + field + "\": ";
  const size_t start = json.find(key);
  if (start == std::string::npos || start + key.size() >= json.size() ||
      !std::isdigit(static_cast<unsigned char>(json[start + key.size()]))) {
    return std::nullopt;
  }
  return std::stoull(json.substr(start + key.size()));
}

// The string value of `"field": "..."` in custosctl's JSON output; "" if absent.
inline std::string Field(const std::string& json, const std::string& field) {
  const std::string key = "\"" + field + "\": \"";
  const size_t start = json.find(key);
  if (start == std::string::npos) return "";
  const size_t end = json.find('"', start + key.size());
  return json.substr(start + key.size(), end - start - key.size());
}

// Proposes `proposal` as officer1 and approves it as officer2 (the state's quorum of one);
// REQUIREs that it executed.
inline pb::ChangeRequest ProposeAndApprove(const CustosServer& server,
                                           const pb::ProposeRequest& proposal) {
  pb::ChangeRequest proposed;
  grpc::Status status = server.Admin("officer1")->Propose(Context().get(), proposal, &proposed);
  INFO(status.error_message());
  REQUIRE(status.ok());
  pb::ApproveRequest approval;
  approval.set_request_id(proposed.request_id());
  approval.set_digest(proposed.digest());
  pb::ChangeRequest executed;
  status = server.Admin("officer2")->Approve(Context().get(), approval, &executed);
  INFO(status.error_message());
  REQUIRE(status.ok());
  REQUIRE(executed.state() == pb::EXECUTED);
  return executed;
}

// Creates a key as officer1; REQUIREs success. A key that grants anything is a request
// (proposed by officer1, approved by officer2, as the state's quorum of one needs); a key
// without grants is created at once.
inline pb::KeyMetadata CreateKey(CustosServer& server, const std::string& alias, bool encrypt_grant,
                                 bool decrypt_grant) {
  pb::CreateKeyRequest req;
  req.set_alias(alias);
  req.set_description("e2e key " + alias);
  pb::KeyMetadata key;
  if (!encrypt_grant && !decrypt_grant) {
    grpc::Status status = server.Admin("officer1")->CreateKey(Context().get(), req, &key);
    INFO(status.error_message());
    REQUIRE(status.ok());
    return key;
  }
  if (encrypt_grant) req.add_encrypt_principals(kAppPrincipal);
  if (decrypt_grant) req.add_decrypt_principals(kAppPrincipal);
  pb::ProposeRequest proposal;
  proposal.set_operation(pb::CREATE_KEY);
  proposal.set_justification("e2e key for the app");
  *proposal.mutable_create_key() = req;
  const pb::ChangeRequest executed = ProposeAndApprove(server, proposal);
  pb::DescribeKeyRequest describe;
  describe.set_key(executed.key_id());
  grpc::Status status = server.Admin("officer1")->DescribeKey(Context().get(), describe, &key);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return key;
}

// The whole catalogue as officer1 sees it, serialised: equal snapshots mean nothing changed.
inline std::string CatalogSnapshot(CustosServer& server) {
  std::string snapshot;
  pb::ListKeysRequest req;
  req.set_page_size(1000);
  auto admin = server.Admin("officer1");
  do {
    pb::ListKeysResponse page;
    grpc::Status status = admin->ListKeys(Context().get(), req, &page);
    REQUIRE(status.ok());
    snapshot += page.SerializeAsString();
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  return snapshot;
}

// How often `needle` occurs in `text` (e.g. a line in custosd's log).
inline size_t Occurrences(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++n;
  }
  return n;
}

// Every audit record so far, read as the auditor.
inline std::vector<pb::AuditRecord> AuditRecords(const CustosServer& server) {
  auto audit = pb::AuditService::NewStub(server.Channel("auditor"));
  std::unique_ptr<grpc::ClientContext> context = Context();
  auto reader = audit->ReadRecords(context.get(), pb::ReadRecordsRequest());
  std::vector<pb::AuditRecord> records;
  pb::AuditRecord record;
  while (reader->Read(&record)) records.push_back(record);
  REQUIRE(reader->Finish().ok());
  return records;
}

// Polls a log (custosd's, or the fault module's) until `line` shows; REQUIREs it does.
inline void AwaitLine(const std::function<std::string()>& log, const std::string& line) {
  for (int i = 0; i < 300 && log().find(line) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  INFO(log());
  REQUIRE(log().find(line) != std::string::npos);
}

// The records of `action` refused with `outcome`, once those after the first (the tallies,
// "N calls refused from T1 to T2: reason") count `repeats` calls; waits up to 15 s, as a tally
// after the first may wait out the recorder's 10 s interval.
inline std::vector<pb::AuditRecord> AwaitTallied(const CustosServer& server,
                                                 const std::string& action,
                                                 const std::string& outcome, uint64_t repeats) {
  std::vector<pb::AuditRecord> refused;
  uint64_t counted = 0;
  for (int i = 0; i < 300 && counted < repeats; ++i) {
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    refused.clear();
    counted = 0;
    for (const pb::AuditRecord& r : AuditRecords(server)) {
      if (r.action() != action || r.outcome() != outcome) continue;
      if (!refused.empty()) counted += std::stoull(r.detail());  // "N calls refused ..."
      refused.push_back(r);
    }
  }
  INFO(refused.size() << " records");
  CHECK(counted == repeats);
  REQUIRE(refused.size() >= 2);
  CHECK(refused.size() <= 3);  // one of its own, one or two tallies: never one per call
  return refused;
}

// Unique aliases across test cases sharing one server.
inline std::string UniqueAlias(const std::string& stem) {
  static int counter = 0;
  return "e2e/" + stem + "-" + std::to_string(++counter);
}

}  // namespace custos::testing
