#include "common/work_queue.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <mutex>
#include <vector>

namespace custos {
namespace {

using namespace std::chrono_literals;

// Holds every task that calls Wait() until Open().
class Gate {
 public:
  void Wait() {
    std::unique_lock lock(mu_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
  }
  void Open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  // Blocks until `n` tasks are inside Wait().
  void AwaitWaiting(int n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return waiting_ >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int waiting_ = 0;
  bool open_ = false;
};

TEST_CASE("WorkQueue runs tasks in arrival order on one thread", "[work_queue]") {
  std::vector<int> order;
  {
    WorkQueue queue(1, 100);
    for (int i = 0; i < 50; ++i) REQUIRE(queue.TrySubmit([&order, i] { order.push_back(i); }));
  }  // the destructor runs what was taken
  REQUIRE(order.size() == 50);
  for (int i = 0; i < 50; ++i) CHECK(order[i] == i);
}

TEST_CASE("WorkQueue refuses a task only when max_waiting tasks wait", "[work_queue]") {
  Gate gate;
  std::atomic<int> ran{0};
  WorkQueue queue(2, 3);
  // Two tasks occupy both threads; they are running, not waiting.
  for (int i = 0; i < 2; ++i) {
    REQUIRE(queue.TrySubmit([&] {
      gate.Wait();
      ++ran;
    }));
  }
  gate.AwaitWaiting(2);
  for (int i = 0; i < 3; ++i) REQUIRE(queue.TrySubmit([&] { ++ran; }));
  CHECK(queue.waiting() == 3);
  CHECK_FALSE(queue.TrySubmit([&] { ran += 100; }));  // dropped, never run
  gate.Open();
  // A slot frees as soon as a waiting task starts.
  for (int tries = 0; tries < 1000 && queue.waiting() > 0; ++tries)
    std::this_thread::sleep_for(1ms);
  REQUIRE(queue.TrySubmit([&] { ++ran; }));
  for (int tries = 0; tries < 1000 && ran.load() < 6; ++tries) std::this_thread::sleep_for(1ms);
  CHECK(ran.load() == 6);
}

TEST_CASE("WorkQueue runs tasks on all its threads at once", "[work_queue]") {
  Gate gate;
  WorkQueue queue(4, 10);
  std::atomic<int> done{0};
  for (int i = 0; i < 4; ++i) {
    REQUIRE(queue.TrySubmit([&] {
      gate.Wait();
      ++done;
    }));
  }
  gate.AwaitWaiting(4);  // would hang if fewer than four ran at once
  CHECK(queue.threads() == 4);
  gate.Open();
}

TEST_CASE("WorkQueue's destructor runs the tasks still waiting", "[work_queue]") {
  Gate gate;
  std::atomic<int> ran{0};
  auto queue = std::make_unique<WorkQueue>(1, 10);
  REQUIRE(queue->TrySubmit([&] { gate.Wait(); }));
  gate.AwaitWaiting(1);
  for (int i = 0; i < 5; ++i) REQUIRE(queue->TrySubmit([&] { ++ran; }));
  std::thread opener([&] {
    std::this_thread::sleep_for(20ms);
    gate.Open();
  });
  queue.reset();
  opener.join();
  CHECK(ran.load() == 5);
}

}  // namespace
}  // namespace custos
