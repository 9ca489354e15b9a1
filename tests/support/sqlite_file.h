// Raw SQL on a database file, over a connection of its own: what someone holding the file (a
// DBA, root on the host) can do behind custosd's back, and how tests read what is stored.
#pragma once

#include <string>

namespace custos::testing {

// The first column of the first row `sql` returns, as text ("" if none). REQUIREs success.
std::string SqlQuery(const std::string& db_path, const std::string& sql);

// Runs `sql` (any number of statements); "" on success, else SQLite's message.
std::string SqlExec(const std::string& db_path, const std::string& sql);

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
