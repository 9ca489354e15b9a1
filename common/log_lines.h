// How custosd's operational log lines look: spdlog's text lines, or JSON lines for log shippers
// that parse JSON:
//   [2026-12-02 19:30:00.123] [info] custosd listening on ...
//   {"time":"2026-12-02T19:30:00.123456Z","level":"info","message":"custosd listening on ..."}
// Either way a message cannot break its line: messages quote what callers send (a key name, an
// alias, in a refusal's summary), and a newline or a terminal escape in it must not forge a
// line of its own. What each line says is unchanged: an audit mirror line still carries its
// call's id (`call=<uuid>`, as in the audit record's call_id), and no line holds key material,
// a PIN or a context value.
#pragma once

namespace custos {

// Text lines (spdlog's usual, local time): control characters in a message are written as
// \n, \r, \t or \xNN; so are bytes that are not well-formed UTF-8, and C1 controls, the
// bidirectional overrides and isolates and the line and paragraph separators as \uNNNN.
void UseTextLogLines();

// JSON lines: time in UTC with microseconds, the message JSON-escaped (the characters above
// as \uNNNN; a byte that is not UTF-8 as the text \xNN, so the line stays valid UTF-8).
void UseJsonLogLines();

}  // namespace custos
