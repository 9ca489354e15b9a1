// Reading and writing dual-control RequestRecords as rows of the requests and
// request_approvals tables. Every statement is constant SQL with bound parameters.
//
// Not thread-safe: callers hold the Database's lock. Internal to storage/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "storage/key_store.h"
#include "storage/sqlite.h"

namespace custos::storage {

// Inserts `request`, or replaces the stored request with its id and all its approvals. Run it
// inside a write transaction.
absl::Status WriteRequest(sqlite::Database& db, const RequestRecord& request);

// The request with `id`, with its approvals in the order given, or nullopt if there is none.
absl::StatusOr<std::optional<RequestRecord>> LoadRequest(sqlite::Database& db, std::string_view id);

// Where a newest-first listing stopped: the last request returned.
struct RequestCursor {
  int64_t created_at = 0;
  std::string id;
};

// Up to `limit` requests matching `filter`, newest first (created_at, then id, descending),
// strictly after `after` if given.
absl::StatusOr<std::vector<RequestRecord>> LoadRequests(sqlite::Database& db,
                                                        const RequestFilter& filter,
                                                        const std::optional<RequestCursor>& after,
                                                        size_t limit);

// Every PENDING request, oldest first.
absl::StatusOr<std::vector<RequestRecord>> LoadPendingRequests(sqlite::Database& db);

}  // namespace custos::storage
