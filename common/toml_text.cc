#include "common/toml_text.h"

#include <cstdint>

namespace custos {
namespace {

// The characters toml++ 3.3.0's is_non_ascii_horizontal_whitespace() cannot classify.
bool Unsafe(uint32_t c) {
  return (c >= 0xA1 && c <= 0x499) || (c >= 0x2C5E && c <= 0x3057 && c != 0x3000) ||
         (c >= 0xFB26 && c <= 0xFEFE);
}

bool IsCommentLine(std::string_view line) {
  const size_t first = line.find_first_not_of(" \t");
  return first != std::string_view::npos && line[first] == '#' &&
         line.find('\\') == std::string_view::npos;
}

// Whether `line` holds an unsafe character. Bytes that are not UTF-8 are skipped: toml++ refuses
// them before it classifies anything.
bool HasUnsafe(std::string_view line) {
  for (size_t i = 0; i < line.size();) {
    const auto lead = static_cast<unsigned char>(line[i]);
    size_t extra = 0;
    uint32_t c = 0;
    if ((lead & 0xE0) == 0xC0) {
      extra = 1, c = lead & 0x1F;
    } else if ((lead & 0xF0) == 0xE0) {
      extra = 2, c = lead & 0x0F;
    } else if ((lead & 0xF8) == 0xF0) {
      extra = 3, c = lead & 0x07;
    } else {  // ASCII, or a byte that begins no UTF-8 sequence
      ++i;
      continue;
    }
    size_t k = 1;
    for (; k <= extra && i + k < line.size(); ++k) {
      const auto next = static_cast<unsigned char>(line[i + k]);
      if ((next & 0xC0) != 0x80) break;
      c = c << 6 | (next & 0x3F);
    }
    if (k == extra + 1 && Unsafe(c)) return true;
    i += k;
  }
  return false;
}

}  // namespace

size_t TomlUnsafeLine(std::string_view text) {
  size_t number = 1;
  for (size_t start = 0; start < text.size(); ++number) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(start, end - start);
    if (!IsCommentLine(line) && HasUnsafe(line)) return number;
    start = end + 1;
  }
  return 0;
}

}  // namespace custos
