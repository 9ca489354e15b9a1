// One custosd per HSM token at a time. Two servers on one token (a copy of the state started
// by mistake, a standby brought up while the primary runs) would both sign checkpoints with
// its audit key and each overwrite the head the token keeps of the other's log: the log forks,
// and neither half can be trusted. The servers may share nothing but the token, so the claim
// lives there: a private data object naming its holder, renewed every fifth of a lease on a
// thread of its own. A server starting finds the claim either released (a clean stop),
// unchanged for a whole lease (its holder died), or renewed while it watched: then it refuses
// to start. PKCS#11 has no compare-and-swap: a claim is written, left to settle, and read back
// (a new one, and a renewal of one left unrenewed for a lease, which may be being taken over),
// and a holder confirms its claim before each write another holder's would conflict with.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "hsm/hsm.h"

namespace custos::hsm {

class TokenLease {
 public:
  struct Options {
    std::string label = "custos-instance";  // the token data object holding the claim
    // How long a claim must go unrenewed before another server may take it. The holder renews
    // every lease / 5; a renewal (a read and a write) must land well within the lease.
    std::chrono::milliseconds lease{5000};
    // How often a starting server looks at a claim while it waits.
    std::chrono::milliseconds poll{250};
    // How long a claim just written is left before it is read back: another server that found
    // the token free at the same moment writes its own within this, and one of them sees the
    // other's and stops.
    std::chrono::milliseconds settle{100};
    // What each renewal says of the holder's state (custosd: its audit log's head), one line:
    // a server taking over a dead holder's claim checks that its own state reaches it.
    std::function<std::string()> state = nullptr;
    // Asked before a claim left by a holder that did not release it is taken over, with that
    // holder ("<host>:<pid>") and the state its last renewal said: an error refuses the take-
    // over (and is what Acquire returns), leaving the claim as it was.
    std::function<absl::Status(const std::string& holder, const std::string& state)> may_take_over =
        nullptr;
  };

  // Claims the token for this process, waiting up to one lease if another holds it. FAILED_
  // PRECONDITION, naming the holder, if its claim is renewed meanwhile (or another server
  // claimed the token at the same moment); the HSM's error if it cannot be read or written.
  static absl::StatusOr<std::unique_ptr<TokenLease>> Acquire(Hsm* hsm, Options options);

  // The state the claim this process took over last said, if it took one over from a holder
  // that did not release it (crashed, or stalled past a lease); empty otherwise.
  const std::string& taken_over_state() const { return taken_over_state_; }
  // "<host>:<pid>" of that holder.
  const std::string& taken_over_from() const { return taken_over_from_; }

  // Renews the claim. ABORTED, naming the other, if another server holds it now: this process
  // lost the token (it stalled for a whole lease) and must stop writing to it at once.
  absl::Status Renew();

  // Renews the claim every lease / 5 on a thread of its own until Release or destruction,
  // through start-up checks longer than a lease and whatever else this process does. `lost`
  // is called on that thread with Renew's ABORTED; other failures are retried.
  void KeepRenewed(std::function<void(const absl::Status&)> lost);

  // OK if this process's claim is current: renewed within half a lease, or renewed now (Renew's
  // errors). Called before each write to the token that another holder's would conflict with:
  // a process stopped for longer than a lease learns it lost the token before it writes.
  absl::Status Confirm();

  // Stops the renewals and marks the claim released, so the next server starts without
  // waiting. Not done if another server holds it.
  absl::Status Release();

  // Releases the claim if Release was not called (a start that failed after Acquire).
  ~TokenLease();
  TokenLease(const TokenLease&) = delete;
  TokenLease& operator=(const TokenLease&) = delete;

 private:
  TokenLease(Hsm* hsm, Options options, std::string holder);
  std::string Mine() const;  // how every claim of this process begins
  std::string Encode(uint64_t beat) const;
  // True if every value is one of this process's claims (a renewal cut short leaves two).
  bool AllMine(const std::vector<std::string>& values) const;
  // Of the values read: whether one is this process's claim, and the other servers' claims
  // (not a "released").
  struct Claims {
    bool mine = false;
    std::vector<std::string> others;
  };
  Claims Sort(const std::vector<std::string>& values) const;
  absl::Status RenewLocked();  // with mu_ held
  void StopRenewing();

  Hsm* const hsm_;
  const Options options_;
  const std::string holder_;  // "<random id> <host>:<pid>"
  std::string taken_over_state_, taken_over_from_;
  std::mutex mu_;       // one renewal at a time, and what follows
  uint64_t epoch_ = 0;  // of this process's claim (EpochOf)
  uint64_t beat_ = 0;
  // When (CLOCK_BOOTTIME) the last renewal that found the claim ours began: another server
  // takes it over no sooner than a lease after that renewal's write landed, later still. And
  // when the claim was taken, and when the last renewal that found it lapsed began (or then).
  std::chrono::nanoseconds renewed_at_{0}, acquired_at_{0}, lapsed_at_{0};
  std::vector<std::string> others_seen_;  // other claims beside this one's at the last renewal
  bool released_ = true;                  // until a claim is written
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread renewing_;
};

}  // namespace custos::hsm
