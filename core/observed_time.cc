#include "core/observed_time.h"

#include <algorithm>
#include <string>

#include "absl/strings/numbers.h"
#include "common/strings.h"

namespace custos::core {

absl::Status ObservedTime::LoadLocked() {
  if (loaded_) return absl::OkStatus();
  CUSTOS_ASSIGN_OR_RETURN(std::optional<std::string> stored,
                          store_->GetReplaySafeSetting(kObservedSecondsSetting));
  int64_t seconds = 0;
  if (stored && (!absl::SimpleAtoi(*stored, &seconds) || seconds < 0)) {
    return absl::InternalError(
        StrCat("the stored observed time '", *stored, "' is not a number of seconds"));
  }
  base_seconds_ = seconds;
  base_monotonic_ms_ = clock_->MonotonicMillis();
  wall_offset_ = clock_->NowSeconds() - base_seconds_;
  loaded_ = true;
  return absl::OkStatus();
}

int64_t ObservedTime::NowLocked() const {
  return base_seconds_ + (clock_->MonotonicMillis() - base_monotonic_ms_) / 1000;
}

absl::StatusOr<int64_t> ObservedTime::Now() {
  std::lock_guard lock(mu_);
  CUSTOS_RETURN_IF_ERROR(LoadLocked());
  return NowLocked();
}

absl::Status ObservedTime::Persist() {
  CUSTOS_ASSIGN_OR_RETURN(const int64_t now, Now());
  // Sealed, so nobody without the HSM can move it forward; an older value put back only
  // delays destruction, so it needs no audit record per turn.
  return store_->PutReplaySafeSetting(kObservedSecondsSetting, std::to_string(now));
}

std::optional<ObservedTime::ClockJump> ObservedTime::WallClockJump(int64_t tolerance_seconds) {
  std::lock_guard lock(mu_);
  if (!loaded_) return std::nullopt;
  const int64_t offset = clock_->NowSeconds() - NowLocked();
  const int64_t jump = offset - wall_offset_;
  if (jump <= tolerance_seconds && jump >= -tolerance_seconds) return std::nullopt;
  return ClockJump{jump, offset};
}

ObservedTime::Bounds ObservedTime::WallBounds() const {
  const int64_t wall = clock_->NowSeconds();
  const int64_t kept_pace = start_wall_ + (clock_->MonotonicMillis() - start_monotonic_ms_) / 1000;
  int64_t lead = wall_lead_.load();
  while (wall - kept_pace > lead && !wall_lead_.compare_exchange_weak(lead, wall - kept_pace)) {
  }
  return Bounds{std::min(wall, kept_pace), std::max(wall, kept_pace + lead)};
}

void ObservedTime::Reported(const ClockJump& jump) {
  std::lock_guard lock(mu_);
  wall_offset_ = jump.offset;  // each jump reported once
}

}  // namespace custos::core
