// Verify: checks an audit log offline — the hash chain, the sequence, the signed checkpoints,
// and optionally an anchor checkpoint the auditor kept off the server — and names the first
// bad record in words a person can act on.
//
// Records are streamed through a RecordSource (a database reader or a JSON Lines export), so a
// log of any size is checked in constant memory. Checks, in seq order, stopping at the first
// failure:
//   - seqs run 1, 2, 3, ... with no gap, repeat or reordering; a log whose older records were
//     archived starts just after a signed checkpoint it holds, from that checkpoint's hash;
//   - each record's stored hash equals ChainHash(previous hash, record);
//   - each checkpoint in the log is signed by the given public key and names the hash the log
//     holds at its seq (a checkpoint beyond the log's end means the tail was truncated);
//   - the anchor, if given, is signed by the key, its seq is in the log and the log holds its
//     hash there (otherwise the tail was truncated or rewritten after it was exported).
// Without an anchor a truncated tail cannot be detected, and the report says so.
//
// Free functions are thread-safe; a RecordSource is not. PublicKeyVerifier is immutable and
// may be shared between threads.
#pragma once

#include <cstdint>
#include <istream>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "audit/record.h"
#include "common/status.h"

struct evp_pkey_st;

namespace custos::audit {

// Checks ECDSA P-256 / SHA-256 signatures under a public key given as PEM, as
// `openssl dgst -sha256 -verify key.pem` does.
class PublicKeyVerifier {
 public:
  // INVALID_ARGUMENT unless `pem` is a "-----BEGIN PUBLIC KEY-----" (SubjectPublicKeyInfo)
  // block holding an EC key on P-256.
  static absl::StatusOr<PublicKeyVerifier> FromPem(std::string_view pem);

  PublicKeyVerifier(PublicKeyVerifier&&) noexcept;
  PublicKeyVerifier& operator=(PublicKeyVerifier&&) noexcept;
  ~PublicKeyVerifier();

  // True iff `signature` is a DER ECDSA-Sig-Value over SHA-256(`message`) under this key.
  bool Verify(std::string_view message, std::span<const uint8_t> signature) const;
  // True iff the checkpoint's signature covers CheckpointMessage(checkpoint).
  bool Verify(const Checkpoint& checkpoint) const;

 private:
  struct KeyDeleter {
    void operator()(evp_pkey_st* key) const;
  };
  explicit PublicKeyVerifier(evp_pkey_st* key) : key_(key) {}
  std::unique_ptr<evp_pkey_st, KeyDeleter> key_;
};

// Yields a log's records in the order it holds them, which should be seq order.
class RecordSource {
 public:
  virtual ~RecordSource() = default;
  // The next record; std::nullopt after the last; an error (whose message says where) if the
  // next record cannot be read or parsed. Reading stops at the first error.
  virtual absl::StatusOr<std::optional<Record>> Next() = 0;
};

// Records from memory. `records` must outlive the source.
class VectorRecordSource final : public RecordSource {
 public:
  explicit VectorRecordSource(std::span<const Record> records) : records_(records) {}
  absl::StatusOr<std::optional<Record>> Next() override;

 private:
  std::span<const Record> records_;
  size_t next_ = 0;
};

// Records from a JSON Lines export (one ToJsonLine object per line; blank lines and the
// export's checkpoint lines are skipped).
// A line that does not parse is an INVALID_ARGUMENT error naming its line number. `in` must
// outlive the source.
class JsonLinesRecordSource final : public RecordSource {
 public:
  explicit JsonLinesRecordSource(std::istream* in) : in_(in) {}
  absl::StatusOr<std::optional<Record>> Next() override;

 private:
  std::istream* in_;
  uint64_t line_number_ = 0;
};

// The records of several sources, one after the other (archives, then the live log), verified
// as one log. The sources must outlive it.
class ConcatenatedRecordSource final : public RecordSource {
 public:
  explicit ConcatenatedRecordSource(std::vector<RecordSource*> sources)
      : sources_(std::move(sources)) {}
  absl::StatusOr<std::optional<Record>> Next() override;

 private:
  std::vector<RecordSource*> sources_;
  size_t current_ = 0;
};

// The checkpoint lines (CheckpointToJsonLine) of a JSON Lines export, in file order.
// INVALID_ARGUMENT naming the line if one does not parse.
absl::StatusOr<std::vector<Checkpoint>> ReadCheckpointLines(std::istream& in);

struct VerifyReport {
  bool ok = false;
  uint64_t records_checked = 0;  // records that passed every check
  uint64_t first_bad_seq = 0;    // where the log first goes wrong; 0 if ok or no record is to blame
  std::string reason;            // what is wrong, naming the record; empty if ok
  uint64_t first_seq = 0;        // the first record read (0: none)
  uint64_t starts_after = 0;     // the log starts after the signed checkpoint at this seq (archived
                                 // before it); 0: it starts at record 1
  uint64_t last_verified_seq = 0;     // last record whose chain hash verified (starts_after: none)
  Bytes last_verified_hash;           // its hash (32 zero bytes if none)
  uint64_t checkpoints_verified = 0;  // log checkpoints whose signature and hash both matched
  uint64_t signed_through_seq = 0;    // highest seq covered by a verified checkpoint or the anchor
  // What the check cannot rule out, e.g. "no anchor checkpoint given: truncation of the tail
  // cannot be ruled out"; empty if nothing.
  std::string caveat;

  // A few lines for a person: the verdict, the reason or the range verified, and the caveat.
  std::string Summary() const;
};

// Verifies the log that `records` yields (see the file comment). `checkpoints` are the
// checkpoints stored in the log, in any order; `anchor` (nullable) is a checkpoint kept off the
// server. Signatures are checked with `key`. A read error of `records` fails the report at the
// record that could not be read.
VerifyReport Verify(RecordSource& records, const std::vector<Checkpoint>& checkpoints,
                    const Checkpoint* anchor, const PublicKeyVerifier& key);

}  // namespace custos::audit
