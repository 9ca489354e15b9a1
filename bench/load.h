// Load generators of custos_bench: RunCalls keeps N unary RPCs in flight with gRPC's callback
// client API (no thread per caller); RunLocal runs an in-process operation on N threads (the
// disk and raw PKCS#11 baselines, which have no RPC). Both time a warm-up, then a recorded
// window, and report rate, latency percentiles and errors the same way.
//
// Thread safety: RunCalls calls the Workload's functions from gRPC's callback threads, several
// at once; RunLocal calls the operation from its N threads at once.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

namespace custos::bench {

struct LoadOptions {
  int inflight = 1;           // calls in flight (RunCalls) or threads (RunLocal)
  double warmup_seconds = 0;  // run but not recorded
  double seconds = 10;        // recorded
  // RunCalls only. Above 0: start exactly this many calls (numbered 0..max_calls-1), with no
  // warm-up and no time limit; all of them are recorded. For setting up (pools of blobs).
  uint64_t max_calls = 0;
  std::chrono::milliseconds deadline{30000};  // RunCalls: per call
  // Above 0: the CPU time of that process (the server) is read at both ends of the recorded
  // window. This process's own CPU time is always read.
  pid_t server_pid = 0;
};

// Failed calls of one kind: a gRPC status code name ("RESOURCE_EXHAUSTED"), or BAD_REPLY for
// an OK reply that the workload's check refused, or ERROR for RunLocal's failures.
struct ErrorCount {
  long count = 0;
  std::string first_message;
};

struct LoadResult {
  int inflight = 0;
  int channels = 0;    // RunCalls: distinct channels (connections) used
  double seconds = 0;  // the recorded window
  long ok = 0;         // successful calls completed inside the recorded window
  long errors = 0;     // failed calls completed inside it (not in ok, nor in the latencies)
  std::map<std::string, ErrorCount> errors_by_code;  // of those
  long ok_total = 0;            // successful calls in the whole run, warm-up and drain included
  double calls_per_second = 0;  // ok / seconds
  double p50_us = 0;
  double p99_us = 0;
  double p999_us = 0;
  // CPU time over the recorded window divided by `ok`; -1 if not measured (or no success).
  double server_cpu_us_per_call = -1;
  double client_cpu_us_per_call = -1;
};

// One call: a method and its serialised request.
struct Call {
  // The full method name, "/package.Service/Method". Must outlive the run: gRPC keeps the
  // pointer for the call's lifetime.
  const std::string* method = nullptr;
  grpc::ByteBuffer request;  // copies share the slices (reference counted): cheap
};

struct Workload {
  // Fills in call number `n` (0, 1, 2, ... in the order calls start). Required.
  std::function<void(uint64_t n, Call& call)> next;
  // Optional: checks the reply of a call that returned OK; returns "" if it is what was
  // expected, else what is wrong (counted as BAD_REPLY). May consume `reply`.
  std::function<std::string(uint64_t n, grpc::ByteBuffer& reply)> check;
};

// Keeps `options.inflight` calls in flight, call i on stubs[i % stubs.size()] (each stub its
// own channel and connection), until the recorded window ends; each completion starts the next
// call at once. Every call gets `options.deadline`. A call counts if it completes inside the
// recorded window; its latency is steady_clock from just before it starts to its callback.
// Calls still in flight when the window ends are waited for (and not counted) before
// returning. `stubs` must not be empty.
LoadResult RunCalls(const std::vector<grpc::GenericStub*>& stubs, const LoadOptions& options,
                    const Workload& workload);

// One in-process operation by thread `thread` (0..threads-1): "" on success, else what failed.
using LocalOperation = std::function<std::string(int thread)>;

// Starts `options.inflight` threads calling `op` back to back until the window ends; counted
// and timed as RunCalls. max_calls and deadline are ignored.
LoadResult RunLocal(const LoadOptions& options, const LocalOperation& op);

// CPU time (user + system, all threads, exited ones included) that process `pid` has used, in
// seconds; -1 if it cannot be read (no such process, or not ours).
double ProcessCpuSeconds(pid_t pid);

// Resident memory (VmRSS) of process `pid` in KiB; -1 if it cannot be read.
long ProcessRssKib(pid_t pid);

// The name of a gRPC status code ("OK", "RESOURCE_EXHAUSTED", ...).
std::string StatusCodeName(int code);

}  // namespace custos::bench
