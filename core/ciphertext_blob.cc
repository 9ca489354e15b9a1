#include "core/ciphertext_blob.h"

#include "absl/strings/str_format.h"
#include "common/strings.h"

namespace custos::core {
namespace {

template <typename ByteVector>
void AppendHeader(const BlobHeader& header, ByteVector& out) {
  out.push_back(kBlobFormatV1);
  out.insert(out.end(), header.key_id.begin(), header.key_id.end());
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<uint8_t>(header.key_version >> shift));
  }
}

}  // namespace

WipedBytes BlobAad(const BlobHeader& header, const EncryptionContext& context) {
  WipedBytes aad;
  AppendHeader(header, aad);
  AppendCanonicalContext(context, aad);
  return aad;
}

Bytes BuildBlob(const BlobHeader& header, std::span<const uint8_t> iv,
                std::span<const uint8_t> ciphertext_and_tag) {
  Bytes blob;
  blob.reserve(kBlobHeaderBytes + iv.size() + ciphertext_and_tag.size());
  AppendHeader(header, blob);
  blob.insert(blob.end(), iv.begin(), iv.end());
  blob.insert(blob.end(), ciphertext_and_tag.begin(), ciphertext_and_tag.end());
  return blob;
}

absl::StatusOr<ParsedBlob> ParseBlob(std::span<const uint8_t> blob) {
  if (blob.empty()) return absl::InvalidArgumentError("ciphertext blob is empty");
  if (blob[0] != kBlobFormatV1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ciphertext blob has unknown format 0x%02x (this server reads format 0x%02x); it is "
        "corrupted or not a Custos ciphertext",
        blob[0], kBlobFormatV1));
  }
  if (blob.size() < kBlobMinBytes) {
    return absl::InvalidArgumentError(StrCat("ciphertext blob is truncated: ", blob.size(),
                                             " bytes, at least ", kBlobMinBytes, " expected"));
  }
  if (blob.size() > kBlobMaxBytes) {
    return absl::InvalidArgumentError(StrCat("ciphertext blob is too long: ", blob.size(),
                                             " bytes, at most ", kBlobMaxBytes, " expected"));
  }
  ParsedBlob parsed;
  std::copy_n(blob.begin() + 1, parsed.header.key_id.size(), parsed.header.key_id.begin());
  for (size_t i = 17; i < kBlobHeaderBytes; ++i) {
    parsed.header.key_version = parsed.header.key_version << 8 | blob[i];
  }
  parsed.iv = blob.subspan(kBlobHeaderBytes, kBlobIvBytes);
  parsed.ciphertext_and_tag = blob.subspan(kBlobHeaderBytes + kBlobIvBytes);
  return parsed;
}

}  // namespace custos::core
