// Table-space keys for databases (the key/value gateway's use cases, core/tde.cc) over the
// real HSM and store: key ids and their versions made and rotated by dual control, tokens
// issued by dual control and claimed once by their database, fetches served exactly within a
// token's binding, and every refusal the same whatever was wrong with the token.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>

#include "core/operation_params.h"
#include "tests/core/kms_fixture.h"
#include "tests/support/sqlite_file.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::RequestState;
using testing::Fixture;

constexpr char kMount[] = "mariadb";
constexpr char kPeer[] = "ipv4:10.0.0.7:40000";

// Proposes as officer and approves as officer2 and officer3; REQUIREs execution.
Request Execute(Fixture& f, Operation operation, const OperationParams& params) {
  return f.Executed(operation, params);
}

OperationParams TdeKey(uint32_t key_id, const std::string& key = "tde-seal") {
  OperationParams params;
  params.tde = {kMount, key_id, key};
  return params;
}

// Issues a token for the fixture's database on `key_ids` of kMount; returns its id.
std::string IssueToken(Fixture& f, std::set<uint32_t> key_ids, int64_t ttl_days = 30) {
  return f.IssueTdeToken(kMount, std::move(key_ids), ttl_days);
}

std::string Claim(Fixture& f, const std::string& id) { return f.ClaimTdeToken(id); }

absl::StatusOr<Kms::TdeKey> Fetch(Fixture& f, const std::string& token, uint32_t key_id,
                                  std::optional<uint32_t> version = std::nullopt,
                                  const std::string& mount = kMount) {
  return f.kms->FetchTdeKey(kPeer, token, mount, key_id, version);
}

// Mount kMount with key ids 1 and 2 sealed under key "tde-seal", and a claimed token for both.
std::string MountWithToken(Fixture& f) {
  f.NewKeyWithoutGrants("tde-seal");
  Execute(f, Operation::kCreateTdeKey, TdeKey(1));
  Execute(f, Operation::kCreateTdeKey, TdeKey(2));
  return Claim(f, IssueToken(f, {1, 2}));
}

TEST_CASE("Key ids are made and rotated by dual control and served to their database", "[tde]") {
  Fixture f;
  const std::string token = MountWithToken(f);
  CHECK(token.rfind("cdt.", 0) == 0);
  CHECK(token.size() == 4 + 36 + 1 + 64);

  absl::StatusOr<Kms::TdeKey> first = Fetch(f, token, 1);
  REQUIRE(first.ok());
  CHECK(first->version == 1);
  REQUIRE(first->key.size() == 32);
  const std::string v1(first->key.view());
  absl::StatusOr<Kms::TdeKey> other = Fetch(f, token, 2);
  REQUIRE(other.ok());
  CHECK(std::string(other->key.view()) != v1);

  // The record names the database, the key that sealed it, and where the key belongs.
  const audit::Event fetched = f.sink.events().back();
  CHECK(fetched.action == "FetchTdeKey");
  CHECK(fetched.principal == testing::kDatabase);
  CHECK(fetched.role == "database");
  CHECK(fetched.peer == kPeer);
  CHECK(fetched.outcome == absl::StatusCode::kOk);
  CHECK(fetched.key_id == (*f.kms->DescribeKey(f.officer, "tde-seal")).key->id);
  CHECK(fetched.key_version == 1);
  CHECK(fetched.detail == "mount=mariadb key_id=2 version=1");

  // A rotation adds version 2, served as the newest; version 1 is served as it was.
  const Request rotated = Execute(f, Operation::kRotateTdeKey, TdeKey(1, ""));
  CHECK(rotated.reason.find("RotateTdeKey executed; mount=mariadb key_id=1 version=2 sealed under "
                            "key ") == 0);
  absl::StatusOr<Kms::TdeKey> newest = Fetch(f, token, 1);
  REQUIRE(newest.ok());
  CHECK(newest->version == 2);
  CHECK(std::string(newest->key.view()) != v1);
  absl::StatusOr<Kms::TdeKey> again = Fetch(f, token, 1, 1);
  REQUIRE(again.ok());
  CHECK(again->version == 1);
  CHECK(std::string(again->key.view()) == v1);

  // A key id exists once; only an existing one rotates.
  Proposal twice;
  twice.operation = Operation::kCreateTdeKey;
  twice.params = TdeKey(1);
  twice.justification = "again";
  CHECK(absl::IsAlreadyExists(f.kms->Propose(f.officer, twice).status()));
  Proposal missing;
  missing.operation = Operation::kRotateTdeKey;
  missing.params = TdeKey(9, "");
  missing.justification = "no such key id";
  CHECK(absl::IsFailedPrecondition(f.kms->Propose(f.officer, missing).status()));
}

TEST_CASE("A second request for one key id or token waits for the first", "[tde][requests]") {
  Fixture f;
  const std::string token_id = [&] {
    MountWithToken(f);
    return IssueToken(f, {1});
  }();
  auto propose = [&](Operation operation, const OperationParams& params) {
    Proposal proposal;
    proposal.operation = operation;
    proposal.params = params;
    proposal.justification = "ticket DBA-8";
    return f.kms->Propose(f.officer, proposal);
  };
  OperationParams revoke;
  revoke.token_id = token_id;
  const struct {
    Operation operation;
    OperationParams params;
    std::string target;
  } cases[] = {
      {Operation::kRotateTdeKey, TdeKey(1, ""), "key id 1 of mount 'mariadb'"},
      {Operation::kCreateTdeKey, TdeKey(3), "key id 3 of mount 'mariadb'"},
      {Operation::kRevokeDatabaseToken, revoke, "database token " + token_id},
  };
  std::vector<Request> firsts;
  for (const auto& c : cases) {
    INFO(c.target);
    const absl::StatusOr<Request> first = propose(c.operation, c.params);
    REQUIRE(first.ok());
    firsts.push_back(*first);
    const absl::StatusOr<Request> second = propose(c.operation, c.params);
    CHECK(absl::IsFailedPrecondition(second.status()));
    CHECK(second.status().message() == c.target + " already has pending request " + first->id +
                                           " (" + std::string(policy::OperationName(c.operation)) +
                                           "); approve, reject or let it expire first");
    CHECK(f.sink.events().back().request_id.empty());
  }
  CHECK(f.store->PendingRequests()->size() == 3);
  // Another key id is another target; one rotation executed leaves room for the next.
  CHECK(propose(Operation::kRotateTdeKey, TdeKey(2, "")).ok());
  const Request& rotation = firsts.front();
  REQUIRE(f.kms->Approve(f.officer2, rotation.id, RequestDigest(rotation)).ok());
  REQUIRE(f.kms->Approve(f.officer3, rotation.id, RequestDigest(rotation))->state ==
          RequestState::kExecuted);
  CHECK(propose(Operation::kRotateTdeKey, TdeKey(1, "")).ok());
}

TEST_CASE("A mount no URL could reach, or the Vault API's own, is refused", "[tde]") {
  Fixture f;
  f.NewKeyWithoutGrants("tde-seal");
  const auto propose_on = [&](const std::string& mount) {
    Proposal proposal;
    proposal.operation = Operation::kCreateTdeKey;
    proposal.params = TdeKey(1);
    proposal.params.tde.mount = mount;
    proposal.justification = "mount " + mount;
    return f.kms->Propose(f.officer, proposal).status();
  };
  for (const std::string mount : {".", "..", ".hidden", "-x", "sys", "a/b", ""}) {
    INFO(mount);
    const absl::Status refused = propose_on(mount);
    CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(refused.message()), Catch::Contains("begins with a letter or digit"));
  }
  for (const std::string mount : {"emr", "sys2", "0.db", "mariadb_prod-1"}) {
    INFO(mount);
    CHECK(propose_on(mount).ok());
  }
}

TEST_CASE("Outside a token's binding is answered as what does not exist", "[tde]") {
  Fixture f;
  f.NewKeyWithoutGrants("tde-seal");
  Execute(f, Operation::kCreateTdeKey, TdeKey(1));
  Execute(f, Operation::kCreateTdeKey, TdeKey(3));
  const std::string token = Claim(f, IssueToken(f, {1, 2}));
  for (const auto& [key_id, version, mount] :
       {std::tuple<uint32_t, std::optional<uint32_t>, std::string>{3, std::nullopt, kMount},
        {2, std::nullopt, kMount},  // bound, but never created
        {1, 2, kMount},             // no version 2
        {1, std::nullopt, "other"}}) {
    INFO(key_id << " " << mount);
    absl::StatusOr<Kms::TdeKey> fetched = Fetch(f, token, key_id, version, mount);
    CHECK(absl::IsNotFound(fetched.status()));
  }
  CHECK(Fetch(f, token, 1).ok());
}

TEST_CASE("Tokens are claimed once by their database; bad tokens are all refused alike",
          "[tde][authz]") {
  Fixture f;
  f.NewKeyWithoutGrants("tde-seal");
  Execute(f, Operation::kCreateTdeKey, TdeKey(1));
  const std::string id = IssueToken(f, {1}, /*ttl_days=*/1);

  // Before it is claimed nothing opens with it, and only its database may claim it.
  CHECK(absl::IsPermissionDenied(Fetch(f, "cdt." + id + "." + std::string(64, '0'), 1).status()));
  CHECK(absl::IsPermissionDenied(f.kms->ClaimDatabaseToken(f.officer, id).status()));
  CHECK(absl::IsPermissionDenied(f.kms->ClaimDatabaseToken(f.app, id).status()));
  const std::string token = Claim(f, id);
  absl::StatusOr<SecureBytes> twice = f.kms->ClaimDatabaseToken(f.database, id);
  CHECK(absl::IsFailedPrecondition(twice.status()));
  CHECK(twice.status().message().find("claimed already") != std::string::npos);
  REQUIRE(Fetch(f, token, 1).ok());

  // Databases fetch; nobody else's role includes it, and databases do nothing else.
  CHECK(absl::IsPermissionDenied(
      f.kms->GenerateDataKey(f.database, "tde-seal", {}, 32, true).status()));
  CHECK(absl::IsPermissionDenied(f.kms->ListKeys(f.database, 10, "").status()));

  std::string wrong = token;
  wrong.back() = wrong.back() == '0' ? '1' : '0';
  for (const std::string& bad : {wrong, std::string("cdt.") + id, std::string("hvs.abc"),
                                 std::string(""), token.substr(0, token.size() - 1)}) {
    INFO(bad);
    absl::StatusOr<Kms::TdeKey> refused = Fetch(f, bad, 1);
    CHECK(absl::IsPermissionDenied(refused.status()));
    CHECK(refused.status().message() ==
          "the token is not valid: unknown, wrong, not yet claimed, revoked or expired");
  }

  // Expired after its TTL.
  f.clock.Advance(policy::kDay);
  CHECK(absl::IsPermissionDenied(Fetch(f, token, 1).status()));
}

TEST_CASE("A wall clock stepped back revives no expired database token", "[tde][clock]") {
  Fixture f;
  f.NewKeyWithoutGrants("tde-seal");
  Execute(f, Operation::kCreateTdeKey, TdeKey(1));
  const std::string unclaimed = IssueToken(f, {1}, /*ttl_days=*/1);
  const std::string token = Claim(f, IssueToken(f, {1}, /*ttl_days=*/1));
  REQUIRE(Fetch(f, token, 1).ok());
  f.clock.Advance(policy::kDay);     // both expired
  f.clock.StepWallClock(-2 * 3600);  // and the clock set two hours back
  CHECK(absl::IsPermissionDenied(Fetch(f, token, 1).status()));
  absl::StatusOr<SecureBytes> late = f.kms->ClaimDatabaseToken(f.database, unclaimed);
  CHECK(absl::IsFailedPrecondition(late.status()));
  CHECK(late.status().message().find(" is expired") != std::string::npos);

  // A token issued now still has its whole day, by the time this server has seen pass.
  const std::string fresh = Claim(f, IssueToken(f, {1}, /*ttl_days=*/1));
  f.clock.Advance(policy::kDay - 1);
  CHECK(Fetch(f, fresh, 1).ok());
  f.clock.Advance(1);
  CHECK(absl::IsPermissionDenied(Fetch(f, fresh, 1).status()));
}

TEST_CASE("A revoked token stops at once, and putting its older row back serves nothing",
          "[tde][insider]") {
  Fixture f;
  const std::string token = MountWithToken(f);
  REQUIRE(Fetch(f, token, 1).ok());
  const std::string id = token.substr(4, 36);
  // What a DBA keeps: a copy of the database while the token was valid.
  f.kms.reset();
  f.store.reset();
  const std::string older = f.dir.File("older.db");
  std::filesystem::copy_file(f.dir.File("custos.db"), older);
  f.Restart();

  OperationParams revoke;
  revoke.token_id = id;
  Execute(f, Operation::kRevokeDatabaseToken, revoke);
  CHECK(absl::IsPermissionDenied(Fetch(f, token, 1).status()));
  Proposal again;
  again.operation = Operation::kRevokeDatabaseToken;
  again.params = revoke;
  again.justification = "twice";
  CHECK(absl::IsFailedPrecondition(f.kms->Propose(f.officer, again).status()));

  // The token's row (value and seal) put back from the copy: the seal is genuine, but the
  // audit log's newest record for the row is the revocation's, so it is not served.
  f.kms.reset();
  f.store.reset();
  const std::string row = "db-token/" + id;
  REQUIRE(custos::testing::SqlExec(f.dir.File("custos.db"),
                                   "ATTACH '" + older +
                                       "' AS old; UPDATE settings SET (value, mac) = "
                                       "(SELECT value, mac FROM old.settings WHERE name = '" +
                                       row + "') WHERE name = '" + row + "';")
              .empty());
  f.Restart();
  absl::StatusOr<Kms::TdeKey> replayed = Fetch(f, token, 1);
  INFO(replayed.status().ToString());
  CHECK(absl::IsDataLoss(replayed.status()));
}

TEST_CASE("A token names a database of the policy, and stops with its role", "[tde][authz]") {
  Fixture f;
  f.NewKeyWithoutGrants("tde-seal");
  Execute(f, Operation::kCreateTdeKey, TdeKey(1));
  OperationParams params;
  params.token = {testing::kApp, kMount, {1}, 30};
  Proposal proposal;
  proposal.operation = Operation::kIssueDatabaseToken;
  proposal.params = params;
  proposal.justification = "an app is no database";
  CHECK(absl::IsFailedPrecondition(f.kms->Propose(f.officer, proposal).status()));
  // No principal at all is a malformed proposal, not a policy question.
  proposal.params.token = {"", kMount, {1}, 30};
  const absl::Status unnamed = f.kms->Propose(f.officer, proposal).status();
  CHECK(unnamed == absl::InvalidArgumentError("a token is issued to a principal: name the "
                                              "database (database_token.principal)"));
  for (const int64_t ttl : {0, 367}) {
    proposal.params.token = {testing::kDatabase, kMount, {1}, ttl};
    CHECK(absl::IsInvalidArgument(f.kms->Propose(f.officer, proposal).status()));
  }
  proposal.params.token = {testing::kDatabase, "no/slash", {1}, 30};
  CHECK(absl::IsInvalidArgument(f.kms->Propose(f.officer, proposal).status()));

  const std::string token = Claim(f, IssueToken(f, {1}));
  REQUIRE(Fetch(f, token, 1).ok());
  // The database leaves the policy: its token opens nothing from the next call on.
  REQUIRE(f.kms
              ->ReplacePolicy(*policy::Policy::Parse(
                  "[roles]\napp = [\"spiffe://t/app/a\"]\n"
                  "officer = [\"spiffe://t/officer/o\", \"spiffe://t/officer/o2\", "
                  "\"spiffe://t/officer/o3\"]\n"))
              .ok());
  CHECK(absl::IsPermissionDenied(Fetch(f, token, 1).status()));
}

TEST_CASE("The key that seals table-space keys stays usable and grants nothing", "[tde]") {
  Fixture f;
  const std::string token = MountWithToken(f);
  auto propose = [&](Operation operation, OperationParams params = {}) {
    Proposal proposal;
    proposal.operation = operation;
    proposal.key = "tde-seal";
    proposal.params = std::move(params);
    proposal.justification = "would strand the databases";
    return f.kms->Propose(f.officer, proposal);
  };
  OperationParams grant;
  grant.decrypt_principals = {testing::kApp};
  OperationParams retire;
  retire.min_decrypt_version = 2;
  for (const auto& [operation, params] : std::vector<std::pair<Operation, OperationParams>>{
           {Operation::kDisableKey, {}},
           {Operation::kScheduleKeyDeletion, {}},
           {Operation::kUpdateKeyGrants, grant},
           {Operation::kSetMinDecryptVersion, retire}}) {
    INFO(policy::OperationName(operation));
    absl::StatusOr<Request> refused = propose(operation, params);
    CHECK(absl::IsFailedPrecondition(refused.status()));
    CHECK(refused.status().message().find("seals the table-space keys of mount(s) mariadb") !=
          std::string::npos);
  }
  // What keeps them readable goes on: a rotation of the sealing key, and revoking no grant.
  REQUIRE(propose(Operation::kRotateKey).ok());
  CHECK(Fetch(f, token, 1).ok());

  // A key that grants an app its use seals nothing.
  f.NewKey("granted");
  Proposal sealed_under_granted;
  sealed_under_granted.operation = Operation::kCreateTdeKey;
  sealed_under_granted.params = TdeKey(5, "granted");
  sealed_under_granted.justification = "an app could open it";
  absl::StatusOr<Request> refused = f.kms->Propose(f.officer, sealed_under_granted);
  CHECK(absl::IsFailedPrecondition(refused.status()));
  CHECK(refused.status().message().find("grants apps its use") != std::string::npos);
}

}  // namespace
}  // namespace custos::core
