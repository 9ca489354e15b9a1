// ServerProcess: a server binary run as a child process for a benchmark (custosd, the echo
// server), so that its CPU time is its own and can be read per phase (ProcessCpuSeconds).
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

namespace custos::bench {

class ServerProcess {
 public:
  // Runs `argv` (argv[0] the binary's path) with `env` added to this process's environment and
  // its output appended to `log`, then waits until it writes the port it listens on to
  // `port_file` (the caller names that file in `argv`). Throws std::runtime_error, with the
  // log, if the process exits or writes no port within 20 seconds.
  ServerProcess(const std::vector<std::string>& argv, std::string port_file, std::string log,
                const std::vector<std::pair<std::string, std::string>>& env = {});
  // SIGTERM, then waits for the process to exit.
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  const std::string& log_path() const { return log_; }
  std::string Log() const;

 private:
  bool Alive() const;

  std::string port_file_;
  std::string log_;
  pid_t pid_ = -1;
  int port_ = 0;
};

// A new channel, its own TCP and TLS connection (GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL), to
// localhost:`port`, trusting `state_dir`/pki/ca.crt and authenticated with the client
// certificate `state_dir`/pki/clients/`client`.{crt,key} (app, officer1, officer2, auditor).
std::shared_ptr<grpc::Channel> MutualTlsChannel(const std::string& state_dir,
                                                const std::string& client, int port);

}  // namespace custos::bench
