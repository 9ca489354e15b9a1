#include "common/log_lines.h"

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <catch2/catch.hpp>
#include <memory>
#include <regex>
#include <sstream>
#include <string>

namespace custos {
namespace {

// What the default logger writes for `message` once `use` set the format.
std::string LineFor(void (*use)(), const std::string& message) {
  std::ostringstream out;
  const std::shared_ptr<spdlog::logger> before = spdlog::default_logger();
  spdlog::set_default_logger(
      std::make_shared<spdlog::logger>("", std::make_shared<spdlog::sinks::ostream_sink_st>(out)));
  use();
  spdlog::warn("refused: key '{}'", message);
  spdlog::set_default_logger(before);
  return out.str();
}

// A caller's text (a key name, an alias) quoted in a message.
const std::string kForged = "zz\n[2026-12-04 13:00:00.000] [critical] FORGED\x1b[31m\r\t\x7f\\\"";

TEST_CASE("Text log lines: a message quoting a caller cannot start a line or drive a terminal",
          "[log]") {
  const std::string line = LineFor(UseTextLogLines, kForged);
  CHECK(std::regex_match(
      line, std::regex(R"(\[20[0-9-]{8} [0-9:]{8}\.[0-9]{3}\] \[warning\] [^\n]*\n)")));
  CHECK(line.substr(line.find("] [warning] ")) ==
        "] [warning] refused: key 'zz\\n[2026-12-04 13:00:00.000] [critical] "
        "FORGED\\x1b[31m\\r\\t\\x7f\\\\\"'\n");
}

TEST_CASE("JSON log lines: the message JSON-escaped, one object per line", "[log]") {
  const std::string line = LineFor(UseJsonLogLines, kForged);
  CHECK(std::regex_match(
      line, std::regex(R"(\{"time":"20[0-9-]{8}T[0-9:]{8}\.[0-9]{6}Z","level":"warning",)"
                       R"("message":"[^\n]*"\}\n)")));
  CHECK(line.substr(line.find("\"message\":")) ==
        "\"message\":\"refused: key 'zz\\n[2026-12-04 13:00:00.000] [critical] "
        "FORGED\\u001b[31m\\r\\t\x7f\\\\\\\"'\"}\n");
}

// Bytes no UTF-8 decoder accepts (a stray continuation byte, a sequence cut short, an overlong
// '/', a surrogate), C1's CSI, a right-to-left override and a line separator, around text in
// other scripts that is left as it is.
const std::string kDisguised =
    "caf\xc3\xa9 \x80|\xe2\x82|\xc0\xaf|\xed\xa0\x80|\xc2\x9b"
    "31m|\xe2\x80\xaetxt.exe|"
    "\xe2\x80\xa8|\xe6\x82\xa3\xe8\x80\x85 \xf0\x9f\x94\x91";

TEST_CASE("Text log lines: bytes that are no UTF-8 and characters that disguise a line escaped",
          "[log]") {
  const std::string line = LineFor(UseTextLogLines, kDisguised);
  CHECK(line.substr(line.find("] [warning] ")) ==
        "] [warning] refused: key 'caf\xc3\xa9 \\x80|\\xe2\\x82|\\xc0\\xaf|"
        "\\xed\\xa0\\x80|\\u009b31m|\\u202etxt.exe|\\u2028|"
        "\xe6\x82\xa3\xe8\x80\x85 \xf0\x9f\x94\x91'\n");
}

TEST_CASE("JSON log lines stay valid UTF-8 whatever bytes the message holds", "[log]") {
  const std::string line = LineFor(UseJsonLogLines, kDisguised);
  CHECK(line.substr(line.find("\"message\":")) ==
        "\"message\":\"refused: key 'caf\xc3\xa9 \\\\x80|\\\\xe2\\\\x82|\\\\xc0\\\\xaf|"
        "\\\\xed\\\\xa0\\\\x80|\\u009b31m|\\u202etxt.exe|\\u2028|"
        "\xe6\x82\xa3\xe8\x80\x85 \xf0\x9f\x94\x91'\"}\n");
}

}  // namespace
}  // namespace custos
