// A thin RAII layer over the SQLite C API for storage/: one connection, cached prepared
// statements, transactions that roll back unless committed, and the one place where SQLite
// result codes become absl::Status.
//
// Not thread-safe: the owner (KeyStore) serialises every use of a Database with its own mutex.
// Internal to storage/; not part of the library's public interface.
#pragma once

#include <sqlite3.h>
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::storage::sqlite {

// Makes `path` readable and writable by its owner only (0600), creating it empty if
// `create` and it does not exist; a missing file is fine when not `create`. Symlinks are
// refused. UNAVAILABLE on failure. Call it only before any connection of this process has
// opened `path`: closing the descriptor it uses drops every POSIX lock the process holds on
// the file, SQLite's included.
absl::Status RestrictToOwner(const std::string& path, bool create);

// `rc` (a failed SQLite result) as a Status: UNAVAILABLE for BUSY/LOCKED/IOERR/FULL/CANTOPEN
// (the disk or another process is in the way; retry later), ALREADY_EXISTS for UNIQUE and
// PRIMARY KEY violations, INTERNAL for the rest. The message is "<what>: <sqlite message>", or
// "<what>: the disk is full ..." when the operating system said so.
absl::Status Error(int rc, sqlite3* db, std::string_view what);

// A prepared statement borrowed from a Database. Resets itself and clears its bindings when
// destroyed, so the next user of the same SQL starts clean. Move-only.
class Statement {
 public:
  Statement(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  ~Statement();
  Statement(Statement&& other) noexcept;
  Statement& operator=(Statement&&) = delete;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  // Parameters are 1-based, as in SQLite. Bound values must outlive the statement's use
  // (bound without copying). A binding error is reported by the next Step().
  Statement& BindText(int index, std::string_view text);
  Statement& BindText(int index, const char* text) {
    return BindText(index, std::string_view(text != nullptr ? text : ""));
  }
  // Refused at compile time: a temporary is gone before the statement runs. (A const rvalue
  // reference takes const temporaries too, and is preferred for any temporary.)
  Statement& BindText(int index, const std::string&& text) = delete;
  Statement& BindBlob(int index, const Bytes& blob);
  Statement& BindBlob(int index, const Bytes&& blob) = delete;
  Statement& BindInt64(int index, int64_t value);
  Statement& BindNull(int index);

  // Advances to the next row: true if a row is ready, false when done.
  absl::StatusOr<bool> Step();
  // Steps a statement that returns no rows (INSERT and the like) to completion.
  absl::Status Run();

  // Columns the statement returns.
  int ColumnCount() const { return sqlite3_column_count(stmt_); }
  // True if the column of the current row is NULL.
  bool ColumnIsNull(int column) const { return sqlite3_column_type(stmt_, column) == SQLITE_NULL; }
  // Column accessors (0-based) for the current row. NULL reads as empty / 0.
  std::string ColumnText(int column) const;
  Bytes ColumnBlob(int column) const;
  int64_t ColumnInt64(int column) const;

 private:
  void NoteBind(int rc);

  sqlite3* db_;
  sqlite3_stmt* stmt_;
  int bind_rc_ = SQLITE_OK;
};

class Database {
 public:
  // Opens (creating it 0600 if needed) the file at `path` read-write, with extended result
  // codes, refusing symlinks.
  static absl::StatusOr<std::unique_ptr<Database>> Open(const std::string& path);
  // Opens an existing file read-only (never creating or changing it), refusing symlinks.
  static absl::StatusOr<std::unique_ptr<Database>> OpenReadOnly(const std::string& path);
  ~Database();
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  // Runs SQL text with no parameters (schema and pragmas only; never values from callers).
  absl::Status Exec(const char* sql);
  // The prepared statement for `sql`, prepared once and reused. Only one Statement for a
  // given SQL text may be in use at a time.
  absl::StatusOr<Statement> Prepare(const char* sql);
  // Runs a one-row, one-column query ("PRAGMA journal_mode") and returns its value as text.
  absl::StatusOr<std::string> QueryText(const char* sql);

  sqlite3* handle() const { return db_; }
  const std::string& path() const { return path_; }

  // Whether the files this connection writes (the database, its -wal and -shm) are still the
  // files at their paths: the ones it found there when it opened them (or first met the
  // -wal and -shm). One deleted or replaced while open (rm, mv over it) takes every commit
  // made after into a file nobody will read again; UNAVAILABLE then, for good, since writing
  // on would acknowledge what is lost, and reopening would adopt a file this process never
  // checked. Every write Transaction asks, before it begins and after it commits. A -wal or
  // -shm found gone while the database file is in place: the WAL's frames (acknowledged
  // commits) are first checkpointed into the database file, which keeps them past a crash.
  absl::Status CheckFilesInPlace();

 private:
  // A file's identity: its device and inode.
  struct FileId {
    dev_t dev = 0;
    ino_t ino = 0;
  };

  Database(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  static absl::StatusOr<std::unique_ptr<Database>> OpenWithFlags(const std::string& path,
                                                                 int flags);

  sqlite3* db_;
  std::unordered_map<std::string, sqlite3_stmt*> statements_;
  std::string path_;
  std::optional<FileId> files_[3];  // the database, -wal, -shm: as first found
  std::string misplaced_;           // why the files are no longer in place, once they are not
};

// BEGIN IMMEDIATE on construction (through Begin), ROLLBACK on destruction unless Commit()
// succeeded. IMMEDIATE takes the write lock up front, so checks made inside the transaction
// stay true until it commits.
class Transaction {
 public:
  static absl::StatusOr<std::unique_ptr<Transaction>> Begin(Database& db);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  absl::Status Commit();

 private:
  explicit Transaction(Database& db) : db_(db) {}

  Database& db_;
  bool open_ = true;
};

}  // namespace custos::storage::sqlite
