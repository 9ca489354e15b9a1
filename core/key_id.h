// Key ids are random (version 4) UUIDs, written in canonical lower-case form and carried as
// 16 raw bytes inside ciphertext blobs.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace custos::core {

using KeyIdBytes = std::array<uint8_t, 16>;

// A new random version 4 UUID from OpenSSL's CSPRNG.
std::string NewKeyId();
// The 16 bytes of a canonical UUID ("8-4-4-4-12" hex, either case), or nullopt.
std::optional<KeyIdBytes> ParseKeyId(std::string_view text);
// Canonical lower-case text of 16 UUID bytes.
std::string FormatKeyId(const KeyIdBytes& bytes);

}  // namespace custos::core
