// CustosdProcess: the real custosd binary, started for a benchmark.
//
// Makes (or completes) a state folder with tools/make-state.sh, sets the worker thread count,
// runs `custosd init`, starts custosd on a random loopback port and waits until it has bound
// it. SIGTERM stops it when the object goes. The same start-up as tests/e2e/custos_server.cc,
// without the test-only extras.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>

#include "tests/support/temp_dir.h"

namespace custos::bench {

class CustosdProcess {
 public:
  // `state_dir` empty: a fresh temporary folder, removed afterwards. Otherwise that folder
  // (created if missing, kept afterwards). Throws std::runtime_error if custosd does not start.
  CustosdProcess(const std::string& state_dir, int worker_threads);
  ~CustosdProcess();
  CustosdProcess(const CustosdProcess&) = delete;
  CustosdProcess& operator=(const CustosdProcess&) = delete;

  // A new mTLS channel (its own TCP connection) authenticated as `client` (app, officer1,
  // officer2, auditor).
  std::shared_ptr<grpc::Channel> Channel(const std::string& client) const;

  // custosd's group-commit counters since it started: Apply calls committed and the
  // transactions (one fsync each) that carried them. Asks with SIGUSR1 and reads the line it
  // logs; throws std::runtime_error if none comes within 10 seconds.
  struct CommitCounts {
    uint64_t batches = 0;
    uint64_t transactions = 0;
  };
  CommitCounts CommitStats() const;

  const std::string& state_dir() const { return dir_; }
  pid_t pid() const { return pid_; }
  std::string Log() const;

 private:
  bool Alive() const;

  std::optional<testing::TempDir> temp_;
  std::string dir_;
  pid_t pid_ = -1;
  int port_ = 0;
};

}  // namespace custos::bench
