#include "storage/audit_log_reader.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "storage/audit_rows.h"
#include "storage/schema.h"
#include "storage/sqlite.h"

namespace custos::storage {
namespace {

constexpr int kFirstVersionWithAuditLog = 4;
constexpr int kFirstVersionWithFormat2 = 5;
constexpr int kFirstVersionWithArchival = 6;
constexpr size_t kPageSize = 1000;

}  // namespace

AuditLogReader::AuditLogReader(std::unique_ptr<sqlite::Database> db, bool format1_columns)
    : db_(std::move(db)), format1_columns_(format1_columns) {}
AuditLogReader::~AuditLogReader() = default;

absl::StatusOr<std::unique_ptr<AuditLogReader>> AuditLogReader::Open(const std::string& path) {
  CUSTOS_ASSIGN_OR_RETURN(auto db, sqlite::Database::OpenReadOnly(path));
  // A live server's commit may hold the file for a moment; wait as the server itself would.
  sqlite3_busy_timeout(db->handle(), 5000);
  // SQLite opens any file lazily; the first query is where a non-database shows itself.
  CUSTOS_ASSIGN_OR_RETURN(const std::string text, db->QueryText("PRAGMA user_version"));
  int version = 0;
  if (!absl::SimpleAtoi(text, &version) || version < kFirstVersionWithAuditLog) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' is not a Custos database with an audit log"));
  }
  if (version > CurrentSchemaVersion()) {
    return absl::FailedPreconditionError(absl::StrCat("'", path, "' has schema version ", version,
                                                      ", newer than this custosctl reads (",
                                                      CurrentSchemaVersion(), ")"));
  }
  if (version >= kFirstVersionWithFormat2) CUSTOS_RETURN_IF_ERROR(CheckRowIndexDefinition(*db));
  auto reader = std::unique_ptr<AuditLogReader>(
      new AuditLogReader(std::move(db), version < kFirstVersionWithFormat2));
  // The live log starts after the newest archival; records up to it may still be stored
  // until custosd has removed them (KeyStore::RemoveArchivedRecords).
  if (version >= kFirstVersionWithArchival) {
    CUSTOS_ASSIGN_OR_RETURN(const std::optional<AuditFloor> floor, LoadAuditFloor(*reader->db_));
    if (floor) reader->next_seq_ = floor->seq + 1;
  }
  return reader;
}

absl::StatusOr<std::optional<audit::Record>> AuditLogReader::Next() {
  if (next_in_page_ == page_.size()) {
    if (exhausted_) return std::optional<audit::Record>();
    CUSTOS_ASSIGN_OR_RETURN(page_, LoadAuditRecords(*db_, next_seq_, kPageSize,
                                                    format1_columns_ ? AuditColumns::kFormat1Columns
                                                                     : AuditColumns::kCurrent));
    // The row index is part of what custosd trusts the file for: an offline check names an
    // entry missing from it as custosd would.
    if (!format1_columns_) CUSTOS_RETURN_IF_ERROR(CheckRowIndexed(*db_, page_));
    next_in_page_ = 0;
    exhausted_ = page_.size() < kPageSize;
    if (page_.empty()) return std::optional<audit::Record>();
    next_seq_ = page_.back().seq + 1;
  }
  return std::optional<audit::Record>(std::move(page_[next_in_page_++]));
}

absl::StatusOr<std::vector<audit::Checkpoint>> AuditLogReader::Checkpoints() {
  return LoadCheckpoints(*db_, 0,
                         format1_columns_ ? AuditColumns::kFormat1Columns : AuditColumns::kCurrent);
}

}  // namespace custos::storage
