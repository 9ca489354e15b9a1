#include "common/log_lines.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>
#include <string_view>

namespace custos {
namespace {

// %* in the pattern: the message, every control character escaped, as the inside of a JSON
// string (`json`) or as text.
class EscapedMessage final : public spdlog::custom_flag_formatter {
 public:
  explicit EscapedMessage(bool json) : json_(json) {}

  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    for (const char c : std::string_view(msg.payload.data(), msg.payload.size())) {
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
          const auto byte = static_cast<unsigned char>(c);
          if (byte >= 0x20 && (json_ || byte != 0x7f)) {
            dest.push_back(c);
            break;
          }
          char escaped[8];
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
