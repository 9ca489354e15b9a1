// kill -9 under load never loses an acknowledged operation from the audit log, and never
// leaves a change half made.
//
// Round after round, app clients generate data keys and encrypt, an officer creates keys and
// an auditor takes checkpoints, all at once; at a random moment custosd is killed with SIGKILL
// and started again on the same state. Then the whole log, read back through AuditService,
// must verify (chain, seqs 1..N, every checkpoint taken so far, before the crash included) and
// must hold an OK record for every operation whose success reply a client received. Records
// of calls whose reply was lost at the kill may be there too, but never more records than calls
// made; and the log read after the previous crash is still its exact prefix.
// (SIGKILL keeps the OS's page cache: that the file is synced before each reply is shown by
// tests/storage/durability_test.cc.)
//
// Some rounds kill it at a worse moment:
//  - dual control: officers propose and approve key rotations and deletions back to back, and
//    the kill lands among them;
//  - automatic rotation: with a tiny encryption budget the server rotates the load's keys by
//    itself every twenty encryptions, and the kill lands among those rotations;
//  - root rotation: officers rotate the legacy root, and the kill lands while the key versions
//    are being re-wrapped in the background (held at a random version), or at a random moment
//    around the approval.
// After every restart, whatever the round: requests the kill left pending are approved, and
// then every request is executed exactly once, with exactly one approval and one execution
// record; every key has exactly the versions its rotation records name and the state its
// deletion record says; every version a reply named exists, and has counted at least the
// encryptions acknowledged under it; and the data keys kept from the load decrypt (all of them
// once a root rotation is over, which must finish, resumed by the restarted server).
//
// A root is legacy only until its first rotation, so the rounds run on two servers, each made
// on a legacy root, ten rounds each.
#include <signal.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "audit/record.h"
#include "audit/verifier.h"
#include "common/strings.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "server/audit_proto.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

constexpr char kOfficerPrincipal[] = "spiffe://custos.local/officer/officer1";
constexpr char kApproverPrincipal[] = "spiffe://custos.local/officer/officer2";
constexpr int kKeys = 4;
constexpr int kAppThreads = 8;

enum class Kind { kPlain, kDualControl, kAutoRotation, kRootRotationMidway, kRootRotation };

const char* Name(Kind kind) {
  switch (kind) {
    case Kind::kPlain:
      return "plain";
    case Kind::kDualControl:
      return "dual control";
    case Kind::kAutoRotation:
      return "automatic rotation";
    case Kind::kRootRotationMidway:
      return "root rotation, killed while re-wrapping";
    case Kind::kRootRotation:
      return "root rotation, killed around the approval";
  }
  return "";
}

// The rounds of each server. Automatic rotation rounds come in pairs, so that the second one
// also shows rotation going on after a kill; root rotations come after a few rounds, with
// versions made by all the other kinds to re-wrap.
constexpr int kRoundsPerServer = 10;
constexpr std::array<std::array<Kind, kRoundsPerServer>, 2> kSchedule = {{
    {Kind::kPlain, Kind::kDualControl, Kind::kPlain, Kind::kAutoRotation, Kind::kAutoRotation,
     Kind::kPlain, Kind::kRootRotationMidway, Kind::kDualControl, Kind::kPlain, Kind::kPlain},
    {Kind::kPlain, Kind::kAutoRotation, Kind::kAutoRotation, Kind::kDualControl, Kind::kPlain,
     Kind::kRootRotation, Kind::kPlain, Kind::kDualControl, Kind::kPlain, Kind::kPlain},
}};

// Signs a checkpoint every 25 records as well, so kills also land while the server signs.
// The encryption budget is the default one, or a tiny one during automatic rotation rounds.
constexpr char kConfig[] = "[audit]\ncheckpoint_every = 25\n[keys]\n";
constexpr char kUsualBudget[] = "encryption_limit = 4294967296\n";
constexpr char kTinyBudget[] =
    "encryption_limit = 100\nrotate_at_percent = 20\nreservation_block = 5\n";
constexpr uint64_t kTinyLimit = 100;

// (action, key id) -> number of calls.
using Tally = std::map<std::pair<std::string, std::string>, uint64_t>;
// (key id, version) -> encryptions acknowledged under it (Encrypt and GenerateDataKey).
using Served = std::map<std::pair<std::string, uint32_t>, uint64_t>;

// A data key the load received, to decrypt after restarts.
struct Sealed {
  std::string key_id;
  uint32_t version = 0;
  std::string context;  // the value of its "load" context entry
  std::string plaintext;
  std::string blob;
};

// A request an officer thread proposed (its proposal acknowledged).
struct Driven {
  std::string id;
  bool executed = false;  // its approval's reply said EXECUTED
};

// What one client thread saw in one round. Each thread owns its own; the test merges them
// after joining the threads.
struct ClientTally {
  Tally acknowledged;                                    // calls answered OK
  Tally attempted;                                       // calls made, whatever their outcome
  std::vector<std::string> created;                      // key ids of CreateKey calls answered OK
  std::vector<pb::Checkpoint> signed_checkpoints;        // GetCheckpoint replies (auditor)
  std::map<std::string, uint64_t> failures_before_kill;  // "code: message" -> count
  uint64_t failures_after_kill = 0;
  Served served;
  std::vector<Sealed> sealed;
  std::vector<Driven> requests;
};

// The flags the load threads share with the test.
struct Flags {
  std::atomic<bool> stop{false};
  std::atomic<bool> killed{false};        // set just before SIGKILL is sent
  std::atomic<uint64_t> acknowledged{0};  // by any thread this round
  // Replies under a version newer than the key's primary version when the round began.
  std::atomic<uint64_t> new_versions{0};
  std::atomic<uint64_t> executed{0};       // approvals answered EXECUTED
  std::atomic<bool> approval_sent{false};  // the root rotation's approval is on its way
};

void CountFailure(const grpc::Status& status, const Flags& flags, ClientTally& tally) {
  if (flags.killed) {
    ++tally.failures_after_kill;
  } else {
    ++tally.failures_before_kill[std::to_string(status.error_code()) + ": " +
                                 status.error_message()];
  }
}

// Sleeps `ms`, or less once the load is stopped.
void Pause(const Flags& flags, int ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (!flags.stop && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// Every 64th data key an app thread receives is kept, and its last one.
constexpr uint64_t kKeepEvery = 64;

// An app thread: GenerateDataKey and Encrypt, in a random mix, over all the keys.
void AppLoad(const CustosServer& server, const std::vector<std::string>& keys,
             const std::map<std::string, uint32_t>& primary, uint32_t seed, Flags& flags,
             ClientTally& tally) {
  auto stub = server.Keys("app");
  std::mt19937 rng(seed);
  const std::string context = std::to_string(seed);
  uint64_t generated = 0;
  std::optional<Sealed> last;
  while (!flags.stop) {
    const std::string& key = keys[rng() % keys.size()];
    grpc::Status status;
    std::string action;
    std::string key_id;
    uint32_t version = 0;
    if (rng() % 2 == 0) {
      action = "GenerateDataKey";
      pb::GenerateDataKeyRequest req;
      req.set_key(key);
      (*req.mutable_encryption_context())["load"] = context;
      pb::GenerateDataKeyResponse reply;
      ++tally.attempted[{action, key}];
      status = stub->GenerateDataKey(Context().get(), req, &reply);
      if (status.ok()) {
        key_id = reply.key_id();
        version = reply.key_version();
        last = Sealed{key_id, version, context, reply.plaintext(), reply.ciphertext_blob()};
        if (generated++ % kKeepEvery == 0) {
          tally.sealed.push_back(*std::move(last));
          last.reset();
        }
      }
    } else {
      action = "Encrypt";
      pb::EncryptRequest req;
      req.set_key(key);
      req.set_plaintext("crash test secret " + std::to_string(rng()));
      pb::EncryptResponse reply;
      ++tally.attempted[{action, key}];
      status = stub->Encrypt(Context().get(), req, &reply);
      key_id = reply.key_id();
      version = reply.key_version();
    }
    if (status.ok()) {
      ++tally.acknowledged[{action, key}];
      ++tally.served[{key_id, version}];
      if (version > primary.at(key)) ++flags.new_versions;
      ++flags.acknowledged;
    } else {
      CountFailure(status, flags, tally);
    }
  }
  if (last) tally.sealed.push_back(*std::move(last));
}

// The officer thread: CreateKey with aliases unique across rounds.
void OfficerLoad(const CustosServer& server, int round, Flags& flags, ClientTally& tally) {
  auto stub = server.Admin("officer1");
  for (int n = 0; !flags.stop; ++n) {
    pb::CreateKeyRequest req;
    req.set_alias("crash/r" + std::to_string(round) + "-" + std::to_string(n));
    pb::KeyMetadata reply;
    ++tally.attempted[{"CreateKey", ""}];
    const grpc::Status status = stub->CreateKey(Context().get(), req, &reply);
    if (status.ok()) {
      tally.created.push_back(reply.key_id());
      ++flags.acknowledged;
    } else {
      CountFailure(status, flags, tally);
    }
  }
}

// Proposes `proposal` as officer1 and, if that is acknowledged, approves it as officer2.
void ProposeAndApprove(const CustosServer& server, pb::ProposeRequest proposal, Flags& flags,
                       ClientTally& tally) {
  pb::ChangeRequest proposed;
  grpc::Status status = server.Admin("officer1")->Propose(Context().get(), proposal, &proposed);
  if (!status.ok()) {
    CountFailure(status, flags, tally);
    return;
  }
  tally.requests.push_back({proposed.request_id()});
  ++flags.acknowledged;
  pb::ApproveRequest approval;
  approval.set_request_id(proposed.request_id());
  approval.set_digest(proposed.digest());
  pb::ChangeRequest reply;
  if (proposal.operation() == pb::ROTATE_ROOT_KEY) flags.approval_sent = true;
  status = server.Admin("officer2")->Approve(Context().get(), approval, &reply);
  if (!status.ok()) {
    CountFailure(status, flags, tally);
    return;
  }
  tally.requests.back().executed = reply.state() == pb::EXECUTED;
  if (tally.requests.back().executed) ++flags.executed;
  ++flags.acknowledged;
}

// The officers of a dual control round: a rotation of one of the load's keys, a deletion of
// one of `victims`, and so on in turn, each proposed and approved at once.
void DualControlLoad(const CustosServer& server, const std::vector<std::string>& keys,
                     const std::vector<std::string>& victims, Flags& flags, ClientTally& tally) {
  for (size_t n = 0; !flags.stop; ++n) {
    pb::ProposeRequest proposal;
    proposal.set_justification("crash test: scheduled change");
    if (n % 2 == 1 && n / 2 < victims.size()) {
      proposal.set_operation(pb::SCHEDULE_KEY_DELETION);
      proposal.set_key(victims[n / 2]);
    } else {
      proposal.set_operation(pb::ROTATE_KEY);
      proposal.set_key(keys[(n / 2) % keys.size()]);
    }
    ProposeAndApprove(server, proposal, flags, tally);
  }
}

// The officers of a root rotation round: once the load is under way and `delay_ms` more have
// passed, a root rotation, proposed and approved. With `hang_after`, the HSM holds the
// re-wrapping's C_WrapKey after that many.
void RootRotationLoad(const CustosServer& server, std::optional<uint64_t> hang_after, int delay_ms,
                      Flags& flags, ClientTally& tally) {
  while (!flags.stop && flags.acknowledged == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  Pause(flags, delay_ms);
  if (flags.stop) return;
  if (hang_after) server.SetFaults("C_WrapKey hang after=" + std::to_string(*hang_after) + "\n");
  pb::ProposeRequest proposal;
  proposal.set_operation(pb::ROTATE_ROOT_KEY);
  proposal.set_justification("crash test: root rotation");
  ProposeAndApprove(server, proposal, flags, tally);
}

// The auditor thread: a signed checkpoint every few tens of milliseconds, each one kept.
void AuditorLoad(const CustosServer& server, Flags& flags, ClientTally& tally) {
  auto stub = pb::AuditService::NewStub(server.Channel("auditor"));
  while (!flags.stop) {
    pb::Checkpoint reply;
    const grpc::Status status = stub->GetCheckpoint(Context().get(), {}, &reply);
    if (status.ok()) {
      tally.signed_checkpoints.push_back(reply);
    } else {
      CountFailure(status, flags, tally);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
  }
}

// The load threads of one round; stopped and joined however the round ends.
class Load {
 public:
  Load(const CustosServer& server, const std::vector<std::string>& keys,
       const std::map<std::string, uint32_t>& primary, uint32_t seed) {
    for (int i = 0; i < kAppThreads; ++i) {
      Add(AppLoad, std::cref(server), std::cref(keys), std::cref(primary), seed + i);
    }
    Add(AuditorLoad, std::cref(server));
  }
  ~Load() { Join(); }

  template <typename F, typename... Args>
  void Add(F f, Args&&... args) {
    ClientTally& tally = tallies_.emplace_back();  // a deque: earlier ones stay where they are
    threads_.emplace_back(f, std::forward<Args>(args)..., std::ref(flags_), std::ref(tally));
  }

  Flags& flags() { return flags_; }
  void Join() {
    flags_.stop = true;
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  // Only after Join().
  const std::deque<ClientTally>& tallies() const { return tallies_; }

 private:
  Flags flags_;
  std::deque<ClientTally> tallies_;
  std::vector<std::thread> threads_;
};

// How long after the round's moment (see RunServer) the kill may come.
int MaxDelayMs(Kind kind) {
  switch (kind) {
    case Kind::kPlain:
      return 700;
    case Kind::kRootRotation:
      return 500;  // from the approval's start: before it commits, while re-wrapping, after
    case Kind::kRootRotationMidway:
      return 200;
    default:
      return 300;
  }
}

// Waits up to `seconds` for `done`.
template <typename F>
bool WaitFor(F done, int seconds = 30) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

using server::FromProto;

// The latest checkpoint, every stored checkpoint, then every record from seq 1, as the
// auditor. In that order: the server goes on writing (maintenance signs checkpoints), and
// records read last cover every checkpoint read before them.
void ReadLog(const CustosServer& server, pb::Checkpoint* latest,
             std::vector<audit::Record>* records, std::vector<audit::Checkpoint>* stored) {
  auto stub = pb::AuditService::NewStub(server.Channel("auditor"));
  grpc::Status status = stub->GetCheckpoint(Context().get(), {}, latest);
  INFO(status.error_message());
  REQUIRE(status.ok());
  REQUIRE(latest->message() == audit::CheckpointMessage(FromProto(*latest)));

  grpc::ClientContext checkpoints_context;
  checkpoints_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto checkpoints = stub->ReadCheckpoints(&checkpoints_context, {});
  stored->clear();
  pb::Checkpoint checkpoint;
  while (checkpoints->Read(&checkpoint)) stored->push_back(FromProto(checkpoint));
  status = checkpoints->Finish();
  INFO(status.error_message());
  REQUIRE(status.ok());

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  pb::ReadRecordsRequest req;
  req.set_from_seq(1);
  auto reader = stub->ReadRecords(&context, req);
  records->clear();
  pb::AuditRecord record;
  while (reader->Read(&record)) records->push_back(FromProto(record));
  status = reader->Finish();
  INFO(status.error_message());
  REQUIRE(status.ok());
}

std::string Describe(const audit::VerifyReport& report) {
  return report.Summary() + " (first bad seq " + std::to_string(report.first_bad_seq) + ")";
}

// The action of the server's record of an executed request.
std::string OperationName(pb::Operation operation) {
  switch (operation) {
    case pb::CREATE_KEY:
      return "CreateKey";
    case pb::ROTATE_KEY:
      return "RotateKey";
    case pb::SCHEDULE_KEY_DELETION:
      return "ScheduleKeyDeletion";
    case pb::ROTATE_ROOT_KEY:
      return "RotateRootKey";
    default:
      return pb::Operation_Name(operation);
  }
}

// Every request in the catalogue (with `state`, if given), by id.
std::map<std::string, pb::ChangeRequest> ListRequests(
    const CustosServer& server, pb::RequestState state = pb::REQUEST_STATE_UNSPECIFIED) {
  std::map<std::string, pb::ChangeRequest> requests;
  pb::ListRequestsRequest req;
  req.set_state(state);
  req.set_page_size(1000);
  auto admin = server.Admin("officer1");
  do {
    pb::ListRequestsResponse page;
    const grpc::Status status = admin->ListRequests(Context().get(), req, &page);
    INFO(status.error_message());
    REQUIRE(status.ok());
    for (const pb::ChangeRequest& r : page.requests()) requests[r.request_id()] = r;
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  return requests;
}

// Every key in the catalogue, by id.
std::map<std::string, pb::KeyMetadata> ListKeys(const CustosServer& server) {
  std::map<std::string, pb::KeyMetadata> keys;
  pb::ListKeysRequest req;
  req.set_page_size(1000);
  auto admin = server.Admin("officer1");
  do {
    pb::ListKeysResponse page;
    const grpc::Status status = admin->ListKeys(Context().get(), req, &page);
    INFO(status.error_message());
    REQUIRE(status.ok());
    for (const pb::KeyMetadata& k : page.keys()) keys[k.key_id()] = k;
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  return keys;
}

pb::ChangeRequest GetRequest(const CustosServer& server, const std::string& id) {
  pb::GetRequestRequest req;
  req.set_request_id(id);
  pb::ChangeRequest reply;
  const grpc::Status status = server.Admin("officer1")->GetRequest(Context().get(), req, &reply);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return reply;
}

// Approves, as officer2, every request still pending; returns their ids.
std::set<std::string> ApprovePending(const CustosServer& server) {
  std::set<std::string> approved;
  auto admin = server.Admin("officer2");
  for (const auto& [id, request] : ListRequests(server, pb::PENDING)) {
    INFO("pending " << OperationName(request.operation()) << " " << id);
    pb::ApproveRequest approval;
    approval.set_request_id(id);
    approval.set_digest(request.digest());
    pb::ChangeRequest reply;
    const grpc::Status status = admin->Approve(Context().get(), approval, &reply);
    INFO(status.error_message());
    REQUIRE(status.ok());
    CHECK(reply.state() == pb::EXECUTED);
    approved.insert(id);
  }
  return approved;
}

// The records of one request, by seq.
struct RequestRecords {
  std::vector<uint64_t> proposals, approvals;
  std::map<std::string, std::vector<uint64_t>> by_server;  // action -> seqs
};

// Every request is executed, exactly once: one proposal, one approval and one record of the
// execution, all before the restart's ServerStart (at `restart_seq`), except the approval and
// execution of those approved only after it (`approved_now`), which come after it. None the
// load saw executed is among those.
void CheckRequests(const CustosServer& server, const std::vector<audit::Record>& records,
                   uint64_t restart_seq, const std::set<std::string>& approved_now,
                   const std::set<std::string>& executed_before) {
  std::map<std::string, RequestRecords> logged;
  for (const audit::Record& r : records) {
    if (r.outcome != "OK" || r.request_id.empty()) continue;
    if (r.action == "Propose" && r.role == "officer") {
      CHECK(r.principal == kOfficerPrincipal);
      logged[r.request_id].proposals.push_back(r.seq);
    } else if (r.action == "Approve" && r.role == "officer") {
      CHECK(r.principal == kApproverPrincipal);
      logged[r.request_id].approvals.push_back(r.seq);
    } else if (r.role == "server") {
      logged[r.request_id].by_server[r.action].push_back(r.seq);
    }
  }
  const std::map<std::string, pb::ChangeRequest> requests = ListRequests(server);
  CHECK(requests.size() == logged.size());
  for (const auto& [id, request] : requests) {
    const bool now = approved_now.count(id) > 0;
    INFO("request " << id << " (" << OperationName(request.operation()) << ")"
                    << (now ? ", approved after the restart" : ""));
    CHECK(request.state() == pb::EXECUTED);
    const RequestRecords& r = logged[id];
    REQUIRE(r.proposals.size() == 1);
    REQUIRE(r.approvals.size() == 1);
    const auto executions = r.by_server.find(OperationName(request.operation()));
    REQUIRE(executions != r.by_server.end());
    REQUIRE(executions->second.size() == 1);
    CHECK(r.proposals[0] < restart_seq);
    CHECK((r.approvals[0] > restart_seq) == now);
    CHECK((executions->second[0] > restart_seq) == now);
    // The approval and its execution commit together.
    CHECK(executions->second[0] == r.approvals[0] + 1);
    if (executed_before.count(id) > 0) CHECK(!now);
  }
}

// Every key has exactly the versions its rotation records name (1..n, n primary), and is
// PENDING_DELETION exactly if its deletion was executed; the catalogue holds exactly the keys
// whose creation is recorded. Returns the catalogue.
std::map<std::string, pb::KeyMetadata> CheckKeys(const CustosServer& server,
                                                 const std::vector<audit::Record>& records) {
  std::map<std::string, uint32_t> rotations, deletions;
  std::set<std::string> created;
  for (const audit::Record& r : records) {
    if (r.outcome != "OK") continue;
    if (r.action == "CreateKey") created.insert(r.key_id);
    if (r.role != "server") continue;
    if (r.action == "RotateKey" || r.action == "AutoRotateKey") ++rotations[r.key_id];
    if (r.action == "ScheduleKeyDeletion") ++deletions[r.key_id];
  }
  std::map<std::string, pb::KeyMetadata> keys = ListKeys(server);
  std::set<std::string> listed;
  for (const auto& [id, key] : keys) {
    listed.insert(id);
    INFO("key " << id << ": " << key.versions_size() << " versions, primary "
                << key.primary_version() << ", " << rotations[id] << " rotations and "
                << deletions[id] << " deletions recorded");
    CHECK(key.integrity_problem() == "");
    REQUIRE(static_cast<uint32_t>(key.versions_size()) == 1 + rotations[id]);
    for (int i = 0; i < key.versions_size(); ++i) {
      CHECK(key.versions(i).version() == static_cast<uint32_t>(i + 1));
    }
    CHECK(key.primary_version() == static_cast<uint32_t>(key.versions_size()));
    CHECK(deletions[id] <= 1);
    CHECK(key.state() == (deletions[id] == 1 ? pb::PENDING_DELETION : pb::ENABLED));
  }
  CHECK(listed == created);
  return keys;
}

// Decrypts each of `sealed` as the app: the data key comes back, under its key and version.
void CheckDecrypts(const CustosServer& server, const std::vector<Sealed>& sealed,
                   Tally& acknowledged, Tally& attempted) {
  auto stub = server.Keys("app");
  for (const Sealed& s : sealed) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(s.blob);
    (*req.mutable_encryption_context())["load"] = s.context;
    pb::DecryptResponse reply;
    ++attempted[{"Decrypt", s.key_id}];
    const grpc::Status status = stub->Decrypt(Context().get(), req, &reply);
    INFO("data key under version " << s.version << " of " << s.key_id << ": "
                                   << status.error_message());
    REQUIRE(status.ok());
    ++acknowledged[{"Decrypt", s.key_id}];
    CHECK(reply.plaintext() == s.plaintext);
    CHECK(reply.key_id() == s.key_id);
    CHECK(reply.key_version() == s.version);
  }
}

// The records of `action` with outcome OK, from `from` (an index into records) on.
std::vector<const audit::Record*> Find(const std::vector<audit::Record>& records,
                                       const std::string& action, size_t from = 0) {
  std::vector<const audit::Record*> found;
  for (size_t i = from; i < records.size(); ++i) {
    if (records[i].action == action && records[i].outcome == "OK") found.push_back(&records[i]);
  }
  return found;
}

// The number a "<N> versions ..." detail starts with (after `prefix`); 0 if none.
uint64_t LeadingCount(const std::string& detail, const std::string& prefix = "") {
  if (detail.compare(0, prefix.size(), prefix) != 0) return 0;
  return std::strtoull(detail.c_str() + prefix.size(), nullptr, 10);
}

// Keys made without grants at the start, beside the load's: their versions fill more than one
// page of a root rotation's re-wrapping (256 keys).
constexpr int kIdleKeys = 300;

// Creates `n` keys without grants as officer1, four at a time; returns their ids.
std::vector<std::string> CreateIdleKeys(const CustosServer& server, int n) {
  constexpr int kThreads = 4;
  std::vector<std::vector<std::string>> ids(kThreads);
  std::vector<grpc::Status> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto stub = server.Admin("officer1");
      for (int i = t; i < n && failures[t].ok(); i += kThreads) {
        pb::CreateKeyRequest req;
        req.set_alias("crash/idle-" + std::to_string(i));
        pb::KeyMetadata reply;
        failures[t] = stub->CreateKey(Context().get(), req, &reply);
        if (failures[t].ok()) ids[t].push_back(reply.key_id());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::vector<std::string> all;
  for (int t = 0; t < kThreads; ++t) {
    INFO(failures[t].error_message());
    REQUIRE(failures[t].ok());
    all.insert(all.end(), ids[t].begin(), ids[t].end());
  }
  return all;
}

// Ten rounds on one server, made on a legacy root; rounds are numbered from `first_round`.
void RunServer(const std::array<Kind, kRoundsPerServer>& schedule, int first_round,
               std::mt19937& rng) {
  CustosServer server(ServerOptions{.extra_config = std::string(kConfig) + kUsualBudget,
                                    .fault_module = true,
                                    .legacy_root = true});
  // Each restart after a kill waits out the dead server's claim on the token: a lease of 2 s
  // (the least an 800 ms HSM deadline allows) rather than 5 s, twenty times. From the first
  // restart on; a C_WrapKey held in a root rotation round is killed 200 ms after it at most.
  server.EditConfig("[hsm]\n", "[hsm]\ncall_timeout_ms = 800\ninstance_lease_ms = 2000\n");
  std::vector<std::string> keys;
  std::map<std::string, uint32_t> primary;  // of each load key, as the last check found it
  for (int i = 0; i < kKeys; ++i) {
    keys.push_back(CreateKey(server, "crash/key-" + std::to_string(i), true, true).key_id());
    primary[keys.back()] = 1;
  }

  Tally acknowledged, attempted;            // app calls, all rounds
  std::vector<std::string> created = keys;  // acknowledged CreateKey, all rounds
  const std::vector<std::string> idle = CreateIdleKeys(server, kIdleKeys);
  created.insert(created.end(), idle.begin(), idle.end());
  uint64_t create_attempts = kKeys + kIdleKeys;
  std::vector<pb::Checkpoint> kept;     // every checkpoint an auditor received
  std::vector<audit::Record> previous;  // the log as read after the previous crash
  std::string public_key_pem;           // pinned at the first read
  Served served;                        // acknowledged encryptions, all rounds
  Served served_tiny;                   // those under the tiny budget
  std::vector<Sealed> sealed;           // data keys kept, all rounds
  std::set<std::string> executed;       // requests the load saw executed
  size_t next_victim = kKeys;           // the first created key no deletion was proposed for
  uint64_t catalogue_versions = kKeys + kIdleKeys;  // in the catalogue after the last round
  bool root_rotated = false;

  for (int index = 0; index < kRoundsPerServer; ++index) {
    const Kind kind = schedule[index];
    const int round = first_round + index;
    INFO("round " << round << " (" << Name(kind) << ")");
    const bool root = kind == Kind::kRootRotationMidway || kind == Kind::kRootRotation;
    const uint64_t versions_at_start = catalogue_versions;
    // --- load, then SIGKILL at a random moment once it is under way ---
    const int delay_ms = static_cast<int>(rng() % MaxDelayMs(kind));
    INFO("killed " << delay_ms << " ms after the round's moment");
    std::map<std::string, uint64_t> failures_before_kill;
    uint64_t failures_after_kill = 0, acknowledged_this_round = 0;
    std::vector<Sealed> sealed_this_round;
    std::vector<std::string> driven;  // requests proposed this round
    std::optional<uint64_t> hang_after;
    if (kind == Kind::kRootRotationMidway) hang_after = rng() % versions_at_start;
    INFO("re-wrapping held after " << hang_after.value_or(0) << " of " << versions_at_start
                                   << " versions");
    const size_t hangs_before = Occurrences(server.FaultLog(), "hanging C_WrapKey");
    {
      Load load(server, keys, primary, rng());
      if (!root) load.Add(OfficerLoad, std::cref(server), round);
      std::vector<std::string> victims;
      if (kind == Kind::kDualControl) {
        // Keys created earlier (the idle ones first), each offered for deletion once.
        const size_t end = std::min(created.size(), next_victim + 32);
        victims.assign(created.begin() + next_victim, created.begin() + end);
        next_victim = end;
        load.Add(DualControlLoad, std::cref(server), std::cref(keys), std::cref(victims));
      }
      if (root) {
        load.Add(RootRotationLoad, std::cref(server), hang_after, static_cast<int>(rng() % 200));
      }
      Flags& flags = load.flags();
      // The moment the delay counts from: the first acknowledged call; in a dual control
      // round, the first executed request; in an automatic rotation round, the first reply
      // under a new version; in a root rotation round, the approval on its way, and with
      // hang_after, the re-wrapping held.
      bool moment = WaitFor([&] { return flags.acknowledged > 0; });
      if (kind == Kind::kDualControl)
        moment = moment && WaitFor([&] { return flags.executed > 0; });
      if (kind == Kind::kAutoRotation) {
        moment = moment && WaitFor([&] { return flags.new_versions > 0; });
      }
      if (root) moment = moment && WaitFor([&] { return flags.approval_sent.load(); });
      if (kind == Kind::kRootRotationMidway) {
        moment = moment && WaitFor([&] {
                   return Occurrences(server.FaultLog(), "hanging C_WrapKey") > hangs_before;
                 });
      }
      if (moment) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      flags.killed = true;
      server.Signal(SIGKILL);  // Kill below reaps it (a second SIGKILL is a no-op)
      load.Join();             // before the restart: calls after the kill must all fail
      INFO(server.Log());
      INFO(server.FaultLog());
      REQUIRE(moment);

      for (const ClientTally& t : load.tallies()) {
        for (const auto& [k, n] : t.acknowledged) {
          acknowledged[k] += n;
          acknowledged_this_round += n;
        }
        for (const auto& [k, n] : t.attempted) {
          if (k.first == "CreateKey") {
            create_attempts += n;
          } else {
            attempted[k] += n;
          }
        }
        created.insert(created.end(), t.created.begin(), t.created.end());
        acknowledged_this_round += t.created.size();
        kept.insert(kept.end(), t.signed_checkpoints.begin(), t.signed_checkpoints.end());
        for (const auto& [what, n] : t.failures_before_kill) failures_before_kill[what] += n;
        failures_after_kill += t.failures_after_kill;
        for (const auto& [k, n] : t.served) {
          served[k] += n;
          if (kind == Kind::kAutoRotation) served_tiny[k] += n;
        }
        sealed_this_round.insert(sealed_this_round.end(), t.sealed.begin(), t.sealed.end());
        for (const Driven& d : t.requests) {
          driven.push_back(d.id);
          if (d.executed) executed.insert(d.id);
        }
      }
    }
    server.Kill();
    if (kind == Kind::kRootRotationMidway) server.SetFaults("");  // releases nothing: it is dead
    // The tiny budget holds from the restart before an automatic rotation round to the one
    // after the last of them.
    const bool tiny_now = kind == Kind::kAutoRotation;
    const bool tiny_next =
        index + 1 < kRoundsPerServer && schedule[index + 1] == Kind::kAutoRotation;
    if (tiny_next && !tiny_now) {
      server.EditConfig(kUsualBudget, kTinyBudget);
      served_tiny.clear();
    }
    if (!tiny_next && tiny_now) server.EditConfig(kTinyBudget, kUsualBudget);
    server.Start();

    // --- what the kill left pending is approved now; a root rotation is awaited ---
    const std::set<std::string> approved_now = ApprovePending(server);
    pb::ChangeRequest rotation;
    if (root) {
      REQUIRE(driven.size() == 1);
      for (int i = 0; i < 3000; ++i) {
        rotation = GetRequest(server, driven[0]);
        if (rotation.state() == pb::EXECUTED && rotation.progress().empty()) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      INFO(rotation.DebugString());
      REQUIRE(rotation.state() == pb::EXECUTED);
      REQUIRE(rotation.progress().empty());
      root_rotated = true;
    }

    // --- the log as an auditor reads it after the restart ---
    pb::Checkpoint latest;
    std::vector<audit::Record> records;
    std::vector<audit::Checkpoint> stored;
    ReadLog(server, &latest, &records, &stored);
    if (public_key_pem.empty()) public_key_pem = latest.public_key_pem();
    CHECK(latest.public_key_pem() == public_key_pem);
    absl::StatusOr<audit::PublicKeyVerifier> key =
        audit::PublicKeyVerifier::FromPem(public_key_pem);
    REQUIRE(key.ok());

    std::ostringstream summary;
    summary << records.size() << " records, " << acknowledged_this_round
            << " calls acknowledged this round, " << kept.size() << " checkpoints kept, "
            << failures_after_kill << " calls failed after the kill, " << driven.size()
            << " requests proposed, " << approved_now.size() << " approved after the restart";
    for (const auto& [what, n] : failures_before_kill) {
      summary << "\n  failed before the kill (" << n << "x): " << what;
    }
    INFO(summary.str());

    // The chain, seqs 1..N, every checkpoint stored in the log (each naming the one before it)
    // and the latest one as anchor; and every checkpoint an auditor kept so far (those taken
    // during the load before the kill included) is among them, unchanged.
    std::vector<audit::Checkpoint> checkpoints;
    for (const pb::Checkpoint& c : kept) checkpoints.push_back(FromProto(c));
    for (const audit::Checkpoint& c : checkpoints) {
      INFO("checkpoint kept at " << c.seq);
      CHECK(std::find(stored.begin(), stored.end(), c) != stored.end());
    }
    const audit::Checkpoint anchor = FromProto(latest);
    audit::VectorRecordSource source(records);
    const audit::VerifyReport report = audit::Verify(source, stored, &anchor, *key);
    INFO(Describe(report));
    REQUIRE(report.ok);
    CHECK(report.first_bad_seq == 0);
    CHECK(report.records_checked == records.size());
    CHECK(report.last_verified_seq == records.size());
    CHECK(report.checkpoints_verified == stored.size());
    CHECK(report.signed_through_seq >= latest.seq());
    REQUIRE(!records.empty());
    CHECK(records.back().seq == records.size());

    // Each checkpoint kept from before this crash is, on its own, an anchor the new log holds.
    for (const audit::Checkpoint& before : checkpoints) {
      audit::VectorRecordSource again(records);
      const audit::VerifyReport anchored = audit::Verify(again, {}, &before, *key);
      INFO("anchor at " << before.seq << ": " << Describe(anchored));
      CHECK(anchored.ok);
    }

    // What was read after the previous crash is still there, byte for byte.
    REQUIRE(records.size() >= previous.size());
    for (size_t i = 0; i < previous.size(); ++i) {
      INFO("seq " << previous[i].seq);
      REQUIRE(records[i] == previous[i]);
    }

    // Every acknowledged call has its OK record; no call has more than one.
    Tally logged;
    std::map<std::string, uint64_t> created_logged;
    for (const audit::Record& r : records) {
      if (r.outcome != "OK") continue;
      if (r.principal == kAppPrincipal) {
        CHECK(r.role == "app");
        ++logged[{r.action, r.key_id}];
      } else if (r.action == "CreateKey") {
        // By officer1 directly, or by the server executing an approved request (keys with
        // grants).
        CHECK(r.role == (r.principal == kOfficerPrincipal ? "officer" : "server"));
        ++created_logged[r.key_id];
      }
    }
    uint64_t logged_total = 0, acknowledged_total = 0, starts = 0, stops = 0;
    uint64_t restart_seq = 0;  // the ServerStart of the restart after this round's kill
    for (const auto& [k, n] : logged) logged_total += n;
    for (const auto& [k, n] : acknowledged) acknowledged_total += n;
    for (const audit::Record& r : records) {
      if (r.action == "ServerStart") {
        ++starts;
        restart_seq = r.seq;
      }
      stops += r.action == "ServerStop";
    }
    INFO("app calls: " << acknowledged_total << " acknowledged, " << logged_total
                       << " OK records; ServerStart " << starts << ", ServerStop " << stops);
    CHECK(starts == static_cast<uint64_t>(index) + 2);  // the first start and every restart
    CHECK(stops == 0);                                  // SIGKILL leaves no time to record one
    REQUIRE(restart_seq > previous.size());
    for (const auto& [k, n] : acknowledged) {
      INFO(k.first << " on " << k.second << ": " << n << " acknowledged, " << logged[k]
                   << " in the log");
      CHECK(logged[k] >= n);
    }
    for (const auto& [k, n] : logged) {
      INFO(k.first << " on " << k.second << ": " << n << " in the log, " << attempted[k]
                   << " calls made");
      CHECK(n <= attempted[k]);
    }
    for (const std::string& id : created) {
      INFO("CreateKey " << id);
      CHECK(created_logged[id] == 1);
    }
    uint64_t creations_logged = 0;
    for (const auto& [id, n] : created_logged) creations_logged += n;
    CHECK(creations_logged <= create_attempts);

    // Requests: each executed exactly once, none half done.
    CheckRequests(server, records, restart_seq, approved_now, executed);
    for (const std::string& id : driven) {  // every proposal acknowledged is there
      INFO("request " << id << " proposed this round");
      CHECK(GetRequest(server, id).state() == pb::EXECUTED);
    }
    // Keys: exactly the versions and states their records name.
    const std::map<std::string, pb::KeyMetadata> catalogue = CheckKeys(server, records);
    catalogue_versions = 0;
    for (const auto& [id, k] : catalogue) catalogue_versions += k.versions_size();
    for (const std::string& id : keys) primary[id] = catalogue.at(id).primary_version();
    // Every version a reply named exists, and its count of encryptions (resumed after a crash
    // from its durable reservation) is at least what was acknowledged under it.
    std::map<std::string, pb::KeyMetadata> described;
    for (const std::string& id : keys) {
      pb::DescribeKeyRequest req;
      req.set_key(id);
      const grpc::Status status =
          server.Admin("officer1")->DescribeKey(Context().get(), req, &described[id]);
      INFO(status.error_message());
      REQUIRE(status.ok());
    }
    for (const auto& [k, n] : served) {
      INFO("version " << k.second << " of " << k.first << ": " << n << " encryptions acknowledged");
      REQUIRE(k.second >= 1);
      REQUIRE(k.second <= described.at(k.first).primary_version());
      CHECK(described.at(k.first).versions(k.second - 1).encryptions() >= n);
    }
    // While the tiny budget held, never more encryptions under one version than it allows,
    // kills or not.
    for (const auto& [k, n] : served_tiny) {
      INFO("version " << k.second << " of " << k.first << ": " << n
                      << " encryptions acknowledged under the tiny budget");
      CHECK(n <= kTinyLimit);
    }

    const std::vector<const audit::Record*> destroyed_roots = Find(records, "DestroyRootKey");
    CHECK(destroyed_roots.size() == (root_rotated ? 1u : 0u));
    if (kind == Kind::kDualControl) {
      // The round executed requests before the kill.
      size_t executed_before_kill = 0;
      for (const std::string& id : driven) executed_before_kill += approved_now.count(id) == 0;
      CHECK(executed_before_kill > 0);
    }
    if (kind == Kind::kAutoRotation) {
      // The server rotated by itself during the round, before the kill.
      const auto rotated = Find(records, "AutoRotateKey", previous.size());
      CHECK(std::count_if(rotated.begin(), rotated.end(),
                          [&](const audit::Record* r) { return r->seq < restart_seq; }) > 0);
    }
    if (root) {
      // Rotated once from the legacy root to a new one; every version that was under the
      // legacy root re-wrapped exactly once, whether before or after the kill; the legacy root
      // destroyed. No version was made during the round (the officer made no keys, nothing
      // rotated), so every version there was is one to re-wrap.
      CHECK(catalogue_versions == versions_at_start);
      const std::string versions = std::to_string(versions_at_start);
      const auto rotated = Find(records, "RotateRootKey");
      REQUIRE(rotated.size() == 1);
      CHECK(rotated[0]->role == "server");
      CHECK(rotated[0]->request_id == driven[0]);
      // A kill while the HSM generated the new root may leave a key under its label (even one
      // without a value); the approval after the restart then passes over it to the next.
      const std::string passed_over = "; labels passed over, taken already: [\"custos-root.2\"]";
      const bool skipped = rotated[0]->detail.ends_with(passed_over);
      if (skipped) CHECK(rotated[0]->seq > restart_seq);
      const std::string new_root = skipped ? "custos-root.3" : "custos-root.2";
      CHECK(rotated[0]->detail == StrCat("new root ", new_root, "; ", versions,
                                         " versions to re-wrap, 0 kept",
                                         skipped ? passed_over : ""));
      INFO(rotation.DebugString());
      CHECK(rotation.reason() == StrCat("root key rotated from 'custos-root' to '", new_root, "'; ",
                                        versions,
                                        " key versions re-wrapped from legacy roots; 0 stay "
                                        "under the confining roots that wrapped them"));
      const auto started = Find(records, "RootMigrationStarted");
      const auto finished = Find(records, "RootRotationFinished");
      REQUIRE(started.size() == 1);
      REQUIRE(finished.size() == 1);
      CHECK(Find(records, "RootMigrationDone").size() == 1);
      REQUIRE(destroyed_roots.size() == 1);
      CHECK(destroyed_roots[0]->detail == "root custos-root");
      uint64_t rewrapped = 0, rewrapped_before_kill = 0, last_rewrap_seq = 0;
      for (const audit::Record& r : records) {
        if (r.action != "RewrapKeyVersions") continue;
        INFO(r.detail);
        CHECK(r.outcome == "OK");
        const uint64_t n = LeadingCount(r.detail);
        CHECK(r.detail == StrCat(n, " versions re-wrapped from a legacy root under ", new_root));
        rewrapped += n;
        last_rewrap_seq = r.seq;
        if (r.seq < restart_seq) rewrapped_before_kill += n;
      }
      // Destroyed once nothing was left under it (maintenance may get there before the
      // rotation's own end).
      CHECK(destroyed_roots[0]->seq > last_rewrap_seq);
      INFO(rewrapped_before_kill << " versions re-wrapped before the kill");
      CHECK(rewrapped == versions_at_start);
      if (kind == Kind::kRootRotationMidway) {
        // Killed while re-wrapping: started before the kill, finished after the restart.
        CHECK(started[0]->seq < restart_seq);
        CHECK(finished[0]->seq > restart_seq);
        CHECK(rewrapped_before_kill <= *hang_after);
      }
    }

    // Data keys: those of this round, or all of them after a root rotation.
    sealed.insert(sealed.end(), sealed_this_round.begin(), sealed_this_round.end());
    CheckDecrypts(server, root ? sealed : sealed_this_round, acknowledged, attempted);

    previous = std::move(records);
    kept.push_back(latest);  // the next round's crash must not rewrite it either
  }
}

TEST_CASE("kill -9 under load: the log verifies and holds every acknowledged operation",
          "[e2e][audit][crash]") {
  const uint32_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  RunServer(kSchedule[0], 0, rng);
  RunServer(kSchedule[1], kRoundsPerServer, rng);
}

}  // namespace
}  // namespace custos::testing
