// AuditLogReader: the audit log of a Custos database file, read without changing the file,
// for auditors who verify a copy of the database offline (`custosctl audit verify --db`).
//
// It never migrates, creates or writes anything; a database in WAL mode is read with its
// -wal file as SQLite sees it. Records are read a page at a time, so a log of any size is
// streamed in constant memory. Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "audit/record.h"
#include "audit/verifier.h"
#include "common/status.h"

namespace custos::storage {

namespace sqlite {
class Database;
}

class AuditLogReader final : public audit::RecordSource {
 public:
  // UNAVAILABLE if the file cannot be opened; FAILED_PRECONDITION if it is not a Custos
  // database with an audit log (schema too old) or was written by a newer Custos.
  static absl::StatusOr<std::unique_ptr<AuditLogReader>> Open(const std::string& path);
  ~AuditLogReader() override;

  // The records in seq order, as the table holds them.
  absl::StatusOr<std::optional<audit::Record>> Next() override;

  // Every checkpoint stored in the file, newest first.
  absl::StatusOr<std::vector<audit::Checkpoint>> Checkpoints();

 private:
  AuditLogReader(std::unique_ptr<sqlite::Database> db, bool format1_columns);

  std::unique_ptr<sqlite::Database> db_;
  bool format1_columns_;  // a file from before schema version 5
  std::vector<audit::Record> page_;
  size_t next_in_page_ = 0;
  uint64_t next_seq_ = 1;
  bool exhausted_ = false;
};

}  // namespace custos::storage
