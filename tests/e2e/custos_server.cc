#include "tests/e2e/custos_server.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
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
#include "tests/support/raw_token.h"

namespace custos::testing {

namespace {

// In a child process, so that this one never initialises SoftHSM on the state's token.
void CreateLegacyRoot(const std::string& dir) {
  std::string pin = ReadFile(dir + "/hsm/pin");
  while (!pin.empty() && (pin.back() == '\n' || pin.back() == '\r')) pin.pop_back();
  std::fflush(nullptr);
  const pid_t child = fork();
  if (child == 0) {
    RawToken("custos", pin).CreateLegacyRoot("custos-root");
    _exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("could not make a legacy root key in " + dir);
  }
}

}  // namespace

CustosServer::CustosServer(const ServerOptions& options) {
  const std::string dir = dir_.path();
  RunOrThrow("MAKE_STATE_QUIET=1 MAKE_STATE_OTHER_CA=1 CUSTOS_PORT=0 " MAKE_STATE_PATH " " + dir);
  if (!options.extra_config.empty()) {
    std::ofstream(dir + "/custosd.toml", std::ios::app) << options.extra_config;
  }
  if (options.fault_module) {
    EditConfig("/usr/lib/softhsm/libsofthsm2.so", FAULT_MODULE_PATH);
    fault_env_ =
        "CUSTOS_FAULT_CONTROL=" + dir + "/fault.control CUSTOS_FAULT_LOG=" + dir + "/fault.log ";
  }
  setenv("SOFTHSM2_CONF", (dir + "/hsm/softhsm2.conf").c_str(), 1);
  if (options.legacy_root) CreateLegacyRoot(dir);
  RunOrThrow(fault_env_ + CUSTOSD_PATH + " --config " + dir + "/custosd.toml init >" + dir +
             "/init.log 2>&1");
  Start();
}

void CustosServer::Start(const std::vector<std::string>& flags) {
  const std::string dir = dir_.path();
  const std::string port_file = dir + "/port";
  std::fflush(nullptr);  // or the child would write the parent's buffered output again
  pid_ = fork();
  if (pid_ == 0) {
    const std::string log = dir + "/custosd.log";
    freopen(log.c_str(), "a", stdout);
    dup2(fileno(stdout), STDERR_FILENO);
    const std::string config = dir + "/custosd.toml";
    if (!fault_env_.empty()) {  // this server's fault module files, not another's
      setenv("CUSTOS_FAULT_CONTROL", (dir + "/fault.control").c_str(), 1);
      setenv("CUSTOS_FAULT_LOG", (dir + "/fault.log").c_str(), 1);
    }
    setenv("SOFTHSM2_CONF", (dir + "/hsm/softhsm2.conf").c_str(), 1);
    // As a shell starts it: SIGPIPE not ignored, whatever this test process does with it.
    signal(SIGPIPE, SIG_DFL);
    std::vector<const char*> argv = {CUSTOSD_PATH, "--config", config.c_str(), "--port-file",
                                     port_file.c_str()};
    for (const std::string& flag : flags) argv.push_back(flag.c_str());
    argv.push_back(nullptr);
    execv(CUSTOSD_PATH, const_cast<char* const*>(argv.data()));
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
  // How it ended, if it did: an exit status, a signal, or still running without a port.
  std::string how = "no port within 20 s";
  siginfo_t info{};
  if (waitid(P_PID, pid_, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid_) {
    how = info.si_code == CLD_EXITED ? "exited " + std::to_string(info.si_status)
                                     : "killed by signal " + std::to_string(info.si_status);
  }
  throw std::runtime_error("custosd did not start (" + how + "):\n" + Log());
}

CustosServer::~CustosServer() { Stop(); }

void CustosServer::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
  std::remove(dir_.File("port").c_str());
}

void CustosServer::EditConfig(const std::string& from, const std::string& to) {
  const std::string path = dir_.File("custosd.toml");
  std::string text = ReadFile(path);
  const size_t at = text.find(from);
  if (at == std::string::npos) throw std::runtime_error("custosd.toml has no '" + from + "'");
  text.replace(at, from.size(), to);
  std::ofstream(path, std::ios::trunc) << text;
}

void CustosServer::SetFaults(const std::string& rules) const {
  const std::string path = dir_.File("fault.control");
  std::ofstream(path + ".new", std::ios::trunc) << rules;
  std::rename((path + ".new").c_str(), path.c_str());  // a new inode: the module notices
}

std::string CustosServer::FaultLog() const { return ReadFile(dir_.File("fault.log")); }

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
  Kill();
  Start();
}

CustosServer& CustosServer::Shared() {
  static CustosServer server;
  return server;
}

bool CustosServer::Alive() const {
  if (pid_ <= 0) return false;
  // WNOWAIT: an exited server stays to be reaped, so WaitForExit still learns its status.
  siginfo_t info{};
  return waitid(P_PID, pid_, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == 0;
}

int CustosServer::WaitForExit(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (pid_ > 0) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      std::remove(dir_.File("port").c_str());
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

int CustosServer::gateway_port() const {
  std::ifstream in(dir_.File("port"));
  int grpc = 0, gateway = 0;
  in >> grpc >> gateway;
  return gateway;
}

int CustosServer::metrics_port() const {
  std::ifstream in(dir_.File("port"));
  int grpc = 0, gateway = 0, metrics = 0;
  in >> grpc >> gateway >> metrics;
  return metrics;
}

std::string CustosServer::Log() const { return ReadFile(dir_.File("custosd.log")); }

std::shared_ptr<grpc::Channel> CustosServer::Channel(const std::string& client,
                                                     grpc::ChannelArguments args) const {
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

int FreeLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throw std::runtime_error("cannot find a free loopback port");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

int RunCustosd(const std::string& args, std::string* output, int timeout_seconds) {
  TempDir dir;
  const std::string out = dir.File("out");
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c",
          // exec: the timeout's SIGKILL below must reach custosd, not only its shell.
          ("exec " + std::string(CUSTOSD_PATH) + " " + args + " >" + out + " 2>&1").c_str(),
          nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  *output = ReadFile(out);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return context;
}

}  // namespace custos::testing
