// AdminService end to end: officers create, describe and list keys; nobody else may.
#include <catch2/catch.hpp>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

TEST_CASE("CreateKey returns the key's metadata and DescribeKey finds it", "[e2e][admin]") {
  CustosServer& server = CustosServer::Shared();
  auto admin = server.Admin("officer1");
  pb::CreateKeyRequest req;
  req.set_alias(UniqueAlias("billing"));
  req.set_description("billing database TDE");
  (*req.mutable_tags())["owner"] = "finance";
  pb::KeyMetadata created;
  REQUIRE(admin->CreateKey(Context().get(), req, &created).ok());
  CHECK(created.key_id().size() == 36);
  CHECK(created.alias() == req.alias());
  CHECK(created.description() == "billing database TDE");
  CHECK(created.tags().at("owner") == "finance");
  CHECK(created.state() == pb::ENABLED);
  CHECK(created.created_by() == "spiffe://custos.local/officer/officer1");
  CHECK(created.primary_version() == 1);
  REQUIRE(created.versions_size() == 1);
  CHECK(created.versions(0).version() == 1);
  CHECK(created.encrypt_principals().empty());
  CHECK(created.decrypt_principals().empty());
  CHECK(created.integrity_problem().empty());

  // Another officer sees the same key, by id and by alias.
  auto other = server.Admin("officer2");
  for (const std::string& name : {created.key_id(), created.alias()}) {
    pb::DescribeKeyRequest describe;
    describe.set_key(name);
    pb::KeyMetadata found;
    REQUIRE(other->DescribeKey(Context().get(), describe, &found).ok());
    CHECK(found.SerializeAsString() == created.SerializeAsString());
  }
}

TEST_CASE("CreateKey refuses bad input and changes nothing", "[e2e][admin]") {
  CustosServer& server = CustosServer::Shared();
  const std::string taken = UniqueAlias("taken");
  CreateKey(server, taken, false, false);
  auto admin = server.Admin("officer1");
  const std::string before = CatalogSnapshot(server);

  struct Case {
    std::string name;
    pb::CreateKeyRequest req;
    StatusCode code;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({"duplicate alias", {}, StatusCode::ALREADY_EXISTS, "already in use"});
  cases.back().req.set_alias(taken);
  cases.push_back({"alias with a space", {}, StatusCode::INVALID_ARGUMENT, "alias may contain"});
  cases.back().req.set_alias("bad alias");
  cases.push_back({"alias like a UUID", {}, StatusCode::INVALID_ARGUMENT, "look like a key id"});
  cases.back().req.set_alias("0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00");
  cases.push_back(
      {"grant to an officer", {}, StatusCode::INVALID_ARGUMENT, "only apps may be granted"});
  cases.back().req.add_decrypt_principals("spiffe://custos.local/officer/officer2");
  cases.push_back(
      {"grant to a stranger", {}, StatusCode::INVALID_ARGUMENT, "is not an app in the policy"});
  cases.back().req.add_encrypt_principals("spiffe://custos.local/app/unknown");
  // One officer alone cannot create a key an app may use: that is a grant, under dual control.
  cases.push_back({"grant without approval",
                   {},
                   StatusCode::FAILED_PRECONDITION,
                   "creating a key that grants use of it needs 1 other officer(s) to approve, "
                   "as UpdateKeyGrants does; propose it with Propose(CreateKey)"});
  cases.back().req.set_alias(UniqueAlias("granted"));
  cases.back().req.add_decrypt_principals(kAppPrincipal);
  for (const Case& c : cases) {
    INFO(c.name);
    pb::KeyMetadata reply;
    grpc::Status status = admin->CreateKey(Context().get(), c.req, &reply);
    CHECK(status.error_code() == c.code);
    CHECK_THAT(status.error_message(), Catch::Contains(c.message));
  }
  CHECK(CatalogSnapshot(server) == before);
}

TEST_CASE("ListKeys pages through every key once", "[e2e][admin]") {
  CustosServer& server = CustosServer::Shared();
  for (int i = 0; i < 5; ++i) CreateKey(server, UniqueAlias("page"), false, false);
  auto admin = server.Admin("officer2");
  std::set<std::string> seen;
  size_t total = 0;
  pb::ListKeysRequest req;
  req.set_page_size(2);
  do {
    pb::ListKeysResponse page;
    REQUIRE(admin->ListKeys(Context().get(), req, &page).ok());
    CHECK(page.keys_size() <= 2);
    for (const auto& key : page.keys()) seen.insert(key.key_id());
    total += static_cast<size_t>(page.keys_size());
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  CHECK(total == seen.size());
  CHECK(total >= 5);

  pb::ListKeysRequest bad;
  bad.set_page_size(5000);
  pb::ListKeysResponse page;
  CHECK(admin->ListKeys(Context().get(), bad, &page).error_code() == StatusCode::INVALID_ARGUMENT);
}

TEST_CASE("DescribeKey of an unknown key is NOT_FOUND", "[e2e][admin]") {
  auto admin = CustosServer::Shared().Admin("officer1");
  pb::DescribeKeyRequest req;
  req.set_key("e2e/nothing-here");
  pb::KeyMetadata reply;
  grpc::Status status = admin->DescribeKey(Context().get(), req, &reply);
  CHECK(status.error_code() == StatusCode::NOT_FOUND);
  CHECK(status.error_message() == "no key with alias 'e2e/nothing-here'");
}

TEST_CASE("Apps and auditors are refused on AdminService", "[e2e][admin][authz]") {
  CustosServer& server = CustosServer::Shared();
  const std::string before = CatalogSnapshot(server);
  for (const char* who : {"app", "auditor"}) {
    auto admin = server.Admin(who);
    pb::CreateKeyRequest create;
    create.set_alias(UniqueAlias("refused"));
    pb::KeyMetadata reply;
    grpc::Status status = admin->CreateKey(Context().get(), create, &reply);
    INFO(who << ": " << status.error_message());
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
    CHECK_THAT(status.error_message(), Catch::Contains("may not perform CreateKey"));
    pb::ListKeysRequest list;
    pb::ListKeysResponse keys;
    status = admin->ListKeys(Context().get(), list, &keys);
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
    CHECK(keys.keys_size() == 0);
  }
  CHECK(CatalogSnapshot(server) == before);
}

}  // namespace
}  // namespace custos::testing
