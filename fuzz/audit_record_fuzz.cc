// The audit log's JSON readers over arbitrary text: a record line (FromJsonLine), a checkpoint
// (CheckpointFromJson) and a checkpoint line (CheckpointFromJsonLine), and hex (FromHex).
// Nothing may escape as an exception or a sanitizer report, a refusal is INVALID_ARGUMENT, and
// whatever is accepted has one reading: written again it reads back equal, and writing that
// gives the same text (so the verifier and a SIEM always see the same record).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "audit/record.h"
#include "fuzz/fuzz_check.h"

namespace custos::audit {
namespace {

void CheckRecordLine(std::string_view text) {
  const absl::StatusOr<Record> record = FromJsonLine(text);
  if (!record.ok()) {
    FUZZ_CHECK(record.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  FUZZ_CHECK(record->format == 1 || record->format == 2);
  FUZZ_CHECK(record->hash.size() == kHashBytes);
  const std::string line = ToJsonLine(*record);
  FUZZ_CHECK(line.find('\n') == std::string::npos);
  FUZZ_CHECK(!IsCheckpointLine(line));
  const absl::StatusOr<Record> again = FromJsonLine(line);
  FUZZ_CHECK(again.ok() && *again == *record);
  FUZZ_CHECK(ToJsonLine(*again) == line);
  // The canonical encoding starts with the format's magic; the chain hash is a SHA-256.
  const Bytes canonical = Canonical(*record);
  const std::string_view magic = record->format == 1 ? kCanonicalMagic : kCanonicalMagicV2;
  FUZZ_CHECK(canonical.size() > magic.size() &&
             std::string_view(reinterpret_cast<const char*>(canonical.data()), magic.size()) ==
                 magic);
  FUZZ_CHECK(ChainHash(record->hash, *record).size() == kHashBytes);
}

void CheckCheckpoint(const Checkpoint& checkpoint) {
  FUZZ_CHECK(checkpoint.seq >= 1 && checkpoint.hash.size() == kHashBytes);
  FUZZ_CHECK(checkpoint.format == 1 || checkpoint.format == 2);
  FUZZ_CHECK(checkpoint.format == 1 || checkpoint.prev_hash.size() == kHashBytes);
  const std::string json = CheckpointToJson(checkpoint);
  const absl::StatusOr<Checkpoint> from_json = CheckpointFromJson(json);
  FUZZ_CHECK(from_json.ok() && *from_json == checkpoint);
  FUZZ_CHECK(CheckpointToJson(*from_json) == json);
  const std::string line = CheckpointToJsonLine(checkpoint);
  FUZZ_CHECK(line.find('\n') == std::string::npos && IsCheckpointLine(line));
  const absl::StatusOr<Checkpoint> from_line = CheckpointFromJsonLine(line);
  FUZZ_CHECK(from_line.ok() && *from_line == checkpoint);
  FUZZ_CHECK(CheckpointToJsonLine(*from_line) == line);
}

void CheckCheckpointText(std::string_view text) {
  const absl::StatusOr<Checkpoint> checkpoint = CheckpointFromJson(text);
  if (checkpoint.ok()) {
    CheckCheckpoint(*checkpoint);
  } else {
    FUZZ_CHECK(checkpoint.status().code() == absl::StatusCode::kInvalidArgument);
  }
  const absl::StatusOr<Checkpoint> line = CheckpointFromJsonLine(text);
  if (line.ok()) {
    CheckCheckpoint(*line);
  } else {
    FUZZ_CHECK(line.status().code() == absl::StatusCode::kInvalidArgument);
  }
}

void CheckHex(std::string_view text) {
  const absl::StatusOr<Bytes> bytes = FromHex(text);
  if (!bytes.ok()) return;
  FUZZ_CHECK(bytes->size() * 2 == text.size());
  FUZZ_CHECK(ToHex(*bytes) == text);
}

}  // namespace
}  // namespace custos::audit

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  custos::audit::CheckRecordLine(text);
  custos::audit::CheckCheckpointText(text);
  custos::audit::CheckHex(text);
  return 0;
}
