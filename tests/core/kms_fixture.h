// A Kms over a real SoftHSM2 token and a real SQLite file whose rows are sealed and checked
// with the HSM's catalogue key (as custosd does), with a recording audit sink, a FaultyHsm to
// inject HSM failures and a manual clock. Shared by the core tests.
#pragma once

#include <atomic>
#include <catch2/catch.hpp>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "core/hsm_row_authenticator.h"
#include "core/kms.h"
#include "core/operation_params.h"
#include "hsm/faulty_hsm.h"
#include "hsm/pkcs11_hsm.h"
#include "tests/support/softhsm_token.h"
#include "tests/support/sqlite_file.h"

namespace custos::core::testing {

using custos::testing::SoftHsmToken;
using custos::testing::TempDir;

inline constexpr char kApp[] = "spiffe://t/app/a";
inline constexpr char kOfficer[] = "spiffe://t/officer/o";
inline constexpr char kOfficer2[] = "spiffe://t/officer/o2";
inline constexpr char kOfficer3[] = "spiffe://t/officer/o3";
inline constexpr char kAuditor[] = "spiffe://t/auditor/x";
inline constexpr char kDatabase[] = "spiffe://t/db/mariadb";
inline constexpr char kPolicy[] =
    "[roles]\napp = [\"spiffe://t/app/a\"]\n"
    "officer = [\"spiffe://t/officer/o\", \"spiffe://t/officer/o2\", \"spiffe://t/officer/o3\"]\n"
    "auditor = [\"spiffe://t/auditor/x\"]\n"
    "database = [\"spiffe://t/db/mariadb\"]\n";

// An audit sink that keeps every event and can be told to refuse them.
class RecordingSink final : public audit::Sink {
 public:
  absl::Status Append(const audit::Event& event) override {
    std::lock_guard lock(mu_);
    if (!refusal_.ok()) return refusal_;
    events_.push_back(event);
    return absl::OkStatus();
  }
  void Refuse(absl::Status status) {
    std::lock_guard lock(mu_);
    refusal_ = std::move(status);
  }
  std::vector<audit::Event> events() {
    std::lock_guard lock(mu_);
    return events_;
  }

 private:
  std::mutex mu_;
  absl::Status refusal_;
  std::vector<audit::Event> events_;
};

struct Fixture {
  SoftHsmToken token;
  TempDir dir;
  std::unique_ptr<hsm::Hsm> real_hsm;
  std::unique_ptr<hsm::FaultyHsm> hsm;
  // Sealing and checking rows through a FaultyHsm of its own, not `hsm`, so that tests
  // counting or failing the use cases' HSM calls see only theirs (and those of the catalogue
  // key only here).
  std::unique_ptr<hsm::FaultyHsm> catalog_hsm;
  HsmRowAuthenticator rows{"custos-catalog-hmac"};
  std::unique_ptr<storage::KeyStore> store;
  RecordingSink sink;
  ManualClock clock{1'800'000'000};
  std::unique_ptr<Kms> kms;
  Caller app{kApp, "ipv4:127.0.0.1:5000"};
  Caller officer{kOfficer, "ipv4:127.0.0.1:5001"};
  Caller auditor{kAuditor, "ipv4:127.0.0.1:5002"};
  Caller officer2{kOfficer2, "ipv4:127.0.0.1:5003"};
  Caller officer3{kOfficer3, "ipv4:127.0.0.1:5004"};
  Caller database{kDatabase, "ipv4:127.0.0.1:5005"};
  uint64_t checkpoint_every = 1000;        // takes effect at the next Start
  std::string root_label = "custos-root";  // new versions' root, as of the next Start
  std::atomic<int> maintenance_wakes{0};

  explicit Fixture(policy::DualControlConfig dual_control = policy::DualControlConfig::Defaults(),
                   UsageLimits limits = {}) {
    hsm::Pkcs11Options options;
    options.module_path = custos::testing::kSoftHsmModule;
    options.token_label = token.label();
    options.pin = SecureBytes::FromString(token.pin());
    options.session_pool_size = 4;
    real_hsm = *hsm::OpenPkcs11Hsm(std::move(options));
    REQUIRE(real_hsm->CreateRootKey("custos-root").ok());
    REQUIRE(real_hsm->CreateHmacKey("custos-audit-hmac").ok());
    REQUIRE(real_hsm->CreateSigningKey("custos-audit-signing").ok());
    REQUIRE(real_hsm->CreateHmacKey("custos-catalog-hmac").ok());
    catalog_hsm = std::make_unique<hsm::FaultyHsm>(real_hsm.get());
    rows.Bind(catalog_hsm.get());
    hsm = std::make_unique<hsm::FaultyHsm>(real_hsm.get());
    store = *storage::KeyStore::Open(dir.File("custos.db"), &rows);
    auto policy = policy::Policy::Parse(kPolicy);
    REQUIRE(policy.ok());
    Start(*policy, dual_control, limits);
  }

  // (Re)creates the Kms over the same HSM and store, as a restarted server would.
  void Start(std::shared_ptr<const policy::Policy> policy,
             const policy::DualControlConfig& dual_control, UsageLimits limits) {
    kms.reset();
    // As custosd does: the root a rotation put in use, once there has been one.
    const absl::StatusOr<std::optional<std::string>> rotated = store->GetSetting(kRootKeySetting);
    const std::string root = rotated.ok() && rotated->has_value() ? **rotated : root_label;
    kms = std::make_unique<Kms>(Kms::Options{.hsm = hsm.get(),
                                             .store = store.get(),
                                             .audit = &sink,
                                             .clock = &clock,
                                             .policy = std::move(policy),
                                             .dual_control = dual_control,
                                             .root_key_label = root,
                                             .usage_limits = limits,
                                             .checkpoint_every = checkpoint_every,
                                             .audit_archive_dir = dir.File("audit-archive"),
                                             .wake_maintenance = [this] { ++maintenance_wakes; }});
  }

  // Closes the Kms and the store and opens both again on the same files and HSM, as a restart
  // of custosd would (nothing cached survives).
  void Restart(UsageLimits limits = {}) {
    kms.reset();
    store.reset();
    absl::StatusOr<std::unique_ptr<storage::KeyStore>> reopened =
        storage::KeyStore::Open(dir.File("custos.db"), &rows);
    REQUIRE(reopened.ok());
    store = *std::move(reopened);
    Start(*policy::Policy::Parse(kPolicy), policy::DualControlConfig::Defaults(), limits);
  }

  // As someone who can write custos.db while custosd is stopped: runs `sql` on it and drops
  // every row index entry naming `row`; then starts again, and checks the log against the
  // HSM's head as custosd's start does.
  void EditRowAndIndexWhileStopped(const std::string& sql, const std::string& row,
                                   UsageLimits limits = {}) {
    kms.reset();
    store.reset();
    INFO(sql);
    REQUIRE(custos::testing::SqlExec(dir.File("custos.db"), sql).empty());
    custos::testing::DropRowIndexEntries(dir.File("custos.db"), "row_name = '" + row + "'");
    Restart(limits);
    REQUIRE(kms->VerifyAuditLog(false).ok());
  }

  // A key nobody may use yet: one officer creates it, no approval needed.
  KeyRef NewKeyWithoutGrants(const std::string& alias) {
    CreateKeyParams params;
    params.alias = alias;
    absl::StatusOr<KeyRef> key = kms->CreateKey(officer, params);
    REQUIRE(key.ok());
    return *key;
  }

  // A key the app may use, created as a key with grants must be: proposed by one officer and
  // approved by as many others as the quorum needs.
  KeyRef NewKey(const std::string& alias) {
    OperationParams params;
    params.create.alias = alias;
    params.create.encrypt_principals = {kApp};
    params.create.decrypt_principals = {kApp};
    const Request request = Executed(policy::Operation::kCreateKey, params);
    absl::StatusOr<KeyRef> key = store->GetKey(request.key_id);
    REQUIRE(key.ok());
    return *key;
  }

  // `operation` (on no key) proposed by officer and approved by officer2 and officer3 as its
  // quorum needs; REQUIREs its execution.
  Request Executed(policy::Operation operation, const OperationParams& params) {
    Proposal proposal;
    proposal.operation = operation;
    proposal.params = params;
    proposal.justification = "ticket SEC-7";
    absl::StatusOr<Request> request = kms->Propose(officer, proposal);
    INFO(request.status().ToString());
    REQUIRE(request.ok());
    for (const Caller* approver : {&officer2, &officer3}) {
      if (request->state != storage::RequestState::kPending) break;
      request = kms->Approve(*approver, request->id, RequestDigest(*request));
      INFO(request.status().ToString());
      REQUIRE(request.ok());
    }
    REQUIRE(request->state == storage::RequestState::kExecuted);
    return *request;
  }

  // Issues a token for kDatabase on `key_ids` of `mount`; returns its id, which the database
  // claims (ClaimTdeToken).
  std::string IssueTdeToken(const std::string& mount, std::set<uint32_t> key_ids,
                            int64_t ttl_days = 30) {
    OperationParams params;
    params.token = {kDatabase, mount, std::move(key_ids), ttl_days};
    const Request done = Executed(policy::Operation::kIssueDatabaseToken, params);
    // "IssueDatabaseToken executed; token <uuid> for ..."
    const std::string marker = "executed; token ";
    const size_t at = done.reason.find(marker);
    REQUIRE(at != std::string::npos);
    return done.reason.substr(at + marker.size(), 36);
  }

  // The token the database sends, claimed by kDatabase.
  std::string ClaimTdeToken(const std::string& id) {
    absl::StatusOr<SecureBytes> token = kms->ClaimDatabaseToken(database, id);
    INFO(token.status().ToString());
    REQUIRE(token.ok());
    return std::string(token->view());
  }
};

}  // namespace custos::core::testing
