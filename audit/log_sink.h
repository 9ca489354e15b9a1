// LogSink: writes events to the "audit" spdlog logger. It promises no durability; it stands
// in until the hash-chained log lands and stays useful as an operator's view. Thread-safe.
#pragma once

#include "audit/event.h"

namespace custos::audit {

class LogSink final : public Sink {
 public:
  absl::Status Append(const Event& event) override;
};

}  // namespace custos::audit
