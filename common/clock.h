// Clock: the one way Custos reads the time, so tests can drive expiry without sleeping.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace custos {

class Clock {
 public:
  virtual ~Clock() = default;
  // Seconds since the Unix epoch: the wall clock, which an operator or NTP may step.
  virtual int64_t NowSeconds() const = 0;
  // Milliseconds of a clock that never steps (CLOCK_MONOTONIC), from an arbitrary origin: how
  // much time this process has seen pass.
  virtual int64_t MonotonicMillis() const = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t NowSeconds() const override {
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  int64_t MonotonicMillis() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
};

// A clock tests set and advance by hand. Advance() moves both clocks, as time passing does;
// StepWallClock() moves only the wall clock, as an operator setting it would. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t now) : now_(now) {}
  int64_t NowSeconds() const override { return now_.load(); }
  int64_t MonotonicMillis() const override { return monotonic_ms_.load(); }
  void Advance(int64_t seconds) {
    now_ += seconds;
    monotonic_ms_ += seconds * 1000;
  }
  void StepWallClock(int64_t seconds) { now_ += seconds; }

 private:
  std::atomic<int64_t> now_;
  std::atomic<int64_t> monotonic_ms_{0};
};

}  // namespace custos
