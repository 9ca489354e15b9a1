#include "common/secure_bytes.h"

#include <catch2/catch.hpp>

namespace custos {
namespace {

TEST_CASE("SecureBytes moves leave the source empty", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("secret");
  SecureBytes b = std::move(a);
  CHECK(a.empty());  // NOLINT(bugprone-use-after-move): the moved-from state is the contract.
  CHECK(b.view() == "secret");
}

TEST_CASE("SecureBytes::Truncate wipes the cut-off tail", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("abcdef");
  const uint8_t* tail = a.data() + 3;
  a.Truncate(3);
  CHECK(a.view() == "abc");
  // The vector keeps its capacity, so the bytes past the end are still ours to inspect.
  CHECK(tail[0] == 0);
  CHECK(tail[1] == 0);
  CHECK(tail[2] == 0);
}

TEST_CASE("SecureBytes::Clone is an independent copy", "[secure_bytes]") {
  SecureBytes a = SecureBytes::FromString("key");
  SecureBytes b = a.Clone();
  a.Wipe();
  CHECK(a.empty());
  CHECK(b.view() == "key");
}

}  // namespace
}  // namespace custos
