// Pkcs11Hsm: the Hsm interface over any PKCS#11 v2.40 module (SoftHSM2, a network HSM...).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/metrics.h"
#include "common/secure_bytes.h"
#include "common/status.h"
#include "hsm/hsm.h"

namespace custos::hsm {

struct Pkcs11Options {
  std::string module_path;           // e.g. /usr/lib/softhsm/libsofthsm2.so
  std::string token_label;           // the token is found by its label
  SecureBytes pin;                   // user PIN; kept only to log in again after a token loss
  size_t session_pool_size = 8;      // sessions, and threads calling the module
  size_t key_cache_capacity = 1024;  // unwrapped key versions kept as session objects
  // Every call is answered within call_timeout (UNAVAILABLE if the module has not answered);
  // at most max_stuck_calls calls that overran it are replaced by fresh threads and sessions
  // at once; a call still inside the module after hang_limit (0: never) calls on_hang_limit.
  // See hsm/call_executor.h.
  std::chrono::milliseconds call_timeout{2000};
  size_t max_stuck_calls = 8;
  std::chrono::milliseconds hang_limit{60000};
  std::function<void(const std::string& message)> on_hang_limit;
  // If set (it must outlive the Hsm's last use): the key cache's lookups, as
  // custos_hsm_key_cache_lookups_total{result="hit"|"miss"}.
  metrics::Registry* metrics = nullptr;
};

// Loads the module (dlopen), finds the token, logs in once for the process lifetime and
// opens the session pool; every call of the Hsm returned runs under a deadline (see
// hsm/deadline_hsm.h). Errors: NOT_FOUND (module or token missing), PERMISSION_DENIED
// (wrong PIN), UNAVAILABLE (token not reachable), RESOURCE_EXHAUSTED (a thread refused).
absl::StatusOr<std::unique_ptr<Hsm>> OpenPkcs11Hsm(Pkcs11Options options);

}  // namespace custos::hsm
