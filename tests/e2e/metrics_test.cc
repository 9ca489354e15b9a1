// The Prometheus endpoint of a real custosd ([metrics] listen on loopback): calls by method and
// status code with their latencies, HSM calls, group commits, the key cache, keys by state,
// pending requests, the audit log's length and checkpoint age; never a principal, key id or
// context value; nothing but GET /metrics; off unless configured, and loopback only.
#include <httplib.h>

#include <catch2/catch.hpp>
#include <regex>
#include <string>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

std::string Scrape(const CustosServer& server, const std::string& path = "/metrics",
                   int* status = nullptr) {
  httplib::Client client("127.0.0.1", server.metrics_port());
  client.set_read_timeout(5, 0);
  const httplib::Result result = client.Get(path);
  REQUIRE(result);
  if (status != nullptr) *status = result->status;
  return result->body;
}

// The value of the sample line that starts with `series` ("name{labels}"); -1 if absent.
double Sample(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

grpc::Status GenerateDataKey(const CustosServer& server, const std::string& as,
                             const std::string& key) {
  pb::GenerateDataKeyRequest req;
  req.set_key(key);
  (*req.mutable_encryption_context())["patient"] = "context-value-never-shown";
  pb::GenerateDataKeyResponse reply;
  return server.Keys(as)->GenerateDataKey(Context().get(), req, &reply);
}

TEST_CASE("The metrics endpoint counts calls, HSM work, commits and the catalogue",
          "[e2e][metrics]") {
  CustosServer server(ServerOptions{.extra_config = "[metrics]\nlisten = \"127.0.0.1:0\"\n"});
  REQUIRE(server.metrics_port() > 0);
  const pb::KeyMetadata key = CreateKey(server, "metrics/key", true, true);
  for (int i = 0; i < 5; ++i) REQUIRE(GenerateDataKey(server, "app", key.key_id()).ok());
  CHECK(GenerateDataKey(server, "officer1", key.key_id()).error_code() ==
        StatusCode::PERMISSION_DENIED);
  pb::ProposeRequest rotate;
  rotate.set_operation(pb::ROTATE_KEY);
  rotate.set_key(key.key_id());
  rotate.set_justification("metrics");
  pb::ChangeRequest pending;
  REQUIRE(server.Admin("officer1")->Propose(Context().get(), rotate, &pending).ok());

  int status = 0;
  const std::string text = "\n" + Scrape(server, "/metrics", &status);
  INFO(text);
  CHECK(status == 200);
  CHECK(Sample(text, R"(custos_requests_total{method="GenerateDataKey",code="OK"})") == 5);
  CHECK(Sample(text,
               R"(custos_requests_total{method="GenerateDataKey",code="PERMISSION_DENIED"})") == 1);
  CHECK(Sample(text, R"(custos_request_duration_seconds_count{method="GenerateDataKey"})") == 6);
  CHECK(Sample(text,
               R"(custos_request_duration_seconds_bucket{method="GenerateDataKey",le="+Inf"})") ==
        6);
  CHECK(Sample(text, R"(custos_requests_total{method="Propose",code="OK"})") ==
        2);  // + CreateKey's
  // Each data key is drawn and sealed in one HSM call.
  CHECK(Sample(text, R"(custos_hsm_call_duration_seconds_count{operation="GenerateDataKey"})") ==
        5);
  CHECK(Sample(text, R"(custos_hsm_call_duration_seconds_count{operation="Encrypt"})") == 0);
  CHECK(Sample(text, R"(custos_hsm_call_duration_seconds_count{operation="SignSha256"})") >= 0);
  CHECK(Sample(text, R"(custos_hsm_key_cache_lookups_total{result="hit"})") >= 4);
  CHECK(Sample(text, R"(custos_hsm_key_cache_lookups_total{result="miss"})") >= 1);
  // Five calls with one context: the first computes its HMAC, the other four find it.
  CHECK(Sample(text, R"(custos_context_hmac_cache_lookups_total{result="hit"})") >= 4);
  CHECK(Sample(text, R"(custos_context_hmac_cache_lookups_total{result="miss"})") >= 1);
  CHECK(Sample(text, "custos_audit_commit_batch_size_count") >= 1);
  CHECK(Sample(text, "custos_audit_commit_duration_seconds_count") ==
        Sample(text, "custos_audit_commit_batch_size_count"));
  CHECK(Sample(text, R"(custos_keys{state="ENABLED"})") == 1);
  CHECK(Sample(text, R"(custos_keys{state="DESTROYED"})") == 0);
  CHECK(Sample(text, "custos_pending_requests") == 1);
  CHECK(Sample(text, "custos_audit_records") >= 8);
  CHECK(Sample(text, "custos_audit_archived_through") == 0);
  CHECK(Sample(text, R"(custos_database_bytes{file="db"})") > 0);
  CHECK(Sample(text, "custos_audit_checkpoint_age_seconds") >= 0);
  CHECK(Sample(text, R"(custos_calls_waiting{lane="data"})") == 0);
  CHECK(Sample(text, R"(custos_calls_waiting{lane="officer"})") == 0);
  CHECK(Sample(text, R"(custos_calls_waiting{lane="auditor"})") == 0);
  CHECK(Sample(text, "custos_usage_tracked_keys") == 1);  // the one key used
  CHECK(Sample(text, R"(custos_calls_turned_away_total{reason="queue_full"})") == 0);
  CHECK_THAT(text, Catch::Contains("# TYPE custos_requests_total counter\n"));
  CHECK_THAT(text, Catch::Contains("# TYPE custos_request_duration_seconds histogram\n"));
  CHECK_THAT(text, Catch::Contains("# TYPE custos_keys gauge\n"));
  // Every sample line is "name{labels} number": the text format, nothing else.
  const std::regex line(
      R"(^(# (HELP|TYPE) .*|[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [-+0-9.eInf]+)$)");
  size_t start = 1;
  for (size_t end = text.find('\n', start); end != std::string::npos;
       start = end + 1, end = text.find('\n', start)) {
    const std::string one = text.substr(start, end - start);
    INFO(one);
    CHECK(std::regex_match(one, line));
  }
  // Nothing that names who or what: no principal, key id, alias or context value.
  CHECK_THAT(text, !Catch::Contains("spiffe"));
  CHECK_THAT(text, !Catch::Contains(key.key_id()));
  CHECK_THAT(text, !Catch::Contains("metrics/key"));
  CHECK_THAT(text, !Catch::Contains("context-value-never-shown"));

  Scrape(server, "/", &status);
  CHECK(status == 404);
  Scrape(server, "/metrics/../admin", &status);
  CHECK(status == 404);
}

TEST_CASE("The metrics endpoint is off by default and loopback only", "[e2e][metrics]") {
  CustosServer& server = CustosServer::Shared();
  CHECK(server.metrics_port() == 0);
  std::string output;
  CustosServer stopped;
  stopped.Stop();
  stopped.EditConfig("[server]\n", "[metrics]\nlisten = \"0.0.0.0:9464\"\n\n[server]\n");
  CHECK(RunCustosd("--config " + stopped.state_dir() + "/custosd.toml", &output) == 1);
  CHECK_THAT(output, Catch::Contains("metrics.listen must be on a loopback address"));
}

}  // namespace
}  // namespace custos::testing
