// custosd --check-config: the config, the policy, the TLS files and the PIN's source checked as
// a start would check them, each problem named, with neither the HSM's keys nor the database
// touched (the state here never had `custosd init`: no database file appears).
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

namespace fs = std::filesystem;

// A fresh state folder (tools/make-state.sh), never initialised or started.
class State {
 public:
  State() {
    int exit_code = -1;
    const std::string out =
        RunCommand("MAKE_STATE_QUIET=1 CUSTOS_PORT=0 " MAKE_STATE_PATH " " + dir_.path() + " 2>&1",
                   &exit_code);
    INFO(out);
    REQUIRE(exit_code == 0);
  }
  std::string File(const std::string& name) const { return dir_.File(name); }
  // Replaces `from` by `to` in the state's file `name`; REQUIREs `from` is there.
  void Edit(const std::string& name, const std::string& from, const std::string& to) const {
    std::ifstream in(File(name));
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t at = text.find(from);
    REQUIRE(at != std::string::npos);
    text.replace(at, from.size(), to);
    std::ofstream(File(name), std::ios::trunc) << text;
  }
  // custosd --check-config on this state: its exit status, its output in *output.
  int Check(std::string* output) const {
    return RunCustosd("--config " + File("custosd.toml") + " --check-config", output);
  }

 private:
  TempDir dir_;
};

TEST_CASE("--check-config passes a good state without touching it", "[e2e][check-config]") {
  State state;
  std::string output;
  CHECK(state.Check(&output) == 0);
  CHECK_THAT(output, Catch::StartsWith("config " + state.File("custosd.toml") + ": OK\npolicy " +
                                       state.File("policy.toml") + ": OK, 5 principals, sha256 "));
  CHECK_FALSE(fs::exists(state.File("custos.db")));
}

TEST_CASE("--check-config names each problem and exits 1", "[e2e][check-config]") {
  State state;
  std::string output;
  SECTION("a bad value, with its file and line") {
    state.Edit("custosd.toml", "[server]\n", "[server]\nworker_threads = 0\n");
    CHECK(state.Check(&output) == 1);
    CHECK(output == "custosd: INVALID_ARGUMENT: config " + state.File("custosd.toml") +
                        ":3: server.worker_threads must be 1..1024\n");
  }
  SECTION("a policy whose quorum no officer can reach") {
    state.Edit("policy.toml", ", \"spiffe://custos.local/officer/officer2\"", "");
    CHECK(state.Check(&output) == 1);
    CHECK_THAT(output, Catch::StartsWith("custosd: FAILED_PRECONDITION: "));
    CHECK_THAT(output, Catch::Contains(" needs 2 distinct officers (proposer and approvers) but "
                                       "the policy names 1"));
  }
  SECTION("a server key that is not the certificate's") {
    fs::copy_file(state.File("pki/clients/app.key"), state.File("pki/server.key"),
                  fs::copy_options::overwrite_existing);
    CHECK(state.Check(&output) == 1);
    CHECK(output == "custosd: FAILED_PRECONDITION: tls.key " + state.File("pki/server.key") +
                        " is not the key of tls.cert " + state.File("pki/server.crt") + "\n");
  }
  SECTION("a PIN file others may read") {
    REQUIRE(chmod(state.File("hsm/pin").c_str(), 0644) == 0);
    CHECK(state.Check(&output) == 1);
    CHECK(output == "custosd: PERMISSION_DENIED: PIN file " + state.File("hsm/pin") +
                        " must belong to this user and be mode 0600\n");
  }
  CHECK_FALSE(fs::exists(state.File("custos.db")));
}

}  // namespace
}  // namespace custos::testing
