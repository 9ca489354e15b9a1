// Dual control end to end: the demo state needs one other officer's approval for every change.
#include <catch2/catch.hpp>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

pb::ChangeRequest Propose(CustosServer& server, const std::string& who, pb::Operation operation,
                          const std::string& key, grpc::Status* status) {
  pb::ProposeRequest req;
  req.set_operation(operation);
  req.set_key(key);
  req.set_justification("e2e: scheduled change");
  pb::ChangeRequest reply;
  *status = server.Admin(who)->Propose(Context().get(), req, &reply);
  return reply;
}

grpc::Status Approve(CustosServer& server, const std::string& who, const pb::ChangeRequest& request,
                     pb::ChangeRequest* reply) {
  pb::ApproveRequest req;
  req.set_request_id(request.request_id());
  req.set_digest(request.digest());
  return server.Admin(who)->Approve(Context().get(), req, reply);
}

pb::KeyMetadata Describe(CustosServer& server, const std::string& key) {
  pb::DescribeKeyRequest req;
  req.set_key(key);
  pb::KeyMetadata reply;
  REQUIRE(server.Admin("officer1")->DescribeKey(Context().get(), req, &reply).ok());
  return reply;
}

TEST_CASE("A rotation needs a second officer and executes once", "[e2e][dual]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("rotate");
  const pb::KeyMetadata key = CreateKey(server, alias, true, true);
  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  pb::GenerateDataKeyResponse old_dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &old_dk).ok());

  grpc::Status status;
  const pb::ChangeRequest proposed = Propose(server, "officer1", pb::ROTATE_KEY, alias, &status);
  INFO(status.error_message());
  REQUIRE(status.ok());
  CHECK(proposed.state() == pb::PENDING);
  CHECK(proposed.operation() == pb::ROTATE_KEY);
  CHECK(proposed.key_id() == key.key_id());
  CHECK(proposed.approvals_required() == 1);
  CHECK(proposed.proposer() == "spiffe://custos.local/officer/officer1");
  CHECK(proposed.digest().size() == 64);

  pb::ChangeRequest reply;
  status = Approve(server, "officer1", proposed, &reply);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  CHECK_THAT(status.error_message(), Catch::Contains("cannot approve it"));
  for (const char* who : {"app", "auditor"}) {
    status = Approve(server, who, proposed, &reply);
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  }
  CHECK(Describe(server, alias).primary_version() == 1);

  // An approval names the request as reviewed: none, or another request's digest, is refused.
  pb::ChangeRequest tampered = proposed;
  tampered.set_digest("");
  status = Approve(server, "officer2", tampered, &reply);
  CHECK(status.error_code() == StatusCode::INVALID_ARGUMENT);
  tampered.set_digest(std::string(64, '0'));
  status = Approve(server, "officer2", tampered, &reply);
  CHECK(status.error_code() == StatusCode::FAILED_PRECONDITION);
  CHECK_THAT(status.error_message(), Catch::Contains("is not the request you reviewed"));
  CHECK(Describe(server, alias).primary_version() == 1);

  status = Approve(server, "officer2", proposed, &reply);
  INFO(status.error_message());
  REQUIRE(status.ok());
  CHECK(reply.state() == pb::EXECUTED);
  CHECK(reply.approvals_size() == 1);
  CHECK(reply.approvals(0).principal() == "spiffe://custos.local/officer/officer2");
  const pb::KeyMetadata rotated = Describe(server, alias);
  CHECK(rotated.primary_version() == 2);
  CHECK(rotated.versions_size() == 2);

  status = Approve(server, "officer2", proposed, &reply);
  CHECK(status.error_code() == StatusCode::FAILED_PRECONDITION);
  CHECK(status.error_message() == "request " + proposed.request_id() +
                                      " is EXECUTED; only PENDING requests accept approvals or "
                                      "rejections");
  CHECK(Describe(server, alias).primary_version() == 2);

  // Old blobs still decrypt; new data keys use version 2.
  pb::DecryptRequest decrypt;
  decrypt.set_ciphertext_blob(old_dk.ciphertext_blob());
  pb::DecryptResponse opened;
  REQUIRE(server.Keys("app")->Decrypt(Context().get(), decrypt, &opened).ok());
  CHECK(opened.plaintext() == old_dk.plaintext());
  pb::GenerateDataKeyResponse new_dk;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &new_dk).ok());
  CHECK(new_dk.key_version() == 2);
}

TEST_CASE("Rejected and unknown requests change nothing", "[e2e][dual]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("reject");
  CreateKey(server, alias, true, true);
  grpc::Status status;
  const pb::ChangeRequest proposed = Propose(server, "officer1", pb::DISABLE_KEY, alias, &status);
  REQUIRE(status.ok());

  // A second change to the same key waits for the first.
  Propose(server, "officer2", pb::SCHEDULE_KEY_DELETION, alias, &status);
  CHECK(status.error_code() == StatusCode::FAILED_PRECONDITION);
  CHECK_THAT(status.error_message(),
             Catch::Contains("already has pending request " + proposed.request_id()));

  pb::RejectRequest reject;
  reject.set_request_id(proposed.request_id());
  reject.set_reason("wrong key");
  pb::ChangeRequest reply;
  REQUIRE(server.Admin("officer2")->Reject(Context().get(), reject, &reply).ok());
  CHECK(reply.state() == pb::REJECTED);
  CHECK(reply.rejected_by() == "spiffe://custos.local/officer/officer2");
  status = Approve(server, "officer2", proposed, &reply);
  CHECK(status.error_code() == StatusCode::FAILED_PRECONDITION);
  CHECK(Describe(server, alias).state() == pb::ENABLED);

  pb::ChangeRequest unknown;
  unknown.set_request_id("0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00");
  unknown.set_digest(proposed.digest());
  status = Approve(server, "officer2", unknown, &reply);
  CHECK(status.error_code() == StatusCode::NOT_FOUND);
  // What is no request id, or an approval without a digest, is refused before any lookup.
  unknown.set_digest("");
  status = Approve(server, "officer2", unknown, &reply);
  CHECK(status.error_code() == StatusCode::INVALID_ARGUMENT);
  CHECK(status.error_message() ==
        "an approval must name the digest of the request as reviewed (GetRequest shows it)");
  unknown.set_request_id("0B5E7D0C-1C7A-4B8E-9D7E-2F8A5C3B1D00");
  unknown.set_digest(proposed.digest());
  status = Approve(server, "officer2", unknown, &reply);
  CHECK(status.error_code() == StatusCode::INVALID_ARGUMENT);
  CHECK(status.error_message() ==
        "request_id is not a request id: Propose returns them as lower-case UUIDs");

  pb::ListRequestsRequest list;
  list.set_key(alias);
  pb::ListRequestsResponse listed;
  REQUIRE(server.Admin("officer1")->ListRequests(Context().get(), list, &listed).ok());
  REQUIRE(listed.requests_size() == 2);  // the key's creation was a request too
  // Newest first; two made in the same second come in id order.
  const bool rejected_first = listed.requests(0).request_id() == proposed.request_id();
  const pb::ChangeRequest& rejected = listed.requests(rejected_first ? 0 : 1);
  const pb::ChangeRequest& creation = listed.requests(rejected_first ? 1 : 0);
  CHECK(rejected.request_id() == proposed.request_id());
  CHECK(rejected.state() == pb::REJECTED);
  CHECK(creation.operation() == pb::CREATE_KEY);
  CHECK(creation.state() == pb::EXECUTED);
  CHECK(creation.approvals_required() == 1);
  list.set_state(pb::PENDING);
  REQUIRE(server.Admin("officer1")->ListRequests(Context().get(), list, &listed).ok());
  CHECK(listed.requests_size() == 0);

  Propose(server, "app", pb::ROTATE_KEY, alias, &status);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  const pb::ChangeRequest open = Propose(server, "officer1", pb::DISABLE_KEY, alias, &status);
  REQUIRE(status.ok());
  for (const char* who : {"app", "auditor"}) {
    pb::RejectRequest veto;
    veto.set_request_id(open.request_id());
    veto.set_reason("not mine to decide");
    status = server.Admin(who)->Reject(Context().get(), veto, &reply);
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  }
  pb::GetRequestRequest get;
  get.set_request_id(open.request_id());
  REQUIRE(server.Admin("officer2")->GetRequest(Context().get(), get, &reply).ok());
  CHECK(reply.state() == pb::PENDING);
  Propose(server, "auditor", pb::ROTATE_KEY, alias, &status);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
}

TEST_CASE("Disable, enable and grant changes go through approval", "[e2e][dual]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("lifecycle");
  CreateKey(server, alias, true, true);
  grpc::Status status;
  pb::ChangeRequest reply;
  const pb::ChangeRequest disable = Propose(server, "officer2", pb::DISABLE_KEY, alias, &status);
  REQUIRE(status.ok());
  REQUIRE(Approve(server, "officer1", disable, &reply).ok());
  CHECK(Describe(server, alias).state() == pb::DISABLED);

  pb::GenerateDataKeyRequest gdk;
  gdk.set_key(alias);
  pb::GenerateDataKeyResponse dk;
  status = server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk);
  CHECK(status.error_code() == StatusCode::FAILED_PRECONDITION);
  CHECK_THAT(status.error_message(), Catch::EndsWith("is DISABLED; only ENABLED keys can be used"));

  const pb::ChangeRequest enable = Propose(server, "officer1", pb::ENABLE_KEY, alias, &status);
  REQUIRE(status.ok());
  REQUIRE(Approve(server, "officer2", enable, &reply).ok());
  CHECK(server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk).ok());

  pb::ProposeRequest grants;
  grants.set_operation(pb::UPDATE_KEY_GRANTS);
  grants.set_key(alias);
  grants.set_justification("app no longer encrypts");
  grants.add_decrypt_principals(kAppPrincipal);
  pb::ChangeRequest proposed;
  REQUIRE(server.Admin("officer1")->Propose(Context().get(), grants, &proposed).ok());
  REQUIRE(Approve(server, "officer2", proposed, &reply).ok());
  status = server.Keys("app")->GenerateDataKey(Context().get(), gdk, &dk);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
}

}  // namespace
}  // namespace custos::testing
