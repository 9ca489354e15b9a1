// Event: the facts one audit record holds about one operation, and the Sink that takes them.
//
// An event never carries a secret: no key material, no plaintext, no PIN and no encryption
// context value. Use cases fill an Event as they learn the facts and hand it to the Sink
// before they answer; a Sink error means the operation must fail (the log fails closed).
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace custos::audit {

struct Event {
  int64_t time = 0;                 // Unix seconds
  std::string principal;            // from the client certificate
  std::string role;                 // "app", "officer", "auditor", or "" if the principal has none
  std::string action;               // policy::ActionName, e.g. "Decrypt"
  std::string key_id;               // empty if the operation names no key or it was not found
  uint32_t key_version = 0;         // 0 if none
  std::string source_key_id;        // ReEncrypt only: the key the blob was decrypted under
  uint32_t source_key_version = 0;  // ReEncrypt only
  std::string request_id;           // dual-control request, if any
  absl::StatusCode outcome = absl::StatusCode::kOk;
  std::string peer;          // transport address of the caller
  std::string detail;        // non-secret context, e.g. "policy sha256=..."
  std::string context_hmac;  // hex HMAC-SHA256 (HSM key) of the canonical context; "" if none
  std::string call_id;       // the front door's id of the call, if it gave one
  std::string row;           // the catalogue row this event changes ("key:<id>", ...), if any
};

// One line of text for operators' logs: key=value pairs, no secrets (see above).
std::string FormatEvent(const Event& event);

class Sink {
 public:
  virtual ~Sink() = default;
  // Records `event`. Returns OK only once the record is as durable as the sink promises.
  virtual absl::Status Append(const Event& event) = 0;
};

}  // namespace custos::audit
