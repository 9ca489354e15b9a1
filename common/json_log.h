// Operational log lines as JSON, one object per line, for log shippers that parse JSON:
//   {"time":"2026-12-02T19:30:00.123456Z","level":"info","message":"custosd listening on ..."}
// Time in UTC with microseconds, the message JSON-escaped. What each line says is unchanged:
// an audit mirror line still carries its call's id (`call=<uuid>`, as in the audit record's
// call_id), and no line holds key material, a PIN or a context value.
#pragma once

namespace custos {

// Switches every spdlog logger, and those made later, to JSON lines.
void UseJsonLogLines();

}  // namespace custos
