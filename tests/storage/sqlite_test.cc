#include "storage/sqlite.h"

#include <catch2/catch.hpp>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace custos::storage::sqlite {
namespace {

TEST_CASE("SQLite errors map to the status a caller can act on", "[sqlite]") {
  using absl::StatusCode;
  CHECK(Error(SQLITE_BUSY, nullptr, "x").code() == StatusCode::kUnavailable);
  CHECK(Error(SQLITE_BUSY_SNAPSHOT, nullptr, "x").code() == StatusCode::kUnavailable);
  CHECK(Error(SQLITE_IOERR_FSYNC, nullptr, "x").code() == StatusCode::kUnavailable);
  CHECK(Error(SQLITE_FULL, nullptr, "x").code() == StatusCode::kUnavailable);
  CHECK(Error(SQLITE_CANTOPEN, nullptr, "x").code() == StatusCode::kUnavailable);
  CHECK(Error(SQLITE_CONSTRAINT_UNIQUE, nullptr, "x").code() == StatusCode::kAlreadyExists);
  CHECK(Error(SQLITE_CONSTRAINT_PRIMARYKEY, nullptr, "x").code() == StatusCode::kAlreadyExists);
  CHECK(Error(SQLITE_CONSTRAINT_CHECK, nullptr, "x").code() == StatusCode::kInternal);
  CHECK(Error(SQLITE_CORRUPT, nullptr, "x").code() == StatusCode::kInternal);
  CHECK(Error(SQLITE_FULL, nullptr, "writing key").message() ==
        "writing key: the disk is full (database or disk is full); free space on the volume "
        "holding the key database");
}

// Values are bound without copying, so a temporary would be gone before the statement runs:
// binding one does not compile. Lvalues, views and literals do.
template <typename Value, typename = void>
constexpr bool kBindsText = false;
template <typename Value>
constexpr bool kBindsText<
    Value, std::void_t<decltype(std::declval<Statement&>().BindText(1, std::declval<Value>()))>> =
    true;
template <typename Value, typename = void>
constexpr bool kBindsBlob = false;
template <typename Value>
constexpr bool kBindsBlob<
    Value, std::void_t<decltype(std::declval<Statement&>().BindBlob(1, std::declval<Value>()))>> =
    true;
static_assert(!kBindsText<std::string>);
static_assert(!kBindsText<const std::string>);  // a const temporary (a const function's result)
static_assert(kBindsText<std::string&>);
static_assert(kBindsText<const std::string&>);
static_assert(kBindsText<std::string_view>);
static_assert(kBindsText<const char (&)[4]>);
static_assert(!kBindsBlob<Bytes>);
static_assert(!kBindsBlob<const Bytes>);
static_assert(kBindsBlob<Bytes&>);
static_assert(kBindsBlob<const Bytes&>);

}  // namespace
}  // namespace custos::storage::sqlite
