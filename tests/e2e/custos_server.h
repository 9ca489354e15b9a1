// CustosServer: a real custosd process for end-to-end tests.
//
// Makes a fresh state folder with tools/make-state.sh (SoftHSM2 token, development CA,
// client certificates for app, officer1, officer2 and auditor, plus a client certificate
// from an unrelated CA), runs `custosd init`, then starts custosd on a random loopback port
// and waits until it answers. The process is stopped (SIGTERM) when the object goes.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/key_service.grpc.pb.h"
#include "tests/support/temp_dir.h"

namespace custos::testing {

inline constexpr char kAppPrincipal[] = "spiffe://custos.local/app/demo";

struct ServerOptions {
  // TOML appended to the generated custosd.toml before the first start.
  std::string extra_config;
  // Load the HSM through the fault-injection module (tests/fault_module), driven with
  // CustosServer::SetFaults.
  bool fault_module = false;
  // Make the root key before `custosd init` as a legacy root (no unwrap template), as the
  // states of Custos before roots confined what they unwrap have it.
  bool legacy_root = false;
};

class CustosServer {
 public:
  // `extra_config` (TOML) is appended to the generated custosd.toml before the first start.
  explicit CustosServer(const std::string& extra_config = "")
      : CustosServer(ServerOptions{extra_config}) {}
  explicit CustosServer(const ServerOptions& options);
  ~CustosServer();

  // The shared server of this test process, started on first use.
  static CustosServer& Shared();

  // A channel authenticated as `client` (app, officer1, officer2, auditor), as the other
  // CA's client ("other-ca"), or with no client certificate at all ("none").
  // `args` adds channel arguments of the test's own.
  std::shared_ptr<grpc::Channel> Channel(const std::string& client,
                                         grpc::ChannelArguments args = {}) const;
  std::unique_ptr<custos::v1::KeyService::Stub> Keys(const std::string& client) const;
  std::unique_ptr<custos::v1::AdminService::Stub> Admin(const std::string& client) const;

  // Stops custosd (SIGTERM) and starts it again on the same state folder (on a new port).
  void Restart();
  // Kills custosd with SIGKILL (no shutdown of any kind) and starts it again.
  void CrashAndRestart();
  // Kills custosd with SIGKILL and waits for it, leaving it stopped; Start() runs it again.
  void Kill();
  // Starts custosd (after Kill or Stop), with `flags` added to its command line (e.g.
  // "--allow-re-anchor"). Throws if it does not come up.
  void Start(const std::vector<std::string>& flags = {});
  void Stop();
  // Sends `signal` to custosd (e.g. SIGHUP to reload the policy).
  void Signal(int signal) const;
  // True while the custosd process is running.
  bool Alive() const;
  // Waits up to `timeout` for custosd to exit by itself; its exit status (128 + signal if a
  // signal ended it), or -1 if it is still running.
  int WaitForExit(std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  // The key/value gateway's port, from the port file's second line (0 when it is off).
  int gateway_port() const;
  // The metrics endpoint's port, from the port file's third line (0 when it is off).
  int metrics_port() const;
  // Replaces `from` by `to` in custosd.toml (takes effect at the next start); throws if
  // `from` is not there.
  void EditConfig(const std::string& from, const std::string& to);
  // With ServerOptions::fault_module: replaces the fault module's rules (see
  // tests/fault_module/fault_module.cc), atomically; "" clears them. FaultLog() is what the
  // module has logged so far.
  void SetFaults(const std::string& rules) const;
  std::string FaultLog() const;
  const std::string& state_dir() const { return dir_.path(); }
  // custosd's standard output and error so far.
  std::string Log() const;

 private:
  TempDir dir_;
  std::string fault_env_;  // "CUSTOS_FAULT_CONTROL=... CUSTOS_FAULT_LOG=... " with fault_module
  pid_t pid_ = -1;
  int port_ = 0;
};

// A client context with a 10-second deadline.
std::unique_ptr<grpc::ClientContext> Context();

// A loopback TCP port nobody listens on right now.
int FreeLoopbackPort();

// Runs custosd with `args` to the end (at most `timeout_seconds`, then SIGKILL), its output
// in `*output`; returns its exit status (128 + signal if killed).
int RunCustosd(const std::string& args, std::string* output, int timeout_seconds = 20);

}  // namespace custos::testing
