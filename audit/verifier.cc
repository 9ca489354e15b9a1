#include "audit/verifier.h"

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <string>
#include <utility>

#include "common/strings.h"

namespace custos::audit {

void PublicKeyVerifier::KeyDeleter::operator()(evp_pkey_st* key) const { EVP_PKEY_free(key); }

PublicKeyVerifier::PublicKeyVerifier(PublicKeyVerifier&&) noexcept = default;
PublicKeyVerifier& PublicKeyVerifier::operator=(PublicKeyVerifier&&) noexcept = default;
PublicKeyVerifier::~PublicKeyVerifier() = default;

absl::StatusOr<PublicKeyVerifier> PublicKeyVerifier::FromPem(std::string_view pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  if (bio == nullptr) return absl::ResourceExhaustedError("out of memory reading the public key");
  EVP_PKEY* raw = PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr);
  if (raw == nullptr) return absl::InvalidArgumentError("not a PEM public key");
  PublicKeyVerifier verifier(raw);
  char group[64] = {};
  if (!EVP_PKEY_is_a(raw, "EC") ||
      EVP_PKEY_get_utf8_string_param(raw, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                     nullptr) != 1 ||
      std::string_view(group) != "prime256v1") {
    return absl::InvalidArgumentError("the public key is not an ECDSA P-256 key");
  }
  return verifier;
}

bool PublicKeyVerifier::Verify(std::string_view message, std::span<const uint8_t> signature) const {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  return ctx != nullptr &&
         EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key_.get()) == 1 &&
         EVP_DigestVerify(ctx.get(), signature.data(), signature.size(),
                          reinterpret_cast<const unsigned char*>(message.data()),
                          message.size()) == 1;
}

bool PublicKeyVerifier::Verify(const Checkpoint& checkpoint) const {
  return Verify(CheckpointMessage(checkpoint), checkpoint.signature);
}

absl::StatusOr<std::optional<Record>> VectorRecordSource::Next() {
  if (next_ == records_.size()) return std::nullopt;
  return records_[next_++];
}

absl::StatusOr<std::optional<Record>> JsonLinesRecordSource::Next() {
  std::string line;
  while (std::getline(*in_, line)) {
    ++line_number_;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (IsCheckpointLine(line)) continue;  // ReadCheckpointLines reads those
    absl::StatusOr<Record> record = FromJsonLine(line);
    if (!record.ok()) {
      return absl::InvalidArgumentError(
          StrCat("line ", line_number_, ": ", record.status().message()));
    }
    return std::optional<Record>(*std::move(record));
  }
  if (in_->bad()) return absl::DataLossError(StrCat("read error after line ", line_number_));
  return std::nullopt;
}

absl::StatusOr<std::optional<Record>> ConcatenatedRecordSource::Next() {
  for (; current_ < sources_.size(); ++current_) {
    CUSTOS_ASSIGN_OR_RETURN(std::optional<Record> record, sources_[current_]->Next());
    if (record.has_value()) return record;
  }
  return std::optional<Record>();
}

absl::StatusOr<std::vector<Checkpoint>> ReadCheckpointLines(std::istream& in) {
  std::vector<Checkpoint> checkpoints;
  std::string line;
  uint64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (!IsCheckpointLine(line)) continue;
    absl::StatusOr<Checkpoint> checkpoint = CheckpointFromJsonLine(line);
    if (!checkpoint.ok()) {
      return absl::InvalidArgumentError(
          StrCat("line ", line_number, ": checkpoint: ", checkpoint.status().message()));
    }
    checkpoints.push_back(*std::move(checkpoint));
  }
  if (in.bad()) return absl::DataLossError(StrCat("read error after line ", line_number));
  return checkpoints;
}

namespace {

std::string Records(uint64_t from, uint64_t to) {
  return from == to ? StrCat("record ", from) : StrCat("records ", from, " to ", to);
}

constexpr std::string_view kBadSignature =
    "signature does not verify under the given public key (forged, altered, or signed by "
    "another key?)";

// One run of Verify: walks the records once, in order, stopping at the first failure.
class Verification {
 public:
  Verification(RecordSource& records, const std::vector<Checkpoint>& checkpoints,
               const Checkpoint* anchor, const PublicKeyVerifier& key)
      : records_(records), anchor_(anchor), key_(key) {
    for (const Checkpoint& checkpoint : checkpoints) checkpoints_.push_back(&checkpoint);
    std::stable_sort(checkpoints_.begin(), checkpoints_.end(),
                     [](const Checkpoint* a, const Checkpoint* b) { return a->seq < b->seq; });
    report_.last_verified_hash.assign(kHashBytes, 0);
    if (anchor_ == nullptr) {
      report_.caveat = "no anchor checkpoint given: truncation of the tail cannot be ruled out";
    }
  }

  VerifyReport Run() {
    if (CheckInputs() && CheckRecords() && CheckEnd()) report_.ok = true;
    return std::move(report_);
  }

 private:
  bool Fail(uint64_t seq, std::string reason) {
    report_.ok = false;
    report_.first_bad_seq = seq;
    report_.reason = std::move(reason);
    return false;
  }

  uint64_t last() const { return report_.last_verified_seq; }

  bool CheckInputs() {
    if (anchor_ != nullptr) {
      if (anchor_->seq == 0 || anchor_->hash.size() != kHashBytes) {
        return Fail(0, "the anchor checkpoint is malformed (no seq or not a 32-byte hash)");
      }
      if (!key_.Verify(*anchor_)) {
        return Fail(0, StrCat("the anchor checkpoint's ", kBadSignature,
                              ": it proves nothing about this log"));
      }
    }
    for (const Checkpoint* checkpoint : checkpoints_) {
      if (checkpoint->seq == 0 || checkpoint->hash.size() != kHashBytes) {
        return Fail(checkpoint->seq, StrCat("checkpoint at ", checkpoint->seq,
                                            " is malformed (no seq or not a 32-byte hash)"));
      }
    }
    return true;
  }

  absl::StatusOr<std::optional<Record>> Take() {
    if (pending_.has_value()) return *std::exchange(pending_, std::nullopt);
    return records_.Next();
  }

  bool CheckRecords() {
    while (true) {
      absl::StatusOr<std::optional<Record>> next = Take();
      if (!next.ok()) {
        return Fail(last() + 1,
                    StrCat(last() == 0 ? std::string("cannot read the first record: ")
                                       : StrCat("cannot read the record after ", last(), ": "),
                           next.status().message()));
      }
      if (!next->has_value()) return true;
      const Record& record = **next;
      if (report_.first_seq == 0 && !Start(record.seq)) return false;
      if (!CheckOrder(record) || !CheckFormat(record) || !CheckHash(record) ||
          !CheckCheckpointsAt(record)) {
        return false;
      }
      report_.last_verified_seq = record.seq;
      report_.last_verified_hash = record.hash;
      ++report_.records_checked;
      if (archival_seq_ == 0 && !archival_statement_.empty() &&
          record.action == "ArchiveAuditLog" && record.detail.size() > archival_statement_.size() &&
          record.detail.compare(record.detail.size() - archival_statement_.size(),
                                archival_statement_.size(), archival_statement_) == 0) {
        archival_seq_ = record.seq;
      }
    }
  }

  // A log starts at record 1, or (once archived) just after a checkpoint it holds, which the
  // archive before it ends with: the chain goes on from that checkpoint's signed hash.
  bool Start(uint64_t first) {
    report_.first_seq = first;
    if (first <= 1) return CheckAnchorBefore(1);
    const uint64_t floor = first - 1;
    while (next_checkpoint_ < checkpoints_.size() && checkpoints_[next_checkpoint_]->seq < floor) {
      ++next_checkpoint_;  // about archived records: the archive that holds them checks them
    }
    if (next_checkpoint_ == checkpoints_.size() || checkpoints_[next_checkpoint_]->seq != floor) {
      report_.first_seq = 1;  // not an archived log's start: CheckOrder names the gap
      return true;
    }
    const Checkpoint& start = *checkpoints_[next_checkpoint_++];
    if (!key_.Verify(start)) {
      return Fail(first, StrCat("the log starts at record ", first, " after the checkpoint at ",
                                floor, ", whose ", kBadSignature));
    }
    report_.starts_after = floor;
    archival_statement_ = StrCat("; the live log starts after the checkpoint at ", floor, " (hash ",
                                 ToHex(start.hash), ")");
    report_.last_verified_seq = floor;
    report_.last_verified_hash = start.hash;
    ++report_.checkpoints_verified;
    previous_checkpoint_ = &start;
    return CheckAnchorBefore(first);
  }

  // An anchor at or before the first record's predecessor cannot be checked against this log.
  bool CheckAnchorBefore(uint64_t first) {
    if (anchor_ == nullptr || anchor_->seq >= first) return true;
    if (anchor_->seq + 1 == first && anchor_->hash == report_.last_verified_hash) return true;
    if (anchor_->seq + 1 == first) {
      return Fail(first - 1, StrCat("the hash at ", first - 1,
                                    " differs from the anchor: history was rewritten"));
    }
    return Fail(anchor_->seq,
                StrCat("the anchor checkpoint is at ", anchor_->seq, ", but this log starts at ",
                       first, " (", Records(1, first - 1),
                       " were archived): verify it with the archive that holds it"));
  }

  // The record must be last() + 1; otherwise one record of look-ahead tells a swap, an edited
  // seq and a deletion apart.
  bool CheckOrder(const Record& record) {
    const uint64_t expected = last() + 1;
    const uint64_t seq = record.seq;
    if (seq == expected) return true;
    absl::StatusOr<std::optional<Record>> peek = records_.Next();
    if (peek.ok()) pending_ = *std::move(peek);
    const uint64_t after = pending_.has_value() ? pending_->seq : 0;
    if (after == expected + 1) {
      return Fail(expected, StrCat("record ", expected, ": found record ", seq,
                                   " in its place (seq edited, or records moved?)"));
    }
    if (after == expected) {
      if (seq > expected) {
        return Fail(expected, StrCat("records out of order at ", expected, ": record ", seq,
                                     " comes before record ", expected, " (swapped?)"));
      }
      return Fail(expected, StrCat("records out of order at ", expected, ": record ", seq,
                                   " appears again after record ", last(), " (duplicated?)"));
    }
    if (seq > expected) {
      if (last() == 0) {
        return Fail(1,
                    StrCat("the log starts at record ", seq, ", not 1, and holds no checkpoint at ",
                           seq - 1, " to start from (", Records(1, seq - 1),
                           " deleted, or archived up to a different record?)"));
      }
      return Fail(expected, StrCat("record ", last(), " is followed by ", seq, " (",
                                   Records(expected, seq - 1), " deleted?)"));
    }
    return Fail(expected, StrCat("records out of order at ", expected, ": record ", seq,
                                 " follows record ", last(), " (duplicated or moved?)"));
  }

  // Formats 1 and 2 only; a format 1 record carries no format 2 field (its encoding would not
  // cover it); and once the log is in format 2 it never goes back.
  bool CheckFormat(const Record& record) {
    if (record.format != 1 && record.format != 2) {
      return Fail(record.seq, StrCat("record ", record.seq, ": unknown format ", record.format));
    }
    if (record.format == 1 &&
        (!record.call_id.empty() || !record.row.empty() || !record.row_digest.empty())) {
      return Fail(record.seq, StrCat("record ", record.seq,
                                     ": format 1 with format 2 fields, which its hash does not "
                                     "cover (edited?)"));
    }
    if (record.format < format_) {
      return Fail(record.seq, StrCat("record ", record.seq, ": format ", record.format,
                                     " after format ", format_, " records (edited?)"));
    }
    format_ = record.format;
    return true;
  }

  bool CheckHash(const Record& record) {
    if (record.hash.size() != kHashBytes) {
      return Fail(record.seq, StrCat("record ", record.seq, ": its stored hash is ",
                                     record.hash.size(), " bytes, not 32 (edited?)"));
    }
    if (ChainHash(report_.last_verified_hash, record) == record.hash) return true;
    std::string reason =
        StrCat("record ", record.seq, ": hash does not match its contents (edited?)");
    if (record.seq > 1) {
      reason += StrCat(", or record ", last(), " was rewritten with a recomputed hash");
    }
    return Fail(record.seq, std::move(reason));
  }

  bool CheckCheckpointsAt(const Record& record) {
    for (; next_checkpoint_ < checkpoints_.size() &&
           checkpoints_[next_checkpoint_]->seq == record.seq;
         ++next_checkpoint_) {
      const Checkpoint& checkpoint = *checkpoints_[next_checkpoint_];
      if (!key_.Verify(checkpoint)) {
        return Fail(record.seq, StrCat("checkpoint at ", record.seq, ": ", kBadSignature));
      }
      if (checkpoint.hash != record.hash) {
        return Fail(record.seq,
                    StrCat("record ", record.seq, ": hash differs from the signed checkpoint at ",
                           record.seq, ": history up to ", record.seq, " was rewritten"));
      }
      if (!CheckCheckpointChain(checkpoint)) return false;
      ++report_.checkpoints_verified;
      report_.signed_through_seq = record.seq;
      previous_checkpoint_ = &checkpoint;
    }
    if (anchor_ != nullptr && anchor_->seq == record.seq) {
      if (anchor_->hash != record.hash) {
        return Fail(record.seq, StrCat("the hash at ", record.seq,
                                       " differs from the anchor: history was rewritten"));
      }
      report_.signed_through_seq = record.seq;
    }
    return true;
  }

  // A format 2 checkpoint names the one signed before it: that one must be in the log, so
  // deleting a checkpoint (the record of what was signed) shows.
  bool CheckCheckpointChain(const Checkpoint& checkpoint) {
    if (checkpoint.format == 1) return true;
    const uint64_t before = previous_checkpoint_ == nullptr ? 0 : previous_checkpoint_->seq;
    if (checkpoint.prev_seq == before &&
        (before == 0 ? std::all_of(checkpoint.prev_hash.begin(), checkpoint.prev_hash.end(),
                                   [](uint8_t b) { return b == 0; })
                     : checkpoint.prev_hash == previous_checkpoint_->hash)) {
      return true;
    }
    if (checkpoint.prev_seq > before) {
      return Fail(checkpoint.seq,
                  StrCat("checkpoint at ", checkpoint.seq, " follows a checkpoint at ",
                         checkpoint.prev_seq, " that the log does not hold (deleted?)"));
    }
    return Fail(checkpoint.seq,
                StrCat("checkpoint at ", checkpoint.seq, " names checkpoint ", checkpoint.prev_seq,
                       " before it, but the log's previous checkpoint is at ", before,
                       before == 0 ? "" : " (or its hash differs)"));
  }

  bool CheckEnd() {
    const std::string ends =
        last() == 0 ? std::string("the log is empty") : StrCat("log ends at ", last());
    if (anchor_ != nullptr && anchor_->seq > last()) {
      return Fail(last() + 1, StrCat(ends, " but the anchor checkpoint is at ", anchor_->seq,
                                     ": the tail was truncated (",
                                     Records(last() + 1, anchor_->seq), " missing)"));
    }
    if (next_checkpoint_ < checkpoints_.size()) {
      const Checkpoint& checkpoint = *checkpoints_[next_checkpoint_];
      if (!key_.Verify(checkpoint)) {
        return Fail(checkpoint.seq, StrCat("checkpoint at ", checkpoint.seq, ": ", kBadSignature));
      }
      return Fail(last() + 1, StrCat(ends, " but it holds a signed checkpoint at ", checkpoint.seq,
                                     ": the tail was truncated (",
                                     Records(last() + 1, checkpoint.seq), " missing)"));
    }
    // A log cut at any stored checkpoint would look archived there: only the signed record of
    // the archival that ended there makes the start believable.
    if (report_.starts_after > 0 &&
        (archival_seq_ == 0 || archival_seq_ > report_.signed_through_seq)) {
      return Fail(report_.starts_after + 1,
                  StrCat("the log starts after the checkpoint at ", report_.starts_after,
                         ", but holds no ArchiveAuditLog record covered by a signature saying it "
                         "was archived up to there: ",
                         Records(1, report_.starts_after), " may have been cut off"));
    }
    if (anchor_ != nullptr && anchor_->seq < last()) {
      report_.caveat = StrCat("records after ", anchor_->seq,
                              " (the anchor) are not covered by it: truncation after record ",
                              anchor_->seq, " cannot be ruled out");
    }
    return true;
  }

  RecordSource& records_;
  const Checkpoint* anchor_;
  const PublicKeyVerifier& key_;
  std::vector<const Checkpoint*> checkpoints_;  // by seq
  size_t next_checkpoint_ = 0;
  const Checkpoint* previous_checkpoint_ = nullptr;  // the last one verified
  uint32_t format_ = 1;                              // of the last record read
  std::optional<Record> pending_;                    // read ahead by CheckOrder
  // What the ArchiveAuditLog record of the archival the log starts after says (the end of its
  // detail), and that record's seq once found.
  std::string archival_statement_;
  uint64_t archival_seq_ = 0;
  VerifyReport report_;
};

}  // namespace

std::string VerifyReport::Summary() const {
  std::string out;
  if (!ok) {
    out = StrCat("FAILED: ", reason, "\n");
    if (last_verified_seq > starts_after) {
      out += StrCat("Verified before that: ", Records(starts_after + 1, last_verified_seq),
                    "; last good hash ", ToHex(last_verified_hash), "\n");
    }
    return out;
  }
  if (last_verified_seq == starts_after) {
    out = "OK: the log is empty\n";
  } else {
    out = StrCat(
        "OK: ", Records(starts_after + 1, last_verified_seq), " verified, chain intact; last hash ",
        ToHex(last_verified_hash), "\n", checkpoints_verified,
        " signed checkpoint(s) in the log verified; ",
        signed_through_seq <= starts_after
            ? std::string("no signature covers any record")
            : StrCat(Records(starts_after + 1, signed_through_seq), " covered by a signature"),
        "\n");
  }
  if (starts_after > 0) {
    out += StrCat("Starts after the signed checkpoint at ", starts_after, ": ",
                  Records(1, starts_after),
                  " were archived; verify the archives with this log to check them\n");
  }
  if (!caveat.empty()) out += StrCat("Note: ", caveat, "\n");
  return out;
}

VerifyReport Verify(RecordSource& records, const std::vector<Checkpoint>& checkpoints,
                    const Checkpoint* anchor, const PublicKeyVerifier& key) {
  return Verification(records, checkpoints, anchor, key).Run();
}

}  // namespace custos::audit
