#include "common/log_lines.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>
#include <string_view>
#include <utility>

namespace custos {
namespace {

// The length of the well-formed UTF-8 sequence at the start of `s` (2 to 4 bytes) and its code
// point, or 0 if it is not one (a stray byte, cut short, overlong, a surrogate).
std::pair<size_t, char32_t> Utf8Sequence(std::string_view s) {
  const auto byte = [&s](size_t i) { return static_cast<unsigned char>(s[i]); };
  // By its lead byte: the sequence's length, the lead's bits of the code point, and the least
  // code point that needs that length (anything less is an overlong form).
  struct Lead {
    size_t length;
    unsigned char bits;
    char32_t least;
  };
  const Lead lead = byte(0) >= 0xc2 && byte(0) <= 0xdf   ? Lead{2, 0x1f, 0x80}
                    : byte(0) >= 0xe0 && byte(0) <= 0xef ? Lead{3, 0x0f, 0x800}
                    : byte(0) >= 0xf0 && byte(0) <= 0xf4 ? Lead{4, 0x07, 0x10000}
                                                         : Lead{0, 0, 0};
  const size_t length = lead.length;
  if (length == 0 || s.size() < length) return {0, 0};
  char32_t code = byte(0) & lead.bits;
  for (size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xc0) != 0x80) return {0, 0};
    code = (code << 6) | (byte(i) & 0x3f);
  }
  if (code < lead.least || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return {0, 0};
  return {length, code};
}

// Characters that are well-formed yet act on how a line reads: C1 controls (0x9b starts a
// terminal escape as ESC [ does), the bidirectional overrides and isolates (text shown in
// another order than written), and the line and paragraph separators.
bool Disguises(char32_t code) {
  return (code >= 0x80 && code <= 0x9f) || code == 0x200e || code == 0x200f ||
         (code >= 0x202a && code <= 0x202e) || (code >= 0x2066 && code <= 0x2069) ||
         code == 0x2028 || code == 0x2029;
}

// %* in the pattern: the message, every control character escaped, as the inside of a JSON
// string (`json`) or as text. Bytes that are not well-formed UTF-8 are written as \xNN (so a
// JSON line stays valid UTF-8), and the characters Disguises() names as \uNNNN.
class EscapedMessage final : public spdlog::custom_flag_formatter {
 public:
  explicit EscapedMessage(bool json) : json_(json) {}

  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    for (size_t i = 0; i < payload.size(); ++i) {
      const char c = payload[i];
      const auto byte = static_cast<unsigned char>(c);
      char escaped[16];
      if (byte >= 0x80) {
        const auto [length, code] = Utf8Sequence(payload.substr(i));
        if (length == 0) {  // \x in JSON is no escape: written as a backslash, then xNN
          std::snprintf(escaped, sizeof(escaped), json_ ? "\\\\x%02x" : "\\x%02x", byte);
          dest.append(std::string_view(escaped));
        } else if (Disguises(code)) {
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(code));
          dest.append(std::string_view(escaped));
          i += length - 1;
        } else {
          dest.append(payload.substr(i, length));
          i += length - 1;
        }
        continue;
      }
      switch (c) {
        case '"':
          dest.append(std::string_view(json_ ? "\\\"" : "\""));
          break;
        case '\\':
          dest.append(std::string_view("\\\\"));  // a caller's backslash-n is no newline
          break;
        case '\n':
          dest.append(std::string_view("\\n"));
          break;
        case '\r':
          dest.append(std::string_view("\\r"));
          break;
        case '\t':
          dest.append(std::string_view("\\t"));
          break;
        default:
          if (byte >= 0x20 && (json_ || byte != 0x7f)) {
            dest.push_back(c);
            break;
          }
          if (json_) {
            std::snprintf(escaped, sizeof(escaped), "\\u%04x", byte);
          } else {
            std::snprintf(escaped, sizeof(escaped), "\\x%02x", byte);
          }
          dest.append(std::string_view(escaped));
      }
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<EscapedMessage>(json_);
  }

 private:
  const bool json_;
};

void UseFormat(spdlog::pattern_time_type time, bool json, const char* pattern) {
  auto formatter = std::make_unique<spdlog::pattern_formatter>(time);
  formatter->add_flag<EscapedMessage>('*', json).set_pattern(pattern);
  spdlog::set_formatter(std::move(formatter));
}

}  // namespace

void UseTextLogLines() {
  UseFormat(spdlog::pattern_time_type::local, false, "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %*");
}

void UseJsonLogLines() {
  UseFormat(spdlog::pattern_time_type::utc, true,
            R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","message":"%*"})");
}

}  // namespace custos
