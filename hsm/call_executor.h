// CallExecutor: runs HSM calls on threads of its own, so that every caller is answered within
// a deadline even when the module never returns.
//
// PKCS#11 has no timeout, and a call under way cannot be cancelled: its thread stays inside
// the module until the module lets it go. So the caller does not make the call; it hands the
// call to one of the executor's threads and waits up to `call_timeout`:
//  - a call that finishes in time is answered as usual;
//  - a call still queued at its deadline is dropped unrun: UNAVAILABLE;
//  - a call still running at its deadline is *set aside*: its caller gets UNAVAILABLE, its
//    thread finishes inside the module whenever it can (what it returns is discarded), and a
//    new thread takes its place, as long as no more than `max_set_aside` calls are set aside
//    at once. Past that bound (or if the system refuses a thread) nothing replaces a stuck
//    thread, and calls wait for the threads still free (or time out): a module that hangs every
//    call cannot make custosd spawn threads without end.
// Calls that cannot be served are answered at once instead of after call_timeout, so that a
// caller learns fast and its thread is not held for nothing ("HSM busy"):
//  - when every thread is stuck (none serves), every call, queued ones included;
//  - when half of max_set_aside calls (at least one) of one kind are stuck, the new calls of
//    that kind. A kind is an operation (`what`) on one HSM object (`object`: the key version,
//    or the label of a key or data object). A module that hangs one operation on one key, say
//    every C_Encrypt under the key applications use, then keeps threads for the others:
//    catalogue MACs, checkpoint signatures, the token claim's renewal, other keys. Calls of
//    that kind already queued are refused too when a thread takes them.
// on_set_aside(+1) runs when a call is set aside and on_set_aside(-1) when it finally returns,
// so the HSM layer can lend out one more session meanwhile; SetAside() tells code running on
// an executor thread whether its call was set aside (its session must not be used again).
// A call that has not returned after `hang_limit` is taken for a module that will never
// answer: on_hang_limit is told once (custosd exits so that its supervisor restarts it).
//
// Tasks must own everything they touch: one that is set aside runs on after Run() returned.
// Thread-safe. The destructor waits for every thread to end, stuck ones included.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace custos::hsm {

class CallExecutor {
 public:
  struct Options {
    size_t threads = 8;  // Threads serving calls, not counting those set aside.
    std::chrono::milliseconds call_timeout{2000};
    size_t max_set_aside = 8;
    std::chrono::milliseconds hang_limit{60000};  // 0: never give up on a stuck call.
    // Told when a call is set aside (+1) and when it returns (-1). Runs with the executor's
    // lock held: it must be quick and must not call the executor.
    std::function<void(int delta)> on_set_aside;
    // Told, once, that a call has not returned after hang_limit; the message says so.
    std::function<void(const std::string& message)> on_hang_limit;
  };

  // INVALID_ARGUMENT if threads or call_timeout is 0; RESOURCE_EXHAUSTED if the system
  // refuses a thread (the ones started are stopped and joined first).
  static absl::StatusOr<std::unique_ptr<CallExecutor>> Create(Options options);
  ~CallExecutor();
  CallExecutor(const CallExecutor&) = delete;
  CallExecutor& operator=(const CallExecutor&) = delete;

  // Runs `task`, call `what` on HSM object `object` (empty: none in particular), on an
  // executor thread and waits for it until call_timeout has passed. OK once it ran;
  // UNAVAILABLE (naming `what`) if it did not finish in time, in which case it either never
  // runs or runs on, set aside, or if it could not be served (above), in which case it never
  // runs.
  absl::Status Run(const char* what, std::string_view object, std::function<void()> task);

  // On an executor thread: true if the call it is running was set aside (its caller has been
  // answered). False on any other thread.
  static bool SetAside();

  size_t set_aside() const;  // Calls set aside and not back yet.

 private:
  struct Task;
  explicit CallExecutor(Options options);
  absl::Status Start();      // Starts the threads; on failure, the destructor joins them.
  void Serve();              // An executor thread's loop.
  void Watch();              // The hang-limit watcher's loop.
  absl::Status AddThread();  // With mu_ held. RESOURCE_EXHAUSTED if the system refuses it.

  // Why call `what` on `object` cannot be served now, or OK. With mu_ held.
  absl::Status Unservable(const char* what, std::string_view object) const;
  // Answers every queued call "HSM busy" (no thread serves any more). With mu_ held.
  void RefuseQueued();

  const Options options_;
  const size_t stuck_per_kind_;  // calls of one kind stuck before its new calls are refused

  mutable std::mutex mu_;         // Guards everything below.
  std::condition_variable work_;  // A task was queued, or stopping_.
  std::condition_variable idle_;  // A thread exited, or the watcher is to stop.
  std::deque<std::shared_ptr<Task>> queue_;
  std::vector<std::shared_ptr<Task>> running_;  // Started and not finished, set aside or not.
  // The threads, joined rather than detached: a thread's end includes freeing the per-thread
  // state of the libraries the module uses (OpenSSL's, under a lock its exit-time cleanup
  // destroys), and the process must not exit while that runs.
  std::vector<std::thread> threads_;  // Those serving or stuck in a set-aside call.
  std::thread retired_;   // The last to retire (its set-aside call returned), not joined yet.
  size_t live_ = 0;       // Threads that have not left Serve().
  size_t serving_ = 0;    // Of those, the ones not stuck in a set-aside call.
  size_t set_aside_ = 0;  // Calls set aside, not back yet.
  // set_aside_ by kind (Kind(): `what` and `object`), no zeros.
  std::map<std::string, size_t, std::less<>> stuck_by_kind_;
  bool hang_reported_ = false;
  bool stopping_ = false;
  bool watcher_stop_ = false;
  std::thread watcher_;
};

}  // namespace custos::hsm
