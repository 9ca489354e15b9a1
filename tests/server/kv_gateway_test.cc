// How the key/value gateway names a client when it counts connections per address: the e2e
// tests reach it over IPv4 loopback and a dual-stack listener only, so the IPv6 /64 grouping is
// shown here on addresses no test host has.
#include "server/kv_gateway.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <httplib.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>

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
}

}  // namespace
}  // namespace custos::server
