#include "storage/sqlite.h"

#include <catch2/catch.hpp>

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

}  // namespace
}  // namespace custos::storage::sqlite
