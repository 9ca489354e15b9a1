// CallExecutor: every caller is answered within call_timeout, a call stuck past it is set
// aside and replaced (up to a bound), a queued call that never got a thread never runs, and a
// call stuck past hang_limit is reported once. Tasks here block on a latch the test controls,
// as a PKCS#11 call stuck in the module would.
#include "hsm/call_executor.h"

#include <catch2/catch.hpp>

#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "tests/hsm/fault_control.h"

namespace custos::testing {
namespace {

using namespace std::chrono_literals;
using hsm::CallExecutor;
using Clock = std::chrono::steady_clock;

// A gate tasks wait at until the test opens it.
class Gate {
 public:
  void Wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return open_; });
  }
  void Open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

struct Recorder {
  std::mutex mu;
  std::vector<int> deltas;
  std::vector<std::string> hangs;
};

// Opens `gate` when the test ends, passed or not: the executor's destructor waits for the
// calls stuck at it.
class OpenAtEnd {
 public:
  explicit OpenAtEnd(std::shared_ptr<Gate> gate) : gate_(std::move(gate)) {}
  ~OpenAtEnd() { gate_->Open(); }

 private:
  std::shared_ptr<Gate> gate_;
};

// Deadlines long enough that an executor thread has always picked a call up by then, even on
// a loaded two-core machine: a call that times out here was running, not queued.
constexpr auto kTimeout = 1000ms;

std::unique_ptr<CallExecutor> Make(size_t threads, size_t max_set_aside, Recorder* recorder,
                                   std::chrono::milliseconds hang_limit = 0ms,
                                   std::chrono::milliseconds timeout = kTimeout) {
  return CallExecutor::Create({.threads = threads,
                               .call_timeout = timeout,
                               .max_set_aside = max_set_aside,
                               .hang_limit = hang_limit,
                               .on_set_aside =
                                   [recorder](int delta) {
                                     std::lock_guard lock(recorder->mu);
                                     recorder->deltas.push_back(delta);
                                   },
                               .on_hang_limit =
                                   [recorder](const std::string& message) {
                                     std::lock_guard lock(recorder->mu);
                                     recorder->hangs.push_back(message);
                                   }})
      .value();
}

TEST_CASE("a call that returns in time is answered with what it did", "[call_executor]") {
  Recorder recorder;
  auto executor = Make(2, 2, &recorder);
  auto result = std::make_shared<int>(0);  // the task's own: it could outlive this scope
  REQUIRE(executor->Run("Sum", "", [result] { *result = 40 + 2; }).ok());
  CHECK(*result == 42);
  CHECK_FALSE(CallExecutor::SetAside());  // not an executor thread
  CHECK(recorder.deltas.empty());
}

TEST_CASE("a stuck call is answered UNAVAILABLE at its deadline and its thread is replaced",
          "[call_executor]") {
  Recorder recorder;
  auto executor = Make(1, 4, &recorder);
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  auto saw_set_aside = std::make_shared<std::atomic<int>>(-1);

  const auto start = Clock::now();
  const absl::Status stuck = executor->Run("C_Encrypt", "", [gate, saw_set_aside] {
    gate->Wait();
    *saw_set_aside = CallExecutor::SetAside() ? 1 : 0;
  });
  const auto waited = Clock::now() - start;
  CHECK(absl::IsUnavailable(stuck));
  CHECK(stuck.message() ==
        "the HSM did not answer C_Encrypt within 1000 ms (hsm.call_timeout_ms); retry later");
  CHECK(waited >= kTimeout);
  CHECK(waited < kTimeout + 2s);
  CHECK(executor->set_aside() == 1);

  // The one thread is stuck, yet the next call is served, by its replacement.
  auto ran = std::make_shared<std::atomic<bool>>(false);
  REQUIRE(executor->Run("C_Decrypt", "", [ran] { *ran = true; }).ok());
  CHECK(*ran);

  gate->Open();  // The module lets the stuck call go: it learns it was set aside.
  for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
  CHECK(executor->set_aside() == 0);
  CHECK(*saw_set_aside == 1);
  std::lock_guard lock(recorder.mu);
  CHECK(recorder.deltas == std::vector<int>{+1, -1});
}

TEST_CASE("past max_set_aside a stuck thread is not replaced, and a call refused never runs",
          "[call_executor]") {
  Recorder recorder;
  auto executor = Make(1, 0, &recorder);
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  CHECK(absl::IsUnavailable(executor->Run("C_UnwrapKey", "", [gate] { gate->Wait(); })));

  // No thread serves: the next call is answered at once, not after a deadline.
  auto ran = std::make_shared<std::atomic<bool>>(false);
  const auto start = Clock::now();
  const absl::Status refused = executor->Run("C_Sign", "", [ran] { *ran = true; });
  CHECK(Clock::now() - start < 100ms);
  CHECK(absl::IsUnavailable(refused));
  CHECK(refused.message() ==
        "HSM busy: every HSM thread is stuck in the module (1 call(s), past "
        "hsm.max_stuck_calls); C_Sign was not started; retry later");
  gate->Open();
  for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
  // The thread came back and serves again; the call dropped from the queue never ran.
  auto later = std::make_shared<std::atomic<bool>>(false);
  REQUIRE(executor->Run("C_Sign", "", [later] { *later = true; }).ok());
  CHECK(*later);
  CHECK_FALSE(*ran);
}

TEST_CASE("calls queued when the last serving thread gets stuck are answered at once",
          "[call_executor]") {
  Recorder recorder;
  auto executor = Make(1, 0, &recorder);
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  auto entered = std::make_shared<std::atomic<bool>>(false);
  auto stuck = std::async(std::launch::async, [&] {
    return executor->Run("C_Encrypt", "", [gate, entered] {
      *entered = true;
      gate->Wait();
    });
  });
  while (!*entered) std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(kTimeout / 2);  // the one thread is inside C_Encrypt
  auto ran = std::make_shared<std::atomic<bool>>(false);
  const auto start = Clock::now();
  const absl::Status queued = executor->Run("C_Sign", "", [ran] { *ran = true; });
  const auto waited = Clock::now() - start;
  CHECK(absl::IsUnavailable(stuck.get()));
  // Refused when C_Encrypt was set aside, half a deadline before its own.
  CHECK(waited < kTimeout * 3 / 4);
  CHECK(queued.message() ==
        "HSM busy: every HSM thread is stuck in the module (1 call(s), past "
        "hsm.max_stuck_calls); C_Sign was not started; retry later");
  gate->Open();
  for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
  REQUIRE(executor->Run("C_Sign", "", [] {}).ok());
  CHECK_FALSE(*ran);
}

TEST_CASE(
    "a call stuck half max_set_aside times on one object is refused there at once; others are "
    "served",
    "[call_executor]") {
  Recorder recorder;
  auto executor = Make(2, 4, &recorder);  // two calls stuck: a kind's bound
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  std::vector<std::future<absl::Status>> stuck;
  for (int i = 0; i < 2; ++i) {
    stuck.push_back(std::async(std::launch::async, [&] {
      return executor->Run("GenerateDataKey", "key-1", [gate] { gate->Wait(); });
    }));
  }
  for (auto& call : stuck) CHECK(absl::IsUnavailable(call.get()));
  REQUIRE(executor->set_aside() == 2);

  const auto start = Clock::now();
  auto ran = std::make_shared<std::atomic<int>>(0);
  const absl::Status refused = executor->Run("GenerateDataKey", "key-1", [ran] { ++*ran; });
  CHECK(Clock::now() - start < 100ms);
  CHECK(refused.message() ==
        "HSM busy: 2 GenerateDataKey call(s) on the same HSM object are stuck in the module; no "
        "new one is started until one returns; retry later");
  CHECK(*ran == 0);
  // The same call on another key, and other calls on the same key, run on the threads that
  // replaced the stuck ones.
  REQUIRE(executor->Run("GenerateDataKey", "key-2", [ran] { ++*ran; }).ok());
  REQUIRE(executor->Run("Decrypt", "key-1", [ran] { ++*ran; }).ok());
  CHECK(*ran == 2);

  gate->Open();  // once they return, the kind is served again
  for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
  REQUIRE(executor->Run("GenerateDataKey", "key-1", [ran] { ++*ran; }).ok());
  CHECK(*ran == 3);
}

TEST_CASE("calls of a kind queued when it got stuck are refused when a thread takes them",
          "[call_executor]") {
  Recorder recorder;
  auto executor = Make(2, 2, &recorder);  // one stuck call is a kind's bound
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  auto entered = std::make_shared<std::atomic<int>>(0);
  auto stuck_call = [&] {
    return executor->Run("GenerateDataKey", "key-1", [gate, entered] {
      ++*entered;
      gate->Wait();
    });
  };
  std::vector<std::future<absl::Status>> calls;
  for (int i = 0; i < 2; ++i) calls.push_back(std::async(std::launch::async, stuck_call));
  while (*entered < 2) std::this_thread::sleep_for(1ms);
  // Both threads are inside the module; a third call of the kind waits for one.
  calls.push_back(std::async(std::launch::async, stuck_call));
  for (auto& call : calls) CHECK(absl::IsUnavailable(call.get()));
  // The two were set aside and replaced; the replacements refused the third instead of
  // running it (and getting stuck in turn).
  CHECK(*entered == 2);
  CHECK(executor->set_aside() == 2);
  auto ran = std::make_shared<std::atomic<bool>>(false);
  REQUIRE(executor->Run("Decrypt", "key-1", [ran] { *ran = true; }).ok());
  CHECK(*ran);
}

TEST_CASE("a call stuck past hang_limit is reported once", "[call_executor]") {
  Recorder recorder;
  auto executor = Make(2, 2, &recorder, 1500ms, 500ms);
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  CHECK(absl::IsUnavailable(executor->Run("C_GenerateRandom", "", [gate] { gate->Wait(); })));
  for (int i = 0; i < 1000; ++i) {
    {
      std::lock_guard lock(recorder.mu);
      if (!recorder.hangs.empty()) break;
    }
    std::this_thread::sleep_for(5ms);
  }
  std::this_thread::sleep_for(1600ms);  // and not again
  {
    std::lock_guard lock(recorder.mu);
    REQUIRE(recorder.hangs.size() == 1);
    CHECK(recorder.hangs[0].rfind("an HSM call (C_GenerateRandom) has not returned for ", 0) == 0);
    CHECK(recorder.hangs[0].find("(hsm.hang_limit_ms)") != std::string::npos);
  }
  gate->Open();
}

TEST_CASE("many callers at once are all served, each exactly once", "[call_executor]") {
  Recorder recorder;
  auto executor = Make(3, 2, &recorder, 0ms, 10s);
  std::atomic<int> runs{0};  // every call has returned (OK) before it goes
  std::vector<std::future<absl::Status>> callers;
  for (int i = 0; i < 16; ++i) {
    callers.push_back(std::async(std::launch::async, [&] {
      absl::Status status;
      for (int j = 0; j < 200 && status.ok(); ++j)
        status = executor->Run("Noop", "", [&] { ++runs; });
      return status;
    }));
  }
  for (auto& caller : callers) CHECK(caller.get().ok());
  CHECK(runs == 16 * 200);
  CHECK(recorder.deltas.empty());
}

// Thread-local state whose destructor, at its thread's exit, takes a while and then counts
// itself, as the per-thread state of a library the module uses (OpenSSL's) is freed at
// thread exit under locks that the library's own exit-time cleanup destroys.
std::atomic<int> thread_states_freed{0};
std::atomic<int> thread_state_free_ms{100};
struct SlowThreadState {
  ~SlowThreadState() {
    std::this_thread::sleep_for(std::chrono::milliseconds(thread_state_free_ms.load()));
    ++thread_states_freed;
  }
};
void UseSlowThreadState() {
  thread_local SlowThreadState state;
  (void)state;
}

TEST_CASE("once destroyed, every thread it ran has ended, thread-local state freed",
          "[call_executor]") {
  Recorder recorder;
  auto executor = Make(1, 2, &recorder);
  thread_states_freed = 0;
  // Twice, a call set aside: its thread is replaced, and retires once the call returns (the
  // second to retire joins the first).
  for (int round = 0; round < 2; ++round) {
    INFO("round " << round);
    auto gate = std::make_shared<Gate>();
    OpenAtEnd release(gate);
    CHECK(absl::IsUnavailable(executor->Run("C_Sign", "", [gate] {
      UseSlowThreadState();
      gate->Wait();
    })));
    REQUIRE(executor->set_aside() == 1);
    REQUIRE(executor->Run("C_Verify", "", [] { UseSlowThreadState(); }).ok());  // replacement
    gate->Open();
    for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
    REQUIRE(executor->set_aside() == 0);
  }
  executor.reset();
  // All three threads are gone, state and all, before the process may go on to its exit.
  CHECK(thread_states_freed == 3);
}

TEST_CASE("no call waits on a retiring thread's exit", "[call_executor]") {
  Recorder recorder;
  auto executor = Make(1, 2, &recorder);
  thread_states_freed = 0;
  thread_state_free_ms = 1500;
  Finally restore([] { thread_state_free_ms = 100; });
  // Two calls set aside, each on a thread that frees slow thread-local state as it exits.
  const std::shared_ptr<Gate> gates[] = {std::make_shared<Gate>(), std::make_shared<Gate>()};
  OpenAtEnd release_first(gates[0]);
  OpenAtEnd release_second(gates[1]);
  for (const auto& gate : gates) {
    // Of two kinds: with max_set_aside 2, a second stuck call of one kind would be refused.
    CHECK(absl::IsUnavailable(executor->Run(gate == gates[0] ? "C_Sign" : "C_Verify", "", [gate] {
      UseSlowThreadState();
      gate->Wait();
    })));
  }
  REQUIRE(executor->set_aside() == 2);
  // Both return: the first to retire takes 1.5 s to end, and the second joins it meanwhile.
  gates[0]->Open();
  for (int i = 0; i < 200 && executor->set_aside() > 1; ++i) std::this_thread::sleep_for(5ms);
  gates[1]->Open();
  for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
  REQUIRE(executor->set_aside() == 0);
  CHECK(thread_states_freed == 0);  // neither thread has ended yet
  const auto start = Clock::now();
  CHECK(executor->Run("C_Digest", "", [] {}).ok());
  CHECK(Clock::now() - start < 300ms);
  executor.reset();
  CHECK(thread_states_freed == 2);
}

// This process's threads, once the count has settled (a joined thread leaves it just after).
long Tasks() {
  const auto count = [] {
    long n = 0;
    for ([[maybe_unused]] const auto& task : std::filesystem::directory_iterator("/proc/self/task"))
      ++n;
    return n;
  };
  for (long last = -1;;) {
    const long now = count();
    if (now == last) return now;
    last = now;
    std::this_thread::sleep_for(20ms);
  }
}

// How many more threads this process may start now (up to `most`): started until the system
// refuses one.
long Headroom(size_t most) {
  Gate gate;
  std::vector<std::thread> started;
  while (started.size() < most) {
    try {
      started.emplace_back([&gate] { gate.Wait(); });
    } catch (const std::system_error&) {
      break;
    }
  }
  gate.Open();
  for (std::thread& thread : started) thread.join();
  return static_cast<long>(started.size());
}

// A process whose threads the system limits: a start past the limit fails, having joined the
// threads it started; a stuck call that cannot be replaced leaves the others served. Run by
// the test below as a process of its own, as another user (root may be exempt from the limit).
TEST_CASE("(an executor short of threads)", "[.][executor_few_threads]") {
  const char* which = std::getenv("CUSTOS_FEW_THREADS_CASE");
  REQUIRE(which != nullptr);
  std::thread([] {}).join();  // a sanitizer's own thread, if any, is started by now
  const long before = Tasks();
  // As a user no other process runs as, so that its thread count is this process's; then a
  // few threads more (measured below), the soft limit only, to lift it again before the process
  // exits (a sanitizer's leak check starts a thread).
  rlimit limit{};
  const uid_t user = 1'000'000 + static_cast<uid_t>(::getpid());
  const auto limited = [&] {
    if (::getrlimit(RLIMIT_NPROC, &limit) != 0) return false;
    const rlimit few{static_cast<rlim_t>(before) + 3, limit.rlim_max};
    return ::setgid(user) == 0 && ::setuid(user) == 0 && ::setrlimit(RLIMIT_NPROC, &few) == 0;
  };
  const bool limits = limited();
  const int why = errno;
  // Changing user (or group) made the process undumpable, which keeps LeakSanitizer's tracer out.
  ::prctl(PR_SET_DUMPABLE, 1);
  if (!limits) {
    std::printf("few threads: skipped, no thread limit of its own: %s\n", std::strerror(why));
    return;
  }
  Finally lift([limit] { ::setrlimit(RLIMIT_NPROC, &limit); });
  // Measured, not assumed: kernels have differed by one in what the limit lets start.
  constexpr size_t kMost = 16;
  const long headroom = Headroom(kMost);
  if (headroom == kMost) {
    std::printf("few threads: skipped, the thread limit is not enforced\n");
    return;
  }
  REQUIRE(headroom > 1);  // the stuck case needs a thread beside the stuck one
  REQUIRE(Tasks() == before);
  if (std::string_view(which) == "start") {
    CallExecutor::Options options;
    options.threads = static_cast<size_t>(headroom) + 2;
    auto executor = CallExecutor::Create(std::move(options));
    std::printf("few threads: start %s\n", executor.status().ToString().c_str());
    std::printf("few threads: %ld more thread(s) left\n", Tasks() - before);  // those started end
    return;
  }
  Recorder recorder;
  auto executor = Make(static_cast<size_t>(headroom), 4, &recorder);
  auto gate = std::make_shared<Gate>();
  OpenAtEnd release(gate);
  std::printf("few threads: stuck %s\n",
              executor->Run("C_Sign", "", [gate] { gate->Wait(); }).ToString().c_str());
  std::printf("few threads: next %s\n", executor->Run("C_Verify", "", [] {}).ToString().c_str());
  gate->Open();
  for (int i = 0; i < 200 && executor->set_aside() > 0; ++i) std::this_thread::sleep_for(5ms);
  std::printf("few threads: after %s\n", executor->Run("C_Digest", "", [] {}).ToString().c_str());
}

// A sanitizer report in a child's `output` is also written beside this process's own reports
// (its log_path, if any: the sanitizer tier fails on any file there), since the child, as
// another user, could only write it to its output.
void KeepSanitizerReport(const std::string& output, const char* which) {
  if (!absl::StrContains(output, "Sanitizer") && !absl::StrContains(output, "runtime error:")) {
    return;
  }
  for (const char* variable : {"ASAN_OPTIONS", "TSAN_OPTIONS", "UBSAN_OPTIONS"}) {
    const char* options = std::getenv(variable);
    if (options == nullptr) continue;
    const std::string all(options);
    const size_t at = all.find("log_path=");
    if (at == std::string::npos) continue;
    const size_t start = at + std::strlen("log_path=");
    const std::string path = all.substr(start, all.find(':', start) - start);
    if (path == "stderr" || path == "stdout") continue;
    const std::string file = path + ".few_threads_" + which + "." + std::to_string(::getpid());
    if (FILE* out = std::fopen(file.c_str(), "w")) {
      std::fputs(output.c_str(), out);
      std::fclose(out);
    }
    return;
  }
}

TEST_CASE("a thread the system refuses fails the start cleanly, or leaves a stuck call unreplaced",
          "[call_executor]") {
  if (::geteuid() != 0) {
    WARN("not root: cannot run a process under a thread limit of its own; skipped");
    return;
  }
  const auto run = [](const char* which) {
    // Sanitizer reports on the output: as another user, the child cannot write the log files
    // (KeepSanitizerReport does).
    const std::string command = std::string("CUSTOS_FEW_THREADS_CASE=") + which +
                                " ASAN_OPTIONS=\"$ASAN_OPTIONS:log_path=stderr\" "
                                "UBSAN_OPTIONS=\"$UBSAN_OPTIONS:log_path=stderr\"" +
                                " TSAN_OPTIONS=\"$TSAN_OPTIONS:log_path=stderr\" /proc/" +
                                std::to_string(::getpid()) + "/exe '[executor_few_threads]' 2>&1";
    FILE* child = ::popen(command.c_str(), "r");
    REQUIRE(child != nullptr);
    std::string output;
    char buffer[512];
    while (std::fgets(buffer, sizeof(buffer), child) != nullptr) output += buffer;
    const int status = ::pclose(child);
    KeepSanitizerReport(output, which);
    INFO(output);
    CHECK(status == 0);
    return output;
  };
  const std::string start = run("start");
  if (absl::StrContains(start, "few threads: skipped")) {
    WARN(start);
    return;
  }
  CHECK_THAT(start, Catch::Contains("few threads: start RESOURCE_EXHAUSTED: cannot start an HSM "
                                    "thread: Resource temporarily unavailable"));
  CHECK_THAT(start, Catch::Contains("few threads: 0 more thread(s) left"));
  const std::string stuck = run("stuck");
  CHECK_THAT(stuck, Catch::Contains("few threads: stuck UNAVAILABLE: the HSM did not answer "
                                    "C_Sign within 1000 ms"));
  CHECK_THAT(stuck, Catch::Contains("its thread is not replaced: cannot start an HSM thread"));
  CHECK_THAT(stuck, Catch::Contains("few threads: next OK"));
  CHECK_THAT(stuck, Catch::Contains("few threads: after OK"));
}

}  // namespace
}  // namespace custos::testing
