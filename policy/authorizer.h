// Separation of duties: which role may perform which action, and per-key grants for apps.
//
// Officers manage keys but never receive plaintext key material; apps use keys they are
// granted but never manage them; auditors only read the audit log. These rules are code,
// not configuration, so no policy file can weaken them. Checked on every call.
#pragma once

#include <set>
#include <string>
#include <string_view>

#include "common/status.h"
#include "policy/policy.h"

namespace custos::policy {

// Every operation a caller can ask for. Names are stable: they appear in the audit log.
enum class Action {
  kGenerateDataKey,
  kGenerateDataKeyWithoutPlaintext,
  kEncrypt,
  kDecrypt,
  kReEncrypt,
  kCreateKey,
  kDescribeKey,
  kListKeys,
  kPropose,
  kApprove,
  kReject,
  kGetRequest,
  kListRequests,
  kReadAudit,
  kClaimDatabaseToken,  // a database takes the gateway token officers issued to it, once
  kFetchTdeKey,         // a database fetches a table-space key through the key/value gateway
};
std::string_view ActionName(Action action);

// OK if `role` may perform `action` at all; PERMISSION_DENIED naming the role and action
// otherwise.
absl::Status AuthorizeRole(Role role, Action action);

// Grants on one key: which app principals may encrypt (encrypt, generate data keys,
// re-encrypt into the key) and which may decrypt (decrypt, re-encrypt out of the key).
enum class KeyUse { kEncrypt, kDecrypt };
std::string_view KeyUseName(KeyUse use);

// OK if `principal` is in `grants`; NoGrant otherwise.
absl::Status CheckGrant(const std::set<std::string>& grants, std::string_view principal, KeyUse use,
                        std::string_view key_name);
// PERMISSION_DENIED naming the principal, the use and the key as the caller named it. Also the
// answer for a key that does not exist: an app cannot tell the two apart, so it cannot learn
// which keys exist.
absl::Status NoGrant(std::string_view principal, KeyUse use, std::string_view key_name);

}  // namespace custos::policy
