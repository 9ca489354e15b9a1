// custos_seed_keys: fills a stopped custosd's state with N keys the demo app may use, for
// benchmarks over large catalogues (docs/PERFORMANCE.md).
//
//   custos_seed_keys --config STATE/custosd.toml --count 1000000 --out key-ids.txt
//
// Each key is made as custosd makes one through dual control: proposed by one officer and
// approved by another (the state's quorum), so every key has a version generated in the HSM and
// wrapped under the current root, sealed catalogue rows (the request as proposed, then as
// executed, and the key) and the records Kms writes for them (Propose, Approve, and the
// server's CreateKey, each naming its row and that row's digest), with peer
// "custos_seed_keys" so the log says how they came. No gRPC call is made. The officers are
// named on the command line and act without their certificates: this is a benchmark tool for
// test states, built with the benchmarks only, never installed with custosd. custosd must be
// stopped (the state lock refuses a second owner). At the end it signs a checkpoint and closes
// the log as a clean custosd stop does, so custosd starts on the state afterwards.
//
// By default keys are written --batch at a time: one commit for a batch's proposals, one for
// their approvals, through the store's own Apply (which seals the rows and chains the records).
// Through core::Kms one key at a time (--through-kms) each Propose and Approve holds the request
// lock alone across its own commit, so seeding waits on two fsyncs per key, one after another
// (about 450 keys/s on an idle disk, 110/s on a busy one); batched, the fsyncs are shared and
// what is left is the HSM's work (a wrapped key and three row MACs per key) and SQLite's.
#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "core/hsm_row_authenticator.h"
#include "core/key_id.h"
#include "core/kms.h"
#include "core/operation_params.h"
#include "hsm/pkcs11_hsm.h"
#include "policy/policy.h"
#include "server/config.h"
#include "storage/key_store.h"
#include "storage/row_codec.h"

namespace custos::bench {
namespace {

using policy::Operation;

struct Options {
  std::string config;
  size_t count = 100000;
  std::string out;
  int threads = 4;
  size_t batch = 1000;
  bool through_kms = false;
  std::string proposer = "spiffe://custos.local/officer/officer1";
  std::vector<std::string> approvers = {"spiffe://custos.local/officer/officer2"};
  std::string grant = "spiffe://custos.local/app/demo";
};

constexpr char kPeer[] = "custos_seed_keys";
constexpr char kJustification[] = "benchmark catalogue";

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "custos_seed_keys: %s\n", status.ToString().c_str());
  return 1;
}

// Key n's CreateKey parameters: encrypt and decrypt grants for the app.
core::OperationParams Params(const Options& options, size_t n) {
  core::OperationParams params;
  params.create.description = "custos_seed_keys " + std::to_string(n);
  params.create.encrypt_principals = {options.grant};
  params.create.decrypt_principals = {options.grant};
  return params;
}

// One key with encrypt and decrypt grants for `options.grant`, through dual control.
absl::StatusOr<std::string> SeedOne(core::Kms& kms, const Options& options, size_t n) {
  const core::Caller proposer{options.proposer, kPeer};
  core::Proposal proposal;
  proposal.operation = Operation::kCreateKey;
  proposal.params = Params(options, n);
  proposal.justification = kJustification;
  CUSTOS_ASSIGN_OR_RETURN(core::Request request, kms.Propose(proposer, proposal));
  for (const std::string& approver : options.approvers) {
    if (request.state != storage::RequestState::kPending) break;
    CUSTOS_ASSIGN_OR_RETURN(
        request, kms.Approve({approver, kPeer}, request.id, core::RequestDigest(request)));
  }
  if (request.state != storage::RequestState::kExecuted) {
    return absl::FailedPreconditionError("the approvers given do not reach the quorum");
  }
  return request.key_id;
}

// Writes keys a batch at a time through the store, with the rows and records that Kms's
// Propose, Approve and Execute write for a CreateKey request (core/requests.cc,
// core/lifecycle.cc); what Kms would check first is checked once, in Check().
class BatchSeeder {
 public:
  BatchSeeder(const Options& options, const server::Config& config, const policy::Policy& policy,
              const core::Kms& kms, hsm::Hsm& hsm, storage::KeyStore& store, const Clock& clock,
              std::string root)
      : options_(options),
        config_(config),
        policy_(policy),
        kms_(kms),
        hsm_(hsm),
        store_(store),
        clock_(clock),
        root_(std::move(root)) {}

  // INVALID_ARGUMENT or FAILED_PRECONDITION where Kms would refuse the requests.
  absl::Status Check() {
    const auto is = [&](const std::string& principal, policy::Role role) {
      return policy_.RoleOf(principal) == role;
    };
    if (!is(options_.proposer, policy::Role::kOfficer)) {
      return absl::FailedPreconditionError(options_.proposer + " is not an officer");
    }
    if (!is(options_.grant, policy::Role::kApp)) {
      return absl::InvalidArgumentError(options_.grant + " is not an app; only apps get grants");
    }
    // A request rewritten twice in one batch would have both its records carry the last
    // digest, so each approval below the quorum would need a batch of its own: not done.
    const int needed = kms_.ApprovalsFor(Operation::kCreateKey, Params(options_, 0));
    if (needed != 1) {
      return absl::FailedPreconditionError(
          "batched seeding supports a quorum of one approver; this state needs " +
          std::to_string(needed) + " (use --through-kms)");
    }
    if (options_.approvers.empty()) return absl::InvalidArgumentError("no --approver given");
    approver_ = options_.approvers.front();
    if (!is(approver_, policy::Role::kOfficer) || approver_ == options_.proposer) {
      return absl::FailedPreconditionError(approver_ +
                                           " may not approve: not an officer, or the proposer");
    }
    return absl::OkStatus();
  }

  // Keys [first, first + count): their ids.
  absl::StatusOr<std::vector<std::string>> Seed(size_t first, size_t count) const {
    std::vector<storage::KeyRecord> keys(count);
    std::vector<storage::RequestRecord> requests(count);
    storage::WriteBatch proposals;
    storage::WriteBatch approvals;
    const int64_t now = clock_.NowSeconds();
    for (size_t i = 0; i < count; ++i) {
      const core::OperationParams params = Params(options_, first + i);
      storage::RequestRecord& request = requests[i];
      request.id = core::NewKeyId();
      request.operation = std::string(policy::OperationName(Operation::kCreateKey));
      request.justification = kJustification;
      request.proposer = options_.proposer;
      request.created_at = now;
      request.expires_at = now + config_.dual_control.request_ttl_seconds;
      request.parameters = core::EncodeParams(Operation::kCreateKey, params);
      proposals.requests.push_back(request);
      proposals.audit.push_back(
          audit::RecordFromEvent(Event(options_.proposer, policy::Action::kPropose, request), 0));

      // Execute's NewKey: the version made in the HSM, only its wrapped form out.
      storage::KeyRecord& key = keys[i];
      key.id = core::NewKeyId();
      key.description = params.create.description;
      key.state = storage::KeyState::kEnabled;
      key.created_at = now;
      key.created_by = options_.proposer;
      key.primary_version = 1;
      key.encrypt_grants = params.create.encrypt_principals;
      key.decrypt_grants = params.create.decrypt_principals;
      CUSTOS_ASSIGN_OR_RETURN(Bytes wrapped, hsm_.GenerateWrappedKey(root_));
      key.versions.push_back({1, std::move(wrapped), root_, now});

      // The approval that reaches the quorum executes the request (Kms::Execute).
      request.approvals.push_back({approver_, now});
      request.state = storage::RequestState::kExecuted;
      request.closed_at = now;
      request.key_id = key.id;
      request.reason =
          request.operation + " executed; key " + key.id + " is ENABLED, primary version 1";
      audit::Event approved = Event(approver_, policy::Action::kApprove, request);
      approved.key_id = key.id;
      approved.key_version = 1;
      audit::Event executed;  // Kms::ServerEvent, under the approval's call id
      executed.time = now;
      executed.principal = core::kServerPrincipal;
      executed.role = "server";
      executed.action = request.operation;
      executed.key_id = key.id;
      executed.key_version = 1;
      executed.request_id = request.id;
      executed.call_id = approved.call_id;
      executed.row = storage::KeyRowName(key.id);
      approvals.keys.push_back(key);
      approvals.requests.push_back(request);
      approvals.audit.push_back(audit::RecordFromEvent(approved, 0));
      approvals.audit.push_back(audit::RecordFromEvent(executed, 0));
    }
    CUSTOS_RETURN_IF_ERROR(store_.Apply(proposals));
    CUSTOS_RETURN_IF_ERROR(store_.Apply(approvals));
    std::vector<std::string> ids;
    ids.reserve(count);
    for (const storage::KeyRecord& key : keys) ids.push_back(key.id);
    return ids;
  }

 private:
  // The record of a call by `principal` on `request`, as Kms::Call makes it.
  audit::Event Event(const std::string& principal, policy::Action action,
                     const storage::RequestRecord& request) const {
    audit::Event event;
    event.call_id = core::NewKeyId();
    event.time = request.created_at;
    event.principal = principal;
    event.role = std::string(policy::RoleName(policy::Role::kOfficer));
    event.peer = kPeer;
    event.action = std::string(policy::ActionName(action));
    event.request_id = request.id;
    event.row = storage::RequestRowName(request.id);
    return event;
  }

  const Options& options_;
  const server::Config& config_;
  const policy::Policy& policy_;
  const core::Kms& kms_;
  hsm::Hsm& hsm_;
  storage::KeyStore& store_;
  const Clock& clock_;
  const std::string root_;
  std::string approver_;  // set by Check()
};

int Run(const Options& options) {
  absl::StatusOr<server::Config> config = server::LoadConfig(options.config);
  if (!config.ok()) return Fail(config.status());
  absl::StatusOr<std::shared_ptr<const policy::Policy>> policy =
      policy::Policy::LoadFile(config->policy_file);
  if (!policy.ok()) return Fail(policy.status());
  core::HsmRowAuthenticator rows(config->catalog_hmac_key_label);
  absl::StatusOr<std::unique_ptr<storage::KeyStore>> store =
      storage::KeyStore::Open(config->storage_path, &rows);
  if (!store.ok()) return Fail(store.status());
  absl::StatusOr<SecureBytes> pin = server::ReadHsmPin(*config);
  if (!pin.ok()) return Fail(pin.status());
  hsm::Pkcs11Options hsm_options;
  hsm_options.module_path = config->hsm_module;
  hsm_options.token_label = config->hsm_token_label;
  hsm_options.pin = *std::move(pin);
  hsm_options.session_pool_size = static_cast<size_t>(options.threads);
  absl::StatusOr<std::unique_ptr<hsm::Hsm>> hsm = hsm::OpenPkcs11Hsm(std::move(hsm_options));
  if (!hsm.ok()) return Fail(hsm.status());
  rows.Bind(hsm->get());
  absl::StatusOr<std::optional<std::string>> rotated = (*store)->GetSetting(core::kRootKeySetting);
  if (!rotated.ok()) return Fail(rotated.status());
  const std::string root = rotated->value_or(config->root_key_label);
  SystemClock clock;
  core::Kms kms({.hsm = hsm->get(),
                 .store = store->get(),
                 .audit = nullptr,
                 .clock = &clock,
                 .policy = *policy,
                 .dual_control = config->dual_control,
                 .root_key_label = root,
                 .usage_limits = config->usage_limits,
                 .audit_hmac_key_label = config->audit_hmac_key_label,
                 .audit_signing_key_label = config->audit_signing_key_label,
                 .audit_head_label = config->audit_head_label,
                 .checkpoint_every = config->checkpoint_every,
                 .audit_archive_dir = config->audit_archive_dir,
                 .context_hmac_cache = 0,
                 .wake_maintenance = [] {}});  // one checkpoint at the end
  // As custosd: nothing is added to a log that fails its check.
  if (absl::Status verified = kms.VerifyAuditLog(false); !verified.ok()) return Fail(verified);
  // As custosd's start: a state fresh from `custosd init` has no catalogue seal yet, and the
  // first start would otherwise seal every seeded row again, each with a record of its own.
  absl::StatusOr<uint64_t> sealed = kms.SealCatalog();
  if (!sealed.ok()) return Fail(sealed.status());
  if (*sealed > 0)
    std::fprintf(stderr, "custos_seed_keys: sealed %llu older rows\n",
                 static_cast<unsigned long long>(*sealed));
  // As Kms before it wraps anything: the root in use proven over the checked log, there and
  // usable.
  absl::StatusOr<std::string> proven = kms.RootForNewVersions();
  if (!proven.ok()) return Fail(proven.status());
  if (absl::Status usable = (*hsm)->CheckRootKey(*proven); !usable.ok()) return Fail(usable);
  BatchSeeder seeder(options, *config, **policy, kms, **hsm, **store, clock, *proven);
  if (!options.through_kms) {
    if (absl::Status checked = seeder.Check(); !checked.ok()) return Fail(checked);
  }

  // Work is handed out in units of one key (through Kms) or one batch.
  const size_t unit = options.through_kms ? 1 : options.batch;
  const auto start = std::chrono::steady_clock::now();
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::vector<std::string> ids;
  ids.reserve(options.count);
  size_t reported = 0;
  absl::Status failure;
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(options.threads));
  for (int t = 0; t < options.threads; ++t) {
    workers.emplace_back([&] {
      for (size_t n = next.fetch_add(unit); n < options.count; n = next.fetch_add(unit)) {
        const size_t count = std::min(unit, options.count - n);
        absl::StatusOr<std::vector<std::string>> made = absl::UnknownError("unset");
        if (options.through_kms) {
          absl::StatusOr<std::string> id = SeedOne(kms, options, n);
          made = id.ok() ? absl::StatusOr<std::vector<std::string>>({*std::move(id)}) : id.status();
        } else {
          made = seeder.Seed(n, count);
        }
        std::lock_guard lock(mu);
        if (!made.ok()) {
          failure = made.status();
          next = options.count;  // the others stop too
          return;
        }
        ids.insert(ids.end(), made->begin(), made->end());
        if (ids.size() >= reported + 10000) {
          reported = ids.size() - ids.size() % 10000;
          const double s =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          std::fprintf(stderr, "  %zu keys, %.0f s\n", ids.size(), s);
        }
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Whatever was made stays, recorded: close the log as a clean stop does.
  if (absl::Status closed = kms.CloseAuditLog(); !closed.ok()) return Fail(closed);
  std::ofstream out(options.out, std::ios::trunc);
  for (const std::string& id : ids) out << id << '\n';
  out.close();
  if (!out) return Fail(absl::UnavailableError("cannot write " + options.out));
  std::fprintf(stderr, "custos_seed_keys: %zu keys in %.1f s (%.0f/s), ids in %s\n", ids.size(),
               seconds, static_cast<double>(ids.size()) / seconds, options.out.c_str());
  return failure.ok() ? 0 : Fail(failure);
}

}  // namespace
}  // namespace custos::bench

int main(int argc, char** argv) {
  custos::bench::Options options;
  CLI::App app{
      "custos_seed_keys: N keys for the demo app in a stopped custosd's state, each proposed and "
      "approved by officers with its records, --batch keys per commit (docs/PERFORMANCE.md)"};
  app.add_option("-c,--config", options.config, "the state's custosd.toml")->required();
  app.add_option("--count", options.count, "keys to create")
      ->capture_default_str()
      ->check(CLI::Range(1, 10'000'000));
  app.add_option("--out", options.out, "write the new key ids here, one a line")->required();
  app.add_option("--threads", options.threads, "batches (or keys, --through-kms) made at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  app.add_option("--batch", options.batch,
                 "keys per commit: one for the batch's proposals, one for its approvals")
      ->capture_default_str()
      ->check(CLI::Range(1, 100'000));
  app.add_flag("--through-kms", options.through_kms,
               "one key at a time through core::Kms Propose and Approve (slow: two fsyncs per "
               "key, one after another)");
  app.add_option("--proposer", options.proposer, "the officer proposing each key")
      ->capture_default_str();
  app.add_option("--approver", options.approvers,
                 "officers approving, until the quorum (batched, the quorum must be one)");
  app.add_option("--grant", options.grant, "the app given encrypt and decrypt grants")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return custos::bench::Run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custos_seed_keys: %s\n", e.what());
    return 1;
  }
}
