// WorkQueue: a fixed set of threads running tasks in arrival order, with a bounded number of
// tasks waiting for a free thread.
//
// The serving layer runs each call's blocking work (HSM calls, waiting for an audit commit)
// here, so no gRPC thread waits on a call, and a burst of callers waits in the queue instead of
// being refused: TrySubmit refuses a task only when `max_waiting` tasks wait already.
// Thread-safe. The destructor runs every task already taken, then joins the threads.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace custos {

class WorkQueue {
 public:
  // `threads` and `max_waiting` at least 1.
  WorkQueue(size_t threads, size_t max_waiting);
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues `task` to run on the first free thread; false (and `task` dropped unrun) if
  // `max_waiting` tasks are waiting already, or the queue is being destroyed.
  bool TrySubmit(std::function<void()> task);

  size_t waiting() const;
  size_t max_waiting() const { return max_waiting_; }
  size_t threads() const { return threads_.size(); }

 private:
  void Work();

  const size_t max_waiting_;
  mutable std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace custos
