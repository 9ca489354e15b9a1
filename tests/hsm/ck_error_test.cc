#include "hsm/ck_error.h"

#include <catch2/catch.hpp>

namespace custos::hsm {
namespace {

TEST_CASE("CkrName names every standard code and shows unknown ones in hex") {
  CHECK(CkrName(CKR_OK) == "CKR_OK");
  CHECK(CkrName(CKR_PIN_INCORRECT) == "CKR_PIN_INCORRECT");
  CHECK(CkrName(CKR_UNWRAPPING_KEY_HANDLE_INVALID) == "CKR_UNWRAPPING_KEY_HANDLE_INVALID");
  CHECK(CkrName(CKR_FUNCTION_REJECTED) == "CKR_FUNCTION_REJECTED");
  CHECK(CkrName(0x4242) == "CKR_0x4242");
  CHECK(CkrName(CKR_VENDOR_DEFINED + 0x10) == "CKR_VENDOR_DEFINED+0x10");
}

TEST_CASE("CkError names the function and the code and maps to a status code") {
  absl::Status error = CkError("C_Encrypt", CKR_DEVICE_ERROR);
  CHECK(error.message() == "PKCS#11 C_Encrypt failed: CKR_DEVICE_ERROR");
  CHECK(absl::IsUnavailable(error));
  REQUIRE(CkrOf(error).has_value());
  CHECK(*CkrOf(error) == CKR_DEVICE_ERROR);
  CHECK_FALSE(CkrOf(absl::UnavailableError("not from PKCS#11")).has_value());

  for (CK_RV rv : {CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_SESSION_HANDLE_INVALID,
                   CKR_SESSION_CLOSED, CKR_CRYPTOKI_NOT_INITIALIZED, CKR_USER_NOT_LOGGED_IN,
                   CKR_HOST_MEMORY, CKR_DEVICE_MEMORY, CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED}) {
    CHECK(absl::IsUnavailable(CkError("C_X", rv)));
  }
  for (CK_RV rv : {CKR_PIN_INCORRECT, CKR_PIN_INVALID, CKR_PIN_LOCKED, CKR_PIN_EXPIRED}) {
    CHECK(absl::IsPermissionDenied(CkError("C_Login", rv)));
  }
  for (CK_RV rv : {CKR_ENCRYPTED_DATA_INVALID, CKR_ENCRYPTED_DATA_LEN_RANGE, CKR_DATA_LEN_RANGE,
                   CKR_WRAPPED_KEY_INVALID, CKR_WRAPPED_KEY_LEN_RANGE}) {
    CHECK(absl::IsInvalidArgument(CkError("C_X", rv)));
  }
  CHECK(absl::IsInternal(CkError("C_X", CKR_MECHANISM_INVALID)));
  CHECK(absl::IsInternal(CkError("C_X", CKR_ATTRIBUTE_SENSITIVE)));
}

TEST_CASE("recovery predicates") {
  CHECK(IsSessionDead(CKR_SESSION_HANDLE_INVALID));
  CHECK(IsSessionDead(CKR_DEVICE_REMOVED));
  CHECK(IsSessionDead(CKR_TOKEN_NOT_PRESENT));
  CHECK_FALSE(IsSessionDead(CKR_PIN_INCORRECT));
  CHECK_FALSE(IsSessionDead(CKR_GENERAL_ERROR));
  CHECK(IsLoginLost(CKR_USER_NOT_LOGGED_IN));
  CHECK_FALSE(IsLoginLost(CKR_SESSION_HANDLE_INVALID));
  CHECK(IsHandleStale(CKR_KEY_HANDLE_INVALID));
  CHECK(IsHandleStale(CKR_OBJECT_HANDLE_INVALID));
  CHECK_FALSE(IsHandleStale(CKR_OK));
}

}  // namespace
}  // namespace custos::hsm
