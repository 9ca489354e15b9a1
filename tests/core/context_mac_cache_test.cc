#include "core/context_mac_cache.h"

#include <catch2/catch.hpp>

#include "tests/core/kms_fixture.h"

namespace custos::core {
namespace {

using testing::Fixture;

std::span<const uint8_t> Bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST_CASE("The context cache is bounded and drops the least recently used first", "[context]") {
  ContextMacCache cache(2);
  const std::string a = cache.KeyOf("p", Bytes("a")), b = cache.KeyOf("p", Bytes("b")),
                    c = cache.KeyOf("p", Bytes("c"));
  CHECK(a.size() == 32);
  CHECK(a != b);
  cache.Insert(a, "mac-a");
  cache.Insert(b, "mac-b");
  CHECK(cache.Find(a) == "mac-a");  // a is now the most recent
  cache.Insert(c, "mac-c");
  CHECK(cache.size() == 2);
  CHECK(cache.Find(b) == std::nullopt);
  CHECK(cache.Find(a) == "mac-a");
  CHECK(cache.Find(c) == "mac-c");
}

TEST_CASE("The context cache names contexts by a salted digest, never by their values",
          "[context]") {
  ContextMacCache one(10), other(10);
  const std::string key = one.KeyOf("p", Bytes("mrn=448812"));
  CHECK(key == one.KeyOf("p", Bytes("mrn=448812")));
  CHECK(key != other.KeyOf("p", Bytes("mrn=448812")));  // another process's salt
  CHECK(key.find("448812") == std::string::npos);
  CHECK(key != one.KeyOf("q", Bytes("mrn=448812")));  // another principal's entry
  CHECK(one.KeyOf("ab", Bytes("c")) != one.KeyOf("a", Bytes("bc")));
  ContextMacCache off(0);
  off.Insert(off.KeyOf("p", Bytes("x")), "mac");
  CHECK(off.size() == 0);
  CHECK(off.Find(off.KeyOf("p", Bytes("x"))) == std::nullopt);
}

TEST_CASE("A repeated context costs one HSM call and records the same HMAC", "[context][kms]") {
  Fixture f;
  f.NewKey("ctx");
  const EncryptionContext context = {{"mrn", "448812"}};
  const EncryptionContext other = {{"mrn", "448813"}};
  REQUIRE(f.kms->GenerateDataKey(f.app, "ctx", context, 32, false).ok());
  const int64_t first = f.hsm->calls();
  REQUIRE(f.kms->GenerateDataKey(f.app, "ctx", context, 32, false).ok());
  const int64_t second = f.hsm->calls();
  REQUIRE(f.kms->GenerateDataKey(f.app, "ctx", other, 32, false).ok());
  const int64_t third = f.hsm->calls();
  CHECK(third - second == second - first + 1);  // only the new context asks the HSM for its HMAC
  std::vector<audit::Record> records = *f.store->ReadAudit(1, 1000);
  std::erase_if(records, [](const audit::Record& r) {
    return r.action != "GenerateDataKeyWithoutPlaintext";
  });
  REQUIRE(records.size() == 3);
  CHECK(records[0].context_hmac == records[1].context_hmac);
  CHECK(records[0].context_hmac != records[2].context_hmac);
  // The cached HMAC is the HSM's: a fresh Kms (empty cache) records the same one.
  const std::string recorded = records[1].context_hmac;
  f.Restart();
  REQUIRE(f.kms->GenerateDataKey(f.app, "ctx", context, 32, false).ok());
  records = *f.store->ReadAudit(1, 1000);
  CHECK(records.back().action == "GenerateDataKeyWithoutPlaintext");
  CHECK(records.back().context_hmac == recorded);
}

}  // namespace
}  // namespace custos::core
