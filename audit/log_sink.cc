#include "audit/log_sink.h"

#include <spdlog/spdlog.h>

namespace custos::audit {

absl::Status LogSink::Append(const Event& event) {
  spdlog::info("audit {}", FormatEvent(event));
  return absl::OkStatus();
}

}  // namespace custos::audit
