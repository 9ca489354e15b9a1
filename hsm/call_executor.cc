#include "hsm/call_executor.h"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <exception>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "hsm/hsm.h"
#include "spdlog/spdlog.h"

namespace custos::hsm {

namespace {
// The key of a kind of call in stuck_by_kind_.
std::string Kind(const char* what, std::string_view object) {
  std::string kind(what);
  kind.append(1, '\n').append(object);
  return kind;
}
}  // namespace

struct CallExecutor::Task {
  Task(const char* w, std::string_view o, std::function<void()> f)
      : what(w), object(o), fn(std::move(f)) {}

  const char* const what;
  const std::string object;
  std::function<void()> fn;  // Run, then cleared, by the executor thread.
  // Guarded by CallExecutor::mu_.
  enum class State { kQueued, kRunning, kDone, kRefused } state = State::kQueued;
  absl::Status refusal;  // Why, once kRefused: dropped from the queue unrun.
  std::chrono::steady_clock::time_point started;
  std::condition_variable done;  // Notified when state becomes kDone or kRefused.
  // Written under mu_; read lock-free by the thread running the task (SetAside()).
  std::atomic<bool> set_aside{false};
};

namespace {
thread_local const std::atomic<bool>* current_set_aside = nullptr;
}  // namespace

absl::StatusOr<std::unique_ptr<CallExecutor>> CallExecutor::Create(Options options) {
  if (options.threads == 0) return absl::InvalidArgumentError("HSM threads must be > 0");
  if (options.call_timeout <= std::chrono::milliseconds(0)) {
    return absl::InvalidArgumentError("hsm.call_timeout_ms must be > 0");
  }
  auto executor = absl::WrapUnique(new CallExecutor(std::move(options)));
  CUSTOS_RETURN_IF_ERROR(executor->Start());
  return executor;
}

CallExecutor::CallExecutor(Options options)
    : options_(std::move(options)),
      stuck_per_kind_(std::max<size_t>(1, options_.max_set_aside / 2)) {}

absl::Status CallExecutor::Start() {
  std::lock_guard lock(mu_);
  threads_.reserve(options_.threads + options_.max_set_aside);  // as many as ever serve or stick
  for (size_t i = 0; i < options_.threads; ++i) CUSTOS_RETURN_IF_ERROR(AddThread());
  if (options_.hang_limit > std::chrono::milliseconds(0)) {
    try {
      watcher_ = std::thread([this] { Watch(); });
    } catch (const std::exception& error) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot start the HSM hang watcher thread: ", error.what()));
    }
  }
  return absl::OkStatus();
}

CallExecutor::~CallExecutor() {
  std::unique_lock lock(mu_);
  stopping_ = true;
  work_.notify_all();
  // Stuck threads are waited for too: their module calls use what the HSM layer owns. The
  // watcher keeps watching meanwhile, so a call that never returns still ends in on_hang_limit.
  idle_.wait(lock, [this] { return live_ == 0; });
  watcher_stop_ = true;
  idle_.notify_all();
  std::vector<std::thread> threads = std::move(threads_);
  if (retired_.joinable()) threads.push_back(std::move(retired_));
  lock.unlock();
  for (std::thread& thread : threads) thread.join();
  if (watcher_.joinable()) watcher_.join();
}

absl::Status CallExecutor::AddThread() {
  // Counted once it exists (it cannot run Serve() before mu_, held here, is released).
  try {
    threads_.emplace_back([this] { Serve(); });
  } catch (const std::exception& error) {  // system_error or bad_alloc; threads_ as it was
    return absl::ResourceExhaustedError(absl::StrCat("cannot start an HSM thread: ", error.what()));
  }
  ++live_;
  ++serving_;
  return absl::OkStatus();
}

bool CallExecutor::SetAside() {
  return current_set_aside != nullptr && current_set_aside->load(std::memory_order_acquire);
}

size_t CallExecutor::set_aside() const {
  std::lock_guard lock(mu_);
  return set_aside_;
}

absl::Status CallExecutor::Unservable(const char* what, std::string_view object) const {
  if (serving_ == 0) {
    return BusyError("HSM busy: every HSM thread is stuck in the module",
                     absl::StrCat("HSM busy: every HSM thread is stuck in the module (", set_aside_,
                                  set_aside_ > options_.max_set_aside
                                      ? " call(s), past hsm.max_stuck_calls); "
                                      : " call(s), no thread could be started in their place); ",
                                  what, " was not started; retry later"));
  }
  if (stuck_by_kind_.empty()) return absl::OkStatus();
  if (auto stuck = stuck_by_kind_.find(Kind(what, object));
      stuck != stuck_by_kind_.end() && stuck->second >= stuck_per_kind_) {
    return BusyError(
        absl::StrCat("HSM busy: ", what, " calls on one HSM object are stuck"),
        absl::StrCat(
            "HSM busy: ", stuck->second, " ", what,
            " call(s) on the same HSM object are stuck in the module; no new one is started until "
            "one returns; retry later"));
  }
  return absl::OkStatus();
}

void CallExecutor::RefuseQueued() {
  for (const std::shared_ptr<Task>& queued : queue_) {
    queued->state = Task::State::kRefused;
    queued->refusal = Unservable(queued->what, queued->object);
    queued->done.notify_all();
  }
  queue_.clear();
}

absl::Status CallExecutor::Run(const char* what, std::string_view object,
                               std::function<void()> task_fn) {
  auto task = std::make_shared<Task>(what, object, std::move(task_fn));
  std::unique_lock lock(mu_);
  if (stopping_) return absl::UnavailableError("the HSM layer is shutting down");
  CUSTOS_RETURN_IF_ERROR(Unservable(what, object));
  queue_.push_back(task);
  work_.notify_one();
  const auto deadline = std::chrono::steady_clock::now() + options_.call_timeout;
  if (task->done.wait_until(lock, deadline, [&] {
        return task->state == Task::State::kDone || task->state == Task::State::kRefused;
      })) {
    return task->state == Task::State::kDone ? absl::OkStatus() : task->refusal;
  }
  if (task->state == Task::State::kQueued) {
    queue_.erase(std::find(queue_.begin(), queue_.end(), task));
    return BusyError(absl::StrCat("HSM busy: no HSM thread was free for ", what),
                     absl::StrCat("HSM busy: no HSM thread was free for ", what, " within ",
                                  options_.call_timeout.count(), " ms (hsm.call_timeout_ms; ",
                                  set_aside_, " call(s) stuck in the module)"));
  }
  task->set_aside.store(true, std::memory_order_release);
  ++set_aside_;
  ++stuck_by_kind_[Kind(what, object)];
  --serving_;
  // Past the bound, or if the system refuses a thread, the stuck one is not replaced.
  std::string not_replaced;
  if (set_aside_ > options_.max_set_aside) {
    not_replaced = "; at hsm.max_stuck_calls, its thread is not replaced";
  } else if (absl::Status added = AddThread(); !added.ok()) {
    not_replaced = absl::StrCat("; its thread is not replaced: ", added.message());
  }
  if (serving_ == 0) RefuseQueued();
  if (options_.on_set_aside) options_.on_set_aside(+1);
  const size_t stuck = set_aside_;
  lock.unlock();
  spdlog::warn(
      "HSM call {} has not returned within {} ms; answered UNAVAILABLE and set aside "
      "({} set aside now{})",
      what, options_.call_timeout.count(), stuck, not_replaced);
  return absl::UnavailableError(absl::StrCat("the HSM did not answer ", what, " within ",
                                             options_.call_timeout.count(),
                                             " ms (hsm.call_timeout_ms); retry later"));
}

void CallExecutor::Serve() {
  std::unique_lock lock(mu_);
  bool serving = true;  // False once retiring after a set-aside call: no longer in serving_.
  for (;;) {
    work_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) break;  // Stopping, and nothing left to do.
    std::shared_ptr<Task> task = std::move(queue_.front());
    queue_.pop_front();
    // A kind whose calls got stuck while this one waited is not started either.
    if (absl::Status refused = Unservable(task->what, task->object); !refused.ok()) {
      task->state = Task::State::kRefused;
      task->refusal = std::move(refused);
      task->done.notify_all();
      continue;
    }
    task->state = Task::State::kRunning;
    task->started = std::chrono::steady_clock::now();
    running_.push_back(task);
    lock.unlock();
    current_set_aside = &task->set_aside;
    task->fn();
    task->fn = nullptr;  // What it owned goes now, on this thread, outside the lock.
    current_set_aside = nullptr;
    lock.lock();
    task->state = Task::State::kDone;
    running_.erase(std::find(running_.begin(), running_.end(), task));
    task->done.notify_all();
    if (task->set_aside.load(std::memory_order_relaxed)) {
      --set_aside_;
      if (auto stuck = stuck_by_kind_.find(Kind(task->what, task->object)); --stuck->second == 0) {
        stuck_by_kind_.erase(stuck);
      }
      if (options_.on_set_aside) options_.on_set_aside(-1);
      spdlog::info("a set-aside HSM call ({}) returned after {} ms", task->what,
                   std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::steady_clock::now() - task->started)
                       .count());
      if (serving_ >= options_.threads) {  // Replaced meanwhile: this thread retires.
        serving = false;
        break;
      }
      ++serving_;
    }
  }
  // A thread retiring leaves its handle for the next to retire (or the destructor) to join,
  // and joins the one the last left: neither a caller nor mu_ waits on a thread's exit, which
  // runs the module's and its libraries' thread-exit handlers under locks of their own.
  std::thread previous;
  if (serving) {
    --serving_;
  } else {
    const auto self = std::find_if(threads_.begin(), threads_.end(), [](const std::thread& t) {
      return t.get_id() == std::this_thread::get_id();
    });
    assert(self != threads_.end());  // Added by AddThread() before this thread could run.
    previous = std::exchange(retired_, std::move(*self));
    threads_.erase(self);
  }
  --live_;
  idle_.notify_all();
  lock.unlock();
  if (previous.joinable()) previous.join();
}

void CallExecutor::Watch() {
  const auto period =
      std::min<std::chrono::milliseconds>(options_.hang_limit / 4, std::chrono::milliseconds(250));
  std::unique_lock lock(mu_);
  while (!idle_.wait_for(lock, period, [this] { return watcher_stop_; })) {
    if (hang_reported_ || running_.empty()) continue;
    const auto now = std::chrono::steady_clock::now();
    for (const auto& task : running_) {
      if (now - task->started < options_.hang_limit) continue;
      hang_reported_ = true;
      const std::string message = absl::StrCat(
          "an HSM call (", task->what, ") has not returned for ",
          std::chrono::duration_cast<std::chrono::seconds>(now - task->started).count(),
          " s (hsm.hang_limit_ms); the PKCS#11 module is taken to be hung for good");
      lock.unlock();
      if (options_.on_hang_limit) options_.on_hang_limit(message);
      lock.lock();
      break;
    }
  }
}

}  // namespace custos::hsm
