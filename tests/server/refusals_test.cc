#include "server/refusals.h"

#include <catch2/catch.hpp>

namespace custos::server {
namespace {

TEST_CASE("PeerAddress drops the port so that a reconnecting client stays one tally",
          "[refusals]") {
  CHECK(PeerAddress("ipv4:10.0.0.7:53211") == "ipv4:10.0.0.7");
  CHECK(PeerAddress("ipv6:[::1]:53211") == "ipv6:[::1]");
  CHECK(PeerAddress("ipv6:%5B::1%5D:53211") == "ipv6:[::1]");  // as gRPC 1.51 writes it
  CHECK(PeerAddress("ipv6:[fe80::1%eth0]:1") == "ipv6:[fe80::1%eth0]");
  CHECK(PeerAddress("ipv6:::1") == "ipv6:::1");  // no brackets: no port to tell apart
  CHECK(PeerAddress("unix:/run/custos.sock") == "unix:/run/custos.sock");
  CHECK(PeerAddress("ipv4:") == "ipv4:");
  CHECK(PeerAddress("") == "");
}

}  // namespace
}  // namespace custos::server
