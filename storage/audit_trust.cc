#include "storage/audit_trust.h"

#include <openssl/crypto.h>

#include <algorithm>

#include "common/strings.h"

namespace custos::storage {
namespace {

constexpr size_t kPage = 1000;

}  // namespace

void AuditTrust::Anchor(uint64_t seq, Bytes hash, bool rows_noted) {
  std::lock_guard lock(mu_);
  trusted_hash_ = std::move(hash);
  broken_ = absl::OkStatus();
  broken_seq_ = 0;
  trusted_seq_.store(seq);
  anchored_.store(rows_noted);
}

void AuditTrust::SetFloor(uint64_t seq, Bytes hash) {
  std::lock_guard lock(floor_mu_);
  floor_hash_ = std::move(hash);
  floor_seq_.store(seq);
}

void AuditTrust::NoteCommitted(uint64_t seq) {
  uint64_t noted = committed_seq_.load();
  while (seq > noted && !committed_seq_.compare_exchange_weak(noted, seq)) {
  }
  commits_noted_.store(true);
}

absl::Status AuditTrust::Cover(uint64_t seq) {
  if (commits_noted_.load() && seq > committed_seq_.load()) {
    return absl::FailedPreconditionError(StrCat(
        "audit record ", seq, " is past the last record custosd committed (", committed_seq_.load(),
        "): it was added to the file from outside while custosd ran"));
  }
  if (seq > trusted_seq_.load()) return absl::OkStatus();
  std::lock_guard lock(mu_);
  const uint64_t top = trusted_seq_.load();
  if (seq > top) return absl::OkStatus();  // another caller covered it meanwhile
  if (!broken_.ok() && seq <= broken_seq_) return broken_;
  if (seq == 0) return absl::OkStatus();
  // Records seq..top, chained from the stored hash of record seq - 1, must end in the trusted
  // hash; that proves each of them, and record seq - 1's hash, authentic.
  Bytes start(audit::kHashBytes, 0);
  const uint64_t floor = floor_seq_.load();
  // A row vouched for by an archived record was carried forward before it was archived: the
  // caller read the log before the archival and may simply ask again.
  const auto archived_meanwhile = [seq] {
    return absl::UnavailableError(
        StrCat("audit record ", seq, " was archived while it was being checked; try again"));
  };
  if (seq <= floor) return archived_meanwhile();
  if (floor > 0 && seq == floor + 1) {
    std::lock_guard floor_lock(floor_mu_);
    start = floor_hash_;
  } else if (seq > 1) {
    absl::StatusOr<std::vector<audit::Record>> read = read_(seq - 1, 1);
    if (absl::IsDataLoss(read.status())) {  // as in the walk below
      broken_ = absl::FailedPreconditionError(read.status().message());
      broken_seq_ = top;
      return broken_;
    }
    CUSTOS_RETURN_IF_ERROR(read.status());
    std::vector<audit::Record>& before = *read;
    if (before.empty() || before[0].seq != seq - 1) {
      if (floor_seq_.load() >= seq - 1) return archived_meanwhile();
      broken_ = absl::FailedPreconditionError(
          StrCat("audit record ", seq - 1, " is missing from the log (deleted?)"));
      broken_seq_ = top;
      return broken_;
    }
    start = std::move(before[0].hash);
  }
  Bytes prev = start;
  uint64_t next = seq;
  absl::Status problem;
  while (next <= top && problem.ok()) {
    absl::StatusOr<std::vector<audit::Record>> read =
        read_(next, static_cast<size_t>(std::min<uint64_t>(kPage, top - next + 1)));
    if (absl::IsDataLoss(read.status())) {  // the file is not as written, if not the records
      problem = absl::FailedPreconditionError(read.status().message());
      break;
    }
    CUSTOS_RETURN_IF_ERROR(read.status());
    const std::vector<audit::Record>& page = *read;
    if (page.empty()) {
      problem = absl::FailedPreconditionError(
          StrCat("audit records ", next, " to ", top, " are missing from the log (deleted?)"));
    }
    for (const audit::Record& record : page) {
      if (record.seq != next) {
        problem = absl::FailedPreconditionError(StrCat(
            "audit record ", next, " is missing from the log (it goes on at ", record.seq, ")"));
        break;
      }
      prev = audit::ChainHash(prev, record);
      ++next;
    }
  }
  // Records that went missing during the walk may have been archived under it.
  if (!problem.ok() && floor_seq_.load() >= seq) return archived_meanwhile();
  if (problem.ok() && (prev.size() != trusted_hash_.size() ||
                       CRYPTO_memcmp(prev.data(), trusted_hash_.data(), prev.size()) != 0)) {
    problem = absl::FailedPreconditionError(
        StrCat("audit records ", seq, " to ", top, " do not chain to the hash signed at record ",
               top, ": a record among them was changed, added or removed after it was written"));
  }
  if (!problem.ok()) {
    broken_ = problem;
    broken_seq_ = top;
    return problem;
  }
  trusted_hash_ = std::move(start);
  trusted_seq_.store(seq - 1);
  return absl::OkStatus();
}

absl::Status AuditTrust::Extend(uint64_t budget) {
  const uint64_t top = trusted_seq_.load();
  const uint64_t floor = floor_seq_.load();
  if (top <= floor || budget == 0) return absl::OkStatus();
  return Cover(top - floor > budget ? top - budget + 1 : floor + 1);
}

}  // namespace custos::storage
