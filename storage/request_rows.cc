#include "storage/request_rows.h"

#include <array>
#include <utility>

#include "absl/strings/str_cat.h"

namespace custos::storage {
namespace {

constexpr char kUpsertRequest[] =
    "INSERT INTO requests (id, operation, key_id, parameters, justification, proposer,"
    " created_at, expires_at, state, rejected_by, reason, closed_at, mac)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
    " ON CONFLICT (id) DO UPDATE SET operation = excluded.operation,"
    " key_id = excluded.key_id, parameters = excluded.parameters,"
    " justification = excluded.justification, proposer = excluded.proposer,"
    " created_at = excluded.created_at, expires_at = excluded.expires_at,"
    " state = excluded.state, rejected_by = excluded.rejected_by, reason = excluded.reason,"
    " closed_at = excluded.closed_at, mac = excluded.mac";
constexpr char kDeleteApprovals[] = "DELETE FROM request_approvals WHERE request_id = ?1";
constexpr char kInsertApproval[] =
    "INSERT INTO request_approvals (request_id, principal, at, ordinal)"
    " VALUES (?1, ?2, ?3, ?4)";
constexpr char kSelectApprovals[] =
    "SELECT principal, at FROM request_approvals WHERE request_id = ?1 ORDER BY ordinal";

// Every request query returns these columns, read by ReadRequestRow.
#define CUSTOS_REQUEST_COLUMNS                                                                 \
  "SELECT id, operation, key_id, parameters, justification, proposer, created_at, expires_at," \
  " state, rejected_by, reason, closed_at, mac FROM requests"

constexpr char kSelectRequestById[] = CUSTOS_REQUEST_COLUMNS " WHERE id = ?1";
constexpr char kSelectPending[] = CUSTOS_REQUEST_COLUMNS " WHERE state = 1 ORDER BY created_at, id";

// ListRequests' eight shapes: with or without each filter and the cursor. Parameters:
// ?1 state, ?2 key_id, ?3 and ?4 the cursor's created_at and id, ?5 the limit; a shape that
// leaves some out still binds them (SQLite numbers slots up to the highest, ?5).
constexpr size_t kFilterByState = 1;
constexpr size_t kFilterByKey = 2;
constexpr size_t kAfterCursor = 4;

const std::string& ListSql(size_t shape) {
  static const std::array<std::string, 8> kSql = [] {
    std::array<std::string, 8> sql;
    for (size_t s = 0; s < sql.size(); ++s) {
      sql[s] = CUSTOS_REQUEST_COLUMNS " WHERE 1";
      if (s & kFilterByState) sql[s] += " AND state = ?1";
      if (s & kFilterByKey) sql[s] += " AND key_id = ?2";
      if (s & kAfterCursor) sql[s] += " AND (created_at, id) < (?3, ?4)";
      sql[s] += " ORDER BY created_at DESC, id DESC LIMIT ?5";
    }
    return sql;
  }();
  return kSql[shape];
}

#undef CUSTOS_REQUEST_COLUMNS

absl::StatusOr<RequestRecord> ReadRequestRow(const sqlite::Statement& row) {
  RequestRecord request;
  request.id = row.ColumnText(0);
  request.operation = row.ColumnText(1);
  request.key_id = row.ColumnText(2);  // NULL (no key) reads as empty.
  request.parameters = row.ColumnText(3);
  request.justification = row.ColumnText(4);
  request.proposer = row.ColumnText(5);
  request.created_at = row.ColumnInt64(6);
  request.expires_at = row.ColumnInt64(7);
  const int64_t state = row.ColumnInt64(8);
  if (state < static_cast<int64_t>(RequestState::kPending) ||
      state > static_cast<int64_t>(RequestState::kFailed)) {
    return absl::InternalError(
        absl::StrCat("request '", request.id, "' has unknown state ", state));
  }
  request.state = static_cast<RequestState>(state);
  request.rejected_by = row.ColumnText(9);
  request.reason = row.ColumnText(10);
  request.closed_at = row.ColumnInt64(11);
  request.mac = row.ColumnBlob(12);
  return request;
}

absl::Status LoadApprovals(sqlite::Database& db, RequestRecord& request) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectApprovals));
  stmt.BindText(1, request.id);
  while (true) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return absl::OkStatus();
    request.approvals.push_back(Approval{stmt.ColumnText(0), stmt.ColumnInt64(1)});
  }
}

// Runs a request query whose parameters `stmt` already has, then loads each row's approvals
// (a few rows each, by primary key) once the query is done with.
absl::StatusOr<std::vector<RequestRecord>> ReadRequests(sqlite::Database& db,
                                                        sqlite::Statement stmt) {
  std::vector<RequestRecord> requests;
  while (true) {
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) break;
    CUSTOS_ASSIGN_OR_RETURN(RequestRecord request, ReadRequestRow(stmt));
    requests.push_back(std::move(request));
  }
  for (RequestRecord& request : requests) CUSTOS_RETURN_IF_ERROR(LoadApprovals(db, request));
  return requests;
}

}  // namespace

absl::Status WriteRequest(sqlite::Database& db, const RequestRecord& request) {
  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kUpsertRequest));
    stmt.BindText(1, request.id).BindText(2, request.operation);
    if (request.key_id.empty()) {
      stmt.BindNull(3);
    } else {
      stmt.BindText(3, request.key_id);
    }
    stmt.BindText(4, request.parameters)
        .BindText(5, request.justification)
        .BindText(6, request.proposer)
        .BindInt64(7, request.created_at)
        .BindInt64(8, request.expires_at)
        .BindInt64(9, static_cast<int64_t>(request.state))
        .BindText(10, request.rejected_by)
        .BindText(11, request.reason)
        .BindInt64(12, request.closed_at);
    if (request.mac.empty()) {
      stmt.BindNull(13);
    } else {
      stmt.BindBlob(13, request.mac);
    }
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kDeleteApprovals));
    stmt.BindText(1, request.id);
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  for (size_t i = 0; i < request.approvals.size(); ++i) {
    const Approval& approval = request.approvals[i];
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kInsertApproval));
    stmt.BindText(1, request.id)
        .BindText(2, approval.principal)
        .BindInt64(3, approval.at)
        .BindInt64(4, static_cast<int64_t>(i));
    CUSTOS_RETURN_IF_ERROR(stmt.Run());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<RequestRecord>> LoadRequest(sqlite::Database& db,
                                                         std::string_view id) {
  std::optional<RequestRecord> request;
  {
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectRequestById));
    stmt.BindText(1, id);
    CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
    if (!row) return std::nullopt;
    CUSTOS_ASSIGN_OR_RETURN(request, ReadRequestRow(stmt));
  }
  CUSTOS_RETURN_IF_ERROR(LoadApprovals(db, *request));
  return request;
}

absl::StatusOr<std::vector<RequestRecord>> LoadRequests(sqlite::Database& db,
                                                        const RequestFilter& filter,
                                                        const std::optional<RequestCursor>& after,
                                                        size_t limit) {
  const size_t shape = (filter.state.has_value() ? kFilterByState : 0) |
                       (filter.key_id.empty() ? 0 : kFilterByKey) |
                       (after.has_value() ? kAfterCursor : 0);
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(ListSql(shape).c_str()));
  stmt.BindInt64(1, filter.state.has_value() ? static_cast<int64_t>(*filter.state) : 0)
      .BindText(2, filter.key_id)
      .BindInt64(3, after.has_value() ? after->created_at : 0)
      .BindText(4, after.has_value() ? std::string_view(after->id) : std::string_view())
      .BindInt64(5, static_cast<int64_t>(limit));
  return ReadRequests(db, std::move(stmt));
}

absl::StatusOr<std::vector<RequestRecord>> LoadPendingRequests(sqlite::Database& db) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt, db.Prepare(kSelectPending));
  return ReadRequests(db, std::move(stmt));
}

}  // namespace custos::storage
