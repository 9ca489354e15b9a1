// The audit log's record and checkpoint formats: the frozen canonical encoding, the hash chain,
// and the JSON forms auditors and SIEMs read. docs/AUDIT.md describes them byte by byte.
//
// A record's canonical encoding is the ASCII magic of its format ("custos-audit-v1" or
// "custos-audit-v2") followed by the fields that format has, in declaration order (`format`
// and `hash` excepted; format 1 stops after `detail`), each as
//
//   +---------------------------+------------------+
//   | length (u32, big-endian)  | length bytes     |
//   +---------------------------+------------------+
//
// with integers written as their decimal ASCII text ("0", "42", "-5"). The encoding is
// injective: two records that differ in any field encode differently. The chain is
//
//   hash(seq 1) = SHA-256(32 zero bytes || Canonical(record 1))
//   hash(seq n) = SHA-256(hash(seq n-1)  || Canonical(record n))
//
// and a checkpoint is an ECDSA P-256 signature (made in the HSM) over the text
// CheckpointMessage(checkpoint), so that plain `openssl dgst -sha256 -verify` checks it. A
// format 2 checkpoint also names the checkpoint before it, so checkpoints form a chain too.
// Records and checkpoints written before format 2 keep format 1 for good; both are read.
//
// Everything here is pure (no I/O, no clock) and thread-compatible: free functions are
// thread-safe; a Chain needs external locking if shared.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "audit/event.h"
#include "common/secure_bytes.h"
#include "common/status.h"

namespace custos::audit {

inline constexpr size_t kHashBytes = 32;  // SHA-256
inline constexpr std::string_view kCanonicalMagic = "custos-audit-v1";
inline constexpr std::string_view kCanonicalMagicV2 = "custos-audit-v2";
// The format new records and checkpoints are written in.
inline constexpr uint32_t kCurrentFormat = 2;

// One audit log record. Fields are in canonical order; none ever holds a secret.
struct Record {
  uint64_t seq = 0;  // 1, 2, 3, ... without gaps
  int64_t time = 0;  // Unix seconds
  std::string principal;
  std::string role;
  std::string action;
  std::string key_id;
  uint32_t key_version = 0;
  std::string source_key_id;  // ReEncrypt only
  uint32_t source_key_version = 0;
  std::string request_id;
  std::string outcome;  // gRPC status code name: "OK", "PERMISSION_DENIED", ...
  std::string peer;
  std::string context_hmac;  // lower-case hex HMAC-SHA256 of the canonical context, or ""
  std::string detail;        // non-secret text
  // Format 2 only (empty in format 1):
  std::string call_id;     // the front door's id of the call, as in the operator's log
  std::string row;         // the catalogue row this record changed ("key:<id>", ...), or ""
  std::string row_digest;  // lower-case hex SHA-256 of that row's canonical encoding, or ""
  uint32_t format = kCurrentFormat;  // 1 or 2; not itself encoded (each has its own magic)
  Bytes hash;                        // kHashBytes: the chain hash through this record

  bool operator==(const Record&) const = default;
};

// The record of `event` at `seq`, with an empty hash (see Chain::Seal). The context HMAC is the
// event's own `context_hmac`, which the use case computed in the HSM.
Record RecordFromEvent(const Event& event, uint64_t seq);

// The frozen canonical encoding of `record` in its format (see above). A format 1 record
// encodes no format 2 field: the verifier refuses one that has any (they would be unsigned).
Bytes Canonical(const Record& record);

// SHA-256(prev_hash || Canonical(record)). `prev_hash` is 32 zero bytes for seq 1.
Bytes ChainHash(std::span<const uint8_t> prev_hash, const Record& record);

// The head of a chain: the last sealed seq and hash. A writer seals records through it in
// commit order. Not thread-safe.
class Chain {
 public:
  // An empty log: the next record is seq 1, chained to 32 zero bytes.
  Chain();

  // Continues a log whose last record is (`last_seq`, `last_hash`). INVALID_ARGUMENT if
  // `last_hash` is not 32 bytes, or if `last_seq` is 0 and `last_hash` is not all zero.
  static absl::StatusOr<Chain> Resume(uint64_t last_seq, std::span<const uint8_t> last_hash);

  // Sets `record.seq` to last_seq() + 1 and `record.hash` to its chain hash, and advances.
  void Seal(Record& record);

  uint64_t last_seq() const { return last_seq_; }
  const Bytes& last_hash() const { return last_hash_; }

 private:
  uint64_t last_seq_ = 0;
  Bytes last_hash_;
};

// A signed statement that the log's record `seq` has chain hash `hash` (and, in format 2, that
// the checkpoint signed before it was at `prev_seq` with `prev_hash`).
struct Checkpoint {
  uint64_t seq = 0;       // >= 1
  Bytes hash;             // kHashBytes
  int64_t time = 0;       // Unix seconds, when it was signed
  Bytes signature;        // DER ECDSA-Sig-Value, P-256 over SHA-256(CheckpointMessage(...))
  std::string key_label;  // HSM label of the signing key (informative, not signed)
  uint64_t prev_seq = 0;  // format 2: the previous checkpoint's seq; 0 for the first
  Bytes prev_hash;        // format 2: its hash; 32 zero bytes (or empty) for the first
  uint32_t format = kCurrentFormat;

  bool operator==(const Checkpoint&) const = default;
};

// The exact text a checkpoint signs. Format 1:
// "custos-audit-checkpoint-v1\nseq=<seq>\nhash=<lower-case hex>\ntime=<time>\n"; format 2 adds
// "prev_seq=<seq>\nprev_hash=<lower-case hex>\n" and says "v2".
std::string CheckpointMessage(const Checkpoint& checkpoint);

// Lower-case hex, and its strict inverse (INVALID_ARGUMENT on odd length or any character
// other than 0-9 a-f).
std::string ToHex(std::span<const uint8_t> bytes);
absl::StatusOr<Bytes> FromHex(std::string_view hex);

// One JSON object on one line, no trailing newline: every field by its name above, integers as
// JSON numbers, `hash` as hex; a format 2 record has "format":2 and its three fields, a format
// 1 record neither. A string field that is not valid UTF-8 is written with U+FFFD in place of
// bad bytes and its exact bytes in an extra "<field>_base64" member, so the round trip is exact
// for any record.
std::string ToJsonLine(const Record& record);
// The inverse of ToJsonLine. Unknown members are ignored. INVALID_ARGUMENT if `line` is not a
// JSON object, a field is missing or mistyped, a number is out of range, `hash` is not 64 hex
// digits, or a field has two readings: "<field>_base64" is accepted only for bytes that are
// not valid UTF-8, and then the plain member must be absent or exactly what ToJsonLine writes
// for those bytes (so a SIEM showing the plain member shows what was verified).
absl::StatusOr<Record> FromJsonLine(std::string_view line);

// A checkpoint as one pretty-printed JSON object for auditors to keep: seq, hash (hex), time,
// (format 2:) prev_seq and prev_hash, key_label, message (CheckpointMessage) and signature
// (base64 of the DER).
std::string CheckpointToJson(const Checkpoint& checkpoint);
// The inverse of CheckpointToJson. INVALID_ARGUMENT if the text is not such an object, seq is
// 0, hash is not 64 hex digits, the signature is not base64, or `message` is not exactly
// CheckpointMessage(seq, hash, time). The signature itself is not checked here (see
// verifier.h).
absl::StatusOr<Checkpoint> CheckpointFromJson(std::string_view json);

// A checkpoint as one line of a JSON Lines export, beside the records it covers:
// {"checkpoint":{...the members of CheckpointToJson...}}. IsCheckpointLine tells such a line
// from a record's by its start; CheckpointFromJsonLine is the inverse (INVALID_ARGUMENT as
// CheckpointFromJson, or if the line holds anything else).
std::string CheckpointToJsonLine(const Checkpoint& checkpoint);
bool IsCheckpointLine(std::string_view line);
absl::StatusOr<Checkpoint> CheckpointFromJsonLine(std::string_view line);

}  // namespace custos::audit
