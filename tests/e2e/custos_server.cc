#include "tests/e2e/custos_server.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/support/files.h"

namespace custos::testing {

CustosServer::CustosServer(const std::string& extra_config) {
  const std::string dir = dir_.path();
  RunOrThrow("MAKE_STATE_QUIET=1 MAKE_STATE_OTHER_CA=1 CUSTOS_PORT=0 " MAKE_STATE_PATH " " + dir);
  if (!extra_config.empty()) std::ofstream(dir + "/custosd.toml", std::ios::app) << extra_config;
  setenv("SOFTHSM2_CONF", (dir + "/hsm/softhsm2.conf").c_str(), 1);
  RunOrThrow(std::string(CUSTOSD_PATH) + " --config " + dir + "/custosd.toml init >" + dir +
             "/init.log 2>&1");
  Start();
}

void CustosServer::Start() {
  const std::string dir = dir_.path();
  const std::string port_file = dir + "/port";
  std::fflush(nullptr);  // or the child would write the parent's buffered output again
  pid_ = fork();
  if (pid_ == 0) {
    const std::string log = dir + "/custosd.log";
    freopen(log.c_str(), "a", stdout);
    dup2(fileno(stdout), STDERR_FILENO);
    const std::string config = dir + "/custosd.toml";
    execl(CUSTOSD_PATH, CUSTOSD_PATH, "--config", config.c_str(), "--port-file", port_file.c_str(),
          nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  port_ = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    if (in >> port_ && port_ > 0) return;
    if (!Alive()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  throw std::runtime_error("custosd did not start:\n" + Log());
}

CustosServer::~CustosServer() { Stop(); }

void CustosServer::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  std::remove(dir_.File("port").c_str());
}

void CustosServer::Restart() {
  Stop();
  Start();
}

void CustosServer::Signal(int signal) const { kill(pid_, signal); }

void CustosServer::CrashAndRestart() {
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
  std::remove(dir_.File("port").c_str());
  Start();
}

CustosServer& CustosServer::Shared() {
  static CustosServer server;
  return server;
}

bool CustosServer::Alive() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }

std::string CustosServer::Log() const { return ReadFile(dir_.File("custosd.log")); }

std::shared_ptr<grpc::Channel> CustosServer::Channel(const std::string& client) const {
  const std::string pki = dir_.File("pki");
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadFile(pki + "/ca.crt");
  if (client == "other-ca") {
    tls.pem_cert_chain = ReadFile(pki + "/other-ca/client.crt");
    tls.pem_private_key = ReadFile(pki + "/other-ca/client.key");
  } else if (client != "none") {
    tls.pem_cert_chain = ReadFile(pki + "/clients/" + client + ".crt");
    tls.pem_private_key = ReadFile(pki + "/clients/" + client + ".key");
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // no connection shared across clients
  return grpc::CreateCustomChannel("localhost:" + std::to_string(port_), grpc::SslCredentials(tls),
                                   args);
}

std::unique_ptr<custos::v1::KeyService::Stub> CustosServer::Keys(const std::string& client) const {
  return custos::v1::KeyService::NewStub(Channel(client));
}

std::unique_ptr<custos::v1::AdminService::Stub> CustosServer::Admin(
    const std::string& client) const {
  return custos::v1::AdminService::NewStub(Channel(client));
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return context;
}

}  // namespace custos::testing
