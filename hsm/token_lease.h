// One custosd per HSM token at a time. Two servers on one token (a copy of the state started
// by mistake, a standby brought up while the primary runs) would both sign checkpoints with
// its audit key and each overwrite the head the token keeps of the other's log: the log forks,
// and neither half can be trusted. The servers may share nothing but the token, so the claim
// lives there: a private data object naming its holder, renewed on every health round. A
// server starting finds the claim either released (a clean stop), unchanged for a whole lease
// (its holder died), or renewed while it watched: then it refuses to start.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/status.h"
#include "hsm/hsm.h"

namespace custos::hsm {

class TokenLease {
 public:
  struct Options {
    std::string label = "custos-instance";  // the token data object holding the claim
    // How long a claim must go unrenewed before another server may take it: longer than the
    // holder's renewal interval plus one slow round.
    std::chrono::milliseconds lease{5000};
    // How often a starting server looks at a claim while it waits.
    std::chrono::milliseconds poll{250};
    // What each renewal says of the holder's state (custosd: its audit log's head), one line:
    // a server taking over a dead holder's claim checks that its own state reaches it.
    std::function<std::string()> state;
    // Asked before a claim left by a holder that did not release it is taken over, with that
    // holder ("<host>:<pid>") and the state its last renewal said: an error refuses the take-
    // over (and is what Acquire returns), leaving the claim as it was.
    std::function<absl::Status(const std::string& holder, const std::string& state)> may_take_over;
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

  // Marks the claim released, so the next server starts without waiting. Not done if
  // another server holds it.
  absl::Status Release();

  TokenLease(const TokenLease&) = delete;
  TokenLease& operator=(const TokenLease&) = delete;

 private:
  TokenLease(Hsm* hsm, Options options, std::string holder);
  std::string Mine() const;  // how every claim of this process begins
  std::string Encode(uint64_t beat) const;
  // True if every value is one of this process's claims (a renewal cut short leaves two).
  bool AllMine(const std::vector<std::string>& values) const;

  Hsm* const hsm_;
  const Options options_;
  const std::string holder_;  // "<random id> <host>:<pid>"
  std::string taken_over_state_, taken_over_from_;
  std::mutex mu_;
  uint64_t beat_ = 0;
};

}  // namespace custos::hsm
