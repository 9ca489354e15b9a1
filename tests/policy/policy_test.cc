#include "policy/policy.h"

#include <sys/stat.h>

#include <fstream>
#include <string>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.h"

namespace custos::policy {
namespace {

constexpr char kValid[] = R"toml(# Custos policy
[roles]
app     = ["spiffe://custos.local/app/billing", "spiffe://custos.local/app/reports"]
officer = ["spiffe://custos.local/officer/alice", "spiffe://custos.local/officer/bob"]
auditor = ["spiffe://custos.local/auditor/carol"]
)toml";

// The expected digest was computed once, outside the code under test:
//   printf '[roles]\nofficer = ["alice"]\n' | sha256sum
constexpr char kSmallPolicy[] = "[roles]\nofficer = [\"alice\"]\n";
constexpr char kSmallPolicySha256[] =
    "1ea793337e3661de12a27d778050e9b99f3996cd608fff6048415c09d72f4f5a";

std::string ParseError(std::string_view text) {
  auto policy = Policy::Parse(text);
  REQUIRE_FALSE(policy.ok());
  CHECK(policy.status().code() == absl::StatusCode::kInvalidArgument);
  return std::string(policy.status().message());
}

TEST_CASE("A valid policy gives each principal its role", "[policy]") {
  auto policy = Policy::Parse(kValid);
  REQUIRE(policy.ok());
  const Policy& p = **policy;
  CHECK(p.principal_count() == 5);
  CHECK(p.RoleOf("spiffe://custos.local/app/billing") == Role::kApp);
  CHECK(p.RoleOf("spiffe://custos.local/app/reports") == Role::kApp);
  CHECK(p.RoleOf("spiffe://custos.local/officer/alice") == Role::kOfficer);
  CHECK(p.RoleOf("spiffe://custos.local/officer/bob") == Role::kOfficer);
  CHECK(p.RoleOf("spiffe://custos.local/auditor/carol") == Role::kAuditor);
  CHECK(p.RoleOf("spiffe://custos.local/app/unknown") == std::nullopt);
  CHECK(p.RoleOf("") == std::nullopt);
  CHECK(p.sha256_hex().size() == 64);
}

TEST_CASE("Apps and auditors are optional; an officer is not", "[policy]") {
  auto officer_only = Policy::Parse("[roles]\nofficer = [\"alice\"]\napp = []\n");
  REQUIRE(officer_only.ok());
  CHECK((*officer_only)->principal_count() == 1);

  CHECK_THAT(ParseError("[roles]\napp = [\"billing\"]\nauditor = [\"carol\"]\n"),
             Catch::Contains("policy names no officer"));
  CHECK_THAT(ParseError("[roles]\nofficer = []\n"), Catch::Contains("policy names no officer"));
  CHECK_THAT(ParseError(""), Catch::Contains("policy has no [roles] table"));
}

TEST_CASE("sha256_hex is the SHA-256 of the exact policy text", "[policy]") {
  auto policy = Policy::Parse(kSmallPolicy);
  REQUIRE(policy.ok());
  CHECK((*policy)->sha256_hex() == kSmallPolicySha256);
  // The same roles written differently is a different file, so a different digest.
  auto spaced = Policy::Parse("[roles]\nofficer = [ \"alice\" ]\n");
  REQUIRE(spaced.ok());
  CHECK((*spaced)->sha256_hex() != kSmallPolicySha256);
}

TEST_CASE("TOML syntax errors name the line", "[policy]") {
  const std::string message = ParseError("[roles]\nofficer = [\"alice\"]\napp = [billing]\n");
  CHECK_THAT(message, Catch::Contains("not valid TOML: line 3"));
  CHECK_THAT(ParseError("[roles\nofficer = [\"alice\"]\n"), Catch::Contains("line 1"));
  CHECK_THAT(ParseError("[roles]\nofficer = [\"alice\"]\nofficer = [\"bob\"]\n"),
             Catch::Contains("line 3"));
}

// Found by fuzz/policy_fuzz.cc: Debian's toml++ 3.3.0 reaches undefined behaviour when it asks
// whether such a character is whitespace (common/toml_text.h), so the text is refused first.
TEST_CASE("A character the TOML parser cannot classify is refused before it parses", "[policy]") {
  CHECK_THAT(ParseError("\xc9\x89\n"), Catch::Contains("not valid TOML: line 1: a character in"));
  CHECK_THAT(ParseError("h2=2*\"=-J\xc3\xb8"
                        "2=2mh"),
             Catch::Contains("line 1"));
  CHECK_THAT(ParseError("[roles]\nofficer = [\"alice\"] \xef\xbb\xbc\n"),
             Catch::Contains("line 2"));
  CHECK_THAT(ParseError("[roles]\nofficer = [\"\"\"\\\n\xc2\xa7"
                        "alice\"\"\"]\n"),
             Catch::Contains("line 3"));
  // Comment lines may hold any character, and a string the same character as an escape.
  CHECK(Policy::Parse("# r\xc3\xb4les\n[roles]\n  # caf\xc3\xa9\nofficer = [\"alice\"]\n").ok());
  CHECK_THAT(ParseError("[roles]\nofficer = [\"caf\\u00e9\"]\n"),
             Catch::Contains("outside printable ASCII"));
}

TEST_CASE("Each kind of bad entry is refused with a message naming it", "[policy]") {
  struct Case {
    const char* text;
    const char* message;
  };
  const Case cases[] = {
      {"[roles]\nofficer = [\"alice\"]\nadmin = [\"root\"]\n",
       "unknown role 'admin' (line 3); the roles are app, officer, auditor and database"},
      {"[roles]\nofficer = [\"alice\"]\n[extra]\nx = 1\n", "unknown top-level table 'extra'"},
      {"version = 2\n[roles]\nofficer = [\"alice\"]\n", "unknown top-level key 'version'"},
      {"roles = 1\n", "'roles' must be a table"},
      {"[roles]\nofficer = [\"alice\", 42]\n",
       "role 'officer' has an entry that is not a string (line 2)"},
      {"[roles]\nofficer = [\"alice\", [\"bob\"]]\n",
       "role 'officer' has an entry that is not a string"},
      {"[roles]\nofficer = \"alice\"\n", "role 'officer' must be an array of principal strings"},
      {"[roles.officer]\nalice = true\n", "role 'officer' must be an array of principal strings"},
      {"[roles]\nofficer = [\"alice\"]\napp = [\"\"]\n",
       "role 'app' has an empty principal (line 3)"},
      {"[roles]\nofficer = [\"alice \"]\n",
       "principal 'alice ' in role 'officer' has leading or trailing whitespace"},
      {"[roles]\nofficer = [\"alice\", \"bob\", \"alice\"]\n",
       "principal 'alice' is listed twice in role 'officer'"},
      {"[roles]\napp = [\"x\"]\nofficer = [\"x\"]\n",
       "principal 'x' holds roles 'app' and 'officer'; each principal must hold exactly one role"},
      // Reported the same way whatever the order in the file.
      {"[roles]\nofficer = [\"x\"]\napp = [\"x\"]\n",
       "principal 'x' holds roles 'app' and 'officer'; each principal must hold exactly one role"},
      {"[roles]\nofficer = [\"alice\"]\nauditor = [\"alice\"]\n",
       "principal 'alice' holds roles 'officer' and 'auditor'"},
  };
  for (const Case& c : cases) {
    INFO("policy:\n" << c.text);
    CHECK_THAT(ParseError(c.text), Catch::Contains(c.message));
  }
}

TEST_CASE("LoadFile reads, parses and hashes a file", "[policy]") {
  custos::testing::TempDir dir;
  const std::string path = dir.File("policy.toml");
  std::ofstream(path) << kSmallPolicy;
  auto policy = Policy::LoadFile(path);
  REQUIRE(policy.ok());
  CHECK((*policy)->RoleOf("alice") == Role::kOfficer);
  CHECK((*policy)->sha256_hex() == kSmallPolicySha256);

  SECTION("a missing file or a directory is NOT_FOUND") {
    auto missing = Policy::LoadFile(dir.File("nope.toml"));
    CHECK(missing.status().code() == absl::StatusCode::kNotFound);
    CHECK_THAT(std::string(missing.status().message()), Catch::Contains("nope.toml"));
    CHECK(Policy::LoadFile(dir.path()).status().code() == absl::StatusCode::kNotFound);
  }
  SECTION("a bad file is INVALID_ARGUMENT naming the file") {
    std::ofstream(path) << "[roles]\napp = [\"billing\"]\n";
    auto bad = Policy::LoadFile(path);
    CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(bad.status().message()), Catch::Contains("policy.toml"));
    CHECK_THAT(std::string(bad.status().message()), Catch::Contains("no officer"));
  }
}

TEST_CASE("A principal that no certificate could carry is refused", "[policy]") {
  // Both kinds parse: a URI principal (scheme ':' ...) and a CN principal (no ':').
  REQUIRE(Policy::Parse("[roles]\nofficer = [\"urn:custos:alice\", \"bob\", "
                        "\"spiffe://custos.local/officer/carol\"]\n")
              .ok());
  const std::string not_uri =
      "has ':' but is not a URI such as spiffe://... or urn:... (a common name never holds ':')";
  for (const char* principal : {"1:alice", ":alice", "alice:", "al_ice:x"}) {
    INFO(principal);
    CHECK_THAT(ParseError(std::string("[roles]\nofficer = [\"") + principal + "\"]\n"),
               Catch::Contains("role 'officer' has a principal that " + not_uri + " (line 2)"));
  }
  for (const char* principal : {"al ice", "alice\\u0007", "caf\\u00e9", "\\u202ealice"}) {
    INFO(principal);
    CHECK_THAT(ParseError(std::string("[roles]\nofficer = [\"") + principal + "\"]\n"),
               Catch::Contains("has a character outside printable ASCII"));
  }
}

TEST_CASE("RoleName", "[policy]") {
  CHECK(RoleName(Role::kApp) == "app");
  CHECK(RoleName(Role::kOfficer) == "officer");
  CHECK(RoleName(Role::kAuditor) == "auditor");
}

}  // namespace
}  // namespace custos::policy
