#include "tests/support/sqlite_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <sqlite3.h>

#include <catch2/catch.hpp>

namespace custos::testing {

std::string SqlQuery(const std::string& db_path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(db_path.c_str(), &db) == SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  sqlite3_stmt* stmt = nullptr;
  INFO(sql << ": " << sqlite3_errmsg(db));
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
  std::string value;
  const int rc = sqlite3_step(stmt);
  REQUIRE((rc == SQLITE_ROW || rc == SQLITE_DONE));
  if (rc == SQLITE_ROW && sqlite3_column_text(stmt, 0) != nullptr) {
    value = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return value;
}

std::string SqlExec(const std::string& db_path, const std::string& sql) {
  sqlite3* db = nullptr;
  if (sqlite3_open(db_path.c_str(), &db) != SQLITE_OK) return "cannot open " + db_path;
  sqlite3_busy_timeout(db, 5000);
  char* error = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
  std::string message = rc == SQLITE_OK ? "" : (error != nullptr ? error : "failed");
  sqlite3_free(error);
  sqlite3_close(db);
  return message;
}

CheckpointLockHeld::CheckpointLockHeld(const std::string& db_path) {
  shm_ = ::open((db_path + "-shm").c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(shm_ >= 0);
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  lock.l_start = 121;
  lock.l_len = 1;
  REQUIRE(::fcntl(shm_, F_OFD_SETLK, &lock) == 0);
}

CheckpointLockHeld::~CheckpointLockHeld() {
  struct flock lock {};
  lock.l_type = F_UNLCK;
  lock.l_whence = SEEK_SET;
  lock.l_start = 121;
  lock.l_len = 1;
  ::fcntl(shm_, F_OFD_SETLK, &lock);
  ::close(shm_);
}

}  // namespace custos::testing
