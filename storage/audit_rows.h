// Reading and writing audit records and checkpoints as rows of audit_log and
// audit_checkpoints. Constant SQL with bound parameters. Not thread-safe: callers hold the
// Database's lock. Internal to storage/.
#pragma once

#include <optional>
#include <span>
#include <vector>

#include "audit/record.h"
#include "common/status.h"
#include "storage/key_store.h"
#include "storage/row_integrity.h"
#include "storage/sqlite.h"

namespace custos::storage {

// Database files older than schema version 5 have no format 2 columns; readers of such a file
// (an old backup being verified) pass kFormat1Columns and get format 1 records and checkpoints.
enum class AuditColumns { kCurrent, kFormat1Columns };

// Appends a sealed record (seq and hash set). Run it inside a write transaction.
absl::Status InsertAuditRecord(sqlite::Database& db, const audit::Record& row);
absl::StatusOr<std::vector<audit::Record>> LoadAuditRecords(
    sqlite::Database& db, uint64_t from_seq, size_t limit,
    AuditColumns columns = AuditColumns::kCurrent);
// The newest live record (after `floor_seq`, the archival floor) naming catalogue row `row`
// (its seq and the digest it carries), or nullopt if none does. Records at or before the floor
// are archived: whatever is still stored there (a removal not finished, or put back) vouches
// for nothing.
absl::StatusOr<std::optional<RowRecord>> LatestRowRecord(sqlite::Database& db, std::string_view row,
                                                         uint64_t floor_seq);
// OK if the row index is defined as schema version 5 made it; DATA_LOSS saying so otherwise
// (dropped, or redefined so that it holds some entries only).
absl::Status CheckRowIndexDefinition(sqlite::Database& db);
// OK if the row index has the entry of each of `records` that names a row. Asked of records as
// their chain is verified: the index is not under the chain, and someone who can write the
// file can rebuild it without the entry of a row's newest record, so that an older one is
// taken for the newest. DATA_LOSS naming the first record without one.
absl::Status CheckRowIndexed(sqlite::Database& db, std::span<const audit::Record> records);
// True if a live record (after `floor_seq`) names catalogue row `row`. Asked of the table
// itself when the row index finds none: the index is not under the chain, and someone who can
// write the file can drop an entry from it without changing a single record.
absl::StatusOr<bool> RowEverRecorded(sqlite::Database& db, std::string_view row,
                                     uint64_t floor_seq);
// The last record, or nullopt for an empty log.
absl::StatusOr<std::optional<audit::Record>> LoadLastAuditRecord(sqlite::Database& db);

// Catalogue rows whose newest live naming record (after `floor_seq`) is at or before
// `through_seq`, with that record, in row-name order after `after_name`, at most `limit`.
absl::StatusOr<std::vector<std::pair<std::string, RowRecord>>> RowsLastRecordedBy(
    sqlite::Database& db, uint64_t through_seq, std::string_view after_name, size_t limit,
    uint64_t floor_seq);

// The mark of the log's newest record (audit_tail): its seq, the nonce its MAC key was made
// from, and the MAC of its chain hash (KeyStore::CheckAuditTail).
struct TailMark {
  uint64_t seq = 0;
  Bytes nonce;
  Bytes mac;
};
// Replaces the mark. Run it inside the write transaction whose records it marks.
absl::Status WriteTailMark(sqlite::Database& db, const TailMark& mark);
// The mark, or nullopt if none was ever written.
absl::StatusOr<std::optional<TailMark>> LoadTailMark(sqlite::Database& db);

// The newest archival (audit_archived), or nullopt if the log was never archived.
absl::StatusOr<std::optional<AuditFloor>> LoadAuditFloor(sqlite::Database& db);
// Records the archival `floor` and removes the checkpoints before it, through the triggers'
// one exception. The records up to it stay until RemoveArchivedRecords: removing millions in
// this transaction would hold every other commit for seconds. Run it inside a write
// transaction.
absl::Status RecordArchival(sqlite::Database& db, const AuditFloor& floor, int64_t time,
                            std::string_view request_id);
// Removes the oldest archived records still present (seq <= `floor_seq`), at most `limit`;
// returns how many (0 when none is left). Run it inside a write transaction.
absl::StatusOr<size_t> RemoveArchivedRecords(sqlite::Database& db, uint64_t floor_seq,
                                             size_t limit);

absl::Status InsertCheckpoint(sqlite::Database& db, const audit::Checkpoint& checkpoint);
// Newest first; `limit` 0 = all.
absl::StatusOr<std::vector<audit::Checkpoint>> LoadCheckpoints(
    sqlite::Database& db, size_t limit, AuditColumns columns = AuditColumns::kCurrent);
// Checkpoints with seq >= `from_seq`, ascending, at most `limit`.
absl::StatusOr<std::vector<audit::Checkpoint>> LoadCheckpointsFrom(sqlite::Database& db,
                                                                   uint64_t from_seq, size_t limit);

}  // namespace custos::storage
