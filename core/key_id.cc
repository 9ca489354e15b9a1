#include "core/key_id.h"

#include <openssl/rand.h>

#include <cstdlib>

namespace custos::core {
namespace {

constexpr char kHex[] = "0123456789abcdef";

bool IsDashAt(size_t i) { return i == 8 || i == 13 || i == 18 || i == 23; }

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string NewKeyId() {
  KeyIdBytes bytes;
  // Ids are not secret, but they must not collide; failure here means the CSPRNG is broken.
  if (RAND_bytes(bytes.data(), bytes.size()) != 1) std::abort();
  bytes[6] = (bytes[6] & 0x0f) | 0x40;  // version 4
  bytes[8] = (bytes[8] & 0x3f) | 0x80;  // RFC 4122 variant
  return FormatKeyId(bytes);
}

std::optional<KeyIdBytes> ParseKeyId(std::string_view text) {
  if (text.size() != 36) return std::nullopt;
  KeyIdBytes bytes{};
  size_t n = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (IsDashAt(i)) {
      if (text[i] != '-') return std::nullopt;
      continue;
    }
    const int hi = HexValue(text[i]);
    const int lo = i + 1 < text.size() ? HexValue(text[i + 1]) : -1;
    if (hi < 0 || lo < 0) return std::nullopt;
    bytes[n++] = static_cast<uint8_t>(hi << 4 | lo);
    ++i;
  }
  return bytes;
}

std::string FormatKeyId(const KeyIdBytes& bytes) {
  std::string out;
  out.reserve(36);
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out.push_back('-');
    out.push_back(kHex[bytes[i] >> 4]);
    out.push_back(kHex[bytes[i] & 0x0f]);
  }
  return out;
}

}  // namespace custos::core
