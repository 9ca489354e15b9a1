#include "storage/audit_rows.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "common/strings.h"

namespace custos::storage {
namespace {

constexpr char kColumnsV1[] =
    "seq, time, principal, role, action, key_id, key_version, source_key_id, "
    "source_key_version, request_id, outcome, peer, context_hmac, detail, hash";
constexpr char kColumns[] =
    "seq, time, principal, role, action, key_id, key_version, source_key_id, "
    "source_key_version, request_id, outcome, peer, context_hmac, detail, hash, format, "
    "call_id, row_name, row_digest";

audit::Record ReadRow(const sqlite::Statement& stmt) {
  audit::Record row;
  row.seq = static_cast<uint64_t>(stmt.ColumnInt64(0));
  row.time = stmt.ColumnInt64(1);
  row.principal = stmt.ColumnText(2);
  row.role = stmt.ColumnText(3);
  row.action = stmt.ColumnText(4);
  row.key_id = stmt.ColumnText(5);
  row.key_version = static_cast<uint32_t>(stmt.ColumnInt64(6));
  row.source_key_id = stmt.ColumnText(7);
  row.source_key_version = static_cast<uint32_t>(stmt.ColumnInt64(8));
  row.request_id = stmt.ColumnText(9);
  row.outcome = stmt.ColumnText(10);
  row.peer = stmt.ColumnText(11);
  row.context_hmac = stmt.ColumnText(12);
  row.detail = stmt.ColumnText(13);
  row.hash = stmt.ColumnBlob(14);
  if (stmt.ColumnCount() <= 15) {
    row.format = 1;
    return row;
  }
  row.format = static_cast<uint32_t>(stmt.ColumnInt64(15));
  row.call_id = stmt.ColumnText(16);
  row.row = stmt.ColumnText(17);
  row.row_digest = stmt.ColumnText(18);
  return row;
}

constexpr char kRowIndexDefinition[] =
    "CREATE INDEX audit_log_by_row ON audit_log (row_name, seq) WHERE row_name <> ''";

absl::Status IndexProblem(std::string_view what) {
  return absl::DataLossError(
      StrCat("the audit log's row index (audit_log_by_row) is not the log's: ", what,
             ". It was rebuilt or edited outside Custos, and no row is believed through it; "
             "stop custosd, rebuild it (sqlite3 custos.db 'REINDEX audit_log_by_row') and start "
             "again"));
}

}  // namespace

absl::Status InsertAuditRecord(sqlite::Database& db, const audit::Record& row) {
  static const std::string sql = std::string("INSERT INTO audit_log (") + kColumns +
                                 ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, "
                                 "?13, ?14, ?15, ?16, ?17, ?18, ?19)";
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(sql.c_str()));
  stmt.BindInt64(1, static_cast<int64_t>(row.seq))
      .BindInt64(2, row.time)
      .BindText(3, row.principal)
      .BindText(4, row.role)
      .BindText(5, row.action)
      .BindText(6, row.key_id)
      .BindInt64(7, row.key_version)
      .BindText(8, row.source_key_id)
      .BindInt64(9, row.source_key_version)
      .BindText(10, row.request_id)
      .BindText(11, row.outcome)
      .BindText(12, row.peer)
      .BindText(13, row.context_hmac)
      .BindText(14, row.detail)
      .BindBlob(15, row.hash)
      .BindInt64(16, row.format)
      .BindText(17, row.call_id)
      .BindText(18, row.row)
      .BindText(19, row.row_digest);
  return stmt.Run();
}

absl::StatusOr<std::vector<audit::Record>> LoadAuditRecords(sqlite::Database& db, uint64_t from_seq,
                                                            size_t limit, AuditColumns columns) {
  static const std::string sql =
      std::string("SELECT ") + kColumns + " FROM audit_log WHERE seq >= ?1 ORDER BY seq LIMIT ?2";
  static const std::string sql_v1 =
      std::string("SELECT ") + kColumnsV1 + " FROM audit_log WHERE seq >= ?1 ORDER BY seq LIMIT ?2";
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement stmt,
      db.Prepare(columns == AuditColumns::kCurrent ? sql.c_str() : sql_v1.c_str()));
  stmt.BindInt64(1, static_cast<int64_t>(from_seq)).BindInt64(2, static_cast<int64_t>(limit));
  std::vector<audit::Record> rows;
  for (;;) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) break;
    rows.push_back(ReadRow(stmt));
  }
  return rows;
}

absl::StatusOr<std::optional<RowRecord>> LatestRowRecord(sqlite::Database& db, std::string_view row,
                                                         uint64_t floor_seq) {
  // Three probes, each asked of the index by name (no other index someone adds answers), and
  // none trusting it further than its entries are checked (CheckRowIndexed checks that each
  // verified record has its entry; these, that the index has nothing else).
  // 1. Spelled as the partial index of schema version 5: the newest entry's record.
  uint64_t seq = 0;
  {
    CUSTOS_ASSIGN_OR_RETURN(
        sqlite::Statement stmt,
        db.Prepare("SELECT seq FROM audit_log INDEXED BY audit_log_by_row WHERE row_name = ?1 "
                   "AND row_name <> '' AND seq > ?2 ORDER BY seq DESC LIMIT 1"));
    stmt.BindText(1, row).BindInt64(2, static_cast<int64_t>(floor_seq));
    CUSTOS_ASSIGN_OR_RETURN(const bool found, stmt.Step());
    if (!found) return std::optional<RowRecord>();
    seq = static_cast<uint64_t>(stmt.ColumnInt64(0));
  }
  // 2. An entry that sorts after that record's but leads to it (or to an older one) was made
  //    outside SQLite: an honest entry's position is its record's seq.
  {
    CUSTOS_ASSIGN_OR_RETURN(
        sqlite::Statement stmt,
        db.Prepare("SELECT 1 FROM audit_log INDEXED BY audit_log_by_row WHERE row_name = ?1 AND "
                   "row_name <> '' AND seq > ?2 LIMIT 1"));
    stmt.BindText(1, row).BindInt64(2, static_cast<int64_t>(seq));
    CUSTOS_ASSIGN_OR_RETURN(const bool forged, stmt.Step());
    if (forged) {
      return IndexProblem(StrCat("it has an entry for row ", row, " past the one for audit record ",
                                 seq, " that leads to no record of its own"));
    }
  }
  // 3. The record itself, from the table (its rowid): the index could point at another row's.
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement stmt,
      db.Prepare("SELECT row_name, row_digest FROM audit_log NOT INDEXED WHERE seq = ?1"));
  stmt.BindInt64(1, static_cast<int64_t>(seq));
  CUSTOS_ASSIGN_OR_RETURN(const bool found, stmt.Step());
  if (!found || stmt.ColumnText(0) != row) {
    return IndexProblem(StrCat("its entry for row ", row, " leads to audit record ", seq,
                               found ? ", which names another row" : ", which is not stored"));
  }
  return std::optional<RowRecord>(RowRecord{seq, stmt.ColumnText(1)});
}

absl::Status CheckRowIndexDefinition(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(
      const std::string definition,
      db.QueryText("SELECT IFNULL((SELECT sql FROM sqlite_schema WHERE type = 'index' AND name = "
                   "'audit_log_by_row' AND tbl_name = 'audit_log'), '')"));
  if (definition == kRowIndexDefinition) return absl::OkStatus();
  return absl::DataLossError(StrCat(
      "the audit log's row index (audit_log_by_row) is ",
      definition.empty() ? "missing" : StrCat("defined as \"", definition, "\""),
      ": it was dropped or redefined outside Custos, and no row can be believed through it; stop "
      "custosd, create it again (sqlite3 custos.db \"DROP INDEX IF EXISTS audit_log_by_row; ",
      kRowIndexDefinition, "\") and start again"));
}

absl::Status CheckRowIndexed(sqlite::Database& db, std::span<const audit::Record> records) {
  for (const audit::Record& record : records) {
    if (record.row.empty()) continue;
    CUSTOS_ASSIGN_OR_RETURN(
        sqlite::Statement stmt,
        db.Prepare("SELECT 1 FROM audit_log INDEXED BY audit_log_by_row WHERE row_name = ?1 AND "
                   "row_name <> '' AND seq = ?2"));
    stmt.BindText(1, record.row).BindInt64(2, static_cast<int64_t>(record.seq));
    CUSTOS_ASSIGN_OR_RETURN(const bool indexed, stmt.Step());
    if (!indexed) {
      return IndexProblem(StrCat("it has no entry for audit record ", record.seq,
                                 ", which names row ", record.row));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> RowEverRecorded(sqlite::Database& db, std::string_view row,
                                     uint64_t floor_seq) {
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<RowRecord> indexed,
                          LatestRowRecord(db, row, floor_seq));
  if (indexed.has_value()) return true;
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt,
                          db.Prepare("SELECT 1 FROM audit_log NOT INDEXED WHERE seq > ?2 AND "
                                     "row_name = ?1 LIMIT 1"));
  stmt.BindText(1, row).BindInt64(2, static_cast<int64_t>(floor_seq));
  return stmt.Step();
}

absl::StatusOr<std::vector<std::pair<std::string, RowRecord>>> RowsLastRecordedBy(
    sqlite::Database& db, uint64_t through_seq, std::string_view after_name, size_t limit,
    uint64_t floor_seq) {
  // One walk of the row index; SQLite takes row_digest from the row that has MAX(seq).
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt,
                          db.Prepare("SELECT row_name, row_digest, MAX(seq) FROM audit_log "
                                     "INDEXED BY audit_log_by_row "
                                     "WHERE row_name <> '' AND row_name > ?1 AND seq > ?4 "
                                     "GROUP BY row_name HAVING MAX(seq) <= ?2 ORDER BY row_name "
                                     "LIMIT ?3"));
  stmt.BindText(1, after_name)
      .BindInt64(2, static_cast<int64_t>(through_seq))
      .BindInt64(3, static_cast<int64_t>(limit))
      .BindInt64(4, static_cast<int64_t>(floor_seq));
  std::vector<std::pair<std::string, RowRecord>> rows;
  for (;;) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) break;
    rows.emplace_back(stmt.ColumnText(0),
                      RowRecord{static_cast<uint64_t>(stmt.ColumnInt64(2)), stmt.ColumnText(1)});
  }
  // What is carried must be each row's newest record as LatestRowRecord finds it, probes and
  // all: the walk above believes every entry it meets.
  for (const auto& [name, listed] : rows) {
    CUSTOS_ASSIGN_OR_RETURN(const std::optional<RowRecord> newest,
                            LatestRowRecord(db, name, floor_seq));
    if (!newest || newest->seq != listed.seq || newest->digest != listed.digest) {
      return IndexProblem(StrCat("walked, it takes audit record ", listed.seq,
                                 " for the newest naming row ", name, "; probed, record ",
                                 newest ? newest->seq : 0));
    }
  }
  return rows;
}

absl::Status WriteTailMark(sqlite::Database& db, const TailMark& mark) {
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement stmt,
      db.Prepare("INSERT OR REPLACE INTO audit_tail (id, seq, nonce, mac) VALUES (1, ?1, ?2, ?3)"));
  stmt.BindInt64(1, static_cast<int64_t>(mark.seq)).BindBlob(2, mark.nonce).BindBlob(3, mark.mac);
  return stmt.Run();
}

absl::StatusOr<std::optional<TailMark>> LoadTailMark(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt,
                          db.Prepare("SELECT seq, nonce, mac FROM audit_tail WHERE id = 1"));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return std::optional<TailMark>();
  return std::optional<TailMark>(
      TailMark{static_cast<uint64_t>(stmt.ColumnInt64(0)), stmt.ColumnBlob(1), stmt.ColumnBlob(2)});
}

absl::StatusOr<std::optional<AuditFloor>> LoadAuditFloor(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement stmt,
      db.Prepare("SELECT through_seq, hash FROM audit_archived ORDER BY through_seq DESC LIMIT 1"));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return std::optional<AuditFloor>();
  return std::optional<AuditFloor>(
      AuditFloor{static_cast<uint64_t>(stmt.ColumnInt64(0)), stmt.ColumnBlob(1)});
}

absl::Status RecordArchival(sqlite::Database& db, const AuditFloor& floor, int64_t time,
                            std::string_view request_id) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement insert,
                          db.Prepare("INSERT INTO audit_archived (through_seq, hash, time, "
                                     "request_id) VALUES (?1, ?2, ?3, ?4)"));
  insert.BindInt64(1, static_cast<int64_t>(floor.seq))
      .BindBlob(2, floor.hash)
      .BindInt64(3, time)
      .BindText(4, request_id);
  CUSTOS_RETURN_IF_ERROR(insert.Run());
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement checkpoints,
                          db.Prepare("DELETE FROM audit_checkpoints WHERE seq < ?1"));
  checkpoints.BindInt64(1, static_cast<int64_t>(floor.seq));
  return checkpoints.Run();
}

absl::StatusOr<size_t> RemoveArchivedRecords(sqlite::Database& db, uint64_t floor_seq,
                                             size_t limit) {
  // seq is the rowid: the first record and the range after it cost a B-tree descent each.
  CUSTOS_ASSIGN_OR_RETURN(const std::string first,
                          db.QueryText("SELECT IFNULL(MIN(seq), 0) FROM audit_log"));
  uint64_t from = 0;
  if (!absl::SimpleAtoi(first, &from) || from == 0 || from > floor_seq) return 0;
  const uint64_t to = std::min<uint64_t>(floor_seq, from + limit - 1);
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement records,
                          db.Prepare("DELETE FROM audit_log WHERE seq BETWEEN ?1 AND ?2"));
  records.BindInt64(1, static_cast<int64_t>(from)).BindInt64(2, static_cast<int64_t>(to));
  CUSTOS_RETURN_IF_ERROR(records.Run());
  return static_cast<size_t>(sqlite3_changes(db.handle()));
}

absl::StatusOr<std::optional<audit::Record>> LoadLastAuditRecord(sqlite::Database& db) {
  static const std::string sql =
      std::string("SELECT ") + kColumns + " FROM audit_log ORDER BY seq DESC LIMIT 1";
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(sql.c_str()));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return std::optional<audit::Record>();
  return std::optional<audit::Record>(ReadRow(stmt));
}

absl::Status InsertCheckpoint(sqlite::Database& db, const audit::Checkpoint& checkpoint) {
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement stmt,
      db.Prepare("INSERT INTO audit_checkpoints (seq, hash, time, key_label, signature, format, "
                 "prev_seq, prev_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
  stmt.BindInt64(1, static_cast<int64_t>(checkpoint.seq))
      .BindBlob(2, checkpoint.hash)
      .BindInt64(3, checkpoint.time)
      .BindText(4, checkpoint.key_label)
      .BindBlob(5, checkpoint.signature)
      .BindInt64(6, checkpoint.format)
      .BindInt64(7, static_cast<int64_t>(checkpoint.prev_seq))
      .BindBlob(8, checkpoint.prev_hash);
  return stmt.Run();
}

namespace {

absl::StatusOr<std::vector<audit::Checkpoint>> ReadCheckpointRows(sqlite::Statement& stmt) {
  std::vector<audit::Checkpoint> checkpoints;
  for (;;) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) break;
    audit::Checkpoint& checkpoint = checkpoints.emplace_back();
    checkpoint.seq = static_cast<uint64_t>(stmt.ColumnInt64(0));
    checkpoint.hash = stmt.ColumnBlob(1);
    checkpoint.time = stmt.ColumnInt64(2);
    checkpoint.key_label = stmt.ColumnText(3);
    checkpoint.signature = stmt.ColumnBlob(4);
    if (stmt.ColumnCount() <= 5) {
      checkpoint.format = 1;
      continue;
    }
    checkpoint.format = static_cast<uint32_t>(stmt.ColumnInt64(5));
    checkpoint.prev_seq = static_cast<uint64_t>(stmt.ColumnInt64(6));
    checkpoint.prev_hash = stmt.ColumnBlob(7);
  }
  return checkpoints;
}

}  // namespace

absl::StatusOr<std::vector<audit::Checkpoint>> LoadCheckpoints(sqlite::Database& db, size_t limit,
                                                               AuditColumns columns) {
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement stmt,
      db.Prepare(columns == AuditColumns::kCurrent
                     ? "SELECT seq, hash, time, key_label, signature, format, prev_seq, prev_hash "
                       "FROM audit_checkpoints ORDER BY seq DESC LIMIT ?1"
                     : "SELECT seq, hash, time, key_label, signature FROM audit_checkpoints "
                       "ORDER BY seq DESC LIMIT ?1"));
  stmt.BindInt64(1, limit == 0 ? -1 : static_cast<int64_t>(limit));
  return ReadCheckpointRows(stmt);
}

absl::StatusOr<std::vector<audit::Checkpoint>> LoadCheckpointsFrom(sqlite::Database& db,
                                                                   uint64_t from_seq,
                                                                   size_t limit) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt,
                          db.Prepare("SELECT seq, hash, time, key_label, signature, format, "
                                     "prev_seq, prev_hash FROM audit_checkpoints WHERE seq >= ?1 "
                                     "ORDER BY seq LIMIT ?2"));
  stmt.BindInt64(1, static_cast<int64_t>(from_seq))
      .BindInt64(2, limit == 0 ? -1 : static_cast<int64_t>(limit));
  return ReadCheckpointRows(stmt);
}

}  // namespace custos::storage
