// StateLock: one process per key database, enforced with an exclusive lock on a lock file.
//
// Two custosd processes on one database would both append to the audit chain from heads
// that go stale under each other (and, on one port with SO_REUSEPORT, split the callers).
// So the store takes flock(LOCK_EX) on "<database>.lock" before it reads or writes anything,
// and holds it for its lifetime; the kernel drops it when the process ends, however it ends.
// The lock lives on a file of its own, never on the database: SQLite's own locks must stay
// shared so that auditors and backup tools can read the live file (and a close() of any
// descriptor on the database would drop SQLite's POSIX locks). The holder's pid is written
// into the file so that a refused second process can name it. Not copyable.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"

namespace custos::storage {

class StateLock {
 public:
  // Takes the lock on `path` (created 0600 if missing; symlinks refused) without waiting.
  // FAILED_PRECONDITION naming the holder's pid if another process holds it; UNAVAILABLE if
  // the file cannot be opened or written.
  static absl::StatusOr<std::unique_ptr<StateLock>> Acquire(const std::string& path);
  ~StateLock();
  StateLock(const StateLock&) = delete;
  StateLock& operator=(const StateLock&) = delete;

 private:
  explicit StateLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace custos::storage
