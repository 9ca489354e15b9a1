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

void DropRowIndexEntries(const std::string& db_path, const std::string& condition) {
  const auto quoted = [](std::string sql) {  // as a literal inside the UPDATE below
    for (size_t at = sql.find('\''); at != std::string::npos; at = sql.find('\'', at + 2)) {
      sql.insert(at, 1, '\'');
    }
    return sql;
  };
  const std::string index =
      "CREATE INDEX audit_log_by_row ON audit_log (row_name, seq) WHERE row_name <> ''";
  const auto define = [&](const std::string& sql) {
    REQUIRE(SqlExec(db_path, "PRAGMA writable_schema = ON; UPDATE sqlite_master SET sql = '" +
                                 quoted(sql) + "' WHERE name = 'audit_log_by_row';")
                .empty());
  };
  define(index + " AND NOT (" + condition + ")");
  REQUIRE(SqlExec(db_path, "REINDEX audit_log_by_row;").empty());
  define(index);
}

void ForgeRowIndexEntry(const std::string& db_path, const std::string& row, uint64_t position,
                        uint64_t target) {
  // A table without rowid whose key is (row_name, seq, rowid) is stored as the index is.
  REQUIRE(SqlExec(db_path,
                  "CREATE TABLE forged (row_name TEXT, seq INTEGER, target INTEGER, PRIMARY KEY "
                  "(row_name, seq, target)) WITHOUT ROWID; INSERT INTO forged SELECT row_name, "
                  "seq, seq FROM audit_log WHERE row_name <> ''; INSERT INTO forged VALUES ('" +
                      row + "', " + std::to_string(position) + ", " + std::to_string(target) + ");")
              .empty());
  REQUIRE(SqlExec(db_path,
                  "PRAGMA writable_schema = ON; UPDATE sqlite_master SET rootpage = (SELECT "
                  "rootpage FROM sqlite_master WHERE name = 'forged') WHERE name = "
                  "'audit_log_by_row'; DELETE FROM sqlite_master WHERE tbl_name = 'forged';")
              .empty());
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
