// custos_seed_keys: fills a stopped custosd's state with N keys the demo app may use, for
// benchmarks over large catalogues (docs/PERFORMANCE.md).
//
//   custos_seed_keys --config STATE/custosd.toml --count 100000 --out key-ids.txt
//
// Each key is made as custosd would make it, in process, through core::Kms: proposed by one
// officer and approved by another (the state's quorum), so every key has a version wrapped in
// the HSM under the current root, sealed catalogue rows, and its audit records (action
// Propose, Approve, CreateKey; peer "custos_seed_keys", so the log says how they came). No
// gRPC call is made. The officers are named on the command line and act without their
// certificates: this is a benchmark tool for test states, built with the benchmarks only,
// never installed with custosd. custosd must be stopped (the state lock refuses a second
// owner). At the end it signs a checkpoint and closes the log as a clean custosd stop does,
// so custosd starts on the state afterwards.
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
#include "core/kms.h"
#include "core/operation_params.h"
#include "hsm/pkcs11_hsm.h"
#include "policy/policy.h"
#include "server/config.h"
#include "storage/key_store.h"

namespace custos::bench {
namespace {

struct Options {
  std::string config;
  size_t count = 100000;
  std::string out;
  int threads = 8;
  std::string proposer = "spiffe://custos.local/officer/officer1";
  std::vector<std::string> approvers = {"spiffe://custos.local/officer/officer2"};
  std::string grant = "spiffe://custos.local/app/demo";
};

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "custos_seed_keys: %s\n", status.ToString().c_str());
  return 1;
}

// One key with encrypt and decrypt grants for `options.grant`, through dual control.
absl::StatusOr<std::string> SeedOne(core::Kms& kms, const Options& options, size_t n) {
  const core::Caller proposer{options.proposer, "custos_seed_keys"};
  core::Proposal proposal;
  proposal.operation = policy::Operation::kCreateKey;
  proposal.params.create.description = "custos_seed_keys " + std::to_string(n);
  proposal.params.create.encrypt_principals = {options.grant};
  proposal.params.create.decrypt_principals = {options.grant};
  proposal.justification = "benchmark catalogue";
  CUSTOS_ASSIGN_OR_RETURN(core::Request request, kms.Propose(proposer, proposal));
  for (const std::string& approver : options.approvers) {
    if (request.state != storage::RequestState::kPending) break;
    CUSTOS_ASSIGN_OR_RETURN(request, kms.Approve({approver, "custos_seed_keys"}, request.id,
                                                 core::RequestDigest(request)));
  }
  if (request.state != storage::RequestState::kExecuted) {
    return absl::FailedPreconditionError("the approvers given do not reach the quorum");
  }
  return request.key_id;
}

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
  SystemClock clock;
  core::Kms kms({.hsm = hsm->get(),
                 .store = store->get(),
                 .audit = nullptr,
                 .clock = &clock,
                 .policy = *policy,
                 .dual_control = config->dual_control,
                 .root_key_label = rotated->value_or(config->root_key_label),
                 .usage_limits = config->usage_limits,
                 .audit_hmac_key_label = config->audit_hmac_key_label,
                 .audit_signing_key_label = config->audit_signing_key_label,
                 .audit_head_label = config->audit_head_label,
                 .checkpoint_every = config->checkpoint_every,
                 .context_hmac_cache = 0,
                 .wake_maintenance = [] {}});  // one checkpoint at the end
  // As custosd: nothing is added to a log that fails its check.
  if (absl::Status verified = kms.VerifyAuditLog(false); !verified.ok()) return Fail(verified);

  const auto start = std::chrono::steady_clock::now();
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::vector<std::string> ids;
  absl::Status failure;
  std::vector<std::thread> workers;
  for (int t = 0; t < options.threads; ++t) {
    workers.emplace_back([&] {
      for (size_t n = next++; n < options.count; n = next++) {
        absl::StatusOr<std::string> id = SeedOne(kms, options, n);
        std::lock_guard lock(mu);
        if (!id.ok()) {
          failure = id.status();
          next = options.count;  // the others stop too
          return;
        }
        ids.push_back(*std::move(id));
        if (ids.size() % 10000 == 0) std::fprintf(stderr, "  %zu keys\n", ids.size());
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
  CLI::App app{"custos_seed_keys: N keys for the demo app in a stopped custosd's state"};
  app.add_option("-c,--config", options.config, "the state's custosd.toml")->required();
  app.add_option("--count", options.count, "keys to create")->check(CLI::Range(1, 10'000'000));
  app.add_option("--out", options.out, "write the new key ids here, one a line")->required();
  app.add_option("--threads", options.threads, "keys made at once")->check(CLI::Range(1, 256));
  app.add_option("--proposer", options.proposer, "the officer proposing each key");
  app.add_option("--approver", options.approvers, "officers approving, until the quorum");
  app.add_option("--grant", options.grant, "the app given encrypt and decrypt grants");
  CLI11_PARSE(app, argc, argv);
  try {
    return custos::bench::Run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custos_seed_keys: %s\n", e.what());
    return 1;
  }
}
