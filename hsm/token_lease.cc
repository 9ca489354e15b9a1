#include "hsm/token_lease.h"

#include <openssl/rand.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace custos::hsm {
namespace {

constexpr char kHeader[] = "custos-lease-v1\n";
constexpr char kHolder[] = "holder=";

std::string Released() { return absl::StrCat(kHeader, "released\n"); }

bool AllReleased(const std::vector<std::string>& values) {
  return std::all_of(values.begin(), values.end(),
                     [](const std::string& v) { return v == Released(); });
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

}  // namespace

TokenLease::TokenLease(Hsm* hsm, Options options, std::string holder)
    : hsm_(hsm), options_(std::move(options)), holder_(std::move(holder)) {}

std::string TokenLease::Mine() const { return absl::StrCat(kHeader, kHolder, holder_, "\n"); }

bool TokenLease::AllMine(const std::vector<std::string>& values) const {
  const std::string mine = Mine();
  return std::all_of(values.begin(), values.end(),
                     [&](const std::string& v) { return v.rfind(mine, 0) == 0; });
}

std::string TokenLease::Encode(uint64_t beat) const {
  std::string state = options_.state ? options_.state() : "";
  state.erase(std::remove(state.begin(), state.end(), '\n'), state.end());
  return absl::StrCat(Mine(), "beat=", beat, "\nstate=", state, "\n");
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
      if (now != found) {
        return absl::FailedPreconditionError(absl::StrCat(
            "another custosd (", HolderOf(now),
            ") holds this HSM token: it renewed its claim while this one waited. Two servers "
            "on one token would fork the audit log; stop the other one first, or give this "
            "one a token of its own"));
      }
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
  const std::string claim = lease->Encode(0);
  CUSTOS_RETURN_IF_ERROR(hsm->WriteTokenData(o.label, claim));
  // Two servers starting at once may both have found the token free: each reads back.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> claimed, hsm->ReadTokenData(o.label));
  if (claimed != std::vector<std::string>{claim}) {
    return absl::FailedPreconditionError(
        absl::StrCat("another custosd (", HolderOf(claimed),
                     ") claimed this HSM token at the same moment; start one server only"));
  }
  return lease;
}

absl::Status TokenLease::Renew() {
  std::lock_guard lock(mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> found, hsm_->ReadTokenData(options_.label));
  if (!AllMine(found)) {
    return absl::AbortedError(absl::StrCat(
        "another custosd (", AllReleased(found) ? "one that has stopped since" : HolderOf(found),
        ") took this HSM token over while this one did not renew its claim for a lease"));
  }
  // Counted before the write: one that timed out may still land, and the next must differ.
  return hsm_->WriteTokenData(options_.label, Encode(++beat_));
}

absl::Status TokenLease::Release() {
  std::lock_guard lock(mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> found, hsm_->ReadTokenData(options_.label));
  if (!AllMine(found)) return absl::OkStatus();  // not this process's to release
  return hsm_->WriteTokenData(options_.label, Released());
}

}  // namespace custos::hsm
