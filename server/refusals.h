// RefusalRecorder: calls refused before any use case ran (the serving queue was full) are
// logged and audited, coalesced.
//
// A client retrying in a loop must not flood the audit log or the operator's log: refusals
// are counted per (rpc, principal, peer address, status, reason) and recorded together,
// kGather after the first refusal (a burst makes one record) and then at most once per
// `interval` while refusals go on, as
// one Kms::RecordRefusedCalls record per tally (its count, first and last time) and one log
// line per tally. If the audit log refuses, the counts are kept and recorded with the next
// batch. At most kMaxTallies tallies are kept between two recordings; further callers are
// counted under one tally with peer "*". Thread-safe; Refused() never waits on a commit.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>

#include "common/clock.h"
#include "core/kms.h"

namespace custos::server {

class RefusalRecorder {
 public:
  static constexpr size_t kMaxTallies = 256;
  static constexpr std::chrono::milliseconds kGather{200};
  static constexpr size_t kMaxRecordedKinds = 1024;  // CountRepeat's memory
  // Reasons may quote what a caller sent (a key name): kept and compared up to this many bytes.
  static constexpr size_t kMaxReasonBytes = 256;

  // `kms` and `clock` must outlive the recorder.
  RefusalRecorder(core::Kms* kms, const Clock* clock,
                  std::chrono::milliseconds interval = std::chrono::seconds(10));
  ~RefusalRecorder();  // Stop()
  RefusalRecorder(const RefusalRecorder&) = delete;
  RefusalRecorder& operator=(const RefusalRecorder&) = delete;

  // Counts one refused call. `peer` is gRPC's peer string; its port is dropped, so that a
  // client reconnecting from new ports stays one tally.
  void Refused(std::string_view rpc, std::string principal, std::string_view peer,
               absl::StatusCode code, std::string_view reason);

  // For refusals that get a record of their own the first time (authentication and
  // authorization refusals): false for the first of its kind (rpc, principal, peer address,
  // status, reason) in `interval`, which the caller then records itself; true for the repeats
  // within it, which are counted as Refused() counts (so a client in a retry loop adds one
  // record and then a tally per interval, not one record and fsync per call). With too many
  // kinds to remember, a new kind is not remembered (false: recorded on its own). False once
  // stopped.
  bool CountRepeat(std::string_view rpc, std::string principal, std::string_view peer,
                   absl::StatusCode code, std::string_view reason);

  // Records what is counted and ends the thread. Call before the Kms goes.
  void Stop();

 private:
  using Key = std::tuple<std::string, std::string, std::string, absl::StatusCode, std::string>;
  using Tallies = std::map<Key, core::Kms::RefusedCalls>;

  void CountLocked(Key key);  // one more in `key`'s tally (or "*" when full); under mu_
  void Run();
  void Record(const Tallies& tallies);
  void Merge(const Tallies& from);  // back into tallies_, under mu_

  core::Kms* const kms_;
  const Clock* const clock_;
  const std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  Tallies tallies_;  // guarded by mu_
  // Kinds of refusal recorded on their own (CountRepeat), with when; guarded by mu_.
  std::map<Key, std::chrono::steady_clock::time_point> recorded_;
  bool stop_ = false;
  std::thread thread_;
};

// gRPC's peer string without its port: "ipv4:10.0.0.7:53211" -> "ipv4:10.0.0.7",
// "ipv6:[::1]:53211" -> "ipv6:[::1]"; anything else as it is.
std::string PeerAddress(std::string_view peer);

}  // namespace custos::server
