#include "storage/sqlite.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"

namespace custos::storage::sqlite {
namespace {

// SQLite's "no destructor, the bytes stay put" marker; a zero-length value still needs a
// non-null pointer, or SQLite binds NULL instead of an empty value.
constexpr char kEmpty[] = "";

absl::Status ErrnoError(const char* what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " '", path, "': ", std::strerror(errno)));
}

}  // namespace

absl::Status RestrictToOwner(const std::string& path, bool create) {
  const int flags = O_RDWR | O_NOFOLLOW | O_CLOEXEC | (create ? O_CREAT : 0);
  const int fd = ::open(path.c_str(), flags, 0600);
  if (fd < 0) {
    if (!create && errno == ENOENT) return absl::OkStatus();
    return ErrnoError("cannot open", path);
  }
  struct stat st {};
  absl::Status status;
  // An existing file may have been made with a looser mode; key catalogues are owner-only.
  if (::fstat(fd, &st) != 0) {
    status = ErrnoError("cannot stat", path);
  } else if ((st.st_mode & 0777) != 0600 && ::fchmod(fd, 0600) != 0) {
    status = ErrnoError("cannot restrict permissions of", path);
  }
  ::close(fd);
  return status;
}

absl::Status Error(int rc, sqlite3* db, std::string_view what) {
  // sqlite3_errmsg describes the connection's last failure, which is `rc` unless the error
  // came from a call that does not record one (a bind, for instance).
  const char* detail =
      db != nullptr && sqlite3_extended_errcode(db) == rc ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  std::string message = absl::StrCat(std::string(what), ": ", detail);
  // SQLite reports a full disk met while writing its journal or WAL as a generic I/O error;
  // the operator needs to hear which.
  const int primary = rc & 0xff;
  const bool no_space = (primary == SQLITE_IOERR || primary == SQLITE_CANTOPEN) && db != nullptr &&
                        sqlite3_system_errno(db) == ENOSPC;
  if (primary == SQLITE_FULL || no_space) {
    message = absl::StrCat(std::string(what), ": the disk is full (", detail,
                           "); free space on the volume holding the key database");
  }
  switch (primary) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
      // The disk or another process is in the way: worth retrying later.
      return absl::UnavailableError(message);
    case SQLITE_CONSTRAINT:
      // Duplicates are the caller's business; any other violated constraint (CHECK, foreign
      // key, NOT NULL) means our own code wrote something wrong.
      if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
        return absl::AlreadyExistsError(message);
      }
      return absl::InternalError(message);
    default:
      return absl::InternalError(message);
  }
}

Statement::~Statement() {
  if (stmt_ == nullptr) return;
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

Statement::Statement(Statement&& other) noexcept
    : db_(other.db_), stmt_(std::exchange(other.stmt_, nullptr)), bind_rc_(other.bind_rc_) {}

void Statement::NoteBind(int rc) {
  if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
}

Statement& Statement::BindText(int index, std::string_view text) {
  const char* data = text.empty() ? kEmpty : text.data();
  NoteBind(sqlite3_bind_text64(stmt_, index, data, text.size(), SQLITE_STATIC, SQLITE_UTF8));
  return *this;
}

Statement& Statement::BindBlob(int index, const Bytes& blob) {
  const void* data = blob.empty() ? static_cast<const void*>(kEmpty) : blob.data();
  NoteBind(sqlite3_bind_blob64(stmt_, index, data, blob.size(), SQLITE_STATIC));
  return *this;
}

Statement& Statement::BindInt64(int index, int64_t value) {
  NoteBind(sqlite3_bind_int64(stmt_, index, value));
  return *this;
}

Statement& Statement::BindNull(int index) {
  NoteBind(sqlite3_bind_null(stmt_, index));
  return *this;
}

absl::StatusOr<bool> Statement::Step() {
  if (bind_rc_ != SQLITE_OK) return Error(bind_rc_, db_, "binding a statement parameter");
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return Error(rc, db_, "key database");
}

absl::Status Statement::Run() {
  CUSTOS_ASSIGN_OR_RETURN(const bool row, Step());
  if (row) return absl::InternalError("SQLite statement returned a row where none was expected");
  return absl::OkStatus();
}

std::string Statement::ColumnText(int column) const {
  const auto* text = sqlite3_column_text(stmt_, column);
  if (text == nullptr) return {};
  return std::string(reinterpret_cast<const char*>(text), sqlite3_column_bytes(stmt_, column));
}

Bytes Statement::ColumnBlob(int column) const {
  const auto* blob = static_cast<const uint8_t*>(sqlite3_column_blob(stmt_, column));
  if (blob == nullptr) return {};
  return Bytes(blob, blob + sqlite3_column_bytes(stmt_, column));
}

int64_t Statement::ColumnInt64(int column) const { return sqlite3_column_int64(stmt_, column); }

absl::StatusOr<std::unique_ptr<Database>> Database::Open(const std::string& path) {
  // Create the file ourselves so it never exists with the umask's looser mode; SQLite gives
  // the -wal and -shm files it creates later the database file's mode.
  CUSTOS_RETURN_IF_ERROR(RestrictToOwner(path, /*create=*/true));
  // FULLMUTEX on top of the owner's mutex costs little and keeps a missed lock from
  // corrupting the connection.
  return OpenWithFlags(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX);
}

absl::StatusOr<std::unique_ptr<Database>> Database::OpenReadOnly(const std::string& path) {
  return OpenWithFlags(path, SQLITE_OPEN_READONLY | SQLITE_OPEN_FULLMUTEX);
}

absl::StatusOr<std::unique_ptr<Database>> Database::OpenWithFlags(const std::string& path,
                                                                  int flags) {
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &db,
                                 flags | SQLITE_OPEN_NOFOLLOW | SQLITE_OPEN_EXRESCODE, nullptr);
  if (rc != SQLITE_OK) {
    absl::Status status = Error(rc, db, absl::StrCat("cannot open database '", path, "'"));
    sqlite3_close_v2(db);  // A handle comes back even on failure (unless out of memory).
    return status;
  }
  sqlite3_extended_result_codes(db, 1);
  std::unique_ptr<Database> opened(new Database(db, path));
  // The file just opened is the one found now (a swap in between is a race nobody can win).
  if ((flags & SQLITE_OPEN_READWRITE) != 0) CUSTOS_RETURN_IF_ERROR(opened->CheckFilesInPlace());
  return opened;
}

absl::Status Database::CheckFilesInPlace() {
  if (!misplaced_.empty()) return absl::UnavailableError(misplaced_);
  static constexpr const char* kSuffixes[] = {"", "-wal", "-shm"};
  for (size_t i = 0; i < std::size(kSuffixes); ++i) {
    const std::string file = absl::StrCat(path_, kSuffixes[i]);
    struct stat st {};
    const char* what = "replaced";
    if (::lstat(file.c_str(), &st) != 0) {
      // A -wal or -shm this connection has not yet made is not missing.
      if (errno == ENOENT && !files_[i]) continue;
      if (errno != ENOENT) return ErrnoError("cannot check the key database file", file);
      what = "deleted";
    } else if (!files_[i]) {
      files_[i] = FileId{st.st_dev, st.st_ino};
      continue;
    } else if (st.st_dev == files_[i]->dev && st.st_ino == files_[i]->ino) {
      continue;
    }
    misplaced_ = absl::StrCat(
        "the key database file '", file, "' was ", what,
        " while open: what is committed now would go to a file no longer at that path, so "
        "nothing more is written until the database is opened again (restore the file from where "
        "it was moved, or from a backup, first)");
    if (i > 0) {
      // The database file itself is in place, and what the WAL held (commits since its last
      // checkpoint, acknowledged) is now only in the open, unlinked one, lost with this
      // process: copied into the database file now, where a crash keeps it.
      (void)sqlite3_exec(db_, "PRAGMA wal_checkpoint(FULL)", nullptr, nullptr, nullptr);
    }
    return absl::UnavailableError(misplaced_);
  }
  return absl::OkStatus();
}

Database::~Database() {
  for (auto& [sql, stmt] : statements_) sqlite3_finalize(stmt);
  sqlite3_close_v2(db_);
}

absl::Status Database::Exec(const char* sql) {
  char* error = nullptr;
  const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &error);
  sqlite3_free(error);  // The same text is available from sqlite3_errmsg.
  if (rc != SQLITE_OK) return Error(rc, db_, absl::StrCat("SQLite failed to run '", sql, "'"));
  return absl::OkStatus();
}

absl::StatusOr<Statement> Database::Prepare(const char* sql) {
  auto it = statements_.find(sql);
  if (it == statements_.end()) {
    sqlite3_stmt* stmt = nullptr;
    const int rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    if (rc != SQLITE_OK) return Error(rc, db_, absl::StrCat("SQLite cannot prepare '", sql, "'"));
    it = statements_.emplace(sql, stmt).first;
  }
  return Statement(db_, it->second);
}

absl::StatusOr<std::string> Database::QueryText(const char* sql) {
  CUSTOS_ASSIGN_OR_RETURN(Statement stmt, Prepare(sql));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return absl::InternalError(absl::StrCat("'", sql, "' returned no row"));
  return stmt.ColumnText(0);
}

absl::StatusOr<std::unique_ptr<Transaction>> Transaction::Begin(Database& db) {
  CUSTOS_RETURN_IF_ERROR(db.CheckFilesInPlace());
  CUSTOS_ASSIGN_OR_RETURN(Statement begin, db.Prepare("BEGIN IMMEDIATE"));
  CUSTOS_RETURN_IF_ERROR(begin.Run());
  return std::unique_ptr<Transaction>(new Transaction(db));
}

Transaction::~Transaction() {
  // SQLite may already have rolled back by itself (after some I/O errors); then the
  // connection is back in autocommit mode and there is nothing left to undo.
  if (open_ && sqlite3_get_autocommit(db_.handle()) == 0) {
    if (auto rollback = db_.Prepare("ROLLBACK"); rollback.ok()) (void)rollback->Run();
  }
}

absl::Status Transaction::Commit() {
  CUSTOS_ASSIGN_OR_RETURN(Statement commit, db_.Prepare("COMMIT"));
  CUSTOS_RETURN_IF_ERROR(commit.Run());
  open_ = false;
  // Committed, but durable only if into the files at the database's paths.
  return db_.CheckFilesInPlace();
}

}  // namespace custos::storage::sqlite
