// PKCS#11 return values (CK_RV) as readable names and as absl::Status.
//
// Every failed C_* call in hsm/ becomes a Status through CkError(), and only there, so the
// mapping from CKR_ codes to status codes lives in one table. The CK_RV travels along as a
// status payload so that callers can still decide how to recover (discard the session,
// log in again, find a handle again). Thread-safe: pure functions.
#pragma once

#include <p11-kit/pkcs11.h>

#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace custos::hsm {

// "CKR_PIN_INCORRECT"; unknown codes come out as "CKR_0x..." (vendor codes as
// "CKR_VENDOR_DEFINED+0x...").
std::string CkrName(CK_RV rv);

// A failed call as a Status: "PKCS#11 C_Encrypt failed: CKR_DEVICE_ERROR". The code says what
// a caller can do about it: UNAVAILABLE (device, token, session or login lost; retry later),
// PERMISSION_DENIED (PIN problems; SessionPool reports them as UNAVAILABLE once running),
// INVALID_ARGUMENT (malformed input data), INTERNAL (the rest). `rv` must not be CKR_OK.
absl::Status CkError(std::string_view function, CK_RV rv);

// The CK_RV carried by a Status made by CkError, if any.
std::optional<CK_RV> CkrOf(const absl::Status& status);

// True if the session can no longer be used (closed, invalidated, token or device gone, or
// left in an unknown state): the pool must close it instead of handing it out again.
bool IsSessionDead(CK_RV rv);

// True if the application's login was lost (for instance after the token was reinserted):
// the PIN must be presented again before private objects can be used.
bool IsLoginLost(CK_RV rv);

// True if an object handle no longer names an object (its session died, or the token was
// reinserted and handles were renumbered): cached handles must be found or unwrapped again.
bool IsHandleStale(CK_RV rv);

// True if the module itself, or its token, may be in a state only re-initialising it cures
// (device error, token removed or not recognised, slot gone, module not initialised): the
// recovery ladder's last rung (see Pkcs11Hsm).
bool NeedsReinitialize(CK_RV rv);

// UNAVAILABLE for a key that the token showed before and does not any more: a token whose
// store went away under the module (SoftHSM2 then shows an empty token until it is
// re-initialised). Carries CKR_TOKEN_NOT_PRESENT, so that callers recover as from a removed token.
absl::Status TokenLostError(std::string_view message);

}  // namespace custos::hsm
