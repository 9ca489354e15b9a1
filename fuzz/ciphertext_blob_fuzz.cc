// ParseBlob over arbitrary bytes: it never reads out of bounds, accepts exactly the inputs the
// format allows, and what it accepts rebuilds byte for byte. The same bytes are also tried as a
// key id's text (ParseKeyId), which must round-trip through FormatKeyId.
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "core/ciphertext_blob.h"
#include "core/key_id.h"
#include "fuzz/fuzz_check.h"

namespace custos::core {
namespace {

void CheckBlob(std::span<const uint8_t> input) {
  const absl::StatusOr<ParsedBlob> parsed = ParseBlob(input);
  const bool valid =
      input.size() >= kBlobMinBytes && input.size() <= kBlobMaxBytes && input[0] == kBlobFormatV1;
  FUZZ_CHECK(parsed.ok() == valid);
  if (!parsed.ok()) {
    FUZZ_CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  FUZZ_CHECK(parsed->iv.size() == kBlobIvBytes);
  FUZZ_CHECK(parsed->ciphertext_and_tag.size() >= kBlobTagBytes);
  FUZZ_CHECK(parsed->iv.data() == input.data() + kBlobHeaderBytes);
  const Bytes rebuilt = BuildBlob(parsed->header, parsed->iv, parsed->ciphertext_and_tag);
  FUZZ_CHECK(std::equal(rebuilt.begin(), rebuilt.end(), input.begin(), input.end()));
  // The AAD starts with the blob's header, then the (here empty) canonical context.
  const WipedBytes aad = BlobAad(parsed->header, {});
  FUZZ_CHECK(aad.size() == kBlobHeaderBytes + 4);
  FUZZ_CHECK(std::equal(aad.begin(), aad.begin() + kBlobHeaderBytes, input.begin()));
  // The key id the blob names has one text form, which parses back to the same bytes.
  const std::optional<KeyIdBytes> id = ParseKeyId(FormatKeyId(parsed->header.key_id));
  FUZZ_CHECK(id.has_value() && *id == parsed->header.key_id);
}

void CheckKeyIdText(std::string_view text) {
  const std::optional<KeyIdBytes> id = ParseKeyId(text);
  if (!id) return;
  FUZZ_CHECK(text.size() == 36);
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  FUZZ_CHECK(FormatKeyId(*id) == lower);
}

}  // namespace
}  // namespace custos::core

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  custos::core::CheckBlob({data, size});
  custos::core::CheckKeyIdText({reinterpret_cast<const char*>(data), size});
  return 0;
}
