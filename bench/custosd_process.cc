#include "bench/custosd_process.h"

#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <stdexcept>
#include <thread>

#include "tests/support/files.h"

namespace custos::bench {
namespace {

using testing::ReadFile;
using testing::RunOrThrow;

// Writes `key = value` into [section] of the config at `config_path`, replacing the key's
// line if the file has one (keys are unique across custosd.toml's sections).
void SetSetting(const std::string& config_path, const std::string& section, const std::string& key,
                int value) {
  std::string config = ReadFile(config_path);
  const std::string line = key + " = " + std::to_string(value);
  const std::regex existing("\n" + key + R"( *= *\d+)");
  if (std::regex_search(config, existing)) {
    config = std::regex_replace(config, existing, "\n" + line);
  } else {
    const std::string header = "[" + section + "]\n";
    const size_t at = config.find(header);
    if (at == std::string::npos) throw std::runtime_error("no " + header + " in " + config_path);
    config.insert(at + header.size(), line + "\n");
  }
  std::ofstream(config_path, std::ios::trunc) << config;
}

}  // namespace

CustosdProcess::CustosdProcess(const std::string& state_dir, int worker_threads, int hsm_threads) {
  if (state_dir.empty()) {
    temp_.emplace();
    dir_ = temp_->path();
  } else {
    std::filesystem::create_directories(state_dir);
    dir_ = std::filesystem::canonical(state_dir).string();
  }
  RunOrThrow("MAKE_STATE_QUIET=1 CUSTOS_PORT=0 " MAKE_STATE_PATH " '" + dir_ + "'");
  const std::string config = dir_ + "/custosd.toml";
  if (worker_threads > 0) SetSetting(config, "server", "worker_threads", worker_threads);
  if (hsm_threads > 0) SetSetting(config, "hsm", "threads", hsm_threads);
  // SOFTHSM2_CONF is given to each custosd explicitly: this process may point its own at
  // another token (the raw PKCS#11 baseline).
  const std::string softhsm_conf = dir_ + "/hsm/softhsm2.conf";
  RunOrThrow("SOFTHSM2_CONF='" + softhsm_conf + "' " CUSTOSD_PATH " --config '" + config +
             "' init >'" + dir_ + "/init.log' 2>&1");
  const std::string port_file = dir_ + "/port";
  server_ = std::make_unique<ServerProcess>(
      std::vector<std::string>{CUSTOSD_PATH, "--config", config, "--port-file", port_file},
      port_file, dir_ + "/custosd.log",
      std::vector<std::pair<std::string, std::string>>{{"SOFTHSM2_CONF", softhsm_conf}});
}

CustosdProcess::~CustosdProcess() { server_.reset(); }  // before the folder goes

std::optional<CustosdProcess::CommitCounts> CustosdProcess::CommitStats() const {
  static const std::regex kLine(R"(group commit: (\d+) batches in (\d+) transactions)");
  // Only what custosd logs after the signal is searched (the log may be long).
  const size_t from = std::filesystem::file_size(server_->log_path());
  kill(pid(), SIGUSR1);
  for (int i = 0; i < 1000; ++i) {
    std::ifstream in(server_->log_path());
    in.seekg(static_cast<std::streamoff>(from));
    const std::string added{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (std::smatch match; std::regex_search(added, match, kLine)) {
      return CommitCounts{std::stoull(match[1].str()), std::stoull(match[2].str())};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return std::nullopt;
}

std::shared_ptr<grpc::Channel> CustosdProcess::Channel(const std::string& client) const {
  return MutualTlsChannel(dir_, client, port());
}

}  // namespace custos::bench
