#include "hsm/ck_error.h"

#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "hsm/hsm.h"

namespace custos::hsm {
namespace {

// Status payload under which CkError() records the raw CK_RV (as decimal text).
constexpr char kCkrPayloadUrl[] = "type.custos.dev/pkcs11.CK_RV";

const char* KnownName(CK_RV rv) {
  switch (rv) {
#define CUSTOS_CKR(name) \
  case name:             \
    return #name;
    CUSTOS_CKR(CKR_OK)
    CUSTOS_CKR(CKR_CANCEL)
    CUSTOS_CKR(CKR_HOST_MEMORY)
    CUSTOS_CKR(CKR_SLOT_ID_INVALID)
    CUSTOS_CKR(CKR_GENERAL_ERROR)
    CUSTOS_CKR(CKR_FUNCTION_FAILED)
    CUSTOS_CKR(CKR_ARGUMENTS_BAD)
    CUSTOS_CKR(CKR_NO_EVENT)
    CUSTOS_CKR(CKR_NEED_TO_CREATE_THREADS)
    CUSTOS_CKR(CKR_CANT_LOCK)
    CUSTOS_CKR(CKR_ATTRIBUTE_READ_ONLY)
    CUSTOS_CKR(CKR_ATTRIBUTE_SENSITIVE)
    CUSTOS_CKR(CKR_ATTRIBUTE_TYPE_INVALID)
    CUSTOS_CKR(CKR_ATTRIBUTE_VALUE_INVALID)
    CUSTOS_CKR(CKR_ACTION_PROHIBITED)
    CUSTOS_CKR(CKR_DATA_INVALID)
    CUSTOS_CKR(CKR_DATA_LEN_RANGE)
    CUSTOS_CKR(CKR_DEVICE_ERROR)
    CUSTOS_CKR(CKR_DEVICE_MEMORY)
    CUSTOS_CKR(CKR_DEVICE_REMOVED)
    CUSTOS_CKR(CKR_ENCRYPTED_DATA_INVALID)
    CUSTOS_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE)
    CUSTOS_CKR(CKR_FUNCTION_CANCELED)
    CUSTOS_CKR(CKR_FUNCTION_NOT_PARALLEL)
    CUSTOS_CKR(CKR_FUNCTION_NOT_SUPPORTED)
    CUSTOS_CKR(CKR_KEY_HANDLE_INVALID)
    CUSTOS_CKR(CKR_KEY_SIZE_RANGE)
    CUSTOS_CKR(CKR_KEY_TYPE_INCONSISTENT)
    CUSTOS_CKR(CKR_KEY_NOT_NEEDED)
    CUSTOS_CKR(CKR_KEY_CHANGED)
    CUSTOS_CKR(CKR_KEY_NEEDED)
    CUSTOS_CKR(CKR_KEY_INDIGESTIBLE)
    CUSTOS_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED)
    CUSTOS_CKR(CKR_KEY_NOT_WRAPPABLE)
    CUSTOS_CKR(CKR_KEY_UNEXTRACTABLE)
    CUSTOS_CKR(CKR_MECHANISM_INVALID)
    CUSTOS_CKR(CKR_MECHANISM_PARAM_INVALID)
    CUSTOS_CKR(CKR_OBJECT_HANDLE_INVALID)
    CUSTOS_CKR(CKR_OPERATION_ACTIVE)
    CUSTOS_CKR(CKR_OPERATION_NOT_INITIALIZED)
    CUSTOS_CKR(CKR_PIN_INCORRECT)
    CUSTOS_CKR(CKR_PIN_INVALID)
    CUSTOS_CKR(CKR_PIN_LEN_RANGE)
    CUSTOS_CKR(CKR_PIN_EXPIRED)
    CUSTOS_CKR(CKR_PIN_LOCKED)
    CUSTOS_CKR(CKR_SESSION_CLOSED)
    CUSTOS_CKR(CKR_SESSION_COUNT)
    CUSTOS_CKR(CKR_SESSION_HANDLE_INVALID)
    CUSTOS_CKR(CKR_SESSION_PARALLEL_NOT_SUPPORTED)
    CUSTOS_CKR(CKR_SESSION_READ_ONLY)
    CUSTOS_CKR(CKR_SESSION_EXISTS)
    CUSTOS_CKR(CKR_SESSION_READ_ONLY_EXISTS)
    CUSTOS_CKR(CKR_SESSION_READ_WRITE_SO_EXISTS)
    CUSTOS_CKR(CKR_SIGNATURE_INVALID)
    CUSTOS_CKR(CKR_SIGNATURE_LEN_RANGE)
    CUSTOS_CKR(CKR_TEMPLATE_INCOMPLETE)
    CUSTOS_CKR(CKR_TEMPLATE_INCONSISTENT)
    CUSTOS_CKR(CKR_TOKEN_NOT_PRESENT)
    CUSTOS_CKR(CKR_TOKEN_NOT_RECOGNIZED)
    CUSTOS_CKR(CKR_TOKEN_WRITE_PROTECTED)
    CUSTOS_CKR(CKR_UNWRAPPING_KEY_HANDLE_INVALID)
    CUSTOS_CKR(CKR_UNWRAPPING_KEY_SIZE_RANGE)
    CUSTOS_CKR(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT)
    CUSTOS_CKR(CKR_USER_ALREADY_LOGGED_IN)
    CUSTOS_CKR(CKR_USER_NOT_LOGGED_IN)
    CUSTOS_CKR(CKR_USER_PIN_NOT_INITIALIZED)
    CUSTOS_CKR(CKR_USER_TYPE_INVALID)
    CUSTOS_CKR(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)
    CUSTOS_CKR(CKR_USER_TOO_MANY_TYPES)
    CUSTOS_CKR(CKR_WRAPPED_KEY_INVALID)
    CUSTOS_CKR(CKR_WRAPPED_KEY_LEN_RANGE)
    CUSTOS_CKR(CKR_WRAPPING_KEY_HANDLE_INVALID)
    CUSTOS_CKR(CKR_WRAPPING_KEY_SIZE_RANGE)
    CUSTOS_CKR(CKR_WRAPPING_KEY_TYPE_INCONSISTENT)
    CUSTOS_CKR(CKR_RANDOM_SEED_NOT_SUPPORTED)
    CUSTOS_CKR(CKR_RANDOM_NO_RNG)
    CUSTOS_CKR(CKR_DOMAIN_PARAMS_INVALID)
    CUSTOS_CKR(CKR_CURVE_NOT_SUPPORTED)
    CUSTOS_CKR(CKR_BUFFER_TOO_SMALL)
    CUSTOS_CKR(CKR_SAVED_STATE_INVALID)
    CUSTOS_CKR(CKR_INFORMATION_SENSITIVE)
    CUSTOS_CKR(CKR_STATE_UNSAVEABLE)
    CUSTOS_CKR(CKR_CRYPTOKI_NOT_INITIALIZED)
    CUSTOS_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED)
    CUSTOS_CKR(CKR_MUTEX_BAD)
    CUSTOS_CKR(CKR_MUTEX_NOT_LOCKED)
    CUSTOS_CKR(CKR_NEW_PIN_MODE)
    CUSTOS_CKR(CKR_NEXT_OTP)
    CUSTOS_CKR(CKR_EXCEEDED_MAX_ITERATIONS)
    CUSTOS_CKR(CKR_FIPS_SELF_TEST_FAILED)
    CUSTOS_CKR(CKR_LIBRARY_LOAD_FAILED)
    CUSTOS_CKR(CKR_PIN_TOO_WEAK)
    CUSTOS_CKR(CKR_PUBLIC_KEY_INVALID)
    CUSTOS_CKR(CKR_FUNCTION_REJECTED)
#undef CUSTOS_CKR
    default:
      return nullptr;
  }
}

absl::StatusCode CodeFor(CK_RV rv) {
  switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_COUNT:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_HOST_MEMORY:
    case CKR_GENERAL_ERROR:
    // The module's own failure, "not necessarily totally hopeless" (PKCS#11): worth a retry,
    // as CKR_GENERAL_ERROR is. Where the data may be to blame (a GCM tag, a wrapped key), the
    // caller asks the HSM again and says so instead (Pkcs11Hsm::BlameData).
    case CKR_FUNCTION_FAILED:
      return absl::StatusCode::kUnavailable;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LOCKED:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LEN_RANGE:
      return absl::StatusCode::kPermissionDenied;
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_DATA_LEN_RANGE:
    case CKR_WRAPPED_KEY_INVALID:
    case CKR_WRAPPED_KEY_LEN_RANGE:
      return absl::StatusCode::kInvalidArgument;
    default:
      return absl::StatusCode::kInternal;
  }
}

}  // namespace

std::string CkrName(CK_RV rv) {
  if (const char* name = KnownName(rv)) return name;
  char hex[32];
  if (rv >= CKR_VENDOR_DEFINED) {
    std::snprintf(hex, sizeof hex, "+0x%lx", rv - CKR_VENDOR_DEFINED);
    return std::string("CKR_VENDOR_DEFINED") + hex;
  }
  std::snprintf(hex, sizeof hex, "0x%lx", rv);
  return std::string("CKR_") + hex;
}

absl::Status CkError(std::string_view function, CK_RV rv) {
  absl::Status status(CodeFor(rv), "PKCS#11 " + std::string(function) + " failed: " + CkrName(rv));
  status.SetPayload(kCkrPayloadUrl, absl::Cord(std::to_string(rv)));
  return status;
}

std::optional<CK_RV> CkrOf(const absl::Status& status) {
  auto payload = status.GetPayload(kCkrPayloadUrl);  // An absl::optional<absl::Cord>.
  if (!payload) return std::nullopt;
  uint64_t rv = 0;
  if (!absl::SimpleAtoi(std::string(*payload), &rv)) return std::nullopt;
  return static_cast<CK_RV>(rv);
}

bool IsModuleFailure(const absl::Status& status) {
  const std::optional<CK_RV> rv = CkrOf(status);
  return rv.has_value() && (*rv == CKR_GENERAL_ERROR || *rv == CKR_FUNCTION_FAILED);
}

bool IsPinRefused(const absl::Status& status) {
  const std::optional<CK_RV> rv = CkrOf(status);
  return rv.has_value() &&
         (*rv == CKR_PIN_INCORRECT || *rv == CKR_PIN_INVALID || *rv == CKR_PIN_LOCKED ||
          *rv == CKR_PIN_EXPIRED || *rv == CKR_PIN_LEN_RANGE);
}

bool IsSessionDead(CK_RV rv) {
  switch (rv) {
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_OPERATION_ACTIVE:  // An operation we did not finish: the session's state is unknown.
      return true;
    default:
      return false;
  }
}

bool NeedsReinitialize(CK_RV rv) {
  switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return true;
    default:
      return false;
  }
}

absl::Status TokenLostError(std::string_view message) {
  absl::Status status = absl::UnavailableError(std::string(message));
  status.SetPayload(kCkrPayloadUrl, absl::Cord(std::to_string(CKR_TOKEN_NOT_PRESENT)));
  return status;
}

bool IsLoginLost(CK_RV rv) { return rv == CKR_USER_NOT_LOGGED_IN; }

bool IsHandleStale(CK_RV rv) {
  switch (rv) {
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_WRAPPING_KEY_HANDLE_INVALID:
    case CKR_UNWRAPPING_KEY_HANDLE_INVALID:
      return true;
    default:
      return false;
  }
}

}  // namespace custos::hsm
