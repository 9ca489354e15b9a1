#include "tests/storage/sync_vfs.h"

#include <algorithm>
#include <thread>

namespace custos::storage::test {
namespace {

// Our file: the methods table below, then the real VFS's file right after it.
struct File {
  sqlite3_file base;
  sqlite3_file* real;
  SyncVfs* owner;  // null for files other than the WAL
};

sqlite3_file* Real(sqlite3_file* f) { return reinterpret_cast<File*>(f)->real; }

int Close(sqlite3_file* f) { return Real(f)->pMethods->xClose(Real(f)); }
int Read(sqlite3_file* f, void* buf, int n, sqlite3_int64 off) {
  return Real(f)->pMethods->xRead(Real(f), buf, n, off);
}
int Write(sqlite3_file* f, const void* buf, int n, sqlite3_int64 off) {
  if (SyncVfs* owner = reinterpret_cast<File*>(f)->owner) owner->Record(SyncVfs::Op::kWrite);
  return Real(f)->pMethods->xWrite(Real(f), buf, n, off);
}
int Truncate(sqlite3_file* f, sqlite3_int64 size) {
  return Real(f)->pMethods->xTruncate(Real(f), size);
}
int Sync(sqlite3_file* f, int flags) {
  SyncVfs* owner = reinterpret_cast<File*>(f)->owner;
  if (owner == nullptr) return Real(f)->pMethods->xSync(Real(f), flags);
  if (const int rc = owner->BeforeSync(); rc != SQLITE_OK) return rc;
  const int rc = Real(f)->pMethods->xSync(Real(f), flags);
  if (rc == SQLITE_OK) owner->Record(SyncVfs::Op::kSync);  // only a sync that happened
  return rc;
}
int FileSize(sqlite3_file* f, sqlite3_int64* size) {
  return Real(f)->pMethods->xFileSize(Real(f), size);
}
int Lock(sqlite3_file* f, int level) { return Real(f)->pMethods->xLock(Real(f), level); }
int Unlock(sqlite3_file* f, int level) { return Real(f)->pMethods->xUnlock(Real(f), level); }
int CheckReservedLock(sqlite3_file* f, int* out) {
  return Real(f)->pMethods->xCheckReservedLock(Real(f), out);
}
int FileControl(sqlite3_file* f, int op, void* arg) {
  return Real(f)->pMethods->xFileControl(Real(f), op, arg);
}
int SectorSize(sqlite3_file* f) { return Real(f)->pMethods->xSectorSize(Real(f)); }
int DeviceCharacteristics(sqlite3_file* f) {
  return Real(f)->pMethods->xDeviceCharacteristics(Real(f));
}
int ShmMap(sqlite3_file* f, int page, int size, int extend, void volatile** out) {
  return Real(f)->pMethods->xShmMap(Real(f), page, size, extend, out);
}
int ShmLock(sqlite3_file* f, int offset, int n, int flags) {
  return Real(f)->pMethods->xShmLock(Real(f), offset, n, flags);
}
void ShmBarrier(sqlite3_file* f) { Real(f)->pMethods->xShmBarrier(Real(f)); }
int ShmUnmap(sqlite3_file* f, int remove) { return Real(f)->pMethods->xShmUnmap(Real(f), remove); }
int Fetch(sqlite3_file* f, sqlite3_int64 off, int n, void** out) {
  return Real(f)->pMethods->xFetch(Real(f), off, n, out);
}
int Unfetch(sqlite3_file* f, sqlite3_int64 off, void* p) {
  return Real(f)->pMethods->xUnfetch(Real(f), off, p);
}

const sqlite3_io_methods kMethods = {.iVersion = 3,
                                     .xClose = Close,
                                     .xRead = Read,
                                     .xWrite = Write,
                                     .xTruncate = Truncate,
                                     .xSync = Sync,
                                     .xFileSize = FileSize,
                                     .xLock = Lock,
                                     .xUnlock = Unlock,
                                     .xCheckReservedLock = CheckReservedLock,
                                     .xFileControl = FileControl,
                                     .xSectorSize = SectorSize,
                                     .xDeviceCharacteristics = DeviceCharacteristics,
                                     .xShmMap = ShmMap,
                                     .xShmLock = ShmLock,
                                     .xShmBarrier = ShmBarrier,
                                     .xShmUnmap = ShmUnmap,
                                     .xFetch = Fetch,
                                     .xUnfetch = Unfetch};

int Open(sqlite3_vfs* vfs, const char* name, sqlite3_file* f, int flags, int* out_flags) {
  auto* owner = static_cast<SyncVfs*>(vfs->pAppData);
  sqlite3_vfs* real_vfs = owner->real();
  File* file = reinterpret_cast<File*>(f);
  file->real = reinterpret_cast<sqlite3_file*>(file + 1);
  file->owner = (flags & SQLITE_OPEN_WAL) != 0 ? owner : nullptr;
  const int rc = real_vfs->xOpen(real_vfs, name, file->real, flags, out_flags);
  // SQLite calls xClose only if pMethods is set, and only ours when the real open succeeded.
  file->base.pMethods = rc == SQLITE_OK && file->real->pMethods != nullptr ? &kMethods : nullptr;
  return rc;
}

}  // namespace

SyncVfs::SyncVfs() {
  real_ = sqlite3_vfs_find("unix");
  vfs_ = *real_;  // every other method is the real VFS's own
  vfs_.szOsFile = static_cast<int>(sizeof(File)) + real_->szOsFile;
  vfs_.zName = "custos-sync-test";
  vfs_.pAppData = this;
  vfs_.xOpen = Open;
  vfs_.pNext = nullptr;
  sqlite3_vfs_register(&vfs_, /*makeDflt=*/1);
}

SyncVfs::~SyncVfs() {
  sqlite3_vfs_unregister(&vfs_);
  sqlite3_vfs_register(real_, /*makeDflt=*/1);
}

std::vector<SyncVfs::Op> SyncVfs::WalOps() const {
  std::lock_guard lock(mu_);
  return ops_;
}

size_t SyncVfs::WalSyncs() const {
  std::lock_guard lock(mu_);
  return static_cast<size_t>(std::count(ops_.begin(), ops_.end(), Op::kSync));
}

void SyncVfs::Record(Op op) {
  std::lock_guard lock(mu_);
  ops_.push_back(op);
}

int SyncVfs::BeforeSync() {
  if (const long long us = sync_delay_us_.load(); us > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
  return sync_fails_ ? SQLITE_IOERR_FSYNC : SQLITE_OK;
}

}  // namespace custos::storage::test
