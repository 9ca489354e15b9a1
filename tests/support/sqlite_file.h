// Raw SQL on a database file, over a connection of its own: what someone holding the file (a
// DBA, root on the host) can do behind custosd's back, and how tests read what is stored.
#pragma once

#include <cstdint>
#include <string>

namespace custos::testing {

// The first column of the first row `sql` returns, as text ("" if none). REQUIREs success.
std::string SqlQuery(const std::string& db_path, const std::string& sql);

// Runs `sql` (any number of statements); "" on success, else SQLite's message.
std::string SqlExec(const std::string& db_path, const std::string& sql);

// Rebuilds custos.db's row index (audit_log_by_row) without the entries of the audit records
// that match `condition` (SQL over audit_log's columns, e.g. "seq = 12"), through the schema
// table, each step on a connection of its own (one reads the schema once): no record changes,
// and only PRAGMA integrity_check would tell. REQUIREs success.
void DropRowIndexEntries(const std::string& db_path, const std::string& condition);

// Swaps custos.db's row index for a B-tree of the same shape holding every genuine entry and
// one forged: an entry naming `row` that sorts as record `position` but leads to record
// `target`. No record changes. REQUIREs success.
void ForgeRowIndexEntry(const std::string& db_path, const std::string& row, uint64_t position,
                        uint64_t target);

// While it lives, another process appears to be checkpointing `db_path`: it holds
// WAL_CKPT_LOCK, byte 121 of the -shm file (SQLite's documented WAL-index layout). SQLite
// then gives up a checkpoint at once, without the busy timeout another connection's reader or
// writer would first be waited for. An open-file-description lock conflicts with SQLite's own
// POSIX locks even within this process. REQUIREs that the lock is taken.
class CheckpointLockHeld {
 public:
  explicit CheckpointLockHeld(const std::string& db_path);
  ~CheckpointLockHeld();
  CheckpointLockHeld(const CheckpointLockHeld&) = delete;
  CheckpointLockHeld& operator=(const CheckpointLockHeld&) = delete;

 private:
  int shm_ = -1;
};

}  // namespace custos::testing
