// Policy: who holds which role, loaded from a TOML file at start-up.
//
//   [roles]
//   app     = ["spiffe://custos.local/app/billing"]
//   officer = ["spiffe://custos.local/officer/alice", "spiffe://custos.local/officer/bob"]
//   auditor = ["spiffe://custos.local/auditor/carol"]
//
// Each principal holds exactly one role: a principal listed twice, an unknown role or an
// unknown table is a load error. Immutable once loaded; share it as shared_ptr<const Policy>.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace custos::policy {

enum class Role { kApp, kOfficer, kAuditor, kDatabase };
std::string_view RoleName(Role role);

class Policy {
 public:
  // INVALID_ARGUMENT with a message naming the offending entry (and line, for TOML syntax).
  static absl::StatusOr<std::shared_ptr<const Policy>> Parse(std::string_view toml_text);
  // As Parse, reading `path`; NOT_FOUND if it cannot be read.
  static absl::StatusOr<std::shared_ptr<const Policy>> LoadFile(const std::string& path);

  std::optional<Role> RoleOf(std::string_view principal) const;
  // Lower-case hex SHA-256 of the policy text, recorded in the audit log at load.
  const std::string& sha256_hex() const { return sha256_hex_; }
  size_t principal_count() const { return roles_.size(); }
  // How many principals hold `role`.
  size_t CountOf(Role role) const;
  // The principals holding a role other than `role`, in order.
  std::vector<std::string> PrincipalsNotIn(Role role) const;

 private:
  Policy() = default;
  std::map<std::string, Role, std::less<>> roles_;
  std::string sha256_hex_;
};

}  // namespace custos::policy
