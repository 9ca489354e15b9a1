// custos_bench: KeyService throughput, latency and server CPU, against baselines measured in
// the same run.
//
// Load is driven with gRPC's callback client API: N calls in flight over M channels (each its
// own mTLS connection), not a thread per caller, so the client does not eat the server's cores.
// One run measures, in order:
//   1. disk commits: single-row SQLite transactions (WAL, synchronous=FULL), one writer, in the
//      folder of the server's database;
//   2. raw PKCS#11: the HSM work of one GenerateDataKey (HMAC of the context, 32 random bytes,
//      AES-256-GCM encryption with an HSM-made IV) on a separate SoftHSM2 token, at 1 thread
//      and at as many threads as custosd has HSM sessions;
//   3. the transport's ceiling: an empty RPC on custos_echo_server (a minimal callback-API
//      service with custosd's TLS settings and certificates, in its own process), at each
//      in-flight level;
//   4. against custosd, as the demo app: GenerateDataKey, GenerateDataKeyWithoutPlaintext,
//      Decrypt, Encrypt of 1 KiB, ReEncrypt and a mix, each with a repeated and a distinct
//      encryption context (bench/key_workloads.h), at each in-flight level;
//   5. disk commits again: a disk's flush cost can drift (a VM's host cache), so the ratios use
//      the faster of the two measurements, the harder one to beat.
// Each phase reports calls/s, p50/p99/p99.9, errors by status code and the server's CPU time
// per successful call; KeyService phases also their ratio to the echo at the same in-flight
// level. See docs/PERFORMANCE.md.
#include <sqlite3.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/custosd_process.h"
#include "bench/key_workloads.h"
#include "bench/load.h"
#include "bench/server_process.h"
#include "core/ciphertext_blob.h"
#include "core/encryption_context.h"
#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/audit_service.grpc.pb.h"
#include "custos/v1/key_service.pb.h"
#include "hsm/pkcs11_hsm.h"
#include "tests/support/softhsm_token.h"

namespace custos::bench {
namespace {

namespace pb = custos::v1;

constexpr char kAppPrincipal[] = "spiffe://custos.local/app/demo";
constexpr int kCustosdDefaultWorkerThreads = 16;  // server/config.h, when the config sets none
constexpr int kBlobMakingInflight = 8;            // below custosd's default thread cap
const std::string kEchoPing = "/custos.bench.Echo/Ping";
const std::string kCreateKey = "/custos.v1.AdminService/CreateKey";
const std::string kBatchGenerateDataKey = "/custos.v1.KeyService/BatchGenerateDataKey";
const std::string kBatchDecrypt = "/custos.v1.KeyService/BatchDecrypt";
const std::string kBatchReEncrypt = "/custos.v1.KeyService/BatchReEncrypt";
constexpr int kCreateKeyInflight = 16;
constexpr int kBatchItems = 1000;
constexpr int kBatchInflight = 4;
const core::EncryptionContext kContext = {{"table", "patients"}};

std::unique_ptr<grpc::ClientContext> Context() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return context;
}

void Check(const grpc::Status& status, const std::string& what) {
  if (!status.ok()) {
    throw std::runtime_error(what + " failed: " + StatusCodeName(status.error_code()) + ": " +
                             status.error_message());
  }
}

// A batch reply's check: kBatchItems results, every one OK.
template <typename Response>
std::string CheckBatch(grpc::ByteBuffer& reply) {
  Response response;
  if (!grpc::SerializationTraits<Response>::Deserialize(&reply, &response).ok()) {
    return "unreadable batch reply";
  }
  if (response.results_size() != kBatchItems) return "batch reply of the wrong size";
  for (const auto& result : response.results()) {
    if (result.status().code() != 0) return "batch item failed: " + result.status().message();
  }
  return "";
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
  DiskCommits(const DiskCommits&) = delete;
  DiskCommits& operator=(const DiskCommits&) = delete;

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
    data_key_ = Value(hsm_->GenerateRandom(32), "GenerateRandom");
    sealed_ = Value(hsm_->Encrypt(Version(), data_key_.span(), aad_), "Encrypt");
  }

  std::string DataKey() {
    absl::StatusOr<Bytes> hmac = hsm_->HmacSha256("bench-hmac", canonical_context_);
    if (!hmac.ok()) return hmac.status().ToString();
    absl::StatusOr<hsm::SealedDataKey> key = hsm_->GenerateDataKey(Version(), 32, aad_);
    return key.ok() ? "" : key.status().ToString();
  }

  // A batch item's HSM work, its context's HMAC being cached: GenerateDataKey's RNG draw and
  // GCM encryption (one call); Decrypt's GCM decryption of a data key; ReEncrypt's decryption and
  // encryption (to the same version, as custos_bench's ReEncrypt calls do).
  std::string DataKeyNoHmac() {
    absl::StatusOr<hsm::SealedDataKey> key = hsm_->GenerateDataKey(Version(), 32, aad_);
    return key.ok() ? "" : key.status().ToString();
  }
  std::string Decrypt() {
    absl::StatusOr<SecureBytes> key =
        hsm_->Decrypt(Version(), sealed_.iv, sealed_.ciphertext_and_tag, aad_);
    return key.ok() ? "" : key.status().ToString();
  }
  std::string ReEncrypt() {
    absl::StatusOr<SecureBytes> key =
        hsm_->Decrypt(Version(), sealed_.iv, sealed_.ciphertext_and_tag, aad_);
    if (!key.ok()) return key.status().ToString();
    absl::StatusOr<hsm::GcmCiphertext> sealed = hsm_->Encrypt(Version(), key->span(), aad_);
    return sealed.ok() ? "" : sealed.status().ToString();
  }

  // What a cold key adds to a GenerateDataKey's HSM work, the row MAC check aside: GCM
  // encryption of a data key under a version the cache holds (hot), or under one that must be
  // unwrapped first (cold: every call names a version never seen, so the cache, of 16, misses
  // and evicts one, whose object is destroyed, as custosd's does once full). And one HMAC.
  std::string EncryptHot() {
    absl::StatusOr<hsm::GcmCiphertext> sealed = hsm_->Encrypt(Version(), data_key_.span(), aad_);
    return sealed.ok() ? "" : sealed.status().ToString();
  }
  std::string EncryptCold() {
    const std::string id = "cold/" + std::to_string(cold_.fetch_add(1));
    absl::StatusOr<hsm::GcmCiphertext> sealed =
        hsm_->Encrypt({id, wrapped_, "bench-root"}, data_key_.span(), aad_);
    return sealed.ok() ? "" : sealed.status().ToString();
  }
  std::string Hmac() {
    absl::StatusOr<Bytes> hmac = hsm_->HmacSha256("bench-hmac", canonical_context_);
    return hmac.ok() ? "" : hmac.status().ToString();
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

  hsm::WrappedKey Version() const { return {"bench/1", wrapped_, "bench-root"}; }

  testing::SoftHsmToken token_;  // sets this process's SOFTHSM2_CONF to its own folder
  std::unique_ptr<hsm::Hsm> hsm_;
  Bytes wrapped_;
  WipedBytes canonical_context_;
  WipedBytes aad_;
  SecureBytes data_key_;
  hsm::GcmCiphertext sealed_;  // data_key_ under the version, for Decrypt and ReEncrypt
  std::atomic<uint64_t> cold_{0};
};

// --- 3 and 4: RPCs --------------------------------------------------------------------------

// `count` channels to a server, each its own mTLS connection, connected before any load.
class Channels {
 public:
  Channels(const std::string& state_dir, const std::string& client, int port, int count) {
    for (int c = 0; c < count; ++c) {
      std::shared_ptr<grpc::Channel> channel = MutualTlsChannel(state_dir, client, port);
      if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
        throw std::runtime_error("cannot connect to port " + std::to_string(port) + " as " +
                                 client);
      }
      stubs_.push_back(std::make_unique<grpc::GenericStub>(channel));
      channels_.push_back(std::move(channel));
    }
  }

  // The stubs of the first min(count, inflight) channels: no channel without a call.
  std::vector<grpc::GenericStub*> For(int inflight) const {
    std::vector<grpc::GenericStub*> stubs;
    for (size_t i = 0; i < stubs_.size() && i < static_cast<size_t>(inflight); ++i) {
      stubs.push_back(stubs_[i].get());
    }
    return stubs;
  }

 private:
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
};

// A key that the demo app may use for everything: encrypt and decrypt grants, so proposed by
// officer1 and approved by officer2 (the demo state's quorum of one).
std::string CreateBenchKey(const CustosdProcess& server, const std::string& alias) {
  pb::ProposeRequest proposal;
  proposal.set_operation(pb::CREATE_KEY);
  proposal.set_justification("custos_bench");
  pb::CreateKeyRequest* key = proposal.mutable_create_key();
  key->set_alias(alias);
  key->set_description("custos_bench");
  key->add_encrypt_principals(kAppPrincipal);
  key->add_decrypt_principals(kAppPrincipal);
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
  if (executed.key_id().empty()) throw std::runtime_error("CreateKey: no key id after approval");
  return executed.key_id();
}

// The seq of the audit log's latest record: the last signed checkpoint's, then the records
// after it (GetCheckpoint answers with the last one the server signed, not a new one).
uint64_t AuditHead(pb::AuditService::Stub& audit) {
  pb::Checkpoint checkpoint;
  Check(audit.GetCheckpoint(Context().get(), pb::GetCheckpointRequest(), &checkpoint),
        "GetCheckpoint");
  pb::ReadRecordsRequest request;
  request.set_from_seq(checkpoint.seq() + 1);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  std::unique_ptr<grpc::ClientReader<pb::AuditRecord>> reader =
      audit.ReadRecords(&context, request);
  uint64_t head = checkpoint.seq();
  pb::AuditRecord record;
  while (reader->Read(&record)) head = record.seq();
  Check(reader->Finish(), "ReadRecords");
  return head;
}

// Successful records of `action` after seq `after`.
long CountRecords(pb::AuditService::Stub& audit, uint64_t after, const std::string& action) {
  pb::ReadRecordsRequest request;
  request.set_from_seq(after + 1);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(300));
  std::unique_ptr<grpc::ClientReader<pb::AuditRecord>> reader =
      audit.ReadRecords(&context, request);
  long count = 0;
  pb::AuditRecord record;
  while (reader->Read(&record)) {
    if (record.action() == action && record.outcome() == "OK") ++count;
  }
  Check(reader->Finish(), "ReadRecords");
  return count;
}

// --- report ---------------------------------------------------------------------------------

struct Phase {
  std::string name{};
  std::string mix{};     // repeated | distinct; empty where there is no context
  std::string server{};  // custosd | echo | in-process
  LoadResult result{};
  double echo_calls_ratio = -1;   // calls/s ÷ the echo's at the same in-flight level
  double echo_p99_ratio = -1;     // p99 ÷ the echo's
  double records_per_fsync = -1;  // custosd's group commit over the phase, warm-up included
  double server_rss_mib = -1;     // the server's resident memory at the phase's end
};

std::string Number(double value, const char* format) {
  if (value < 0) return "-";
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

void PrintTable(const std::vector<Phase>& phases) {
  std::printf("\n%-31s %-8s %8s %10s %8s %8s %9s %8s %8s %7s %7s %6s %7s %8s\n", "phase", "mix",
              "inflight", "calls/s", "p50 us", "p99 us", "p99.9 us", "srv CPU", "cli CPU", "/echo",
              "p99/", "recs/", "srv RSS", "errors");
  std::printf("%-31s %-8s %8s %10s %8s %8s %9s %8s %8s %7s %7s %6s %7s %8s\n", "", "", "", "", "",
              "", "", "us/call", "us/call", "calls/s", "echo", "fsync", "MiB", "");
  for (const Phase& p : phases) {
    const LoadResult& r = p.result;
    std::printf("%-31s %-8s %8d %10.1f %8.0f %8.0f %9.0f %8s %8s %7s %7s %6s %7s %8ld\n",
                p.name.c_str(), p.mix.empty() ? "-" : p.mix.c_str(), r.inflight, r.calls_per_second,
                r.p50_us, r.p99_us, r.p999_us, Number(r.server_cpu_us_per_call, "%.1f").c_str(),
                Number(r.client_cpu_us_per_call, "%.1f").c_str(),
                Number(p.echo_calls_ratio, "%.3f").c_str(),
                Number(p.echo_p99_ratio, "%.2f").c_str(),
                Number(p.records_per_fsync, "%.1f").c_str(),
                Number(p.server_rss_mib, "%.0f").c_str(), r.errors);
    for (const auto& [code, e] : r.errors_by_code) {
      std::printf("    %ld %s, first: %s\n", e.count, code.c_str(), e.first_message.c_str());
    }
  }
  std::printf(
      "\nsrv CPU: the server process's CPU time (custosd, or custos_echo_server for echo) over "
      "the recorded window per successful call; in-process phases have no server. cli CPU: "
      "this process's. /echo: calls/s and p99 against the echo at the same in-flight level. "
      "recs/fsync: audit records per custosd transaction over the phase. srv RSS: the server's "
      "resident memory at the phase's end.\n\n");
}

// "ratio <name> = <value>" lines, also kept for --json.
class Ratios {
 public:
  // Nothing if the denominator was not measured (--no-baselines).
  void Add(const std::string& name, double numerator, double denominator) {
    if (denominator <= 0) return;
    const double value = numerator / denominator;
    std::printf("ratio %-56s = %8.3f\n", name.c_str(), value);
    json_[name] = value;
  }
  const nlohmann::json& json() const { return json_; }

 private:
  nlohmann::json json_ = nlohmann::json::object();
};

nlohmann::json ToJson(const Phase& p) {
  const LoadResult& r = p.result;
  nlohmann::json errors = nlohmann::json::object();
  for (const auto& [code, e] : r.errors_by_code) {
    errors[code] = {{"count", e.count}, {"first_message", e.first_message}};
  }
  const auto optional = [](double v) { return v < 0 ? nlohmann::json() : nlohmann::json(v); };
  return {{"phase", p.name},
          {"mix", p.mix.empty() ? nlohmann::json() : nlohmann::json(p.mix)},
          {"server", p.server},
          {"inflight", r.inflight},
          {"channels", r.channels},
          {"seconds", r.seconds},
          {"ok", r.ok},
          {"ok_total", r.ok_total},
          {"errors", r.errors},
          {"errors_by_code", errors},
          {"calls_per_second", r.calls_per_second},
          {"p50_us", r.p50_us},
          {"p99_us", r.p99_us},
          {"p999_us", r.p999_us},
          {"server_cpu_us_per_call", optional(r.server_cpu_us_per_call)},
          {"client_cpu_us_per_call", optional(r.client_cpu_us_per_call)},
          {"echo_calls_per_second_ratio", optional(p.echo_calls_ratio)},
          {"echo_p99_ratio", optional(p.echo_p99_ratio)},
          {"records_per_fsync", optional(p.records_per_fsync)},
          {"server_rss_mib", optional(p.server_rss_mib)}};
}

struct Options {
  std::vector<int> inflight = {1, 64, 1000};
  int channels = 8;
  int keys = 1;
  size_t blobs = 2000;
  double seconds = 10;
  double warmup = 2;
  double deadline = 30;
  int worker_threads = 0;
  int hsm_threads = 0;
  std::string state_dir;
  std::string json;
  std::string key_ids;             // a file of key ids (custos_seed_keys --out) to use
  std::vector<std::string> ops;    // KeyOpName()s to run; empty = all
  std::vector<std::string> mixes;  // ContextMixName()s to run; empty = both
  bool baselines = true;           // the disk and raw PKCS#11 phases
};

bool Selected(const std::vector<std::string>& chosen, std::string_view name) {
  return chosen.empty() || std::find(chosen.begin(), chosen.end(), name) != chosen.end();
}

int Run(const Options& options) {
  const int max_inflight = *std::max_element(options.inflight.begin(), options.inflight.end());
  const int connections = std::min(options.channels, max_inflight);
  // The raw baseline's threads: as many as custosd has workers, the most HSM calls its
  // callers can have under way (custosd itself runs at most hsm.threads at once).
  const int raw_threads =
      options.worker_threads > 0 ? options.worker_threads : kCustosdDefaultWorkerThreads;
  const auto deadline = std::chrono::milliseconds(static_cast<long>(options.deadline * 1000));
  const std::string run_id = std::to_string(std::time(nullptr)) + "-" + std::to_string(getpid());

  CustosdProcess server(options.state_dir, options.worker_threads, options.hsm_threads);
  const std::string& state = server.state_dir();
  const std::string echo_port_file = state + "/echo-port";
  ServerProcess echo(
      {ECHO_SERVER_PATH, "--cert", state + "/pki/server.crt", "--key", state + "/pki/server.key",
       "--client-ca", state + "/pki/ca.crt", "--port-file", echo_port_file},
      echo_port_file, state + "/echo.log");
  std::printf(
      "custosd pid %d, state %s, worker_threads %s, hsm.threads %s; echo server pid %d; up to "
      "%d channel(s) per server; %d key(s); %zu blobs per context mix; %d online CPU(s)\n",
      server.pid(), state.c_str(),
      options.worker_threads > 0 ? std::to_string(options.worker_threads).c_str()
                                 : "config default",
      options.hsm_threads > 0 ? std::to_string(options.hsm_threads).c_str() : "config default",
      echo.pid(), connections, options.keys, options.blobs,
      static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  std::fflush(stdout);

  std::vector<Phase> phases;
  const auto progress = [&](const Phase& p) {
    std::fprintf(stderr, "  done: %s %s @%d: %.1f calls/s, %ld errors\n", p.name.c_str(),
                 p.mix.c_str(), p.result.inflight, p.result.calls_per_second, p.result.errors);
  };
  const auto local = [&](const std::string& name, int threads, const LocalOperation& op) {
    Phase p{.name = name, .server = "in-process"};
    p.result = RunLocal(
        {.inflight = threads, .warmup_seconds = options.warmup, .seconds = options.seconds}, op);
    progress(p);
    phases.push_back(std::move(p));
    return phases.back().result;
  };
  const auto timed = [&](int inflight, pid_t pid) {
    return LoadOptions{.inflight = inflight,
                       .warmup_seconds = options.warmup,
                       .seconds = options.seconds,
                       .deadline = deadline,
                       .server_pid = pid};
  };

  const auto rss_mib = [](pid_t pid) {
    const long kib = ProcessRssKib(pid);
    return kib < 0 ? -1.0 : static_cast<double>(kib) / 1024;
  };

  // 1 and 2: in this process.
  DiskCommits commits(state + "/bench-commits.db");
  const LoadResult disk_first = options.baselines ? local("disk commit (WAL, FULL), first", 1,
                                                          [&](int) { return commits.CommitOne(); })
                                                  : LoadResult{};
  // The batch phases to run, each with the single call it batches and the raw PKCS#11 work of
  // one of its items (at 1 thread and at as many as batches in flight).
  struct BatchPhase {
    std::string name;
    KeyOp single;
    LoadResult raw_one{};
    LoadResult raw_many{};
    std::string raw_name{};
    LoadResult result{};
  };
  std::vector<BatchPhase> batch_phases;
  // Only when named: it needs a seeded catalogue (--key-ids) with more keys than calls.
  const bool cold_keys =
      std::find(options.ops.begin(), options.ops.end(), "ColdKeys") != options.ops.end();
  LoadResult raw_hot, raw_cold, raw_hmac;
  for (auto [name, single] : {std::pair{"BatchGenerateDataKey", KeyOp::kGenerateDataKey},
                              std::pair{"BatchDecrypt", KeyOp::kDecrypt},
                              std::pair{"BatchReEncrypt", KeyOp::kReEncrypt}}) {
    if (Selected(options.ops, name)) batch_phases.push_back({.name = name, .single = single});
  }
  if (options.baselines) {
    RawHsm raw(static_cast<size_t>(std::max(raw_threads, kBatchInflight)));
    local("raw PKCS#11 (HMAC+RNG+GCM)", 1, [&](int) { return raw.DataKey(); });
    local("raw PKCS#11 (HMAC+RNG+GCM)", raw_threads, [&](int) { return raw.DataKey(); });
    if (cold_keys) {
      raw_hot =
          local("raw PKCS#11 (GCM, version cached)", 1, [&](int) { return raw.EncryptHot(); });
      raw_cold = local("raw PKCS#11 (unwrap + GCM)", 1, [&](int) { return raw.EncryptCold(); });
      raw_hmac = local("raw PKCS#11 (HMAC)", 1, [&](int) { return raw.Hmac(); });
    }
    for (BatchPhase& b : batch_phases) {
      LocalOperation op;
      if (b.single == KeyOp::kGenerateDataKey) {
        b.raw_name = "raw PKCS#11 (RNG+GCM)";
        op = [&](int) { return raw.DataKeyNoHmac(); };
      } else if (b.single == KeyOp::kDecrypt) {
        b.raw_name = "raw PKCS#11 (GCM decrypt)";
        op = [&](int) { return raw.Decrypt(); };
      } else {
        b.raw_name = "raw PKCS#11 (GCM decrypt+encrypt)";
        op = [&](int) { return raw.ReEncrypt(); };
      }
      b.raw_one = local(b.raw_name, 1, op);
      b.raw_many = local(b.raw_name, kBatchInflight, op);
    }
  }

  // 3. The transport's ceiling.
  const Channels echo_channels(state, "app", echo.port(), connections);
  std::map<int, LoadResult> echo_at;
  grpc::Slice nothing;  // an empty PingRequest is zero bytes (but a buffer all the same)
  const grpc::ByteBuffer empty_request(&nothing, 1);
  Workload ping;
  ping.next = [&](uint64_t, Call& call) {
    call.method = &kEchoPing;
    call.request = empty_request;
  };
  for (int inflight : options.inflight) {
    Phase p{.name = "echo (empty RPC, mTLS)", .server = "echo"};
    p.result = RunCalls(echo_channels.For(inflight), timed(inflight, echo.pid()), ping);
    p.server_rss_mib = rss_mib(echo.pid());
    echo_at[inflight] = p.result;
    progress(p);
    phases.push_back(std::move(p));
  }

  // 4. KeyService through custosd.
  std::vector<std::string> key_ids;
  key_ids.reserve(static_cast<size_t>(options.keys));
  if (!options.key_ids.empty()) {
    std::ifstream ids(options.key_ids);
    for (std::string id; std::getline(ids, id);) {
      if (!id.empty()) key_ids.push_back(id);
    }
    if (key_ids.empty()) throw std::runtime_error("no key ids in " + options.key_ids);
    std::printf("%zu keys from %s\n", key_ids.size(), options.key_ids.c_str());
  }
  const int to_create = key_ids.empty() ? options.keys : 0;
  for (int k = 0; k < to_create; ++k) {
    key_ids.push_back(CreateBenchKey(server, "bench-" + run_id + "-" + std::to_string(k)));
  }
  const Channels app(state, "app", server.port(), connections);
  KeyWorkloads workloads(key_ids, run_id);
  workloads.MakeBlobs(app.For(kBlobMakingInflight), options.blobs, kBlobMakingInflight);
  std::unique_ptr<pb::AuditService::Stub> audit =
      pb::AuditService::NewStub(server.Channel("auditor"));

  long acknowledged = 0;  // GenerateDataKey calls answered OK, warm-up and drain included
  long audited = 0;
  uint64_t head_before = 0;
  for (KeyOp op : kAllKeyOps) {
    if (!Selected(options.ops, KeyOpName(op))) continue;
    if (op == KeyOp::kGenerateDataKey) head_before = AuditHead(*audit);
    for (ContextMix mix : kAllContextMixes) {
      if (!Selected(options.mixes, ContextMixName(mix))) continue;
      const Workload workload = workloads.For(op, mix);
      for (int inflight : options.inflight) {
        Phase p{.name = std::string(KeyOpName(op)),
                .mix = std::string(ContextMixName(mix)),
                .server = "custosd"};
        const std::optional<CustosdProcess::CommitCounts> before = server.CommitStats();
        p.result = RunCalls(app.For(inflight), timed(inflight, server.pid()), workload);
        p.server_rss_mib = rss_mib(server.pid());
        const std::optional<CustosdProcess::CommitCounts> after = server.CommitStats();
        if (before && after && after->transactions > before->transactions) {
          p.records_per_fsync = static_cast<double>(after->batches - before->batches) /
                                static_cast<double>(after->transactions - before->transactions);
        }
        const LoadResult& e = echo_at[inflight];
        if (e.calls_per_second > 0)
          p.echo_calls_ratio = p.result.calls_per_second / e.calls_per_second;
        if (e.p99_us > 0 && p.result.ok > 0) p.echo_p99_ratio = p.result.p99_us / e.p99_us;
        if (op == KeyOp::kGenerateDataKey) acknowledged += p.result.ok_total;
        progress(p);
        phases.push_back(std::move(p));
      }
    }
    // Every acknowledged GenerateDataKey must have its audit record; read before other
    // phases add theirs.
    if (op == KeyOp::kGenerateDataKey) {
      audited = CountRecords(*audit, head_before, "GenerateDataKey");
    }
  }

  // A key every cache of custosd misses against the one hot key, GenerateDataKey with the
  // repeated context: what a miss adds (the key's row read and its MAC checked, its version
  // unwrapped, its usage row read and a reservation committed) against the raw unwrap.
  std::vector<std::pair<Phase, Phase>> hot_cold;  // at each in-flight level
  if (cold_keys) {
    for (int inflight : options.inflight) {
      Phase phase[2];
      for (int cold = 0; cold < 2; ++cold) {
        Phase& p = phase[cold];
        p = {.name = cold ? "GenerateDataKey, cold keys" : "GenerateDataKey, hot key",
             .mix = std::string(ContextMixName(ContextMix::kRepeated)),
             .server = "custosd"};
        p.result = RunCalls(app.For(inflight), timed(inflight, server.pid()),
                            cold ? workloads.ColdKeys() : workloads.HotKey());
        p.server_rss_mib = rss_mib(server.pid());
        const LoadResult& e = echo_at[inflight];
        if (e.calls_per_second > 0)
          p.echo_calls_ratio = p.result.calls_per_second / e.calls_per_second;
        progress(p);
        phases.push_back(p);
      }
      hot_cold.emplace_back(phase[0], phase[1]);
    }
    std::printf("  %llu cold calls over %zu keys%s\n",
                static_cast<unsigned long long>(workloads.cold_calls()), key_ids.size(),
                workloads.cold_calls() > key_ids.size() ? ": keys were used again (warm)" : "");
  }

  // Officers creating keys without grants (no approval needed) side by side, and a database
  // asking for many data keys in one call. A batch phase's calls/s counts calls of 1,000
  // items each.
  if (Selected(options.ops, "CreateKey")) {
    const Channels officer(state, "officer1", server.port(), kCreateKeyInflight);
    pb::CreateKeyRequest create;
    create.set_description("custos_bench: a key without grants");
    grpc::Slice created(create.SerializeAsString());
    const grpc::ByteBuffer create_request(&created, 1);
    Workload creations;
    creations.next = [&](uint64_t, Call& call) {
      call.method = &kCreateKey;
      call.request = create_request;
    };
    Phase p{.name = "CreateKey (no grants)", .server = "custosd"};
    p.result = RunCalls(officer.For(kCreateKeyInflight), timed(kCreateKeyInflight, server.pid()),
                        creations);
    p.server_rss_mib = rss_mib(server.pid());
    progress(p);
    phases.push_back(std::move(p));
  }
  // Each item as its single call with the repeated context would be: a data key under the
  // first key; a Decrypt or a ReEncrypt (to the blob's own key) of the blobs made beforehand.
  const std::vector<KeyWorkloads::Blob>& blobs = workloads.Blobs(ContextMix::kRepeated);
  for (BatchPhase& b : batch_phases) {
    std::string request;
    const std::string* method = nullptr;
    Workload batches;
    if (b.single == KeyOp::kGenerateDataKey) {
      pb::BatchGenerateDataKeyRequest batch;
      for (int i = 0; i < kBatchItems; ++i) {
        pb::GenerateDataKeyRequest* item = batch.add_items();
        item->set_key(key_ids.front());
        (*item->mutable_encryption_context())["table"] = "patients";
      }
      request = batch.SerializeAsString();
      method = &kBatchGenerateDataKey;
      batches.check = [](uint64_t, grpc::ByteBuffer& reply) {
        return CheckBatch<pb::BatchGenerateDataKeyResponse>(reply);
      };
    } else if (b.single == KeyOp::kDecrypt) {
      pb::BatchDecryptRequest batch;
      for (size_t i = 0; i < kBatchItems; ++i) {
        const KeyWorkloads::Blob& blob = blobs[i % blobs.size()];
        pb::DecryptRequest* item = batch.add_items();
        item->set_ciphertext_blob(blob.ciphertext);
        item->mutable_encryption_context()->insert(blob.context.begin(), blob.context.end());
      }
      request = batch.SerializeAsString();
      method = &kBatchDecrypt;
      batches.check = [](uint64_t, grpc::ByteBuffer& reply) {
        return CheckBatch<pb::BatchDecryptResponse>(reply);
      };
    } else {
      pb::BatchReEncryptRequest batch;
      for (size_t i = 0; i < kBatchItems; ++i) {
        const KeyWorkloads::Blob& blob = blobs[i % blobs.size()];
        pb::ReEncryptRequest* item = batch.add_items();
        item->set_ciphertext_blob(blob.ciphertext);
        item->mutable_source_encryption_context()->insert(blob.context.begin(), blob.context.end());
        item->mutable_destination_encryption_context()->insert(blob.context.begin(),
                                                               blob.context.end());
      }
      request = batch.SerializeAsString();
      method = &kBatchReEncrypt;
      batches.check = [](uint64_t, grpc::ByteBuffer& reply) {
        return CheckBatch<pb::BatchReEncryptResponse>(reply);
      };
    }
    grpc::Slice slice(request);
    const grpc::ByteBuffer buffer(&slice, 1);
    batches.next = [&](uint64_t, Call& call) {
      call.method = method;
      call.request = buffer;
    };
    Phase p{.name = b.name + " x" + std::to_string(kBatchItems),
            .mix = std::string(ContextMixName(ContextMix::kRepeated)),
            .server = "custosd"};
    p.result = RunCalls(app.For(kBatchInflight), timed(kBatchInflight, server.pid()), batches);
    p.server_rss_mib = rss_mib(server.pid());
    progress(p);
    std::printf("  %s: %.0f items/s in batches of %d, %d batches in flight\n", b.name.c_str(),
                p.result.calls_per_second * kBatchItems, kBatchItems, kBatchInflight);
    b.result = p.result;
    phases.push_back(std::move(p));
  }

  // 5.
  const LoadResult disk_last = options.baselines ? local("disk commit (WAL, FULL), last", 1,
                                                         [&](int) { return commits.CommitOne(); })
                                                 : LoadResult{};
  const LoadResult& disk =
      disk_first.calls_per_second >= disk_last.calls_per_second ? disk_first : disk_last;

  PrintTable(phases);
  Ratios ratios;
  for (const Phase& p : phases) {
    if (p.name != KeyOpName(KeyOp::kGenerateDataKey)) continue;
    const std::string at = "@" + std::to_string(p.result.inflight);
    const std::string what = p.name + at + " " + p.mix;
    const LoadResult& e = echo_at[p.result.inflight];
    ratios.Add(absl::StrCat(what, " / echo", at, " calls/s"), p.result.calls_per_second,
               e.calls_per_second);
    if (p.mix == ContextMixName(ContextMix::kRepeated)) {
      ratios.Add(what + " / disk commit calls/s", p.result.calls_per_second, disk.calls_per_second);
    }
  }
  // A batch item against its single call (the best rate over the in-flight levels run, repeated
  // context) and against the raw PKCS#11 work of one item; the performance issue asks for at
  // least the smaller of 3 times the first and 0.8 times the second (at 1 thread).
  for (const BatchPhase& b : batch_phases) {
    double single = 0;
    for (const Phase& p : phases) {
      if (p.name == KeyOpName(b.single) && p.mix == ContextMixName(ContextMix::kRepeated)) {
        single = std::max(single, p.result.calls_per_second);
      }
    }
    const double items = b.result.calls_per_second * kBatchItems;
    const std::string what = b.name + " items/s";
    if (single > 0) {
      ratios.Add(absl::StrCat(what, " / ", std::string(KeyOpName(b.single)), " repeated calls/s"),
                 items, single);
    }
    ratios.Add(absl::StrCat(what, " / ", b.raw_name, "@1"), items, b.raw_one.calls_per_second);
    ratios.Add(absl::StrCat(what, " / ", b.raw_name, "@", kBatchInflight), items,
               b.raw_many.calls_per_second);
    if (single > 0) {
      ratios.Add(what + " / target", items, std::min(3 * single, 0.8 * b.raw_one.calls_per_second));
    }
  }
  // The issue asks a miss to add at most one raw unwrap (same run) plus 30 us.
  if (!hot_cold.empty() && options.baselines) {
    const double unwrap_us = raw_cold.p50_us - raw_hot.p50_us;
    std::printf(
        "\nraw unwrap (unwrap+GCM p50 - GCM p50, 1 thread): %.1f us; raw HMAC p50 %.1f us\n",
        unwrap_us, raw_hmac.p50_us);
    for (const auto& [hot, cold] : hot_cold) {
      const LoadResult& h = hot.result;
      const LoadResult& c = cold.result;
      std::printf(
          "cold-key miss @%d: p50 +%.0f us, server CPU +%.0f us per call (target: unwrap + 30 "
          "= %.0f us)\n",
          c.inflight, c.p50_us - h.p50_us, c.server_cpu_us_per_call - h.server_cpu_us_per_call,
          unwrap_us + 30);
      const std::string at = "@" + std::to_string(c.inflight);
      ratios.Add("cold-key miss" + at + " p50 added / (raw unwrap + 30 us)", c.p50_us - h.p50_us,
                 unwrap_us + 30);
      ratios.Add("cold-key miss" + at + " server CPU added / (raw unwrap + 30 us)",
                 c.server_cpu_us_per_call - h.server_cpu_us_per_call, unwrap_us + 30);
    }
  }
  // More records than replies is possible (a reply lost after the commit); fewer is not.
  const bool all_audited = audited >= acknowledged;
  std::printf("\naudit: %ld GenerateDataKey calls acknowledged, %ld OK records after seq %llu%s\n",
              acknowledged, audited, static_cast<unsigned long long>(head_before),
              all_audited ? " (every acknowledged call audited)" : " (MISSING RECORDS)");

  if (!options.json.empty()) {
    nlohmann::json out;
    out["command"] = {{"inflight", options.inflight},
                      {"channels", options.channels},
                      {"keys", options.keys},
                      {"blobs", options.blobs},
                      {"seconds", options.seconds},
                      {"warmup", options.warmup},
                      {"deadline_seconds", options.deadline},
                      {"worker_threads", options.worker_threads},
                      {"hsm_threads", options.hsm_threads}};
    out["online_cpus"] = sysconf(_SC_NPROCESSORS_ONLN);
    out["phases"] = nlohmann::json::array();
    for (const Phase& p : phases) out["phases"].push_back(ToJson(p));
    out["ratios"] = ratios.json();
    out["audit"] = {{"action", "GenerateDataKey"},
                    {"acknowledged", acknowledged},
                    {"records", audited},
                    {"all_audited", all_audited}};
    std::ofstream(options.json) << out.dump(2) << "\n";
  }
  // Failed calls are reported (table, JSON, here) but do not void the run: custosd may refuse
  // calls past what it admits. A phase with no success does.
  long errors = 0;
  bool every_phase_ran = true;
  for (const Phase& p : phases) {
    errors += p.result.errors;
    if (p.result.ok == 0) {
      every_phase_ran = false;
      std::fprintf(stderr, "custos_bench: no call succeeded in %s %s @%d\n", p.name.c_str(),
                   p.mix.c_str(), p.result.inflight);
    }
  }
  if (errors > 0) std::fprintf(stderr, "custos_bench: warning: %ld calls failed\n", errors);
  return every_phase_ran && all_audited ? 0 : 1;
}

int Main(int argc, char** argv) {
  Options options;
  CLI::App app{"custos_bench: KeyService calls against same-run baselines (echo, HSM, disk)"};
  app.add_option("--inflight", options.inflight, "calls in flight, one level per phase")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  app.add_option("--channels", options.channels,
                 "channels (TLS connections) per server; fewer when fewer calls are in flight")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--keys", options.keys, "keys to create; each call picks one at random")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--blobs", options.blobs,
                 "blobs made beforehand per context mix, cycled by Decrypt and ReEncrypt")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--seconds", options.seconds, "recorded seconds per phase")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--warmup", options.warmup, "unrecorded seconds before each phase")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--deadline", options.deadline, "deadline of each call, seconds")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--worker-threads", options.worker_threads,
                 "custosd's server.worker_threads; 0 leaves the config's (custosd's default)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  app.add_option("--hsm-threads", options.hsm_threads,
                 "custosd's hsm.threads; 0 leaves the config's (custosd's default)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  app.add_option("--state-dir", options.state_dir,
                 "custosd state folder (made if missing, kept); default a temporary one. The "
                 "disk baseline runs in this folder");
  app.add_option("--json", options.json, "also write the results here as JSON");
  app.add_option("--key-ids", options.key_ids,
                 "use these keys (a file of ids, one a line, from custos_seed_keys) instead of "
                 "creating --keys; each call picks one");
  app.add_option("--ops", options.ops,
                 "phases against custosd to run, by name (GenerateDataKey, Decrypt, CreateKey, "
                 "BatchGenerateDataKey, BatchDecrypt, BatchReEncrypt, ...); default all but "
                 "ColdKeys, which runs only when named (GenerateDataKey on keys no cache holds, "
                 "each used once, against the hot key; needs --key-ids with more keys than "
                 "calls)");
  app.add_option("--mixes", options.mixes,
                 "context mixes to run (repeated, distinct); default both");
  app.add_flag("!--no-baselines", options.baselines,
               "skip the disk and raw PKCS#11 phases (and the ratios to them); the echo runs");
  CLI11_PARSE(app, argc, argv);
  return Run(options);
}

}  // namespace
}  // namespace custos::bench

int main(int argc, char** argv) {
  try {
    return custos::bench::Main(argc, argv);
  } catch (const std::exception& e) {  // e.g. out of memory: said, never a crash dump
    std::fprintf(stderr, "custos_bench: %s\n", e.what());
    return 2;
  }
}
