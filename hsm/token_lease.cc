#include "hsm/token_lease.h"

#include <openssl/rand.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace custos::hsm {
namespace {

constexpr char kHeader[] = "custos-lease-v1\n";
constexpr char kHolder[] = "holder=";

constexpr char kReleased[] = "custos-lease-v1\nreleased\n";

// The claim of epoch `epoch` released: the next claim's epoch follows it (EpochOf).
std::string Released(uint64_t epoch) { return absl::StrCat(kReleased, "epoch=", epoch, "\n"); }

bool AllReleased(const std::vector<std::string>& values) {
  return std::all_of(values.begin(), values.end(),
                     [](const std::string& v) { return v.rfind(kReleased, 0) == 0; });
}

// The text after "<field>=" on its line in the first of `values` that has one.
std::string FieldOf(const std::vector<std::string>& values, const std::string& field) {
  const std::string prefix = absl::StrCat("\n", field, "=");
  for (const std::string& value : values) {
    const size_t at = value.find(prefix);
    if (at == std::string::npos) continue;
    const size_t from = at + prefix.size();
    return value.substr(from, value.find('\n', from) - from);
  }
  return "";
}

// "<host>:<pid>" of the claim in `values`, for messages; the random id stays out.
std::string HolderOf(const std::vector<std::string>& values) {
  const std::string holder = FieldOf(values, "holder");
  if (holder.empty()) return "unknown";
  const size_t space = holder.find(' ');
  return space == std::string::npos ? holder : holder.substr(space + 1);
}

// Epochs count from 1 to kLastEpoch, then from 1 again (0 is none). No count of claims comes
// near the wrap, but a forged release may start one just short of it.
constexpr uint64_t kLastEpoch = (uint64_t{1} << 62) - 1;

// How many claims led to the one in `value`: one more than the latest its writer found (claims
// and releases), so a claim written since a write that landed late stands over it. 0 in a
// claim or release from before epochs were written, in none, and in one past kLastEpoch (a
// forgery).
uint64_t EpochOf(const std::string& value) {
  uint64_t epoch = 0;
  return absl::SimpleAtoi(FieldOf({value}, "epoch"), &epoch) && epoch <= kLastEpoch ? epoch : 0;
}

// Whether epoch `a` comes after `b`: the nearer way round the count (serial number arithmetic,
// RFC 1982), so a claim counted from 1 again follows one written just short of the wrap. Of
// two different epochs, exactly one follows the other (the count's length is odd). 0 comes
// after none.
bool Follows(uint64_t a, uint64_t b) {
  if (a == 0) return false;
  if (b == 0) return true;
  const uint64_t ahead = (a + kLastEpoch - b) % kLastEpoch;  // a - b, round the wrap
  return ahead != 0 && ahead <= kLastEpoch / 2;
}

// Round the wrap "follows" is not transitive: among epochs spread far round it (forged), the
// latest depends on the order they are looked at in. Every reader looks in this order, so
// servers reading the same claims agree on which stands.
std::vector<std::string> InOneOrder(std::vector<std::string> values) {
  std::sort(values.begin(), values.end());
  return values;
}

// The epoch of a claim written over `values`: the one after the latest among them.
uint64_t NextEpoch(const std::vector<std::string>& values) {
  uint64_t latest = 0;
  for (const std::string& value : InOneOrder(values)) {
    if (const uint64_t epoch = EpochOf(value); Follows(epoch, latest)) latest = epoch;
  }
  return latest == kLastEpoch ? 1 : latest + 1;
}

// Of the claims in `values`, the one that stands when several lie side by side: the latest
// epoch (a server taking a lapsed claim over writes over a holder renewing it at the same
// moment, which stops), then, of claims written from the same one (servers starting at the
// same moment), the greatest holder (its random id first). A claim from before epochs were
// written (no epoch line) comes after all that have one: its server may have taken any of them
// over. Empty if none is a claim.
std::string StandingHolder(const std::vector<std::string>& values) {
  struct Claim {
    bool before_epochs;
    uint64_t epoch;
    std::string holder;
  };
  const auto after = [](const Claim& a, const Claim& b) {
    return a.before_epochs != b.before_epochs ? a.before_epochs : Follows(a.epoch, b.epoch);
  };
  std::optional<Claim> standing;
  for (const std::string& value : InOneOrder(values)) {
    Claim claim{value.find("\nepoch=") == std::string::npos, EpochOf(value),
                FieldOf({value}, "holder")};
    if (claim.holder.empty()) continue;
    if (!standing || after(claim, *standing) ||
        (!after(*standing, claim) && claim.holder > standing->holder)) {
      standing = std::move(claim);
    }
  }
  return standing ? standing->holder : "";
}

// A starting server's refusal: the claim it watched (now `values`) changed, so its holder lives.
absl::Status RenewedMeanwhile(const std::vector<std::string>& values) {
  return absl::FailedPreconditionError(absl::StrCat(
      "another custosd (", HolderOf(values),
      ") holds this HSM token: it renewed its claim while this one waited. Two servers on one "
      "token would fork the audit log; stop the other one first, or give this one a token of "
      "its own"));
}

// The server behind `others` (claims), for a holder's messages: its own may be gone already.
std::string OtherOf(const std::vector<std::string>& others) {
  return others.empty() ? "one that has stopped since" : HolderOf(others);
}

// A holder's loss: its claim lapsed and was taken.
absl::Status TookOver(const std::vector<std::string>& others) {
  return absl::AbortedError(absl::StrCat(
      "another custosd (", OtherOf(others),
      ") took this HSM token over while this one did not renew its claim for a lease"));
}

// A holder's loss to `others`, whose claim replaced its own or stands over it beside it: taken
// over if it `lapsed`, else claimed at the same moment if it is `starting`.
absl::Status Lost(const std::vector<std::string>& others, bool lapsed, bool starting) {
  if (lapsed) return TookOver(others);
  if (starting) {
    return absl::AbortedError(absl::StrCat("another custosd (", OtherOf(others),
                                           ") claimed this HSM token at the same moment, and its "
                                           "claim stands"));
  }
  return absl::AbortedError(absl::StrCat("another custosd (", OtherOf(others),
                                         ") holds this HSM token: its claim stands over this "
                                         "one's"));
}

// Now on CLOCK_BOOTTIME: unlike steady_clock it counts a suspended host's sleep, which a
// server on another host waiting for the claim did not sleep through.
std::chrono::nanoseconds BootNow() {
  timespec now{};
  ::clock_gettime(CLOCK_BOOTTIME, &now);
  return std::chrono::seconds(now.tv_sec) + std::chrono::nanoseconds(now.tv_nsec);
}

}  // namespace

TokenLease::TokenLease(Hsm* hsm, Options options, std::string holder)
    : hsm_(hsm), options_(std::move(options)), holder_(std::move(holder)) {}

std::string TokenLease::Mine() const { return absl::StrCat(kHeader, kHolder, holder_, "\n"); }

bool TokenLease::AllMine(const std::vector<std::string>& values) const {
  const std::string mine = Mine();
  return std::all_of(values.begin(), values.end(),
                     [&](const std::string& v) { return v.rfind(mine, 0) == 0; });
}

TokenLease::Claims TokenLease::Sort(const std::vector<std::string>& values) const {
  Claims claims;
  for (const std::string& value : values) {
    if (AllMine({value})) {
      claims.mine = true;
    } else if (!FieldOf({value}, "holder").empty()) {
      claims.others.push_back(value);
    }
  }
  return claims;
}

std::string TokenLease::Encode(uint64_t beat) const {
  std::string state = options_.state ? options_.state() : "";
  state.erase(std::remove(state.begin(), state.end(), '\n'), state.end());
  return absl::StrCat(Mine(), "epoch=", epoch_, "\nbeat=", beat, "\nstate=", state, "\n");
}

absl::StatusOr<std::unique_ptr<TokenLease>> TokenLease::Acquire(Hsm* hsm, Options options) {
  // A random id tells this process's claim from a later one of the same pid on the same host.
  unsigned char id[16];
  if (RAND_bytes(id, sizeof(id)) != 1) return absl::InternalError("RAND_bytes failed");
  char host[256] = {};
  if (::gethostname(host, sizeof(host) - 1) != 0) host[0] = '?';
  std::string holder;
  for (unsigned char b : id) absl::StrAppend(&holder, absl::Hex(b, absl::kZeroPad2));
  absl::StrAppend(&holder, " ", host, ":", ::getpid());
  std::unique_ptr<TokenLease> lease(new TokenLease(hsm, std::move(options), std::move(holder)));
  const Options& o = lease->options_;

  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> found, hsm->ReadTokenData(o.label));
  if (!AllReleased(found)) {
    // Held, or left by a holder that died: a live one renews its claim within a lease.
    const auto until = std::chrono::steady_clock::now() + o.lease;
    while (std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(o.poll);
      CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> now, hsm->ReadTokenData(o.label));
      if (AllReleased(now)) {  // it stopped cleanly meanwhile
        found = std::move(now);
        break;
      }
      if (now != found) return RenewedMeanwhile(now);
    }
    if (!AllReleased(found)) {
      lease->taken_over_from_ = HolderOf(found);
      lease->taken_over_state_ = FieldOf(found, "state");
      spdlog::warn(
          "the HSM token's last holder ({}) stopped without releasing it, and has not renewed "
          "its claim for {} ms; taking the token over",
          HolderOf(found), o.lease.count());
      if (o.may_take_over) {
        CUSTOS_RETURN_IF_ERROR(o.may_take_over(lease->taken_over_from_, lease->taken_over_state_));
      }
    }
  }
  lease->epoch_ = NextEpoch(found);
  const auto writing = BootNow();
  std::string claim = lease->Encode(0);
  if (AllReleased(found)) {
    CUSTOS_RETURN_IF_ERROR(hsm->WriteTokenData(o.label, claim));
  } else {
    // The holder may have come back while this one decided (custosd reads its database above):
    // its claim is replaced only if still the one watched, looked at in the call that writes.
    absl::Status replaced = hsm->ReplaceTokenData(o.label, found, claim);
    if (absl::IsFailedPrecondition(replaced)) {
      CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> now, hsm->ReadTokenData(o.label));
      if (!AllReleased(now)) return RenewedMeanwhile(now);
      // It came back and stopped cleanly (perhaps more than once): past that release's epoch.
      if (const uint64_t past = NextEpoch(now); Follows(past, lease->epoch_)) lease->epoch_ = past;
      claim = lease->Encode(0);
      replaced = hsm->WriteTokenData(o.label, claim);
    }
    CUSTOS_RETURN_IF_ERROR(replaced);
  }
  lease->released_ = false;
  // Two servers starting at once may both have found the token free. Each writes, then looks
  // again once the other's write has landed: a claim destroyed by a later one stops its
  // writer, and of claims written side by side (neither saw the other) the standing one's
  // holder (StandingHolder) clears the others. A module may show one process another's object late
  // (SoftHSM2 can miss a write made while it wrote its own): the renewals settle that.
  std::this_thread::sleep_for(o.settle);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> claimed, hsm->ReadTokenData(o.label));
  if (std::find(claimed.begin(), claimed.end(), claim) == claimed.end() ||
      StandingHolder(claimed) != lease->holder_) {
    lease->released_ = true;  // not ours to release
    std::erase(claimed, claim);
    return absl::FailedPreconditionError(
        absl::StrCat("another custosd (", HolderOf(claimed),
                     ") claimed this HSM token at the same moment; start one server only"));
  }
  if (claimed.size() > 1) {
    // Over the claims read only: one written since is left to the renewals.
    const absl::Status cleared = hsm->ReplaceTokenData(o.label, claimed, claim);
    if (!cleared.ok() && !absl::IsFailedPrecondition(cleared)) return cleared;
  }
  lease->renewed_at_ = lease->acquired_at_ = lease->lapsed_at_ = writing;
  return lease;
}

TokenLease::~TokenLease() {
  StopRenewing();
  if (released_) return;
  if (absl::Status released = Release(); !released.ok()) {
    spdlog::error("releasing the HSM token (the next start waits {} ms): {}",
                  options_.lease.count(), released.ToString());
  }
}

absl::Status TokenLease::Renew() {
  std::lock_guard lock(mu_);
  return RenewLocked();
}

absl::Status TokenLease::RenewLocked() {
  const auto began = BootNow();
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> found, hsm_->ReadTokenData(options_.label));
  // Unrenewed for a lease by the time the read returned, the claim may have been taken over
  // before the read was served: another claim beside it that outranks it then stands. Within
  // the first lease, another claim is a server that started at the same moment, and the
  // outranking one stands; so within a lease of a lapsed renewal, whose read-back may have
  // missed a taker's claim. Past all three, nothing should lie beside it but a write that
  // landed late (its writer may be gone): this one stands, and clears it.
  const bool lapsed = BootNow() - renewed_at_ >= options_.lease;
  const bool starting = began - acquired_at_ < options_.lease;
  const bool unsettled = began - lapsed_at_ < options_.lease;
  const auto [mine_found, others] = Sort(found);
  if (found.empty()) {
    // Not another server's: one would have written its own. Someone holding the PIN deleted it.
    spdlog::warn(
        "the claim on this HSM token ('{}') was deleted while this server held it; "
        "writing it again",
        options_.label);
  } else if (!mine_found) {
    return Lost(others, lapsed, starting);
  } else if (!others.empty()) {
    // Claimed side by side with another server (one of the two seeing the other's late), taken
    // over as it renewed, or a write that landed late: the standing claim's holder clears the
    // others.
    if ((lapsed || starting || unsettled) && StandingHolder(found) != holder_) {
      return Lost(others, lapsed, starting);
    }
    if (others != others_seen_) {  // once per claim, not per renewal
      spdlog::warn(
          "another custosd's claim ({}) lies beside this one's on the HSM token (written at the "
          "same moment, or late); this one's stands, and the other stops at its next renewal",
          HolderOf(others));
    }
  }
  others_seen_ = others;
  // Only over what was read: a server that took the claim over since (a lapsed one may be
  // taken at any moment) has written its own, which this write must not destroy. Counted before
  // the write: one that timed out may still land, and the next must differ.
  const absl::Status written = hsm_->ReplaceTokenData(options_.label, found, Encode(++beat_));
  if (absl::IsFailedPrecondition(written)) {
    return absl::UnavailableError("the claim changed as it was renewed; reading again");
  }
  CUSTOS_RETURN_IF_ERROR(written);
  if (lapsed || BootNow() - renewed_at_ >= options_.lease) {
    // Lapsed when it began, or since (a pause, a slow module): not trusted until read back. A
    // server taking the claim over may have written its own between this write's look and the
    // write itself. Its claim beside this one stands (an epoch later), and that server clears
    // this renewal once its own claim has settled. Read after that: a module may hide the
    // other's claim from this process until the next change (see Acquire), which is that one.
    std::this_thread::sleep_for(2 * options_.settle);
    CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> claimed, hsm_->ReadTokenData(options_.label));
    const Claims after = Sort(claimed);
    if (!after.mine || StandingHolder(claimed) != holder_) return TookOver(after.others);
    lapsed_at_ = began;
  }
  renewed_at_ = began;
  return absl::OkStatus();
}

absl::Status TokenLease::Confirm() {
  std::lock_guard lock(mu_);
  if (BootNow() - renewed_at_ < options_.lease / 2) return absl::OkStatus();
  return RenewLocked();
}

void TokenLease::KeepRenewed(std::function<void(const absl::Status&)> lost) {
  renewing_ = std::thread([this, lost = std::move(lost)] {
    const auto interval = options_.lease / 5;
    auto wait = interval;
    bool failing = false;  // logged when renewals start failing and when they succeed again
    std::unique_lock stop(stop_mu_);
    while (!stop_cv_.wait_for(stop, wait, [this] { return stopping_; })) {
      stop.unlock();
      const auto began = std::chrono::steady_clock::now();
      const absl::Status renewed = Renew();
      if (absl::IsAborted(renewed)) {
        lost(renewed);
        return;
      }
      if (!renewed.ok() && !failing) {
        spdlog::warn("cannot renew the claim on the HSM token (retrying): {}", renewed.ToString());
      } else if (renewed.ok() && failing) {
        spdlog::info("the claim on the HSM token is renewed again");
      }
      failing = !renewed.ok();
      // A renewal that failed slowly most likely left a call stuck in the module (answered at
      // the HSM call timeout, still inside): each retry while it hangs adds one, taking a
      // thread and a session from the calls custosd serves. Those back off, up to half a lease.
      const bool slow = std::chrono::steady_clock::now() - began >= interval / 2;
      wait = failing && slow ? std::min(wait * 2, options_.lease / 2) : interval;
      stop.lock();
    }
  });
}

void TokenLease::StopRenewing() {
  {
    std::lock_guard stop(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (renewing_.joinable()) renewing_.join();
}

absl::Status TokenLease::Release() {
  StopRenewing();
  std::lock_guard lock(mu_);
  released_ = true;
  // A renewal of this process's that timed out may land meanwhile: read again, a few times.
  for (int attempt = 0;; ++attempt) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> found, hsm_->ReadTokenData(options_.label));
    if (!AllMine(found)) return absl::OkStatus();  // not this process's to release
    // Only over this process's claim: one a server took over since stands.
    absl::Status released = hsm_->ReplaceTokenData(options_.label, found, Released(epoch_));
    if (!absl::IsFailedPrecondition(released) || attempt == 2) return released;
  }
}

}  // namespace custos::hsm
