// TomlUnsafeLine: the characters Debian's toml++ 3.3.0 cannot classify are found on any line
// but a comment line, and nothing else is.
#include "common/toml_text.h"

#include <catch2/catch.hpp>
#include <string>

namespace custos {
namespace {

// The UTF-8 encoding of `c`.
std::string Utf8(char32_t c) {
  std::string out;
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | c >> 6);
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | c >> 12);
    out += static_cast<char>(0x80 | (c >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
  return out;
}

TEST_CASE("Exactly the characters toml++ cannot classify are unsafe", "[toml_text]") {
  for (char32_t c : {0xA1, 0xE9, 0x499, 0x2C5E, 0x2FFF, 0x3001, 0x3057, 0xFB26, 0xFEFC, 0xFEFE}) {
    INFO(static_cast<uint32_t>(c));
    CHECK(TomlUnsafeLine("a = 1 " + Utf8(c) + "\n") == 1);
  }
  for (char32_t c : {0x7F, 0xA0, 0x49A, 0x2014, 0x2C5D, 0x3000, 0x3058, 0x4E2D, 0xFB25, 0xFEFF}) {
    INFO(static_cast<uint32_t>(c));
    CHECK(TomlUnsafeLine("a = \"" + Utf8(c) + "\"\n") == 0);
  }
}

TEST_CASE("The first unsafe line is named; comment lines are not checked", "[toml_text]") {
  CHECK(TomlUnsafeLine("") == 0);
  CHECK(TomlUnsafeLine("[roles]\nofficer = [\"a\"]\n") == 0);
  CHECK(TomlUnsafeLine("# caf\xc3\xa9\n  \t# \xc3\xa9\na = 1\n") == 0);
  CHECK(TomlUnsafeLine("a = 1\nb = \"caf\xc3\xa9\"\nc = \xc3\xa9\n") == 2);
  CHECK(TomlUnsafeLine("a = 1 # caf\xc3\xa9") ==
        1);  // a comment after a value: not a line of its own
  // A backslash could end a line inside a multi-line string, where toml++ classifies again.
  CHECK(TomlUnsafeLine("s = \"\"\"\n# x\\ \xc3\xa9\"\"\"\n") == 2);
  // Bytes that are not UTF-8 are left to toml++, which refuses them before classifying.
  CHECK(TomlUnsafeLine("a = \"\xc3\"\n\xff\xfe\n\xe2\x82") == 0);
}

}  // namespace
}  // namespace custos
