// TomlUnsafeLine: a check on TOML text before toml++ parses it.
//
// Debian 12's toml++ (3.3.0) reaches __builtin_unreachable() — undefined behaviour — when it
// asks whether one of the characters U+00A1..U+0499, U+2C5E..U+3057 (but U+3000) or
// U+FB26..U+FEFE is whitespace (upstream marzer/tomlplusplus issues 190 and 295). It asks that
// of many characters it reads outside strings and comments, even ahead of a syntax error it is
// about to report, and of some inside multi-line strings. So text holding one of them is refused
// before it reaches toml++, except on a comment line (one whose first character other than
// space and tab is '#', and that holds no backslash), which toml++ reads without asking. In a
// string, such a character can still be written as an escape (\u00E9).
#pragma once

#include <cstddef>
#include <string_view>

namespace custos {

// What is wrong with the line TomlUnsafeLine names.
inline constexpr std::string_view kTomlUnsafeText =
    "a character in U+00A1..U+0499, U+2C5E..U+3057 or U+FB26..U+FEFE, which this build's TOML "
    "parser cannot read safely outside a comment line (in a string, write it as an escape such "
    "as \\u00E9)";

// The first line (1-based) of `text` that holds such a character, not counting comment lines;
// 0 if there is none.
size_t TomlUnsafeLine(std::string_view text);

}  // namespace custos
