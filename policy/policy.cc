#include "policy/policy.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <array>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <exception>
#include <utility>

#include <toml++/toml.h>

#include "absl/strings/str_cat.h"
#include "common/toml_text.h"

namespace custos::policy {
namespace {

constexpr std::array<Role, 4> kRoles = {Role::kApp, Role::kOfficer, Role::kAuditor,
                                        Role::kDatabase};
// Far beyond any real policy; stops a mistyped path such as /dev/zero from eating memory.
constexpr size_t kMaxPolicyBytes = 1 << 20;

std::string Line(const toml::node& node) {
  return absl::StrCat(" (line ", node.source().begin.line, ")");
}

absl::StatusOr<std::string> Sha256Hex(std::string_view text) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_Digest(text.data(), text.size(), digest, &size, EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("OpenSSL could not compute SHA-256 of the policy");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < size; ++i) {
    hex.push_back(kHex[digest[i] >> 4]);
    hex.push_back(kHex[digest[i] & 0x0f]);
  }
  return hex;
}

// The [roles] table, after checking that nothing else is at the top level.
absl::StatusOr<const toml::table*> RolesTable(const toml::table& doc) {
  for (const auto& [key, node] : doc) {
    if (key.str() == "roles") continue;
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown top-level ", node.is_table() ? "table" : "key", " '", std::string(key.str()), "'",
        Line(node), "; a policy holds only a [roles] table"));
  }
  const toml::node* roles = doc.get("roles");
  if (roles == nullptr) {
    return absl::InvalidArgumentError(
        "policy has no [roles] table; at least one officer is needed");
  }
  if (!roles->is_table()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'roles' must be a table, written [roles]", Line(*roles)));
  }
  for (const auto& [key, node] : *roles->as_table()) {
    const bool known = key.str() == "app" || key.str() == "officer" || key.str() == "auditor" ||
                       key.str() == "database";
    if (!known) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown role '", std::string(key.str()), "'", Line(node),
                       "; the roles are app, officer, auditor and database"));
    }
  }
  return roles->as_table();
}

// Why `principal` can never name a client certificate; "" if it can. Principals are as
// server/peer_identity.h derives them: printable ASCII (0x21..0x7E); a URI principal (from a
// URI SAN) starts with an RFC 3986 scheme and ':' and has more after it; anything else is a
// CN principal, which never holds ':'. So every entry names exactly one kind.
const char* PrincipalSyntaxError(std::string_view principal) {
  for (unsigned char c : principal) {
    if (c < 0x21 || c > 0x7e) {
      return "has a character outside printable ASCII (a space, a control or a non-ASCII "
             "character)";
    }
  }
  const size_t colon = principal.find(':');
  if (colon == std::string_view::npos) return "";  // a CN principal
  bool scheme = colon > 0 && std::isalpha(static_cast<unsigned char>(principal[0]));
  for (char c : principal.substr(0, colon)) {
    scheme =
        scheme && (std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.');
  }
  if (!scheme || colon + 1 == principal.size()) {
    return "has ':' but is not a URI such as spiffe://... or urn:... (a common name never "
           "holds ':')";
  }
  return "";
}

}  // namespace

std::string_view RoleName(Role role) {
  switch (role) {
    case Role::kApp:
      return "app";
    case Role::kOfficer:
      return "officer";
    case Role::kAuditor:
      return "auditor";
    case Role::kDatabase:
      return "database";
  }
  return "unknown";
}

absl::StatusOr<std::shared_ptr<const Policy>> Policy::Parse(std::string_view toml_text) {
  if (const size_t line = TomlUnsafeLine(toml_text); line != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy is not valid TOML: line ", line, ": ",
                     absl::string_view(kTomlUnsafeText.data(), kTomlUnsafeText.size())));
  }
  toml::table doc;
  try {
    doc = toml::parse(toml_text);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy is not valid TOML: line ", e.source().begin.line, ", column ",
                     e.source().begin.column, ": ", std::string(e.description())));
  } catch (const std::exception& e) {  // Nothing thrown may leave the library.
    return absl::InternalError(absl::StrCat("cannot parse the policy: ", e.what()));
  }
  CUSTOS_ASSIGN_OR_RETURN(const toml::table* roles, RolesTable(doc));

  std::shared_ptr<Policy> policy(new Policy());
  bool has_officer = false;
  // Roles in a fixed order, so a principal listed under two roles is reported the same way
  // whatever the order of the file.
  for (Role role : kRoles) {
    const std::string name(RoleName(role));
    const toml::node* entry = roles->get(name);
    if (entry == nullptr) continue;
    const toml::array* principals = entry->as_array();
    if (principals == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("role '", name, "' must be an array of principal strings", Line(*entry)));
    }
    for (const toml::node& item : *principals) {
      if (!item.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat("role '", name, "' has an entry that is not a string", Line(item),
                         "; principals are strings such as \"spiffe://...\""));
      }
      const std::string& principal = item.as_string()->get();
      if (principal.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("role '", name, "' has an empty principal", Line(item)));
      }
      // A stray space would make an entry that never matches any certificate.
      if (std::isspace(static_cast<unsigned char>(principal.front())) ||
          std::isspace(static_cast<unsigned char>(principal.back()))) {
        return absl::InvalidArgumentError(absl::StrCat("principal '", principal, "' in role '",
                                                       name, "' has leading or trailing whitespace",
                                                       Line(item)));
      }
      // Not echoed: it may hold characters that do not belong in a log line.
      if (const char* error = PrincipalSyntaxError(principal); *error != '\0') {
        return absl::InvalidArgumentError(
            absl::StrCat("role '", name, "' has a principal that ", error, Line(item)));
      }
      auto [it, inserted] = policy->roles_.emplace(principal, role);
      if (!inserted && it->second == role) {
        return absl::InvalidArgumentError(absl::StrCat(
            "principal '", principal, "' is listed twice in role '", name, "'", Line(item)));
      }
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(
            "principal '", principal, "' holds roles '", std::string(RoleName(it->second)),
            "' and '", name, "'; each principal must hold exactly one role", Line(item)));
      }
      has_officer |= role == Role::kOfficer;
    }
  }
  if (!has_officer) {
    return absl::InvalidArgumentError(
        "policy names no officer; at least one officer is needed to manage keys");
  }
  CUSTOS_ASSIGN_OR_RETURN(policy->sha256_hex_, Sha256Hex(toml_text));
  return policy;
}

absl::StatusOr<std::shared_ptr<const Policy>> Policy::LoadFile(const std::string& path) {
  const auto cannot_read = [&path](int error) {
    return absl::NotFoundError(
        absl::StrCat("cannot read policy file '", path, "': ", std::strerror(error)));
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return cannot_read(errno);
  std::string text;
  char buffer[16384];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      ::close(fd);
      return cannot_read(error);
    }
    if (n == 0) break;
    text.append(buffer, static_cast<size_t>(n));
    if (text.size() > kMaxPolicyBytes) {
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat("policy file '", path, "' is larger than ", kMaxPolicyBytes, " bytes"));
    }
  }
  ::close(fd);
  auto policy = Parse(text);
  if (!policy.ok()) {
    return absl::Status(policy.status().code(),
                        absl::StrCat("policy file '", path, "': ", policy.status().message()));
  }
  return policy;
}

std::optional<Role> Policy::RoleOf(std::string_view principal) const {
  auto it = roles_.find(principal);
  if (it == roles_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> Policy::PrincipalsNotIn(Role role) const {
  std::vector<std::string> out;
  for (const auto& [principal, held] : roles_) {
    if (held != role) out.push_back(principal);
  }
  return out;
}

size_t Policy::CountOf(Role role) const {
  size_t count = 0;
  for (const auto& [principal, held] : roles_) count += held == role;
  return count;
}

}  // namespace custos::policy
