// AuditTrust: which records of the audit log are known to be as they were written, so that a
// catalogue row vouched for by one of them can be believed.
//
// At start-up custosd checks the log against the head the HSM last signed: that head's hash is
// authentic and every record after it chains to it (Kms::VerifyAuditLog). The records before
// the head are not read then (a million of them take seconds). But a row is current only if the
// newest record naming it carries its digest, and someone who can write the file could put back
// an older row and edit or delete the newer record that names it, without touching any hash:
// only recomputing the chain shows that. So before a record at or before the trusted point
// vouches for a row, the records from it up to that point are recomputed and must reproduce the
// trusted hash; the trusted point then moves down to the record before it. Each record is
// recomputed at most once per run, whichever row asks first; maintenance walks the rest down to
// record 1 (or the archive floor) a slice at a time. A segment that does not reproduce the hash is
// remembered: nothing at or before it is believed again in this run.
//
// Unanchored (tests, offline tools, a start-up that verified everything) every record is
// believed. Thread-safe; Cover of a record above the trusted point takes no lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "audit/record.h"
#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::storage {

class AuditTrust {
 public:
  // Records with seq >= `from_seq`, ascending, at most `limit`. DATA_LOSS if the file they were
  // read from is found not as custosd wrote it (its row index, say): Cover takes that for a
  // change to the log.
  using ReadRecords =
      std::function<absl::StatusOr<std::vector<audit::Record>>(uint64_t from_seq, size_t limit)>;

  explicit AuditTrust(ReadRecords read) : read_(std::move(read)) {}

  // Every record after `seq` is known intact and `hash` is record `seq`'s authentic hash (0 and
  // 32 zero bytes: everything is known intact). Forgets an earlier anchor and any failure.
  // `rows_noted`: every record after `seq` was verified (or written) by this process, which
  // noted the rows they name (anchored()).
  void Anchor(uint64_t seq, Bytes hash, bool rows_noted = true);

  // The log was archived up to `seq` (storage AuditFloor): its first record chains to `hash`,
  // which a signed checkpoint vouches for, and nothing at or before `seq` is read again.
  void SetFloor(uint64_t seq, Bytes hash);

  // OK if record `seq` is known intact, recomputing the records from it up to the trusted point
  // first if needed. FAILED_PRECONDITION if they do not reproduce the trusted hash (now or in an
  // earlier call): the log was changed there after it was written.
  absl::Status Cover(uint64_t seq);

  // Every record up to `seq` is one this process committed (or resumed its chain from at
  // start-up); noted after each commit, before a reader can see its records, and never after a
  // failed one. A record past it was added to the file by someone else while this process
  // runs: Cover refuses it (it vouches for nothing). Stores only; never lowered.
  void NoteCommitted(uint64_t seq);
  uint64_t committed_seq() const { return committed_seq_.load(); }

  // Recomputes up to `budget` more records below the trusted point (for maintenance). OK when
  // there was nothing left to do, too.
  absl::Status Extend(uint64_t budget);

  // The trusted point: every record after it is known intact (0 when all are, or unanchored).
  uint64_t trusted_seq() const { return trusted_seq_.load(); }
  // True once anchored with `rows_noted`: the records after the trusted point were then all
  // verified (or written) by this process, which noted the rows they name (RowIntegrity::Noted).
  bool anchored() const { return anchored_.load(); }

 private:
  const ReadRecords read_;
  std::atomic<uint64_t> trusted_seq_{0};
  std::atomic<bool> anchored_{false};
  std::atomic<uint64_t> committed_seq_{0};
  std::atomic<bool> commits_noted_{false};  // false for an AuditTrust no store feeds
  std::mutex mu_;
  Bytes trusted_hash_;   // guarded by mu_
  absl::Status broken_;  // guarded by mu_: why records at or before broken_seq_ are not believed
  uint64_t broken_seq_ = 0;  // guarded by mu_
  // The archive floor. Set from the store's commit (under its lock), so never under mu_,
  // which Cover holds while it reads from the store: floor_mu_ is a leaf lock.
  std::atomic<uint64_t> floor_seq_{0};
  mutable std::mutex floor_mu_;
  Bytes floor_hash_;  // guarded by floor_mu_
};

}  // namespace custos::storage
