// The key/value gateway in process, where a test must act at an exact moment: how it names a
// client when it counts connections per address (the e2e tests reach it over IPv4 loopback and
// a dual-stack listener only, so the IPv6 /64 grouping is shown here on addresses no test host
// has), how a key's reply is wiped, and a stop that begins while a key is being fetched.
#include "server/kv_gateway.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <httplib.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <mutex>
#include <regex>
#include <string>
#include <thread>

#include "tests/core/kms_fixture.h"
#include "tests/server/test_pki.h"

namespace custos::server {
namespace {

sockaddr_storage Peer(const std::string& text) {
  sockaddr_storage peer{};
  if (text.find(':') == std::string::npos) {
    auto* v4 = reinterpret_cast<sockaddr_in*>(&peer);
    v4->sin_family = AF_INET;
    v4->sin_port = htons(40001);
    REQUIRE(inet_pton(AF_INET, text.c_str(), &v4->sin_addr) == 1);
  } else {
    auto* v6 = reinterpret_cast<sockaddr_in6*>(&peer);
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(40001);
    REQUIRE(inet_pton(AF_INET6, text.c_str(), &v6->sin6_addr) == 1);
  }
  return peer;
}

TEST_CASE("The gateway counts an IPv4 client by its address and an IPv6 one by its /64",
          "[gateway]") {
  const std::pair<std::string, std::string> cases[] = {
      {"10.1.2.3", "10.1.2.3"},
      {"::ffff:10.1.2.3", "10.1.2.3"},  // from a dual-stack listener: the same client
      {"::ffff:10.1.2.4", "10.1.2.4"},  // and not the /64 every mapped address shares
      {"2001:db8:1:2::1", "2001:db8:1:2::/64"},
      {"2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"},
      {"2001:db8:1:3::1", "2001:db8:1:3::/64"},
      {"::1", "::/64"},
      {"fe80::1", "fe80::/64"},
  };
  for (const auto& [address, group] : cases) {
    INFO(address);
    CHECK(AddressGroup(Peer(address)) == group);
  }
  sockaddr_storage unix_peer{};
  unix_peer.ss_family = AF_UNIX;
  CHECK(AddressGroup(unix_peer).empty());
}

// The e2e tests show a key's reply is neither compressed nor partial copies; this shows its one
// buffer is wiped when the response goes, through the hooks cpp-httplib's server calls.
TEST_CASE("A key's reply is written from one buffer, wiped when the response is destroyed",
          "[gateway]") {
  const std::string key_json = R"({"data":{"data":{"data":")" + std::string(64, 'a') + R"("}}})";
  httplib::Response response;
  ReplySecret(response, key_json);
  CHECK(response.status == 200);
  CHECK(response.body.empty());  // no copy in the body, which a Range or gzip would copy again
  CHECK(response.get_header_value("Content-Type") == "application/json");
  REQUIRE(response.content_length_ == key_json.size());
  std::string written;
  httplib::DataSink sink;
  sink.write = [&](const char* data, size_t length) {
    written.append(data, length);
    return true;
  };
  // As the server writes it: whole, or a range from an offset.
  REQUIRE(response.content_provider_(0, key_json.size(), sink));
  CHECK(written == key_json);
  written.clear();
  REQUIRE(response.content_provider_(25, 64, sink));
  CHECK(written == std::string(64, 'a'));
  // Nothing past the body, however the range is asked.
  written.clear();
  CHECK_FALSE(response.content_provider_(0, key_json.size() + 1, sink));
  CHECK_FALSE(response.content_provider_(key_json.size() + 1, 0, sink));
  CHECK_FALSE(response.content_provider_(1, SIZE_MAX, sink));
  CHECK(written.empty());
  // The destructor calls the releaser; called here, the buffer it wiped can still be read.
  REQUIRE(response.content_provider_resource_releaser_);
  response.content_provider_resource_releaser_(true);
  written.clear();
  REQUIRE(response.content_provider_(0, key_json.size(), sink));
  CHECK(written == std::string(key_json.size(), '\0'));

  // What the gateway counts replies in flight by runs once, when the response goes, and after
  // the wipe.
  int released = 0;
  httplib::ContentProvider provider;  // (a copy holds the buffer as the response's does)
  {
    httplib::Response counted;
    ReplySecret(counted, key_json, [&](bool whole) {
      CHECK_FALSE(whole);  // (no server wrote it)
      ++released;
      written.clear();
      CHECK(provider(0, key_json.size(), sink));
      CHECK(written == std::string(key_json.size(), '\0'));
    });
    provider = counted.content_provider_;
    CHECK(released == 0);
  }
  CHECK(released == 1);
}

TEST_CASE("Every token a request carries is wiped in place, and nothing else", "[gateway]") {
  const std::string token = "cdt." + std::string(101, 'x');  // past any short-string buffer
  httplib::Request request;
  request.headers.emplace("X-Vault-Token", token);
  request.headers.emplace("x-vault-token", "cdt.short");  // (header names match in any case)
  request.headers.emplace("Host", "db-1");
  const std::string* const long_value = &request.headers.find("X-Vault-Token")->second;
  const char* const where = long_value->data();
  WipeTokens(request);
  const auto [begin, end] = request.headers.equal_range("X-Vault-Token");
  REQUIRE(std::distance(begin, end) == 2);
  for (auto header = begin; header != end; ++header) {
    CHECK(header->second.find_first_not_of('\0') == std::string::npos);
  }
  // In place: the buffer that held it holds zeros, not a copy elsewhere.
  CHECK(long_value->data() == where);
  CHECK(long_value->size() == token.size());
  CHECK(request.get_header_value("Host") == "db-1");
}

// cpp-httplib writes no more of a provided body once its listener stops: a key fetched from
// Kms as the gateway began to stop went out as headers without a body, its fetch recorded as
// served. Stopping waits for such replies to be sent.
TEST_CASE("A key fetched as the gateway begins to stop is sent whole", "[gateway]") {
  core::testing::Fixture f;
  f.NewKeyWithoutGrants("tde-seal");
  core::OperationParams tde;
  tde.tde = {"mariadb", 1, "tde-seal"};
  f.Executed(policy::Operation::kCreateTdeKey, tde);
  const std::string token = f.ClaimTdeToken(f.IssueTdeToken("mariadb", {1}));

  const int64_t now = std::time(nullptr);
  const testing::TestCa ca("Custos Test CA", now - 3600, now + 3600);
  testing::LeafSpec leaf;
  leaf.cn = "localhost";
  leaf.eku = "serverAuth";
  leaf.not_before = now - 3600;
  leaf.not_after = now + 3600;
  std::string key_pem;
  testing::WriteFile(f.dir.File("gateway.crt"), ca.Issue(leaf, &key_pem));
  testing::WriteFile(f.dir.File("gateway.key"), key_pem, 0600);
  absl::StatusOr<std::unique_ptr<KvGateway>> gateway =
      KvGateway::Start(f.kms.get(), {.listen = "127.0.0.1:0",
                                     .cert = f.dir.File("gateway.crt"),
                                     .key = f.dir.File("gateway.key")});
  INFO(gateway.status().ToString());
  REQUIRE(gateway.ok());
  httplib::SSLClient client("127.0.0.1", (*gateway)->port());
  client.enable_server_certificate_verification(false);
  client.set_read_timeout(10);

  // Inside Kms, the fetch starts the stop on another thread, and goes on once stopping has
  // had time to reach its wait.
  // (The mutex orders the hook's thread and this one for ThreadSanitizer, which does not see
  // the socket between them.)
  std::mutex stopping_mu;
  std::thread stopping;
  f.hsm->BeforeNextCall([&] {
    {
      std::lock_guard lock(stopping_mu);
      stopping = std::thread([&] { gateway->reset(); });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  });
  const httplib::Result fetched = client.Get("/v1/mariadb/data/1", {{"X-Vault-Token", token}});
  {
    std::lock_guard lock(stopping_mu);
    REQUIRE(stopping.joinable());
    stopping.join();
  }
  REQUIRE(fetched);
  CHECK(fetched->status == 200);
  CHECK(std::regex_match(fetched->body, std::regex(R"(\{"data":\{"data":\{"data":"[0-9a-f]{64}"\},)"
                                                   R"("metadata":\{"version":1\}\}\})")));
  // Recorded as served, as it was.
  const audit::Event served = f.sink.events().back();
  CHECK(served.action == "FetchTdeKey");
  CHECK(served.outcome == absl::StatusCode::kOk);
}

}  // namespace
}  // namespace custos::server
