// An online backup of the key database: SQLite's backup API copies every page in one read
// transaction, so the copy is one consistent state of the catalogue and of the audit chain
// (record N's hash covers record N-1 in the copy as in the live file), while custosd keeps
// serving (WAL mode: a reader never blocks its commits).
//
// The copy alone is not a backup of Custos: its key versions are wrapped under root keys that
// live in the HSM token. BackupSummary names those roots, so that the token backup kept with it
// can be checked to hold them (docs/OPERATIONS.md).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "common/status.h"

namespace custos::storage {

struct BackupSummary {
  uint64_t bytes = 0;            // size of the copy
  uint64_t last_record = 0;      // the copy's last audit record (0: none)
  uint64_t last_checkpoint = 0;  // the copy's last signed checkpoint (0: none)
  uint64_t keys = 0;
  // Key versions in the copy by the root key (label) that wraps them: the token backup must
  // hold each of these roots.
  std::map<std::string, uint64_t> versions_by_root;
};

// Copies the database at `from` (read only; a live custosd may be using it) to `to`, a new
// file created with mode 0600 (ALREADY_EXISTS if it exists: a backup is never overwritten),
// checks the copy (PRAGMA integrity_check), flushes it to disk and summarises it. On any error
// the partial copy is removed. FAILED_PRECONDITION if `from` is not a Custos database.
absl::StatusOr<BackupSummary> BackupDatabase(const std::string& from, const std::string& to);

}  // namespace custos::storage
