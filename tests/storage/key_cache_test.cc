#include "storage/key_cache.h"

#include <catch2/catch.hpp>

namespace custos::storage {
namespace {

std::shared_ptr<const KeyRecord> Key(std::string id, std::string alias = "") {
  auto key = std::make_shared<KeyRecord>();
  key->id = std::move(id);
  key->alias = std::move(alias);
  return key;
}

TEST_CASE("KeyCache finds keys by id and alias", "[key_cache]") {
  KeyCache cache(4);
  cache.Put(Key("a", "alpha"));
  cache.Put(Key("b"));
  CHECK(cache.FindById("a")->alias == "alpha");
  CHECK(cache.FindByAlias("alpha")->id == "a");
  CHECK(cache.FindById("b") != nullptr);
  CHECK(cache.FindByAlias("") == nullptr);  // An empty alias is no alias.
  CHECK(cache.FindById("c") == nullptr);
  CHECK(cache.size() == 2);
}

TEST_CASE("KeyCache evicts the least recently used key beyond capacity", "[key_cache]") {
  KeyCache cache(2);
  cache.Put(Key("a", "alpha"));
  cache.Put(Key("b", "beta"));
  REQUIRE(cache.FindByAlias("alpha") != nullptr);  // a is now more recent than b.
  cache.Put(Key("c", "gamma"));
  CHECK(cache.size() == 2);
  CHECK(cache.FindById("b") == nullptr);
  CHECK(cache.FindByAlias("beta") == nullptr);  // The alias index goes with the record.
  CHECK(cache.FindById("a") != nullptr);
  CHECK(cache.FindById("c") != nullptr);
}

TEST_CASE("KeyCache replaces a key with the same id and keeps evicted records valid",
          "[key_cache]") {
  KeyCache cache(2);
  cache.Put(Key("a", "old"));
  auto held = cache.FindById("a");
  cache.Put(Key("a", "new"));
  CHECK(cache.size() == 1);
  CHECK(cache.FindByAlias("old") == nullptr);
  CHECK(cache.FindByAlias("new")->id == "a");
  CHECK(held->alias == "old");  // Whoever held the old record still has it intact.

  cache.Put(Key("b"));
  cache.Put(Key("c"));
  CHECK(cache.FindById("a") == nullptr);
  CHECK(cache.FindByAlias("new") == nullptr);
}

}  // namespace
}  // namespace custos::storage
