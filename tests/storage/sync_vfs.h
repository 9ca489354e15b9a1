// SyncVfs: a SQLite VFS over the default one that records, for write-ahead-log files, every
// write and every sync in order, and can make syncs slow or failing. Registered as the
// process's default VFS while an instance lives, so a KeyStore opened meanwhile uses it: the
// tests see exactly when SQLite asks the OS to make the log durable, relative to when
// KeyStore::Apply returns.
#pragma once

#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <vector>

namespace custos::storage::test {

class SyncVfs {
 public:
  enum class Op { kWrite, kSync };

  SyncVfs();
  ~SyncVfs();
  SyncVfs(const SyncVfs&) = delete;
  SyncVfs& operator=(const SyncVfs&) = delete;

  // The WAL writes and syncs so far, in the order SQLite made them.
  std::vector<Op> WalOps() const;
  size_t WalSyncs() const;

  // Every WAL sync sleeps this long first (a slow disk).
  void SetSyncDelay(std::chrono::microseconds delay) { sync_delay_us_ = delay.count(); }
  // While set, every WAL sync fails with SQLITE_IOERR_FSYNC (a disk that lost the write).
  void SetSyncFails(bool fails) { sync_fails_ = fails; }

  // For the file methods (see sync_vfs.cc); not for tests.
  void Record(Op op);
  int BeforeSync();
  sqlite3_vfs* real() const { return real_; }

 private:
  sqlite3_vfs vfs_{};
  sqlite3_vfs* real_ = nullptr;
  mutable std::mutex mu_;
  std::vector<Op> ops_;  // guarded by mu_
  std::atomic<long long> sync_delay_us_{0};
  std::atomic<bool> sync_fails_{false};
};

}  // namespace custos::storage::test
