#include "bench/load.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <ctime>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/status/status.h"

namespace custos::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Percentile(const std::vector<float>& sorted, double p) {
  if (sorted.empty()) return 0;
  const auto rank = static_cast<size_t>(std::lround(p * static_cast<double>(sorted.size() - 1)));
  return sorted[std::min(rank, sorted.size() - 1)];
}

Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

double Micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// What one caller (a slot of RunCalls, a thread of RunLocal) saw; merged once at the end, so
// nothing is shared while the load runs.
struct Tally {
  std::vector<float> latencies_us;  // recorded successes
  std::map<std::string, ErrorCount> errors;
  long ok_total = 0;

  void Error(const std::string& code, std::string message) {
    ErrorCount& e = errors[code];
    if (e.count++ == 0) e.first_message = std::move(message);
  }
};

// CPU seconds of this process and of the server, read at both ends of the recorded window.
class CpuMeter {
 public:
  explicit CpuMeter(pid_t server) : server_(server) {}
  void Start() { Read(client_start_, server_start_); }
  void Stop() { Read(client_stop_, server_stop_); }
  double ClientUsPer(long calls) const { return Per(client_start_, client_stop_, calls); }
  double ServerUsPer(long calls) const { return Per(server_start_, server_stop_, calls); }

 private:
  void Read(double& client, double& server) const {
    client = ProcessCpuSeconds(getpid());
    server = server_ > 0 ? ProcessCpuSeconds(server_) : -1;
  }
  static double Per(double start, double stop, long calls) {
    if (start < 0 || stop < 0 || calls <= 0) return -1;
    return (stop - start) * 1e6 / static_cast<double>(calls);
  }

  pid_t server_;
  double client_start_ = -1, server_start_ = -1, client_stop_ = -1, server_stop_ = -1;
};

LoadResult Summarise(const std::vector<Tally*>& tallies, const LoadOptions& options, double seconds,
                     const CpuMeter& cpu) {
  LoadResult result;
  result.inflight = options.inflight;
  result.seconds = seconds;
  std::vector<float> latencies;
  for (const Tally* t : tallies) {
    latencies.insert(latencies.end(), t->latencies_us.begin(), t->latencies_us.end());
    result.ok_total += t->ok_total;
    for (const auto& [code, e] : t->errors) {
      ErrorCount& merged = result.errors_by_code[code];
      if (merged.count == 0) merged.first_message = e.first_message;
      merged.count += e.count;
      result.errors += e.count;
    }
  }
  std::sort(latencies.begin(), latencies.end());
  result.ok = static_cast<long>(latencies.size());
  result.calls_per_second = seconds > 0 ? static_cast<double>(result.ok) / seconds : 0;
  result.p50_us = Percentile(latencies, 0.50);
  result.p99_us = Percentile(latencies, 0.99);
  result.p999_us = Percentile(latencies, 0.999);
  result.client_cpu_us_per_call = cpu.ClientUsPer(result.ok);
  result.server_cpu_us_per_call = cpu.ServerUsPer(result.ok);
  return result;
}

// RunCalls' state. Each slot is one chain of calls: a completion records its call and starts
// the slot's next one, so a slot's fields are only ever touched by one callback at a time.
class CallRunner {
 public:
  CallRunner(const std::vector<grpc::GenericStub*>& stubs, const LoadOptions& options,
             const Workload& workload)
      : options_(options), workload_(workload) {
    for (int i = 0; i < options.inflight; ++i) {
      slots_.push_back(std::make_unique<Slot>());
      slots_.back()->stub = stubs[static_cast<size_t>(i) % stubs.size()];
    }
  }

  LoadResult Run() {
    const bool counted = options_.max_calls > 0;
    const Clock::time_point start = Clock::now();
    record_from_ = counted ? start : start + Seconds(options_.warmup_seconds);
    end_ = counted ? Clock::time_point::max() : record_from_ + Seconds(options_.seconds);
    CpuMeter cpu(options_.server_pid);
    bool cpu_started = false, cpu_stopped = false;
    if (counted) {
      cpu.Start();
      cpu_started = true;
    }
    active_ = static_cast<int>(slots_.size());
    for (const std::unique_ptr<Slot>& slot : slots_) Start(*slot);

    std::unique_lock lock(mu_);
    for (;;) {
      const Clock::time_point now = Clock::now();
      if (!cpu_started && now >= record_from_) {
        cpu.Start();
        cpu_started = true;
      }
      if (!counted && !cpu_stopped && now >= end_) {
        cpu.Stop();
        cpu_stopped = true;
      }
      if (!deferred_.empty()) {
        std::vector<Slot*> restart;
        restart.swap(deferred_);
        lock.unlock();
        for (Slot* slot : restart) Start(*slot);
        lock.lock();
        continue;
      }
      if (active_ == 0) break;
      if (!cpu_started) {
        cv_.wait_until(lock, record_from_);
      } else if (!counted && !cpu_stopped) {
        cv_.wait_until(lock, end_);
      } else {
        cv_.wait(lock, [&] { return active_ == 0 || !deferred_.empty(); });
      }
    }
    lock.unlock();
    if (!cpu_stopped) cpu.Stop();
    const double seconds =
        counted ? std::chrono::duration<double>(Clock::now() - start).count() : options_.seconds;
    std::vector<Tally*> tallies;
    for (const std::unique_ptr<Slot>& slot : slots_) tallies.push_back(&slot->tally);
    return Summarise(tallies, options_, seconds, cpu);
  }

 private:
  struct Slot {
    grpc::GenericStub* stub = nullptr;
    std::optional<grpc::ClientContext> context;  // one per call: not reusable
    uint64_t n = 0;
    Call call;
    grpc::ByteBuffer reply;
    Clock::time_point started;
    Tally tally;
  };

  // Starts the slot's next call, or retires the slot once the run is over.
  void Start(Slot& slot) {
    const uint64_t n = next_.fetch_add(1, std::memory_order_relaxed);
    if ((options_.max_calls > 0 && n >= options_.max_calls) || Clock::now() >= end_) {
      Retire();
      return;
    }
    slot.n = n;
    workload_.next(n, slot.call);
    slot.context.emplace();  // the previous call's context is done with (its callback ran)
    slot.context->set_deadline(std::chrono::system_clock::now() + options_.deadline);
    slot.reply.Clear();
    slot.started = Clock::now();
    slot.stub->UnaryCall(&*slot.context, *slot.call.method, grpc::StubOptions(), &slot.call.request,
                         &slot.reply,
                         [this, &slot](const grpc::Status& status) { Done(slot, status); });
  }

  void Done(Slot& slot, const grpc::Status& status) {
    const Clock::time_point now = Clock::now();
    const bool recorded = now >= record_from_ && now < end_;
    if (status.ok()) {
      std::string bad = workload_.check ? workload_.check(slot.n, slot.reply) : std::string();
      if (bad.empty()) {
        ++slot.tally.ok_total;
        if (recorded)
          slot.tally.latencies_us.push_back(static_cast<float>(Micros(now - slot.started)));
      } else if (recorded) {
        slot.tally.Error("BAD_REPLY", std::move(bad));
      }
    } else if (recorded) {
      slot.tally.Error(StatusCodeName(status.error_code()), status.error_message());
    }
    // gRPC may run a callback inline, inside the UnaryCall that started the call (a call that
    // fails at once): past a few levels the main thread restarts the slot instead, so a burst
    // of instant failures cannot grow the stack without bound.
    static thread_local int depth = 0;
    if (depth >= 8) {
      std::lock_guard lock(mu_);
      deferred_.push_back(&slot);
      cv_.notify_one();
      return;
    }
    ++depth;
    Start(slot);
    --depth;
  }

  void Retire() {
    std::lock_guard lock(mu_);
    if (--active_ == 0) cv_.notify_one();
  }

  const LoadOptions& options_;
  const Workload& workload_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::atomic<uint64_t> next_ = 0;
  Clock::time_point record_from_;
  Clock::time_point end_;
  std::mutex mu_;
  std::condition_variable cv_;
  int active_ = 0;               // guarded by mu_: slots not yet retired
  std::vector<Slot*> deferred_;  // guarded by mu_: slots for the main thread to restart
};

}  // namespace

LoadResult RunCalls(const std::vector<grpc::GenericStub*>& stubs, const LoadOptions& options,
                    const Workload& workload) {
  CallRunner runner(stubs, options, workload);
  LoadResult result = runner.Run();
  result.channels = static_cast<int>(std::min(stubs.size(), static_cast<size_t>(options.inflight)));
  return result;
}

LoadResult RunLocal(const LoadOptions& options, const LocalOperation& op) {
  const Clock::time_point start = Clock::now() + std::chrono::milliseconds(50);  // all ready
  const Clock::time_point record_from = start + Seconds(options.warmup_seconds);
  const Clock::time_point end = record_from + Seconds(options.seconds);

  std::vector<Tally> tallies(static_cast<size_t>(options.inflight));
  std::vector<std::thread> threads;
  threads.reserve(tallies.size());
  for (int t = 0; t < options.inflight; ++t) {
    threads.emplace_back([&, t] {
      Tally& mine = tallies[static_cast<size_t>(t)];
      std::this_thread::sleep_until(start);
      for (Clock::time_point now = Clock::now(); now < end; now = Clock::now()) {
        std::string error = op(t);
        const Clock::time_point done = Clock::now();
        if (error.empty()) ++mine.ok_total;
        if (done < record_from || done >= end) continue;
        if (!error.empty()) {
          mine.Error("ERROR", std::move(error));
        } else {
          mine.latencies_us.push_back(static_cast<float>(Micros(done - now)));
        }
      }
    });
  }
  CpuMeter cpu(0);
  std::this_thread::sleep_until(record_from);
  cpu.Start();
  std::this_thread::sleep_until(end);
  cpu.Stop();
  for (std::thread& thread : threads) thread.join();
  std::vector<Tally*> all;
  all.reserve(tallies.size());
  for (Tally& t : tallies) all.push_back(&t);
  return Summarise(all, options, options.seconds, cpu);
}

long ProcessRssKib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));  // "VmRSS:  1234 kB"
  }
  return -1;
}

double ProcessCpuSeconds(pid_t pid) {
  // The process's CPU clock: nanoseconds, all threads, exited ones included.
  clockid_t clock = 0;
  timespec ts{};
  if (clock_getcpuclockid(pid, &clock) == 0 && clock_gettime(clock, &ts) == 0) {
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }
  // Else /proc/<pid>/stat: utime and stime (fields 14 and 15) in clock ticks.
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return -1;
  const size_t comm_end = stat.rfind(')');  // the command name may hold spaces
  if (comm_end == std::string::npos) return -1;
  std::istringstream fields(stat.substr(comm_end + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 13; ++i) fields >> field;  // state .. cmajflt
  if (!(fields >> utime >> stime)) return -1;
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

std::string StatusCodeName(int code) {
  // absl and gRPC share their code numbers.
  const std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "CODE_" + std::to_string(code) : name;
}

}  // namespace custos::bench
