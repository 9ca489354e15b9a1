#include "server/refusals.h"

#include <spdlog/spdlog.h>

namespace custos::server {

std::string PeerAddress(std::string_view encoded) {
  // gRPC writes an IPv6 peer's brackets percent-encoded ("ipv6:%5B::1%5D:54621").
  std::string decoded(encoded);
  for (const auto& [from, to] : {std::pair{"%5B", "["}, std::pair{"%5D", "]"}}) {
    for (size_t at = decoded.find(from); at != std::string::npos; at = decoded.find(from, at)) {
      decoded.replace(at, 3, to);
    }
  }
  const std::string_view peer = decoded;
  const bool ip = peer.rfind("ipv4:", 0) == 0 || peer.rfind("ipv6:", 0) == 0;
  const size_t colon = peer.rfind(':');
  if (!ip || colon == std::string_view::npos || colon < 5) return std::string(peer);
  // An IPv6 address without brackets has no port to drop.
  if (peer.rfind("ipv6:", 0) == 0 && peer.find(']') == std::string_view::npos) {
    return std::string(peer);
  }
  return std::string(peer.substr(0, colon));
}

RefusalRecorder::RefusalRecorder(core::Kms* kms, const Clock* clock,
                                 std::chrono::milliseconds interval)
    : kms_(kms), clock_(clock), interval_(interval), thread_([this] { Run(); }) {}

RefusalRecorder::~RefusalRecorder() { Stop(); }

void RefusalRecorder::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool RefusalRecorder::CountRepeat(std::string_view rpc, std::string principal,
                                  std::string_view peer, absl::StatusCode code,
                                  std::string_view reason) {
  reason = reason.substr(0, kMaxReasonBytes);
  const auto now = std::chrono::steady_clock::now();
  Key key(std::string(rpc), std::move(principal), PeerAddress(peer), code, std::string(reason));
  std::lock_guard lock(mu_);
  if (stop_) return false;
  auto seen = recorded_.find(key);
  if (seen != recorded_.end() && now - seen->second < interval_) {
    CountLocked(std::move(key));
    return true;
  }
  if (seen == recorded_.end() && recorded_.size() >= kMaxRecordedKinds) {
    std::erase_if(recorded_, [&](const auto& kind) { return now - kind.second >= interval_; });
    // Still full (a flood of distinct refusals): this one is recorded on its own, as before
    // counting existed; nobody's flood may fold another caller's refusal into a tally.
    if (recorded_.size() >= kMaxRecordedKinds) return false;
  }
  recorded_.insert_or_assign(std::move(key), now);
  return false;
}

void RefusalRecorder::Refused(std::string_view rpc, std::string principal, std::string_view peer,
                              absl::StatusCode code, std::string_view reason) {
  reason = reason.substr(0, kMaxReasonBytes);
  Key key(std::string(rpc), std::move(principal), PeerAddress(peer), code, std::string(reason));
  std::lock_guard lock(mu_);
  CountLocked(std::move(key));
}

void RefusalRecorder::CountLocked(Key key) {
  const int64_t now = clock_->NowSeconds();
  auto it = tallies_.find(key);
  if (it == tallies_.end() && tallies_.size() >= kMaxTallies) {
    std::get<1>(key).clear();
    std::get<2>(key).assign(1, '*');  // every further caller
    it = tallies_.find(key);
  }
  if (it == tallies_.end()) {
    core::Kms::RefusedCalls tally;
    std::tie(tally.rpc, tally.principal, tally.peer, tally.code, tally.reason) = key;
    tally.first = now;
    it = tallies_.emplace(std::move(key), std::move(tally)).first;
  }
  ++it->second.count;
  it->second.last = now;
  if (it->second.count == 1) cv_.notify_all();
}

void RefusalRecorder::Run() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stop_ || !tallies_.empty(); });
    if (tallies_.empty()) return;  // stopping with nothing left to record
    cv_.wait_for(lock, kGather, [this] { return stop_; });
    const bool last = stop_;  // one attempt after the stop, whatever its outcome
    Tallies taken = std::exchange(tallies_, {});
    lock.unlock();
    Record(taken);
    lock.lock();
    if (last) return;
    // Coalesce: whatever is refused next waits for the interval (or the stop).
    cv_.wait_for(lock, interval_, [this] { return stop_; });
  }
}

void RefusalRecorder::Record(const Tallies& tallies) {
  std::vector<core::Kms::RefusedCalls> refused;
  refused.reserve(tallies.size());
  for (const auto& [key, tally] : tallies) {
    spdlog::warn("{} {} to {} refused ({}) from {} (principal '{}'): {}", tally.count,
                 tally.count == 1 ? "call" : "calls", tally.rpc,
                 absl::StatusCodeToString(tally.code), tally.peer, tally.principal, tally.reason);
    refused.push_back(tally);
  }
  if (absl::Status recorded = kms_->RecordRefusedCalls(refused); !recorded.ok()) {
    spdlog::error("refused calls not recorded yet (kept for the next attempt): {}",
                  recorded.ToString());
    Merge(tallies);
  }
}

void RefusalRecorder::Merge(const Tallies& from) {
  std::lock_guard lock(mu_);
  for (auto& [key, tally] : from) {
    auto [it, inserted] = tallies_.try_emplace(key, tally);
    if (inserted) continue;
    it->second.count += tally.count;
    it->second.first = std::min(it->second.first, tally.first);
  }
}

}  // namespace custos::server
