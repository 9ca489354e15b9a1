// CustosdProcess: the real custosd binary, started for a benchmark.
//
// Makes (or completes) a state folder with tools/make-state.sh, optionally sets the worker
// thread count, runs `custosd init`, starts custosd on a random loopback port and waits until
// it has bound it. SIGTERM stops it when the object goes. The same start-up as
// tests/e2e/custos_server.cc, without the test-only extras.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>

#include "bench/server_process.h"
#include "tests/support/temp_dir.h"

namespace custos::bench {

class CustosdProcess {
 public:
  // `state_dir` empty: a fresh temporary folder, removed afterwards. Otherwise that folder
  // (created if missing, kept afterwards). `worker_threads` 0 leaves custosd.toml's
  // server.worker_threads as it is (custosd's default if unset); above 0 writes it, and so
  // does `hsm_threads` for hsm.threads. Throws std::runtime_error if custosd does not start.
  CustosdProcess(const std::string& state_dir, int worker_threads, int hsm_threads = 0);
  ~CustosdProcess();
  CustosdProcess(const CustosdProcess&) = delete;
  CustosdProcess& operator=(const CustosdProcess&) = delete;

  // A new mTLS channel (its own TCP connection) authenticated as `client` (app, officer1,
  // officer2, auditor).
  std::shared_ptr<grpc::Channel> Channel(const std::string& client) const;

  // custosd's group-commit counters since it started: Apply calls committed and the
  // transactions (one fsync each) that carried them. Asks with SIGUSR1 and reads the line it
  // logs; nullopt if none comes within 10 seconds.
  struct CommitCounts {
    uint64_t batches = 0;
    uint64_t transactions = 0;
  };
  std::optional<CommitCounts> CommitStats() const;

  const std::string& state_dir() const { return dir_; }
  pid_t pid() const { return server_->pid(); }
  int port() const { return server_->port(); }
  std::string Log() const { return server_->Log(); }

 private:
  std::optional<testing::TempDir> temp_;
  std::string dir_;
  std::unique_ptr<ServerProcess> server_;
};

}  // namespace custos::bench
