#include "core/ciphertext_blob.h"

#include <catch2/catch.hpp>

#include "core/encryption_context.h"
#include "core/key_id.h"

namespace custos::core {
namespace {

TEST_CASE("The canonical context encoding is frozen", "[context]") {
  WipedBytes out;
  AppendCanonicalContext({{"b", "2"}, {"a", "xy"}}, out);
  // count=2, then "a"->"xy", then "b"->"2", each length a big-endian u32.
  const WipedBytes expected = {0,   0,   0, 2, 0, 0, 0,   1, 'a', 0, 0, 0,  2,
                               'x', 'y', 0, 0, 0, 1, 'b', 0, 0,   0, 1, '2'};
  CHECK(out == expected);
  WipedBytes empty;
  AppendCanonicalContext({}, empty);
  CHECK(empty == WipedBytes{0, 0, 0, 0});
}

TEST_CASE("Entries cannot be shifted between key and value", "[context]") {
  WipedBytes a, b;
  AppendCanonicalContext({{"ab", "c"}}, a);
  AppendCanonicalContext({{"a", "bc"}}, b);
  CHECK(a != b);
}

TEST_CASE("ValidateContext enforces its limits without naming values", "[context]") {
  CHECK(ValidateContext({{"k", "v"}}).ok());
  CHECK(ValidateContext({{"", "v"}}).message() == "encryption context has an empty key");
  EncryptionContext many;
  for (int i = 0; i < 65; ++i) many[std::to_string(i)] = "v";
  CHECK(ValidateContext(many).message() ==
        "encryption context has 65 entries; at most 64 are allowed");
  CHECK(absl::IsInvalidArgument(ValidateContext({{std::string(257, 'k'), "v"}})));
  const absl::Status big = ValidateContext({{"k", std::string(9000, 's')}});
  CHECK(absl::IsInvalidArgument(big));
  CHECK(std::string(big.message()).find("sss") == std::string::npos);
}

TEST_CASE("Blobs build and parse back field for field", "[blob]") {
  BlobHeader header;
  header.key_id = *ParseKeyId("0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00");
  header.key_version = 0x01020304;
  const Bytes iv(12, 0xaa);
  const Bytes sealed(20, 0xbb);
  const Bytes blob = BuildBlob(header, iv, sealed);
  REQUIRE(blob.size() == 21 + 12 + 20);
  CHECK(blob[0] == 0x01);
  CHECK(blob[17] == 1);
  CHECK(blob[20] == 4);
  absl::StatusOr<ParsedBlob> parsed = ParseBlob(blob);
  REQUIRE(parsed.ok());
  CHECK(parsed->header.key_id == header.key_id);
  CHECK(parsed->header.key_version == 0x01020304);
  CHECK(Bytes(parsed->iv.begin(), parsed->iv.end()) == iv);
  CHECK(Bytes(parsed->ciphertext_and_tag.begin(), parsed->ciphertext_and_tag.end()) == sealed);
  // The AAD is the header followed by the canonical context.
  const WipedBytes aad = BlobAad(header, {});
  CHECK(Bytes(aad.begin(), aad.begin() + 21) == Bytes(blob.begin(), blob.begin() + 21));
  CHECK(aad.size() == 25);
}

TEST_CASE("Malformed blobs are refused with a reason", "[blob]") {
  CHECK(ParseBlob({}).status().message() == "ciphertext blob is empty");
  Bytes wrong_format(60, 0);
  wrong_format[0] = 0x02;
  CHECK(ParseBlob(wrong_format).status().message() ==
        "ciphertext blob has unknown format 0x02 (this server reads format 0x01); it is "
        "corrupted or not a Custos ciphertext");
  Bytes short_blob(48, 0);
  short_blob[0] = 0x01;
  CHECK(ParseBlob(short_blob).status().message() ==
        "ciphertext blob is truncated: 48 bytes, at least 49 expected");
  short_blob.push_back(0);
  CHECK(ParseBlob(short_blob).ok());
  // The longest is Encrypt's largest plaintext (4 KiB) sealed.
  Bytes long_blob(kBlobMinBytes + kBlobMaxPlaintextBytes, 0);
  long_blob[0] = 0x01;
  CHECK(ParseBlob(long_blob).ok());
  long_blob.push_back(0);
  CHECK(ParseBlob(long_blob).status().message() ==
        "ciphertext blob is too long: 4146 bytes, at most 4145 expected");
}

TEST_CASE("Key ids are version 4 UUIDs that parse back", "[key_id]") {
  const std::string id = NewKeyId();
  REQUIRE(id.size() == 36);
  CHECK(id[14] == '4');
  const auto bytes = ParseKeyId(id);
  REQUIRE(bytes);
  CHECK(FormatKeyId(*bytes) == id);
  CHECK(NewKeyId() != id);
  CHECK_FALSE(ParseKeyId("billing"));
  CHECK_FALSE(ParseKeyId("0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d0g"));
  CHECK_FALSE(ParseKeyId("0b5e7d0c11c7a-4b8e-9d7e-2f8a5c3b1d00"));
  CHECK(FormatKeyId(*ParseKeyId("0B5E7D0C-1C7A-4B8E-9D7E-2F8A5C3B1D00")) ==
        "0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00");
}

}  // namespace
}  // namespace custos::core
