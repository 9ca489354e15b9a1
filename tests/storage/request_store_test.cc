// KeyStore's dual-control requests: GetRequest, ListRequests, PendingRequests.
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include <catch2/catch.hpp>

#include "storage/key_store.h"
#include "tests/storage/store_test_util.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using namespace custos::storage::test;  // NOLINT: the shared helpers

std::string RequestId(int n) {
  char id[40];
  std::snprintf(id, sizeof(id), "20000000-0000-4000-8000-%012d", n);
  return id;
}

RequestRecord MakeRequest(int n, std::string key_id, int64_t created_at,
                          RequestState state = RequestState::kPending) {
  RequestRecord request;
  request.id = RequestId(n);
  request.operation = key_id.empty() ? "RotateRootKey" : "ScheduleKeyDeletion";
  request.key_id = std::move(key_id);
  request.parameters = "key_id=" + request.key_id + "\nwaiting_days=30";
  request.justification = "request " + std::to_string(n);
  request.proposer = "officer/alice";
  request.created_at = created_at;
  request.expires_at = created_at + 86400;
  request.state = state;
  return request;
}

void CheckSameRequest(const RequestRecord& got, const RequestRecord& want) {
  CHECK(got.id == want.id);
  CHECK(got.operation == want.operation);
  CHECK(got.key_id == want.key_id);
  CHECK(got.parameters == want.parameters);
  CHECK(got.justification == want.justification);
  CHECK(got.proposer == want.proposer);
  CHECK(got.created_at == want.created_at);
  CHECK(got.expires_at == want.expires_at);
  CHECK(got.state == want.state);
  REQUIRE(got.approvals.size() == want.approvals.size());
  for (size_t i = 0; i < got.approvals.size(); ++i) {
    CHECK(got.approvals[i].principal == want.approvals[i].principal);
    CHECK(got.approvals[i].at == want.approvals[i].at);
  }
  CHECK(got.rejected_by == want.rejected_by);
  CHECK(got.reason == want.reason);
  CHECK(got.closed_at == want.closed_at);
}

absl::Status Write(KeyStore& store, std::vector<RequestRecord> requests) {
  WriteBatch batch;
  batch.requests = std::move(requests);
  return store.Apply(batch);
}

std::vector<std::string> Ids(const std::vector<RequestRecord>& requests) {
  std::vector<std::string> ids;
  for (const RequestRecord& request : requests) ids.push_back(request.id);
  return ids;
}

TEST_CASE("A request round-trips every field, approvals in the order given", "[requests]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto store = OpenStore(path);
  RequestRecord request = MakeRequest(1, IdFor(7), 1700000000);
  // Not in any sorted order: the store keeps the order given.
  request.approvals = {
      {"officer/zed", 1700000100}, {"officer/amy", 1700000050}, {"officer/mike", 1700000200}};
  REQUIRE(Write(*store, {request}).ok());
  CheckSameRequest(store->GetRequest(request.id).value(), request);
  CheckSameRequest(Reopen(store, path)->GetRequest(request.id).value(), request);

  SECTION("replacing it replaces its approvals") {
    request.state = RequestState::kRejected;
    request.approvals = {{"officer/mike", 1700000200}};
    request.rejected_by = "officer/bob";
    request.reason = "not this quarter";
    request.closed_at = 1700000300;
    REQUIRE(Write(*store, {request}).ok());
    CheckSameRequest(Reopen(store, path)->GetRequest(request.id).value(), request);
    CHECK(QueryFile(path, "SELECT count(*) FROM request_approvals") == "1");
    CHECK(QueryFile(path, "SELECT count(*) FROM requests") == "1");
  }
  SECTION("an approval appended keeps the others' order") {
    request.approvals.push_back({"officer/bea", 1700000250});
    REQUIRE(Write(*store, {request}).ok());
    CheckSameRequest(Reopen(store, path)->GetRequest(request.id).value(), request);
  }
  SECTION("a request on no single key has an empty key_id") {
    RequestRecord root = MakeRequest(2, "", 1700000001, RequestState::kExecuted);
    root.reason = "root key rotated: 12 versions re-wrapped";
    REQUIRE(Write(*store, {root}).ok());
    CheckSameRequest(Reopen(store, path)->GetRequest(root.id).value(), root);
    CHECK(QueryFile(path, "SELECT count(*) FROM requests WHERE key_id IS NULL") == "1");
  }
}

TEST_CASE("GetRequest of an unknown id is NOT_FOUND naming it", "[requests]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  REQUIRE(Write(*store, {MakeRequest(1, IdFor(1), 1)}).ok());
  auto missing = store->GetRequest("nope");
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(missing.status().message() == "no request with id 'nope'");
  CHECK(store->GetRequest("").status().code() == absl::StatusCode::kNotFound);
}

// 23 requests over 3 keys (and none), in every state, several sharing a creation time so the
// id decides their order.
std::vector<RequestRecord> Population() {
  const std::vector<std::string> keys = {IdFor(1), IdFor(2), IdFor(3), ""};
  const RequestState states[] = {RequestState::kPending, RequestState::kExecuted,
                                 RequestState::kRejected, RequestState::kExpired,
                                 RequestState::kFailed};
  std::vector<RequestRecord> requests;
  for (int n = 0; n < 23; ++n) {
    // Created in a scrambled order; times repeat every 3 requests.
    const int m = (n * 7) % 23;
    RequestRecord request =
        MakeRequest(m, keys[m % keys.size()], 1700000000 + (m / 3) * 60, states[(m / 2) % 5]);
    request.approvals = {{"officer/bob", request.created_at + 1}};
    requests.push_back(request);
  }
  return requests;
}

// What a listing with `filter` must return: newest first, by (created_at, id).
std::vector<std::string> Expected(const std::vector<RequestRecord>& all,
                                  const RequestFilter& filter) {
  std::vector<RequestRecord> matching;
  for (const RequestRecord& request : all) {
    if (filter.state.has_value() && request.state != *filter.state) continue;
    if (!filter.key_id.empty() && request.key_id != filter.key_id) continue;
    matching.push_back(request);
  }
  std::sort(matching.begin(), matching.end(), [](const auto& a, const auto& b) {
    return std::tie(a.created_at, a.id) > std::tie(b.created_at, b.id);
  });
  return Ids(matching);
}

TEST_CASE("ListRequests pages through every match, newest first", "[requests]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  const std::vector<RequestRecord> all = Population();
  REQUIRE(Write(*store, all).ok());

  RequestFilter filter;
  SECTION("no filter") {}
  SECTION("by state") { filter.state = RequestState::kPending; }
  SECTION("by state, another") { filter.state = RequestState::kFailed; }
  SECTION("by key") { filter.key_id = IdFor(2); }
  SECTION("by state and key") {
    filter.state = RequestState::kExecuted;
    filter.key_id = IdFor(3);
  }
  SECTION("by a key with no requests") { filter.key_id = IdFor(99); }
  const std::vector<std::string> want = Expected(all, filter);
  for (size_t page_size : {size_t{1}, size_t{3}, size_t{4}, size_t{1000}}) {
    INFO("page size " << page_size);
    std::vector<std::string> seen;
    std::string token;
    size_t pages = 0;
    do {
      auto page = store->ListRequests(filter, page_size, token);
      REQUIRE(page.ok());
      ++pages;
      CHECK(page->requests.size() <= page_size);
      for (const RequestRecord& request : page->requests) {
        CHECK(request.approvals.size() == 1);  // Approvals come along.
      }
      const auto ids = Ids(page->requests);
      seen.insert(seen.end(), ids.begin(), ids.end());
      token = page->next_page_token;
    } while (!token.empty());
    CHECK(seen == want);
    // A page that ends exactly at the end carries no token: no empty page follows.
    CHECK(pages == std::max<size_t>(1, (want.size() + page_size - 1) / page_size));
  }
}

TEST_CASE("ListRequests: first page exact, and the sanity of its arguments", "[requests]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  REQUIRE(Write(*store, {MakeRequest(1, IdFor(1), 100), MakeRequest(2, IdFor(1), 300),
                         MakeRequest(3, IdFor(2), 200), MakeRequest(4, IdFor(2), 300)})
              .ok());
  auto page = store->ListRequests({}, 3, "");
  REQUIRE(page.ok());
  CHECK(Ids(page->requests) == std::vector<std::string>{RequestId(4), RequestId(2), RequestId(3)});
  REQUIRE_FALSE(page->next_page_token.empty());
  auto rest = store->ListRequests({}, 3, page->next_page_token);
  REQUIRE(rest.ok());
  CHECK(Ids(rest->requests) == std::vector<std::string>{RequestId(1)});
  CHECK(rest->next_page_token.empty());
  CheckSameRequest(rest->requests[0], MakeRequest(1, IdFor(1), 100));

  auto empty = OpenStore(dir.File("empty.db"))->ListRequests({}, 10, "");
  REQUIRE(empty.ok());
  CHECK(empty->requests.empty());
  CHECK(empty->next_page_token.empty());

  CHECK(store->ListRequests({}, 0, "").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->ListRequests({}, 1001, "").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->ListRequests({}, 1000, "").ok());
  // Not hex; odd length; hex of "no-colon", of "x:id", of "5:" (no id) and of ":id".
  for (const char* token :
       {"zz", "abc", "ABCD", "6e6f2d636f6c6f6e", "783a6964", "353a", "3a6964"}) {
    INFO("token: " << token);
    auto bad = store->ListRequests({}, 10, token);
    CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(bad.status().message()), Catch::Contains("ListRequests"));
  }
}

TEST_CASE("PendingRequests lists every PENDING request, oldest first", "[requests]") {
  TempDir dir;
  auto store = OpenStore(dir.File("keys.db"));
  CHECK(store->PendingRequests().value().empty());
  const std::vector<RequestRecord> all = Population();
  REQUIRE(Write(*store, all).ok());
  RequestFilter pending;
  pending.state = RequestState::kPending;
  std::vector<std::string> want = Expected(all, pending);
  std::reverse(want.begin(), want.end());
  REQUIRE(want.size() >= 4);
  auto got = store->PendingRequests();
  REQUIRE(got.ok());
  CHECK(Ids(*got) == want);
  for (const RequestRecord& request : *got) CHECK(request.approvals.size() == 1);

  // Past its expiry but not yet marked EXPIRED: still pending, for the sweep to close.
  RequestRecord old = MakeRequest(99, IdFor(1), 1);
  old.expires_at = 2;
  REQUIRE(Write(*store, {old}).ok());
  CHECK(store->PendingRequests().value().front().id == old.id);
  old.state = RequestState::kExpired;
  old.closed_at = 3;
  REQUIRE(Write(*store, {old}).ok());
  CHECK(Ids(store->PendingRequests().value()) == want);
}

TEST_CASE("RequestStateName", "[requests]") {
  CHECK(RequestStateName(RequestState::kPending) == "PENDING");
  CHECK(RequestStateName(RequestState::kExecuted) == "EXECUTED");
  CHECK(RequestStateName(RequestState::kRejected) == "REJECTED");
  CHECK(RequestStateName(RequestState::kExpired) == "EXPIRED");
  CHECK(RequestStateName(RequestState::kFailed) == "FAILED");
}

}  // namespace
}  // namespace custos::storage
