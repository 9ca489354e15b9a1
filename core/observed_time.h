// ObservedTime: how much time custosd has itself seen pass, summed over all its runs.
//
// Destroying a key cannot be undone, so it must not rest on one reading of the wall clock,
// which an operator (or a misconfigured time server) can step forward. Observed time advances
// only with the monotonic clock while the server runs, and is persisted in the store (the
// replay-safe setting "observed_seconds", sealed under an HSM key: nobody without it can move
// the figure forward) so that the next run resumes from it. Downtime does not count: it delays
// destruction, never hastens it. A crash loses what was observed since the last Persist(),
// again in the safe direction.
//
// It also notices the wall clock running ahead of (or behind) observed time within a run:
// WallClockJump() finds a jump until it is Reported(), so the server can alert once. And it
// holds the wall clock to observed time for what expires or falls due by it (WallBounds()).
// Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>

#include "common/clock.h"
#include "common/status.h"
#include "storage/key_store.h"

namespace custos::core {

// The store setting holding observed seconds as decimal text.
inline constexpr char kObservedSecondsSetting[] = "observed_seconds";

class ObservedTime {
 public:
  // `store` and `clock` must outlive this object. The run begins now (WallBounds).
  ObservedTime(storage::KeyStore* store, const Clock* clock)
      : store_(store),
        clock_(clock),
        start_wall_(clock->NowSeconds()),
        start_monotonic_ms_(clock->MonotonicMillis()) {}

  // Observed seconds now. Reads the persisted figure on first use (0 for a new store);
  // UNAVAILABLE if it cannot be read, INTERNAL if it is not a number.
  absl::StatusOr<int64_t> Now();

  // Stores the current figure (one settings write).
  absl::Status Persist();

  struct ClockJump {
    int64_t seconds;  // how far the wall clock moved (negative: back)
    int64_t offset;   // the wall clock's offset from observed time after it
  };
  // How far the wall clock has moved ahead of observed time (negative: behind) since this
  // run began or since the last jump reported, if that exceeds `tolerance_seconds`. Nothing
  // before the first Now(). Found again at every call until Reported(): a jump whose record
  // could not be written (a full disk) is recorded at a later turn.
  std::optional<ClockJump> WallClockJump(int64_t tolerance_seconds);
  void Reported(const ClockJump& jump);

  // The wall clock now, and where it would be had it kept pace with the monotonic clock since
  // this run began: `earliest` is the smaller of the two, `latest` the larger; both are the
  // wall clock while it keeps pace. What expires by the wall clock (requests, database tokens)
  // expires by `latest`, so a clock stepped back reopens no approval window and revives no
  // token; what falls due by it (rotation periods) falls due by `earliest`, so a clock
  // stepped forward makes nothing due early. `latest` never falls back within a run: once
  // the wall clock has been seen ahead, it keeps that lead after the clock is set right, so
  // what was issued meanwhile lives its own span and no more. Needs nothing stored, and
  // cannot fail.
  struct Bounds {
    int64_t earliest;
    int64_t latest;
  };
  Bounds WallBounds() const;

 private:
  absl::Status LoadLocked();
  int64_t NowLocked() const;

  storage::KeyStore* const store_;
  const Clock* const clock_;
  std::mutex mu_;
  bool loaded_ = false;
  int64_t base_seconds_ = 0;          // the persisted figure at load
  int64_t base_monotonic_ms_ = 0;     // the monotonic clock at load
  int64_t wall_offset_ = 0;           // wall minus observed, when last (re)based
  const int64_t start_wall_;          // the wall clock when this run began
  const int64_t start_monotonic_ms_;  // the monotonic clock then
  // The furthest the wall clock has been seen ahead of where it would be at the monotonic
  // clock's pace, in this run (WallBounds).
  mutable std::atomic<int64_t> wall_lead_{0};
};

}  // namespace custos::core
