#include "bench/server_process.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <thread>

#include "tests/support/files.h"

namespace custos::bench {

using testing::ReadFile;

ServerProcess::ServerProcess(const std::vector<std::string>& argv, std::string port_file,
                             std::string log,
                             const std::vector<std::pair<std::string, std::string>>& env)
    : port_file_(std::move(port_file)), log_(std::move(log)) {
  std::filesystem::remove(port_file_);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  std::fflush(nullptr);  // or the child would write the parent's buffered output again
  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    if (std::freopen(log_.c_str(), "a", stdout) == nullptr) _exit(126);
    dup2(fileno(stdout), STDERR_FILENO);
    for (const auto& [name, value] : env) setenv(name.c_str(), value.c_str(), 1);
    execv(args[0], args.data());
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file_);
    if (in >> port_ && port_ > 0) return;
    if (!Alive()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const std::string what = argv[0] + " did not start:\n" + Log();
  if (Alive()) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  pid_ = -1;
  throw std::runtime_error(what);
}

ServerProcess::~ServerProcess() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  std::filesystem::remove(port_file_);  // stale once the server is gone
}

bool ServerProcess::Alive() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }

std::string ServerProcess::Log() const { return ReadFile(log_); }

std::shared_ptr<grpc::Channel> MutualTlsChannel(const std::string& state_dir,
                                                const std::string& client, int port) {
  const std::string pki = state_dir + "/pki";
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadFile(pki + "/ca.crt");
  tls.pem_cert_chain = ReadFile(pki + "/clients/" + client + ".crt");
  tls.pem_private_key = ReadFile(pki + "/clients/" + client + ".key");
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // each channel its own connection
  return grpc::CreateCustomChannel("localhost:" + std::to_string(port), grpc::SslCredentials(tls),
                                   args);
}

}  // namespace custos::bench
