// kill -9 under load never loses an acknowledged operation from the audit log.
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
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <map>
#include <random>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "audit/record.h"
#include "audit/verifier.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "server/audit_proto.h"
#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

constexpr char kOfficerPrincipal[] = "spiffe://custos.local/officer/officer1";
constexpr int kKeys = 4;
constexpr int kAppThreads = 8;
constexpr int kRounds = 8;

// Signs a checkpoint every 25 records as well, so kills also land while the server signs.
constexpr char kConfig[] = "[audit]\ncheckpoint_every = 25\n";

// (action, key id) -> number of calls.
using Tally = std::map<std::pair<std::string, std::string>, uint64_t>;

// What one client thread saw in one round. Each thread owns its own; the test merges them
// after joining the threads.
struct ClientTally {
  Tally acknowledged;                                    // calls answered OK
  Tally attempted;                                       // calls made, whatever their outcome
  std::vector<std::string> created;                      // key ids of CreateKey calls answered OK
  std::vector<pb::Checkpoint> signed_checkpoints;        // GetCheckpoint replies (auditor)
  std::map<std::string, uint64_t> failures_before_kill;  // "code: message" -> count
  uint64_t failures_after_kill = 0;
};

// The flags the load threads share with the test.
struct Flags {
  std::atomic<bool> stop{false};
  std::atomic<bool> killed{false};        // set just before SIGKILL is sent
  std::atomic<uint64_t> acknowledged{0};  // by any thread this round
};

void CountFailure(const grpc::Status& status, const Flags& flags, ClientTally& tally) {
  if (flags.killed) {
    ++tally.failures_after_kill;
  } else {
    ++tally.failures_before_kill[std::to_string(status.error_code()) + ": " +
                                 status.error_message()];
  }
}

// An app thread: GenerateDataKey and Encrypt, in a random mix, over all the keys.
void AppLoad(const CustosServer& server, const std::vector<std::string>& keys, uint32_t seed,
             Flags& flags, ClientTally& tally) {
  auto stub = server.Keys("app");
  std::mt19937 rng(seed);
  while (!flags.stop) {
    const std::string& key = keys[rng() % keys.size()];
    grpc::Status status;
    std::string action;
    if (rng() % 2 == 0) {
      action = "GenerateDataKey";
      pb::GenerateDataKeyRequest req;
      req.set_key(key);
      (*req.mutable_encryption_context())["load"] = std::to_string(seed);
      pb::GenerateDataKeyResponse reply;
      ++tally.attempted[{action, key}];
      status = stub->GenerateDataKey(Context().get(), req, &reply);
    } else {
      action = "Encrypt";
      pb::EncryptRequest req;
      req.set_key(key);
      req.set_plaintext("crash test secret " + std::to_string(rng()));
      pb::EncryptResponse reply;
      ++tally.attempted[{action, key}];
      status = stub->Encrypt(Context().get(), req, &reply);
    }
    if (status.ok()) {
      ++tally.acknowledged[{action, key}];
      ++flags.acknowledged;
    } else {
      CountFailure(status, flags, tally);
    }
  }
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
  Load(const CustosServer& server, const std::vector<std::string>& keys, int round, uint32_t seed)
      : tallies_(kAppThreads + 2) {
    for (int i = 0; i < kAppThreads; ++i) {
      threads_.emplace_back(AppLoad, std::cref(server), std::cref(keys), seed + i, std::ref(flags_),
                            std::ref(tallies_[i]));
    }
    threads_.emplace_back(OfficerLoad, std::cref(server), round, std::ref(flags_),
                          std::ref(tallies_[kAppThreads]));
    threads_.emplace_back(AuditorLoad, std::cref(server), std::ref(flags_),
                          std::ref(tallies_[kAppThreads + 1]));
  }
  ~Load() { Join(); }

  Flags& flags() { return flags_; }
  void Join() {
    flags_.stop = true;
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  // Only after Join().
  const std::vector<ClientTally>& tallies() const { return tallies_; }

 private:
  Flags flags_;
  std::vector<ClientTally> tallies_;
  std::vector<std::thread> threads_;
};

using server::FromProto;

// The latest checkpoint (signed on request), then every record from seq 1 and every stored
// checkpoint, as the auditor.
void ReadLog(const CustosServer& server, pb::Checkpoint* latest,
             std::vector<audit::Record>* records, std::vector<audit::Checkpoint>* stored) {
  auto stub = pb::AuditService::NewStub(server.Channel("auditor"));
  grpc::Status status = stub->GetCheckpoint(Context().get(), {}, latest);
  INFO(status.error_message());
  REQUIRE(status.ok());
  REQUIRE(latest->message() == audit::CheckpointMessage(FromProto(*latest)));

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

  grpc::ClientContext checkpoints_context;
  checkpoints_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto checkpoints = stub->ReadCheckpoints(&checkpoints_context, {});
  stored->clear();
  pb::Checkpoint checkpoint;
  while (checkpoints->Read(&checkpoint)) stored->push_back(FromProto(checkpoint));
  status = checkpoints->Finish();
  INFO(status.error_message());
  REQUIRE(status.ok());
}

std::string Describe(const audit::VerifyReport& report) {
  return report.Summary() + " (first bad seq " + std::to_string(report.first_bad_seq) + ")";
}

TEST_CASE("kill -9 under load: the log verifies and holds every acknowledged operation",
          "[e2e][audit][crash]") {
  CustosServer server(kConfig);
  std::vector<std::string> keys;
  for (int i = 0; i < kKeys; ++i) {
    keys.push_back(CreateKey(server, "crash/key-" + std::to_string(i), true, false).key_id());
  }

  const uint32_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937 rng(seed);

  Tally acknowledged, attempted;            // app calls, all rounds
  std::vector<std::string> created = keys;  // acknowledged CreateKey, all rounds
  uint64_t create_attempts = kKeys;
  std::vector<pb::Checkpoint> kept;     // every checkpoint an auditor received
  std::vector<audit::Record> previous;  // the log as read after the previous crash
  std::string public_key_pem;           // pinned at the first read

  for (int round = 0; round < kRounds; ++round) {
    INFO("round " << round);
    // --- load, then SIGKILL at a random moment once it is under way ---
    const int delay_ms = static_cast<int>(rng() % 700);
    INFO("killed " << delay_ms << " ms after the first acknowledged call");
    std::map<std::string, uint64_t> failures_before_kill;
    uint64_t failures_after_kill = 0, acknowledged_this_round = 0;
    {
      Load load(server, keys, round, rng());
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (load.flags().acknowledged == 0 && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      const bool under_load = load.flags().acknowledged > 0;
      if (under_load) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      load.flags().killed = true;
      server.Signal(SIGKILL);  // CrashAndRestart below reaps it (a second SIGKILL is a no-op)
      load.Join();             // before the restart: calls after the kill must all fail
      INFO(server.Log());
      REQUIRE(under_load);

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
      }
    }
    server.CrashAndRestart();

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
            << failures_after_kill << " calls failed after the kill";
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
    for (const auto& [k, n] : logged) logged_total += n;
    for (const auto& [k, n] : acknowledged) acknowledged_total += n;
    for (const audit::Record& r : records) {
      starts += r.action == "ServerStart";
      stops += r.action == "ServerStop";
    }
    INFO("app calls: " << acknowledged_total << " acknowledged, " << logged_total
                       << " OK records; ServerStart " << starts << ", ServerStop " << stops);
    CHECK(starts == static_cast<uint64_t>(round) + 2);  // the first start and every restart
    CHECK(stops == 0);                                  // SIGKILL leaves no time to record one
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

    previous = std::move(records);
    kept.push_back(latest);  // the next round's crash must not rewrite it either
  }
}

}  // namespace
}  // namespace custos::testing
