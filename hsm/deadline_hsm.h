// DeadlineHsm: an Hsm whose every call answers within hsm.call_timeout_ms, whatever the module
// does.
//
// It runs each call of the Hsm it wraps on a CallExecutor (see hsm/call_executor.h). A call the
// module does not answer in time is answered UNAVAILABLE ("the HSM did not answer ... within
// N ms") and set aside; so the call can run on after its caller has gone, its inputs are
// copied first (plaintexts into SecureBytes, wiped when the call ends) and its result is
// dropped (and wiped) if nobody waits for it any more. Forget() has no result: one the executor
// refuses before it starts (its threads busy or stuck in the module) is logged and left, with
// those that follow while it waits, to a thread of its own, which tries them together a second
// later and again until they start (each try waiting up to call_timeout for a thread): a
// destroyed version's unwrapped copy must not stay in the module. A try set aside midway
// leaves the drops it has not made to the next: made on a set-aside thread, each would retire
// a healthy cache session.
//
// Thread-safe. The executor is stopped (its threads waited for) before the wrapped Hsm goes.
#pragma once

#include <memory>

#include "hsm/call_executor.h"
#include "hsm/hsm.h"

namespace custos::hsm {

std::unique_ptr<Hsm> WithDeadlines(std::unique_ptr<Hsm> inner,
                                   std::unique_ptr<CallExecutor> executor);

}  // namespace custos::hsm
