// The canonical encryption-context encoding is frozen and must be injective: every stored blob's
// AAD depends on it. The input is read as an encoding (u32 count, then u32-length-prefixed key
// and value per entry, all big-endian) by a reference decoder written here from the format in
// core/encryption_context.h; the context it yields is validated and encoded again, and:
//   - the encoding decodes back to the same context, and has the size the format gives;
//   - an input that is already canonical (keys strictly increasing, nothing left over) is
//     reproduced byte for byte, so two different contexts never share an encoding;
//   - ValidateContext accepts exactly the contexts within the documented limits;
//   - BlobAad is the header followed by that same encoding.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "core/ciphertext_blob.h"
#include "core/encryption_context.h"
#include "fuzz/fuzz_check.h"

namespace custos::core {
namespace {

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}

  std::optional<uint32_t> U32() {
    if (in_.size() - pos_ < 4) return std::nullopt;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = v << 8 | in_[pos_++];
    return v;
  }
  std::optional<std::string> String() {
    const std::optional<uint32_t> size = U32();
    if (!size || in_.size() - pos_ < *size) return std::nullopt;
    std::string s(reinterpret_cast<const char*>(in_.data() + pos_), *size);
    pos_ += *size;
    return s;
  }
  bool done() const { return pos_ == in_.size(); }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

struct Decoded {
  EncryptionContext context;
  bool canonical = true;  // keys strictly increasing and the input fully consumed
};

// Reads as many whole entries as the input holds (at most `count`).
Decoded Decode(std::span<const uint8_t> in) {
  Decoded out;
  Reader reader(in);
  const std::optional<uint32_t> count = reader.U32();
  if (!count) return {{}, false};
  std::optional<std::string> previous;
  for (uint32_t i = 0; i < *count; ++i) {
    std::optional<std::string> key = reader.String();
    std::optional<std::string> value = key ? reader.String() : std::nullopt;
    if (!value) {
      out.canonical = false;
      break;
    }
    if (previous && !(*previous < *key)) out.canonical = false;
    previous = *key;
    out.context.emplace(*std::move(key), *std::move(value));
  }
  out.canonical = out.canonical && reader.done();
  return out;
}

bool WithinLimits(const EncryptionContext& context) {
  if (context.size() > kMaxContextEntries) return false;
  size_t total = 0;
  for (const auto& [key, value] : context) {
    if (key.empty() || key.size() > kMaxContextKeyBytes) return false;
    total += key.size() + value.size();
  }
  return total <= kMaxContextBytes;
}

}  // namespace
}  // namespace custos::core

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custos::core;
  const std::span<const uint8_t> input(data, size);
  const Decoded decoded = Decode(input);
  const EncryptionContext& context = decoded.context;

  const absl::Status valid = ValidateContext(context);
  FUZZ_CHECK(valid.ok() == WithinLimits(context));
  FUZZ_CHECK(valid.ok() || valid.code() == absl::StatusCode::kInvalidArgument);

  custos::WipedBytes encoded;
  AppendCanonicalContext(context, encoded);
  size_t expected = 4;
  for (const auto& [key, value] : context) expected += 8 + key.size() + value.size();
  FUZZ_CHECK(encoded.size() == expected);
  const Decoded again = Decode(encoded);
  FUZZ_CHECK(again.canonical && again.context == context);
  if (decoded.canonical) {
    FUZZ_CHECK(std::equal(encoded.begin(), encoded.end(), input.begin(), input.end()));
  }

  // Appending keeps what was there; the blob AAD is header || encoding.
  custos::WipedBytes prefixed = {0xAA};
  AppendCanonicalContext(context, prefixed);
  FUZZ_CHECK(prefixed.size() == encoded.size() + 1 && prefixed[0] == 0xAA &&
             std::equal(encoded.begin(), encoded.end(), prefixed.begin() + 1));
  BlobHeader header;
  header.key_version = static_cast<uint32_t>(size);
  const custos::WipedBytes aad = BlobAad(header, context);
  FUZZ_CHECK(aad.size() == kBlobHeaderBytes + encoded.size());
  FUZZ_CHECK(std::equal(encoded.begin(), encoded.end(), aad.begin() + kBlobHeaderBytes));
  return 0;
}
