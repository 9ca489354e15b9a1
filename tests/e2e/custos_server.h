// CustosServer: a real custosd process for end-to-end tests.
//
// Makes a fresh state folder with tools/make-state.sh (SoftHSM2 token, development CA,
// client certificates for app, officer1, officer2 and auditor, plus a client certificate
// from an unrelated CA), runs `custosd init`, then starts custosd on a random loopback port
// and waits until it answers. The process is stopped (SIGTERM) when the object goes.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "custos/v1/admin_service.grpc.pb.h"
#include "custos/v1/key_service.grpc.pb.h"
#include "tests/support/temp_dir.h"

namespace custos::testing {

inline constexpr char kAppPrincipal[] = "spiffe://custos.local/app/demo";

class CustosServer {
 public:
  // `extra_config` (TOML) is appended to the generated custosd.toml before the first start.
  explicit CustosServer(const std::string& extra_config = "");
  ~CustosServer();

  // The shared server of this test process, started on first use.
  static CustosServer& Shared();

  // A channel authenticated as `client` (app, officer1, officer2, auditor), as the other
  // CA's client ("other-ca"), or with no client certificate at all ("none").
  std::shared_ptr<grpc::Channel> Channel(const std::string& client) const;
  std::unique_ptr<custos::v1::KeyService::Stub> Keys(const std::string& client) const;
  std::unique_ptr<custos::v1::AdminService::Stub> Admin(const std::string& client) const;

  // Stops custosd (SIGTERM) and starts it again on the same state folder (on a new port).
  void Restart();
  // Kills custosd with SIGKILL (no shutdown of any kind) and starts it again.
  void CrashAndRestart();
  // Sends `signal` to custosd (e.g. SIGHUP to reload the policy).
  void Signal(int signal) const;
  // True while the custosd process is running.
  bool Alive() const;
  int port() const { return port_; }
  const std::string& state_dir() const { return dir_.path(); }
  // custosd's standard output and error so far.
  std::string Log() const;

 private:
  void Start();
  void Stop();

  TempDir dir_;
  pid_t pid_ = -1;
  int port_ = 0;
};

// A client context with a 10-second deadline.
std::unique_ptr<grpc::ClientContext> Context();

}  // namespace custos::testing
