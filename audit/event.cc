#include "audit/event.h"

#include "common/strings.h"

namespace custos::audit {

namespace {

// Values come from client certificates and peers: escape anything that could forge a line.
std::string Escaped(std::string_view value) {
  std::string out;
  for (unsigned char c : value) {
    if (c < 0x20 || c == 0x7f || c == '\\' || c == ' ') {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0x0f]);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return out;
}

}  // namespace

std::string FormatEvent(const Event& event) {
  return StrCat("call=", event.call_id, " time=", event.time,
                " principal=", Escaped(event.principal), " role=", event.role,
                " action=", event.action, " key=", event.key_id, " version=", event.key_version,
                " source_key=", event.source_key_id, " source_version=", event.source_key_version,
                " request=", event.request_id, " outcome=", absl::StatusCodeToString(event.outcome),
                " peer=", Escaped(event.peer), " context_hmac=", event.context_hmac,
                " detail=", Escaped(event.detail));
}

}  // namespace custos::audit
