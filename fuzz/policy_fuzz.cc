// Policy::Parse over arbitrary text. Nothing may escape as an exception or a sanitizer report;
// a refusal is INVALID_ARGUMENT; a policy that loads has an officer, gives each principal one
// role (the roles' counts add up), never names the empty principal, and loads the same again.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_check.h"
#include "policy/dual_control.h"
#include "policy/policy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custos::policy;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<std::shared_ptr<const Policy>> policy = Policy::Parse(text);
  if (!policy.ok()) {
    FUZZ_CHECK(policy.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  const Policy& p = **policy;
  FUZZ_CHECK(p.CountOf(Role::kOfficer) >= 1);
  FUZZ_CHECK(p.CountOf(Role::kApp) + p.CountOf(Role::kOfficer) + p.CountOf(Role::kAuditor) +
                 p.CountOf(Role::kDatabase) ==
             p.principal_count());
  FUZZ_CHECK(p.sha256_hex().size() == 64);
  // The empty principal and one with a space can never be a certificate's identity.
  FUZZ_CHECK(!p.RoleOf(""));
  FUZZ_CHECK(!p.RoleOf(" "));
  const absl::StatusOr<std::shared_ptr<const Policy>> again = Policy::Parse(text);
  FUZZ_CHECK(again.ok() && (*again)->sha256_hex() == p.sha256_hex() &&
             (*again)->principal_count() == p.principal_count());
  const absl::Status reachable = CheckQuorumsReachable(DualControlConfig::Defaults(), p);
  FUZZ_CHECK(reachable.ok() == (p.CountOf(Role::kOfficer) >= 3));
  return 0;
}
