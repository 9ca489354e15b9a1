// custos_bench: is audited GenerateDataKey throughput bounded by the disk's per-commit rate?
//
// Every GenerateDataKey reply waits until its audit record is durable (SQLite WAL,
// synchronous=FULL). Without group commit each call would cost one fsync, so throughput could
// not exceed the rate of single-row commits the disk sustains. One run measures, in order:
//   1. disk commits: single-row SQLite transactions (WAL, synchronous=FULL), one writer, in the
//      folder of the server's database;
//   2. raw PKCS#11: the HSM work of one GenerateDataKey (HMAC of the context, 32 random bytes,
//      AES-256-GCM encryption with an HSM-made IV) through the hsm library on a separate
//      SoftHSM2 token, at 1 and at N threads;
//   3. an empty RPC: grpc.health.v1.Health/Check over the same mTLS channels, N callers;
//   4. audited GenerateDataKey as the demo app, at N callers and at 1;
//   5. disk commits again: a disk's flush cost can drift (a VM's host cache), so the ratios use
//      the faster of the two measurements, the harder one to beat;
// then prints each against the baselines. See docs/PERFORMANCE.md.
#include <sqlite3.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/custosd_process.h"
#include "bench/load.h"
#include "core/ciphertext_blob.h"
#include "core/encryption_context.h"
#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "custos/v1/key_service.grpc.pb.h"
#include "health.grpc.pb.h"
#include "hsm/pkcs11_hsm.h"
#include "tests/support/softhsm_token.h"

namespace custos::bench {
namespace {

namespace pb = custos::v1;
using grpc::health::v1::Health;

constexpr int kCallersPerChannel = 8;  // 64 callers share 8 TLS connections
constexpr char kAppPrincipal[] = "spiffe://custos.local/app/demo";
const core::EncryptionContext kContext = {{"table", "patients"}};

std::unique_ptr<grpc::ClientContext> Context() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return context;
}

std::string Describe(const grpc::Status& status) {
  return std::to_string(status.error_code()) + ": " + status.error_message();
}

void Check(const grpc::Status& status, const std::string& what) {
  if (!status.ok()) throw std::runtime_error(what + " failed: " + Describe(status));
}

// --- 1. disk commits ------------------------------------------------------------------------

// What the audit log would cost with one fsync per record: sequential single-row commits.
class DiskCommits {
 public:
  explicit DiskCommits(std::string path) : path_(std::move(path)) {
    Exec(sqlite3_open(path_.c_str(), &db_), "open");
    Exec(sqlite3_exec(db_,
                      "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                      "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);",
                      nullptr, nullptr, nullptr),
         "setup");
    Exec(sqlite3_prepare_v2(db_, "INSERT INTO t (v) VALUES (?)", -1, &insert_, nullptr), "prepare");
  }
  ~DiskCommits() {
    sqlite3_finalize(insert_);
    sqlite3_close(db_);
    for (const char* suffix : {"", "-wal", "-shm"}) std::remove((path_ + suffix).c_str());
  }

  // One autocommit INSERT: its own transaction, so one WAL fsync.
  std::string CommitOne() {
    static const std::string kRow(300, 'r');  // about the size of one audit record
    sqlite3_bind_blob(insert_, 1, kRow.data(), static_cast<int>(kRow.size()), SQLITE_STATIC);
    const int rc = sqlite3_step(insert_);
    sqlite3_reset(insert_);
    return rc == SQLITE_DONE ? "" : sqlite3_errmsg(db_);
  }

 private:
  void Exec(int rc, const char* what) {
    if (rc != SQLITE_OK) {
      throw std::runtime_error(std::string("sqlite ") + what + ": " + sqlite3_errmsg(db_));
    }
  }

  std::string path_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
};

// --- 2. raw PKCS#11 -------------------------------------------------------------------------

// The HSM calls one GenerateDataKey makes (core/kms.cc), on a token of its own.
class RawHsm {
 public:
  explicit RawHsm(size_t sessions) : token_("custos-bench") {
    hsm::Pkcs11Options options;
    options.module_path = testing::kSoftHsmModule;
    options.token_label = token_.label();
    options.pin = SecureBytes::FromString(token_.pin());
    options.session_pool_size = sessions;
    options.key_cache_capacity = 16;
    hsm_ = Value(hsm::OpenPkcs11Hsm(std::move(options)), "open the token");
    Ok(hsm_->CreateRootKey("bench-root"), "CreateRootKey");
    Ok(hsm_->CreateHmacKey("bench-hmac"), "CreateHmacKey");
    wrapped_ = Value(hsm_->GenerateWrappedKey("bench-root"), "GenerateWrappedKey");
    core::AppendCanonicalContext(kContext, canonical_context_);
    aad_ = core::BlobAad(core::BlobHeader{.key_id = {}, .key_version = 1}, kContext);
  }

  std::string DataKey() {
    absl::StatusOr<Bytes> hmac = hsm_->HmacSha256("bench-hmac", canonical_context_);
    if (!hmac.ok()) return hmac.status().ToString();
    absl::StatusOr<SecureBytes> key = hsm_->GenerateRandom(32);
    if (!key.ok()) return key.status().ToString();
    absl::StatusOr<hsm::GcmCiphertext> sealed =
        hsm_->Encrypt({"bench/1", wrapped_, "bench-root"}, key->span(), aad_);
    return sealed.ok() ? "" : sealed.status().ToString();
  }

 private:
  template <typename T>
  static T Value(absl::StatusOr<T> value, const char* what) {
    Ok(value.status(), what);
    return *std::move(value);
  }
  static void Ok(const absl::Status& status, const char* what) {
    if (!status.ok()) throw std::runtime_error(std::string(what) + ": " + status.ToString());
  }

  testing::SoftHsmToken token_;  // sets this process's SOFTHSM2_CONF to its own folder
  std::unique_ptr<hsm::Hsm> hsm_;
  Bytes wrapped_;
  Bytes canonical_context_;
  Bytes aad_;
};

// --- 3 and 4: RPCs through custosd ----------------------------------------------------------

// The app's callers: caller i uses channel i / kCallersPerChannel, each channel its own mTLS
// connection, the same for the empty RPC and GenerateDataKey.
class AppClients {
 public:
  AppClients(const CustosdProcess& server, int callers) {
    const int channels = (callers + kCallersPerChannel - 1) / kCallersPerChannel;
    for (int c = 0; c < channels; ++c) {
      std::shared_ptr<grpc::Channel> channel = server.Channel("app");
      if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
        throw std::runtime_error("cannot connect to custosd as app");
      }
      channels_.push_back(std::move(channel));
    }
    for (int i = 0; i < callers; ++i) {
      keys_.push_back(pb::KeyService::NewStub(channels_[i / kCallersPerChannel]));
      health_.push_back(Health::NewStub(channels_[i / kCallersPerChannel]));
    }
  }

  std::string HealthCheck(int caller) {
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = health_[caller]->Check(Context().get(), request, &response);
    if (!status.ok()) return Describe(status);
    return response.status() == response.SERVING ? "" : "health: not SERVING";
  }

  std::string GenerateDataKey(int caller, const std::string& key_id) {
    pb::GenerateDataKeyRequest request;
    request.set_key(key_id);
    request.mutable_encryption_context()->insert(kContext.begin(), kContext.end());
    request.set_key_spec(pb::AES_256);
    pb::GenerateDataKeyResponse response;
    const grpc::Status status = keys_[caller]->GenerateDataKey(Context().get(), request, &response);
    if (!status.ok()) return Describe(status);
    ++acknowledged_;
    return response.plaintext().size() == 32 ? "" : "GenerateDataKey: wrong plaintext size";
  }

  // GenerateDataKey calls answered OK so far, warm-up included.
  long acknowledged() const { return acknowledged_; }

 private:
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<pb::KeyService::Stub>> keys_;
  std::vector<std::unique_ptr<Health::Stub>> health_;
  std::atomic<long> acknowledged_ = 0;
};

// A key that the demo app may encrypt with: a grant, so proposed by officer1 and approved by
// officer2 (the demo state's quorum of one).
std::string CreateBenchKey(const CustosdProcess& server) {
  pb::ProposeRequest proposal;
  proposal.set_operation(pb::CREATE_KEY);
  proposal.set_justification("custos_bench");
  pb::CreateKeyRequest* key = proposal.mutable_create_key();
  key->set_alias("bench-" + std::to_string(std::time(nullptr)) + "-" + std::to_string(getpid()));
  key->set_description("custos_bench");
  key->add_encrypt_principals(kAppPrincipal);
  pb::ChangeRequest proposed;
  Check(pb::AdminService::NewStub(server.Channel("officer1"))
            ->Propose(Context().get(), proposal, &proposed),
        "Propose(CreateKey)");
  pb::ApproveRequest approval;
  approval.set_request_id(proposed.request_id());
  approval.set_digest(proposed.digest());
  pb::ChangeRequest executed;
  Check(pb::AdminService::NewStub(server.Channel("officer2"))
            ->Approve(Context().get(), approval, &executed),
        "Approve(CreateKey)");
  return executed.key_id();
}

// The audit log's head: the seq of its latest record (GetCheckpoint signs one if needed).
uint64_t AuditHead(pb::AuditService::Stub& audit) {
  pb::Checkpoint checkpoint;
  Check(audit.GetCheckpoint(Context().get(), pb::GetCheckpointRequest(), &checkpoint),
        "GetCheckpoint");
  return checkpoint.seq();
}

// Successful GenerateDataKey records after seq `after`.
long CountDataKeyRecords(pb::AuditService::Stub& audit, uint64_t after) {
  pb::ReadRecordsRequest request;
  request.set_from_seq(after + 1);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  std::unique_ptr<grpc::ClientReader<pb::AuditRecord>> reader =
      audit.ReadRecords(&context, request);
  long count = 0;
  pb::AuditRecord record;
  while (reader->Read(&record)) {
    if (record.action() == "GenerateDataKey" && record.outcome() == "OK") ++count;
  }
  Check(reader->Finish(), "ReadRecords");
  return count;
}

// --- report ---------------------------------------------------------------------------------

struct Phase {
  std::string name;
  LoadResult result;
};

void PrintTable(const std::vector<Phase>& phases) {
  std::printf("\n%-36s %7s %11s %10s %10s %7s\n", "phase", "callers", "ops/s", "p50 us", "p99 us",
              "errors");
  for (const Phase& p : phases) {
    std::printf("%-36s %7d %11.1f %10.1f %10.1f %7ld\n", p.name.c_str(), p.result.threads,
                p.result.ops_per_second, p.result.p50_us, p.result.p99_us, p.result.errors);
    if (p.result.errors > 0) std::printf("  first error: %s\n", p.result.first_error.c_str());
  }
  std::printf("\n");
}

// "ratio <name> = <value>" lines, also kept for --json.
class Ratios {
 public:
  void Add(const std::string& name, double numerator, double denominator) {
    const double value = denominator > 0 ? numerator / denominator : 0;
    std::printf("ratio %-52s = %8.3f\n", name.c_str(), value);
    json_[name] = value;
  }
  const nlohmann::json& json() const { return json_; }

 private:
  nlohmann::json json_ = nlohmann::json::object();
};

nlohmann::json ToJson(const Phase& p) {
  return {{"phase", p.name},           {"callers", p.result.threads},
          {"ops", p.result.ops},       {"seconds", p.result.seconds},
          {"errors", p.result.errors}, {"ops_per_second", p.result.ops_per_second},
          {"p50_us", p.result.p50_us}, {"p99_us", p.result.p99_us}};
}

struct Options {
  int callers = 64;
  double seconds = 10;
  double warmup = 2;
  std::string state_dir;
  std::string json;
};

int Run(const Options& options) {
  const int n = options.callers;
  const std::string at_n = "@" + std::to_string(n);
  const LoadOptions one{.threads = 1, .warmup_seconds = options.warmup, .seconds = options.seconds};
  const LoadOptions many{
      .threads = n, .warmup_seconds = options.warmup, .seconds = options.seconds};
  // custosd caps gRPC at worker_threads + 2 threads, pollers included, and refuses calls
  // beyond that ("Server Threadpool Exhausted"): N callers need N workers plus room for the
  // pollers (up to 2 per completion queue), and never fewer than the default 16.
  const int workers = std::max(16, n + 8);

  CustosdProcess server(options.state_dir, workers);
  std::printf("custosd pid %d, state %s, %d worker threads; %d callers over %d channel(s)\n",
              server.pid(), server.state_dir().c_str(), workers, n,
              (n + kCallersPerChannel - 1) / kCallersPerChannel);
  std::fflush(stdout);
  std::vector<Phase> phases;
  auto run = [&](const std::string& name, const LoadOptions& load, const Operation& op) {
    phases.push_back({name, RunLoad(load, op)});
    std::printf("  done: %s (%d)\n", name.c_str(), load.threads);
    std::fflush(stdout);
    return phases.back().result;
  };

  DiskCommits commits(server.state_dir() + "/bench-commits.db");
  const LoadResult disk_before =
      run("disk commit (WAL, FULL), first", one, [&](int) { return commits.CommitOne(); });
  LoadResult raw_1, raw_n;
  {
    RawHsm raw(static_cast<size_t>(workers));
    raw_1 = run("raw PKCS#11 (HMAC+RNG+GCM)", one, [&](int) { return raw.DataKey(); });
    raw_n = run("raw PKCS#11 (HMAC+RNG+GCM)", many, [&](int) { return raw.DataKey(); });
  }
  AppClients app(server, n);
  const LoadResult empty =
      run("empty RPC (health Check, mTLS)", many, [&](int c) { return app.HealthCheck(c); });

  const std::string key_id = CreateBenchKey(server);
  std::unique_ptr<pb::AuditService::Stub> audit =
      pb::AuditService::NewStub(server.Channel("auditor"));
  const uint64_t head_before = AuditHead(*audit);
  const CustosdProcess::CommitCounts commits_before = server.CommitStats();
  const LoadResult gdk_n =
      run("GenerateDataKey (audited)", many, [&](int c) { return app.GenerateDataKey(c, key_id); });
  const CustosdProcess::CommitCounts commits_after = server.CommitStats();
  // Over the whole phase (warm-up included): how many requests' records each fsync carried.
  const double batches = static_cast<double>(commits_after.batches - commits_before.batches);
  const double transactions =
      static_cast<double>(commits_after.transactions - commits_before.transactions);
  const LoadResult gdk_1 =
      run("GenerateDataKey (audited)", one, [&](int c) { return app.GenerateDataKey(c, key_id); });
  const long audited = CountDataKeyRecords(*audit, head_before);
  const LoadResult disk_after =
      run("disk commit (WAL, FULL), last", one, [&](int) { return commits.CommitOne(); });
  const LoadResult& disk =
      disk_before.ops_per_second >= disk_after.ops_per_second ? disk_before : disk_after;

  PrintTable(phases);
  Ratios ratios;
  // The key number: above 1, requests outrun one fsync each (group commit at work).
  ratios.Add("GenerateDataKey" + at_n + " / disk commit ops/s", gdk_n.ops_per_second,
             disk.ops_per_second);
  ratios.Add("GenerateDataKey@1 / disk commit ops/s", gdk_1.ops_per_second, disk.ops_per_second);
  // Group commit measured directly: above 1, durability costs less than one fsync a request.
  ratios.Add("GenerateDataKey" + at_n + " batches per commit (fsync)", batches, transactions);
  ratios.Add("GenerateDataKey" + at_n + " commits/s / disk commit ops/s",
             transactions / (options.seconds + options.warmup), disk.ops_per_second);
  ratios.Add("GenerateDataKey" + at_n + " / empty RPC" + at_n + " ops/s", gdk_n.ops_per_second,
             empty.ops_per_second);
  ratios.Add("GenerateDataKey" + at_n + " / empty RPC" + at_n + " p50", gdk_n.p50_us, empty.p50_us);
  ratios.Add("GenerateDataKey" + at_n + " / empty RPC" + at_n + " p99", gdk_n.p99_us, empty.p99_us);
  ratios.Add("GenerateDataKey" + at_n + " / raw PKCS#11" + at_n + " ops/s", gdk_n.ops_per_second,
             raw_n.ops_per_second);
  ratios.Add("GenerateDataKey" + at_n + " / raw PKCS#11" + at_n + " p50", gdk_n.p50_us,
             raw_n.p50_us);
  ratios.Add("GenerateDataKey" + at_n + " / raw PKCS#11" + at_n + " p99", gdk_n.p99_us,
             raw_n.p99_us);
  ratios.Add("GenerateDataKey@1 / raw PKCS#11@1 ops/s", gdk_1.ops_per_second, raw_1.ops_per_second);
  ratios.Add("GenerateDataKey@1 / raw PKCS#11@1 p50", gdk_1.p50_us, raw_1.p50_us);
  ratios.Add("GenerateDataKey@1 / disk commit p50", gdk_1.p50_us, disk.p50_us);
  // More records than replies is possible (a reply lost after the commit); fewer is not.
  const bool all_audited = audited >= app.acknowledged();
  std::printf("\naudit: %ld GenerateDataKey calls acknowledged, %ld OK records after seq %llu%s\n",
              app.acknowledged(), audited, static_cast<unsigned long long>(head_before),
              all_audited ? " (every acknowledged call audited)" : " (MISSING RECORDS)");

  if (!options.json.empty()) {
    nlohmann::json out;
    out["command"] = {{"callers", n},
                      {"seconds", options.seconds},
                      {"warmup", options.warmup},
                      {"callers_per_channel", kCallersPerChannel},
                      {"worker_threads", workers}};
    out["online_cpus"] = sysconf(_SC_NPROCESSORS_ONLN);
    for (const Phase& p : phases) out["phases"].push_back(ToJson(p));
    out["ratios"] = ratios.json();
    out["audit"] = {{"acknowledged", app.acknowledged()}, {"records", audited}};
    out["group_commit"] = {{"batches", batches}, {"transactions", transactions}};
    std::ofstream(options.json) << out.dump(2) << "\n";
  }
  // Failed calls are reported (table, JSON, here) but do not void the run: custosd may refuse
  // a rare call under load ("Server Threadpool Exhausted"). A phase with no success does.
  long errors = 0;
  bool every_phase_ran = true;
  for (const Phase& p : phases) {
    errors += p.result.errors;
    every_phase_ran = every_phase_ran && p.result.ops > 0;
  }
  if (errors > 0) std::fprintf(stderr, "custos_bench: warning: %ld calls failed\n", errors);
  return every_phase_ran && all_audited ? 0 : 1;
}

}  // namespace
}  // namespace custos::bench

int main(int argc, char** argv) {
  custos::bench::Options options;
  CLI::App app{"custos_bench: audited GenerateDataKey throughput against same-run baselines"};
  app.add_option("--callers", options.callers, "concurrent callers (threads)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--seconds", options.seconds, "recorded seconds per phase")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--warmup", options.warmup, "unrecorded seconds before each phase")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--state-dir", options.state_dir,
                 "custosd state folder (made if missing, kept); default a temporary one. The "
                 "disk baseline runs in this folder");
  app.add_option("--json", options.json, "also write the results here as JSON");
  CLI11_PARSE(app, argc, argv);
  try {
    return custos::bench::Run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custos_bench: %s\n", e.what());
    return 2;
  }
}
