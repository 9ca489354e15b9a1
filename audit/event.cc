#include "audit/event.h"

#include "common/strings.h"

namespace custos::audit {

std::string FormatEvent(const Event& event) {
  return StrCat("time=", event.time, " principal=", event.principal, " role=", event.role,
                " action=", event.action, " key=", event.key_id, " version=", event.key_version,
                " source_key=", event.source_key_id, " source_version=", event.source_key_version,
                " request=", event.request_id, " outcome=", absl::StatusCodeToString(event.outcome),
                " peer=", event.peer);
}

}  // namespace custos::audit
