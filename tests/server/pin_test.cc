// ReadHsmPin: the PIN from a private file or from an environment variable it then removes.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <string>

#include "server/config.h"
#include "tests/support/temp_dir.h"

namespace custos::server {
namespace {

using testing::TempDir;

// Writes `content` to `path` and sets its mode to exactly `mode` (whatever the umask).
void WriteFile(const std::string& path, const std::string& content, mode_t mode) {
  {
    std::ofstream out(path, std::ios::binary);
    out << content;
  }
  REQUIRE(chmod(path.c_str(), mode) == 0);
}

Config PinFileConfig(const std::string& path) {
  Config config;
  config.hsm_pin_file = path;
  return config;
}

Config PinEnvConfig(const std::string& variable) {
  Config config;
  config.hsm_pin_env = variable;
  return config;
}

// An environment variable name no other test or process setting uses.
std::string VariableName(const std::string& suffix) {
  return "CUSTOS_TEST_HSM_PIN_" + std::to_string(getpid()) + "_" + suffix;
}

void RequireFails(const absl::StatusOr<SecureBytes>& pin, absl::StatusCode code) {
  INFO(pin.status().ToString());
  REQUIRE_FALSE(pin.ok());
  CHECK(pin.status().code() == code);
}

TEST_CASE("A 0600 PIN file is read without its trailing newline", "[pin]") {
  TempDir dir;
  const std::string path = dir.File("hsm.pin");
  WriteFile(path, "1234\n", 0600);
  absl::StatusOr<SecureBytes> pin = ReadHsmPin(PinFileConfig(path));
  INFO(pin.status().ToString());
  REQUIRE(pin.ok());
  CHECK(pin->view() == "1234");

  WriteFile(path, "5678\r\n", 0600);
  pin = ReadHsmPin(PinFileConfig(path));
  REQUIRE(pin.ok());
  CHECK(pin->view() == "5678");

  WriteFile(path, "no-newline", 0400);
  pin = ReadHsmPin(PinFileConfig(path));
  REQUIRE(pin.ok());
  CHECK(pin->view() == "no-newline");
}

TEST_CASE("A PIN file readable by group or others is refused", "[pin]") {
  TempDir dir;
  const std::string path = dir.File("hsm.pin");
  WriteFile(path, "1234\n", 0644);
  RequireFails(ReadHsmPin(PinFileConfig(path)), absl::StatusCode::kPermissionDenied);
  WriteFile(path, "1234\n", 0640);
  RequireFails(ReadHsmPin(PinFileConfig(path)), absl::StatusCode::kPermissionDenied);
  WriteFile(path, "1234\n", 0604);
  RequireFails(ReadHsmPin(PinFileConfig(path)), absl::StatusCode::kPermissionDenied);
  // Unreadable by its owner: only root could read it, and is refused as any user would be.
  WriteFile(path, "1234\n", 0000);
  const auto unreadable = ReadHsmPin(PinFileConfig(path));
  CHECK(unreadable.status().code() == absl::StatusCode::kPermissionDenied);
  CHECK(unreadable.status().message() ==
        "PIN file " + path + " must belong to this user and be mode 0600");
}

TEST_CASE("A symbolic link to a good PIN file is refused", "[pin]") {
  TempDir dir;
  const std::string target = dir.File("hsm.pin");
  WriteFile(target, "1234\n", 0600);
  REQUIRE(ReadHsmPin(PinFileConfig(target)).ok());
  const std::string link = dir.File("link.pin");
  REQUIRE(symlink(target.c_str(), link.c_str()) == 0);
  const auto linked = ReadHsmPin(PinFileConfig(link));
  CHECK(linked.status().code() == absl::StatusCode::kNotFound);
  CHECK(linked.status().message() ==
        "cannot open PIN file " + link + ": a symbolic link is refused");
}

TEST_CASE("An empty, missing or odd PIN file yields no PIN", "[pin]") {
  TempDir dir;
  const std::string path = dir.File("hsm.pin");
  WriteFile(path, "", 0600);
  RequireFails(ReadHsmPin(PinFileConfig(path)), absl::StatusCode::kNotFound);
  WriteFile(path, "\n\n", 0600);
  const auto empty = ReadHsmPin(PinFileConfig(path));
  CHECK(empty.status().code() == absl::StatusCode::kNotFound);
  CHECK(empty.status().message() == "PIN file " + path + " is empty");

  const auto absent = ReadHsmPin(PinFileConfig(dir.File("absent.pin")));
  CHECK(absent.status().code() == absl::StatusCode::kNotFound);
  CHECK(absent.status().message() ==
        "cannot open PIN file " + dir.File("absent.pin") + ": No such file or directory");
  RequireFails(ReadHsmPin(PinFileConfig(dir.path())), absl::StatusCode::kInvalidArgument);
  WriteFile(path, std::string(4097, '1'), 0600);
  RequireFails(ReadHsmPin(PinFileConfig(path)), absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A PIN from pin_env is returned and removed from the environment", "[pin]") {
  const std::string variable = VariableName("set");
  REQUIRE(setenv(variable.c_str(), "4321", 1) == 0);
  const absl::StatusOr<SecureBytes> pin = ReadHsmPin(PinEnvConfig(variable));
  INFO(pin.status().ToString());
  REQUIRE(pin.ok());
  CHECK(pin->view() == "4321");
  CHECK(std::getenv(variable.c_str()) == nullptr);

  // Read once only: the variable is gone now.
  RequireFails(ReadHsmPin(PinEnvConfig(variable)), absl::StatusCode::kNotFound);
}

TEST_CASE("An unset or empty pin_env yields no PIN", "[pin]") {
  const std::string variable = VariableName("unset");
  REQUIRE(unsetenv(variable.c_str()) == 0);
  RequireFails(ReadHsmPin(PinEnvConfig(variable)), absl::StatusCode::kNotFound);

  REQUIRE(setenv(variable.c_str(), "", 1) == 0);
  RequireFails(ReadHsmPin(PinEnvConfig(variable)), absl::StatusCode::kNotFound);
  unsetenv(variable.c_str());
}

}  // namespace
}  // namespace custos::server
