// Pkcs11Hsm: the Hsm interface over any PKCS#11 v2.40 module (SoftHSM2, a network HSM...).
#pragma once

#include <memory>
#include <string>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "hsm/hsm.h"

namespace custos::hsm {

struct Pkcs11Options {
  std::string module_path;           // e.g. /usr/lib/softhsm/libsofthsm2.so
  std::string token_label;           // the token is found by its label
  SecureBytes pin;                   // user PIN; kept only to log in again after a token loss
  size_t session_pool_size = 8;      // sessions shared by worker threads
  size_t key_cache_capacity = 1024;  // unwrapped key versions kept as session objects
};

// Loads the module (dlopen), finds the token, logs in once for the process lifetime and
// opens the session pool. Errors: NOT_FOUND (module or token missing), PERMISSION_DENIED
// (wrong PIN), UNAVAILABLE (token not reachable).
absl::StatusOr<std::unique_ptr<Hsm>> OpenPkcs11Hsm(Pkcs11Options options);

}  // namespace custos::hsm
