#include "storage/backup.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "storage/sqlite.h"

namespace custos::storage {
namespace {

absl::Status Copy(sqlite::Database& source, sqlite::Database& copy) {
  sqlite3_backup* backup = sqlite3_backup_init(copy.handle(), "main", source.handle(), "main");
  if (backup == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot start the backup: ", sqlite3_errmsg(copy.handle())));
  }
  // Every page in one step: one read transaction, one consistent state. Stepping in parts
  // would let a commit in between restart the copy, or mix states without it.
  const int stepped = sqlite3_backup_step(backup, -1);
  const int finished = sqlite3_backup_finish(backup);
  if (stepped != SQLITE_DONE || finished != SQLITE_OK) {
    return absl::UnavailableError(absl::StrCat("backup failed: ", sqlite3_errstr(stepped), " (",
                                               sqlite3_errmsg(copy.handle()), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Count(sqlite::Database& db, const char* sql) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement statement, db.Prepare(sql));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, statement.Step());
  return row ? static_cast<uint64_t>(statement.ColumnInt64(0)) : 0;
}

absl::StatusOr<BackupSummary> Summarise(sqlite::Database& copy) {
  CUSTOS_ASSIGN_OR_RETURN(const std::string integrity, copy.QueryText("PRAGMA integrity_check"));
  if (integrity != "ok") {
    return absl::DataLossError(absl::StrCat("the copy fails its integrity check: ", integrity));
  }
  BackupSummary summary;
  CUSTOS_ASSIGN_OR_RETURN(summary.last_record,
                          Count(copy, "SELECT coalesce(max(seq), 0) FROM audit_log"));
  CUSTOS_ASSIGN_OR_RETURN(summary.last_checkpoint,
                          Count(copy, "SELECT coalesce(max(seq), 0) FROM audit_checkpoints"));
  CUSTOS_ASSIGN_OR_RETURN(summary.keys, Count(copy, "SELECT count(*) FROM keys"));
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement roots,
      copy.Prepare("SELECT root_key_label, count(*) FROM key_versions WHERE length(wrapped) > 0 "
                   "GROUP BY root_key_label"));
  for (;;) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, roots.Step());
    if (!row) break;
    summary.versions_by_root[roots.ColumnText(0)] = static_cast<uint64_t>(roots.ColumnInt64(1));
  }
  return summary;
}

// Flushes `path` and its folder's entry to disk: a backup reported done survives a power cut.
absl::Status Sync(const std::string& path) {
  const std::string folder = std::filesystem::absolute(path).parent_path().string();
  for (const std::string& name : {path, folder}) {
    const int fd = open(name.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
      if (fd >= 0) close(fd);
      return absl::UnavailableError(absl::StrCat("cannot flush ", name, " to disk"));
    }
    close(fd);
  }
  return absl::OkStatus();
}

absl::StatusOr<BackupSummary> Backup(const std::string& from, const std::string& to) {
  CUSTOS_ASSIGN_OR_RETURN(auto source, sqlite::Database::OpenReadOnly(from));
  // A live server's commit may hold the file for a moment; wait as the server itself would.
  sqlite3_busy_timeout(source->handle(), 5000);
  CUSTOS_ASSIGN_OR_RETURN(const std::string tables,
                          source->QueryText("SELECT count(*) FROM sqlite_schema WHERE type = "
                                            "'table' AND name IN ('keys', 'audit_log')"));
  if (tables != "2") {
    return absl::FailedPreconditionError(
        absl::StrCat("'", from, "' is not a Custos database with an audit log"));
  }
  CUSTOS_ASSIGN_OR_RETURN(auto copy, sqlite::Database::Open(to));
  CUSTOS_RETURN_IF_ERROR(Copy(*source, *copy));
  source.reset();
  CUSTOS_ASSIGN_OR_RETURN(BackupSummary summary, Summarise(*copy));
  // The copy is one file on its own, no WAL beside it to lose (custosd turns WAL on again when
  // it opens a restored copy).
  CUSTOS_ASSIGN_OR_RETURN(const std::string mode, copy->QueryText("PRAGMA journal_mode = DELETE"));
  if (mode != "delete") {
    return absl::UnavailableError(absl::StrCat("the copy stayed in journal mode ", mode));
  }
  copy.reset();
  CUSTOS_RETURN_IF_ERROR(Sync(to));
  struct stat st {};
  if (stat(to.c_str(), &st) == 0) summary.bytes = static_cast<uint64_t>(st.st_size);
  return summary;
}

}  // namespace

absl::StatusOr<BackupSummary> BackupDatabase(const std::string& from, const std::string& to) {
  // O_EXCL: never overwrite; 0600: the copy is as sensitive as the database.
  const int fd = open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      return absl::AlreadyExistsError(absl::StrCat("'", to, "' exists; a backup never overwrites"));
    }
    return absl::FailedPreconditionError(absl::StrCat("cannot create '", to, "'"));
  }
  close(fd);
  absl::StatusOr<BackupSummary> summary = Backup(from, to);
  if (!summary.ok()) {
    std::error_code ignored;
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) {
      std::filesystem::remove(to + suffix, ignored);
    }
  }
  return summary;
}

}  // namespace custos::storage
