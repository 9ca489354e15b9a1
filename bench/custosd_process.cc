#include "bench/custosd_process.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/support/files.h"

namespace custos::bench {
namespace {

using testing::ReadFile;
using testing::RunOrThrow;

// The default (16) would make gRPC refuse calls beyond 18 at once with RESOURCE_EXHAUSTED; a
// benchmark of N concurrent callers needs N workers (which also sizes the HSM session pool).
void SetWorkerThreads(const std::string& config_path, int threads) {
  std::string config = ReadFile(config_path);
  const std::string line = "worker_threads = " + std::to_string(threads);
  const std::regex existing(R"(\nworker_threads *= *\d+)");
  if (std::regex_search(config, existing)) {
    config = std::regex_replace(config, existing, "\n" + line);
  } else {
    const size_t server = config.find("[server]\n");
    if (server == std::string::npos) throw std::runtime_error("no [server] in " + config_path);
    config.insert(server + 9, line + "\n");
  }
  std::ofstream(config_path, std::ios::trunc) << config;
}

}  // namespace

CustosdProcess::CustosdProcess(const std::string& state_dir, int worker_threads) {
  if (state_dir.empty()) {
    temp_.emplace();
    dir_ = temp_->path();
  } else {
    std::filesystem::create_directories(state_dir);
    dir_ = std::filesystem::canonical(state_dir).string();
  }
  RunOrThrow("MAKE_STATE_QUIET=1 CUSTOS_PORT=0 " MAKE_STATE_PATH " '" + dir_ + "'");
  const std::string config = dir_ + "/custosd.toml";
  SetWorkerThreads(config, worker_threads);
  // SOFTHSM2_CONF is given to each custosd explicitly: this process may point its own at
  // another token (the raw PKCS#11 baseline).
  const std::string softhsm_conf = dir_ + "/hsm/softhsm2.conf";
  RunOrThrow("SOFTHSM2_CONF='" + softhsm_conf + "' " CUSTOSD_PATH " --config '" + config +
             "' init >'" + dir_ + "/init.log' 2>&1");

  const std::string port_file = dir_ + "/port";
  std::filesystem::remove(port_file);
  std::fflush(nullptr);  // or the child would write the parent's buffered output again
  pid_ = fork();
  if (pid_ == 0) {
    const std::string log = dir_ + "/custosd.log";
    freopen(log.c_str(), "a", stdout);
    dup2(fileno(stdout), STDERR_FILENO);
    setenv("SOFTHSM2_CONF", softhsm_conf.c_str(), 1);
    execl(CUSTOSD_PATH, CUSTOSD_PATH, "--config", config.c_str(), "--port-file", port_file.c_str(),
          nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    if (in >> port_ && port_ > 0) return;
    if (!Alive()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  throw std::runtime_error("custosd did not start:\n" + Log());
}

CustosdProcess::~CustosdProcess() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  std::filesystem::remove(dir_ + "/port");  // stale once custosd is gone
}

bool CustosdProcess::Alive() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }

std::string CustosdProcess::Log() const { return ReadFile(dir_ + "/custosd.log"); }

CustosdProcess::CommitCounts CustosdProcess::CommitStats() const {
  static const std::regex kLine(R"(group commit: (\d+) batches in (\d+) transactions)");
  const auto count = [&] {
    const std::string log = Log();
    return std::distance(std::sregex_iterator(log.begin(), log.end(), kLine),
                         std::sregex_iterator());
  };
  const auto before = count();
  kill(pid_, SIGUSR1);
  for (int i = 0; i < 1000; ++i) {
    const std::string log = Log();
    std::smatch last;
    long seen = 0;
    for (auto it = std::sregex_iterator(log.begin(), log.end(), kLine);
         it != std::sregex_iterator(); ++it, ++seen) {
      last = *it;
    }
    if (seen > before) {
      return {std::stoull(last[1].str()), std::stoull(last[2].str())};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  throw std::runtime_error("custosd logged no group commit counts after SIGUSR1");
}

std::shared_ptr<grpc::Channel> CustosdProcess::Channel(const std::string& client) const {
  const std::string pki = dir_ + "/pki";
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadFile(pki + "/ca.crt");
  tls.pem_cert_chain = ReadFile(pki + "/clients/" + client + ".crt");
  tls.pem_private_key = ReadFile(pki + "/clients/" + client + ".key");
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // each channel its own connection
  return grpc::CreateCustomChannel("localhost:" + std::to_string(port_), grpc::SslCredentials(tls),
                                   args);
}

}  // namespace custos::bench
