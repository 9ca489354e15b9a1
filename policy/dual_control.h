// Dual control as data: which key-management operations need other officers' approval, and
// how many.
//
// Every operation below is a request: an officer proposes it and it executes once
// `approvals` other officers approved it. Quorums are data, set in the server config; the
// rules that enforce them (no self-approval, distinct approvers, expiry) live with the use
// cases in core/. Dual control never fails open: every operation but CreateKey needs at least
// one approval besides the proposer, and a config that says otherwise does not load.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string_view>

#include "common/status.h"
#include "policy/policy.h"

namespace custos::policy {

enum class Operation {
  kCreateKey,  // only when the config asks for approvals (default: officer alone)
  kRotateKey,  // new version becomes primary; old versions still decrypt
  kDisableKey,
  kEnableKey,
  kScheduleKeyDeletion,   // PENDING_DELETION for a waiting period, then crypto-shredded
  kCancelKeyDeletion,     // back to DISABLED
  kUpdateKeyGrants,       // who may encrypt / decrypt
  kSetMinDecryptVersion,  // retire (or un-retire) old versions
  kRotateRootKey,         // new versions under a new root; legacy roots' versions moved to it
  kReAnchorAuditLog,      // accept an audit log that does not extend the HSM's last signed head
  // Table-space keys served to databases through the key/value gateway (docs/TDE.md):
  kCreateTdeKey,         // a key id of a mount, with its first version
  kRotateTdeKey,         // a new version of a mount's key id, served as its newest
  kIssueDatabaseToken,   // a gateway token for a database principal, bound to a mount's key ids
  kRevokeDatabaseToken,  // that token stops working at once
  kArchiveAuditLog,      // move the log's records up to a signed checkpoint to an archive file
};
inline constexpr Operation kAllOperations[] = {
    Operation::kCreateKey,           Operation::kRotateKey,
    Operation::kDisableKey,          Operation::kEnableKey,
    Operation::kScheduleKeyDeletion, Operation::kCancelKeyDeletion,
    Operation::kUpdateKeyGrants,     Operation::kSetMinDecryptVersion,
    Operation::kRotateRootKey,       Operation::kReAnchorAuditLog,
    Operation::kCreateTdeKey,        Operation::kRotateTdeKey,
    Operation::kIssueDatabaseToken,  Operation::kRevokeDatabaseToken,
    Operation::kArchiveAuditLog};

// The operations on the key/value gateway's keys and tokens, which name no Custos key.
inline bool IsGatewayOperation(Operation operation) {
  return operation == Operation::kCreateTdeKey || operation == Operation::kRotateTdeKey ||
         operation == Operation::kIssueDatabaseToken ||
         operation == Operation::kRevokeDatabaseToken;
}

// Stable names, used in the config, the API and the audit log: "RotateKey", ...
std::string_view OperationName(Operation operation);
std::optional<Operation> ParseOperation(std::string_view name);

inline constexpr int64_t kDay = 24 * 3600;

struct DualControlConfig {
  // Approvals needed besides the proposer's own proposal. Every operation has an entry.
  std::map<Operation, int> approvals;
  int64_t request_ttl_seconds = kDay;            // a pending request expires after this
  int64_t deletion_waiting_seconds = 30 * kDay;  // default waiting period, 7..30 days

  // 2 approvals for every operation, none for CreateKey; 24 h requests; 30-day waiting period.
  static DualControlConfig Defaults();

  int ApprovalsFor(Operation operation) const { return approvals.at(operation); }

  // One line naming every setting, for the audit log: "approvals CreateKey=0 RotateKey=2 ...;
  // request_ttl=86400s; deletion_waiting=2592000s". A quorum lowered in the config shows there.
  std::string Summary() const;

  // INVALID_ARGUMENT naming the setting at fault: an operation without an entry, fewer than
  // one approval for any operation but CreateKey (fewer than zero for it), a TTL under a
  // minute or over 30 days, a waiting period outside 7..30 days.
  absl::Status Validate() const;
};

// FAILED_PRECONDITION if `policy` has too few officers for some operation ever to reach its
// quorum (proposer + approvals distinct officers).
absl::Status CheckQuorumsReachable(const DualControlConfig& config, const Policy& policy);

}  // namespace custos::policy
