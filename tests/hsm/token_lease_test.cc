// One server per token: the claim a starting server finds, waits out, or is refused by. Real
// SoftHSM2 tokens; "servers" are leases taken in this process with short timings.
#include "hsm/token_lease.h"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "hsm/faulty_hsm.h"
#include "tests/hsm/fault_control.h"
#include "tests/hsm/hsm_test_util.h"
#include "tests/support/raw_token.h"

namespace custos::testing {
namespace {

using namespace std::chrono_literals;
using hsm::TokenLease;

const TokenLease::Options kShort{.label = "custos-instance", .lease = 600ms, .poll = 50ms};

// The one claim on the token (there must be exactly one).
std::string OnlyClaim(hsm::Hsm& hsm) {
  const auto claims = hsm.ReadTokenData("custos-instance");
  REQUIRE(claims.ok());
  REQUIRE(claims->size() == 1);
  return claims->at(0);
}

TEST_CASE("A token claimed and renewed refuses a second server; released, it does not wait",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto first = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(first.ok());
  std::atomic<bool> stop{false};
  std::thread renewing([&] {
    while (!stop) {
      CHECK((*first)->Renew().ok());
      std::this_thread::sleep_for(100ms);
    }
  });
  const auto refused = TokenLease::Acquire(hsm.get(), kShort);
  stop = true;
  renewing.join();
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(refused.status().message()),
             Catch::Contains("holds this HSM token: it renewed its claim while this one waited"));
  CHECK((*first)->Renew().ok());  // the refused one wrote nothing

  REQUIRE((*first)->Release().ok());
  const auto started = std::chrono::steady_clock::now();
  auto next = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(next.ok());
  CHECK(std::chrono::steady_clock::now() - started < kShort.lease);
  CHECK(hsm->ReadTokenData("custos-instance")->size() == 1);
  CHECK((*next)->taken_over_state().empty());  // released: nothing taken over
}

TEST_CASE("A claim left unrenewed is taken over after a lease, and its holder told",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  TokenLease::Options with_state = kShort;
  with_state.state = [] { return std::string("7 abc\n"); };  // one line, whatever it says
  auto stalled = TokenLease::Acquire(hsm.get(), with_state);
  REQUIRE(stalled.ok());
  REQUIRE((*stalled)->Renew().ok());
  const auto started = std::chrono::steady_clock::now();
  auto taker = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(taker.ok());
  CHECK(std::chrono::steady_clock::now() - started >= kShort.lease);
  CHECK((*taker)->taken_over_state() == "7 abc");  // what the last renewal said
  CHECK((*taker)->taken_over_from().ends_with(":" + std::to_string(::getpid())));
  const absl::Status lost = (*stalled)->Renew();
  CHECK(lost.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(lost.message()), Catch::Contains("took this HSM token over"));
  // The old holder neither renews over the new claim nor releases it.
  CHECK((*stalled)->Release().ok());
  CHECK((*taker)->Renew().ok());
}

// One server of "Servers starting at the same moment", in a process of its own (as servers
// are: one module instance each): opens the token the environment names, waits for the
// agreed instant, claims, and prints the outcome; a server that took the token holds it,
// renewing, for a few leases.
TEST_CASE("(a server starting at an agreed instant)", "[.][lease_contender]") {
  const char* label = std::getenv("CUSTOS_CONTENDER_TOKEN");
  const char* at = std::getenv("CUSTOS_CONTENDER_START_MS");
  REQUIRE(label != nullptr);
  REQUIRE(at != nullptr);
  const auto open = [&] {
    hsm::Pkcs11Options options;
    options.module_path = kSoftHsmModule;
    options.token_label = label;
    options.pin = SecureBytes::FromString("1234-test-pin");
    return hsm::OpenPkcs11Hsm(std::move(options));
  };
  // Processes opening one SoftHSM2 token at once: one may meet the others mid-write
  // (a server would be restarted); the claim is what is tested.
  auto hsm = open();
  for (int retry = 0; retry < 5 && !hsm.ok(); ++retry) {
    std::this_thread::sleep_for(100ms);
    hsm = open();
  }
  INFO(hsm.status().ToString());
  REQUIRE(hsm.ok());
  std::this_thread::sleep_until(std::chrono::system_clock::time_point(
      std::chrono::milliseconds(std::strtoll(at, nullptr, 10))));
  auto lease = TokenLease::Acquire(hsm->get(), kShort);
  if (!lease.ok()) {
    std::printf("contender: refused %s\n", lease.status().ToString().c_str());
    return;
  }
  std::printf("contender: took the token\n");
  std::fflush(stdout);
  (*lease)->KeepRenewed([](const absl::Status& lost) {
    std::printf("contender: lost %s\n", lost.ToString().c_str());
  });
  std::this_thread::sleep_for(kShort.lease * 3);
  CHECK((*lease)->Release().ok());
}

TEST_CASE("Servers starting at the same moment: exactly one takes the token", "[token_lease]") {
  SoftHsmToken token;
  OpenHsm(token);  // the token's first objects, before any contender
  for (int round = 0; round < 4; ++round) {
    INFO("round " << round);
    const auto start = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch()) +
                       std::chrono::milliseconds(1500);  // each has opened the module by then
    const std::string command = "CUSTOS_CONTENDER_TOKEN='" + token.label() +
                                "' CUSTOS_CONTENDER_START_MS=" + std::to_string(start.count()) +
                                " /proc/" + std::to_string(::getpid()) +
                                "/exe '[lease_contender]' 2>&1";
    constexpr int kServers = 2;
    std::vector<FILE*> servers;
    for (int i = 0; i < kServers; ++i) servers.push_back(::popen(command.c_str(), "r"));
    int holding = 0;  // took the token and kept it
    for (FILE* server : servers) {
      REQUIRE(server != nullptr);
      std::string output;
      char buffer[512];
      while (std::fgets(buffer, sizeof(buffer), server) != nullptr) output += buffer;
      CHECK(::pclose(server) == 0);
      INFO(output);
      if (absl::StrContains(output, "contender: refused")) {
        CHECK((absl::StrContains(output,
                                 "contender: refused FAILED_PRECONDITION: another "
                                 "custosd (") &&
               (absl::StrContains(output, "claimed this HSM token at the same moment") ||
                absl::StrContains(output, "it renewed its claim while this one waited"))));
      } else if (absl::StrContains(output, "contender: lost")) {
        // Took it, while the module showed it the other's claim only after (SoftHSM2 may),
        // and stopped at its first renewal.
        CHECK(absl::StrContains(output, "contender: lost ABORTED: another custosd ("));
        CHECK(absl::StrContains(output,
                                "claimed this HSM token at the same moment, and its "
                                "claim stands"));
      } else {
        CHECK(absl::StrContains(output, "contender: took the token"));
        ++holding;
      }
    }
    CHECK(holding == 1);
  }
}

TEST_CASE(
    "A claim renewed on its own thread keeps the token; one that stalled learns it lost "
    "the token before it writes",
    "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto holder = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(holder.ok());
  // Just renewed: confirmed without asking the token.
  faulty.SetDown(true);
  CHECK((*holder)->Confirm().ok());
  faulty.SetDown(false);

  std::atomic<int> lost{0};
  (*holder)->KeepRenewed([&](const absl::Status&) { ++lost; });
  std::this_thread::sleep_for(kShort.lease * 2);  // nobody calls: the thread renews
  CHECK(TokenLease::Acquire(hsm.get(), kShort).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  CHECK((*holder)->Confirm().ok());
  CHECK(lost == 0);
  REQUIRE((*holder)->Release().ok());  // stops renewing

  // A holder stopped for a lease: another takes the token over, and the first's next Confirm
  // (before it would sign or write the head) finds that out.
  auto stalled = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(stalled.ok());
  auto taker = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(taker.ok());
  CHECK(!(*taker)->taken_over_from().empty());
  const absl::Status confirmed = (*stalled)->Confirm();
  CHECK(confirmed.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(confirmed.message()), Catch::Contains("took this HSM token over"));
}

// No compare-and-swap: each side's write could destroy the other's claim. Both write only over
// the claim they read (looked at again in the call that writes), and a holder renewing a lapsed
// claim reads its renewal back before it trusts it.
TEST_CASE(
    "A holder back as its token is taken over keeps it: the taker writes only over what it watched",
    "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto stalled = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(stalled.ok());
  // It comes back while the taker checks its state (custosd reads its database then).
  TokenLease::Options taker_options = kShort;
  absl::Status back;
  taker_options.may_take_over = [&](const std::string&, const std::string&) {
    back = (*stalled)->Renew();
    return absl::OkStatus();
  };
  auto taker = TokenLease::Acquire(hsm.get(), taker_options);
  CHECK(back.ok());
  CHECK(taker.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(taker.status().message()),
             Catch::Contains("holds this HSM token: it renewed its claim while this one waited"));
  CHECK((*stalled)->Confirm().ok());
  CHECK((*stalled)->Renew().ok());
  CHECK(hsm->ReadTokenData("custos-instance")->size() == 1);
}

TEST_CASE("A taker whose holder came back and then stopped cleanly takes the freed token",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto stalled = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(stalled.ok());
  TokenLease::Options taker_options = kShort;
  absl::Status back, stopped;
  taker_options.may_take_over = [&](const std::string&, const std::string&) {
    back = (*stalled)->Renew();
    stopped = (*stalled)->Release();
    return absl::OkStatus();
  };
  auto taker = TokenLease::Acquire(hsm.get(), taker_options);
  CHECK(back.ok());
  CHECK(stopped.ok());
  INFO(taker.status().ToString());
  REQUIRE(taker.ok());
  CHECK(hsm->ReadTokenData("custos-instance")->size() == 1);
  CHECK((*taker)->Renew().ok());
}

TEST_CASE("A taker that meets a release written since it watched claims past its epoch",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto stalled = TokenLease::Acquire(hsm.get(), kShort);  // epoch 1
  REQUIRE(stalled.ok());
  TokenLease::Options taker_options = kShort;
  taker_options.may_take_over = [&](const std::string&, const std::string&) {
    // Its holder came back, stopped, started again a few times, and stopped cleanly.
    return hsm->WriteTokenData("custos-instance", "custos-lease-v1\nreleased\nepoch=6\n");
  };
  auto taker = TokenLease::Acquire(hsm.get(), taker_options);
  INFO(taker.status().ToString());
  REQUIRE(taker.ok());
  CHECK_THAT(OnlyClaim(*hsm), Catch::Contains("\nepoch=7\n"));
}

TEST_CASE("An epoch past the count (forged) is read as none; past the last, the count wraps to 1",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  REQUIRE(hsm->WriteTokenData("custos-instance",
                              "custos-lease-v1\nreleased\nepoch=18446744073709551615\n")
              .ok());
  auto lease = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(lease.ok());
  CHECK_THAT(OnlyClaim(*hsm), Catch::Contains("\nepoch=1\n"));
  CHECK((*lease)->Renew().ok());
  REQUIRE((*lease)->Release().ok());

  // The last epoch: the next claim counts from 1 again, writing no epoch out of bounds, and a
  // take-over of it counts on.
  REQUIRE(hsm->WriteTokenData("custos-instance",
                              "custos-lease-v1\nreleased\nepoch=4611686018427387903\n")
              .ok());
  auto stalled = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(stalled.ok());
  CHECK_THAT(OnlyClaim(*hsm), Catch::Contains("\nepoch=1\n"));
  auto taker = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(taker.ok());
  CHECK_THAT(OnlyClaim(*hsm), Catch::Contains("\nepoch=2\n"));
  CHECK((*stalled)->Renew().code() == absl::StatusCode::kAborted);
  CHECK((*taker)->Renew().ok());
  REQUIRE((*taker)->Release().ok());

  // Two releases (one landed late) beside epoch 1's, each in either order. Across the wrap, 1 is
  // the latest. 2^61 is as far ahead of 1 as an epoch can be and still follow it: it is the
  // latest; 2^61 + 1 is one further, so 1 follows it.
  struct Beside {
    const char* epoch;
    const char* next;
  };
  for (const Beside beside :
       {Beside{"4611686018427387903", "2"}, Beside{"2305843009213693952", "2305843009213693953"},
        Beside{"2305843009213693953", "2"}}) {
    for (const bool first_written : {true, false}) {
      INFO("epoch " << beside.epoch << "'s release " << (first_written ? "first" : "second"));
      const std::string other =
          absl::StrCat("custos-lease-v1\nreleased\nepoch=", beside.epoch, "\n");
      const std::string one = "custos-lease-v1\nreleased\nepoch=1\n";
      REQUIRE(hsm->WriteTokenData("custos-instance", first_written ? other : one).ok());
      RawToken(token).CreateData("custos-instance", first_written ? one : other);
      auto after = TokenLease::Acquire(hsm.get(), kShort);
      REQUIRE(after.ok());
      CHECK_THAT(OnlyClaim(*hsm), Catch::Contains(absl::StrCat("\nepoch=", beside.next, "\n")));
      REQUIRE((*after)->Release().ok());
    }
  }
}

TEST_CASE("A holder renewing a lapsed claim as another takes it over stops, and writes no more",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto stalled = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(stalled.ok());
  std::this_thread::sleep_for(kShort.lease + 50ms);  // lapsed
  // The taker's claim lands while the holder's renewal settles, destroying the renewal (as a
  // taker's write destroys the claim it took over).
  const std::string taker_claim = "custos-lease-v1\nholder=ff taker:1\nepoch=2\nbeat=0\nstate=\n";
  const auto after_the_write = [&] {
    faulty.BeforeNextCallTo("ReadTokenData", [&] {
      std::vector<std::string> values = *hsm->ReadTokenData("custos-instance");
      REQUIRE(values.size() == 1);  // the renewal
      REQUIRE(hsm->WriteTokenData("custos-instance", taker_claim).ok());
    });
  };
  faulty.BeforeNextCallTo("ReplaceTokenData", after_the_write);  // whichever call writes
  faulty.BeforeNextCallTo("WriteTokenData", after_the_write);
  const absl::Status renewed = (*stalled)->Renew();
  CHECK(renewed.code() == absl::StatusCode::kAborted);
  CHECK(renewed.message() ==
        "another custosd (taker:1) took this HSM token over while this one did not renew its "
        "claim for a lease");
  // Its next Confirm (before it would sign or write the head) does not trust the renewal.
  CHECK((*stalled)->Confirm().code() == absl::StatusCode::kAborted);
  CHECK(*hsm->ReadTokenData("custos-instance") == std::vector<std::string>{taker_claim});
  faulty.BeforeNextCallTo("WriteTokenData", nullptr);  // unused: disarmed before the release
}

TEST_CASE("A holder renewing a lapsed claim leaves a claim written since its read alone",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto stalled = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(stalled.ok());
  std::this_thread::sleep_for(kShort.lease + 50ms);  // lapsed
  // The taker's claim lands between the holder's read and its write (whichever call writes).
  const std::string taker_claim = "custos-lease-v1\nholder=00 taker:1\nepoch=2\nbeat=0\nstate=\n";
  const auto take_over = [&] { REQUIRE(hsm->WriteTokenData("custos-instance", taker_claim).ok()); };
  faulty.BeforeNextCallTo("ReplaceTokenData", take_over);
  faulty.BeforeNextCallTo("WriteTokenData", take_over);
  const absl::Status renewed = (*stalled)->Renew();
  CHECK(renewed.code() == absl::StatusCode::kUnavailable);
  CHECK(renewed.message() == "the claim changed as it was renewed; reading again");
  CHECK(*hsm->ReadTokenData("custos-instance") == std::vector<std::string>{taker_claim});
  const absl::Status next = (*stalled)->Renew();
  CHECK(next.code() == absl::StatusCode::kAborted);
  CHECK(next.message() ==
        "another custosd (taker:1) took this HSM token over while this one did not renew its "
        "claim for a lease");
  CHECK(*hsm->ReadTokenData("custos-instance") == std::vector<std::string>{taker_claim});
  faulty.BeforeNextCallTo("WriteTokenData", nullptr);  // unused: disarmed before the release
}

TEST_CASE("A holder stopping as another takes its claim over leaves the new claim standing",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto stopping = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(stopping.ok());
  const std::string taker_claim = "custos-lease-v1\nholder=00 taker:1\nepoch=2\nbeat=0\nstate=\n";
  // Between its read and its write, whichever call writes.
  const auto take_over = [&] { REQUIRE(hsm->WriteTokenData("custos-instance", taker_claim).ok()); };
  faulty.BeforeNextCallTo("ReplaceTokenData", take_over);
  faulty.BeforeNextCallTo("WriteTokenData", take_over);
  CHECK((*stopping)->Release().ok());
  CHECK(*hsm->ReadTokenData("custos-instance") == std::vector<std::string>{taker_claim});
  faulty.BeforeNextCallTo("WriteTokenData", nullptr);  // unused: disarmed
}

// Renews `lease` every 100 ms until it is past its first lease (no longer "starting").
// Ends on a renewal, so that what the caller does next meets a claim renewed just now.
void RenewPastFirstLease(TokenLease& lease) {
  const auto until = std::chrono::steady_clock::now() + kShort.lease + 100ms;
  while (std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(100ms);
    REQUIRE(lease.Renew().ok());
  }
}

std::vector<std::string> Sorted(std::vector<std::string> values) {
  std::sort(values.begin(), values.end());
  return values;
}

// A server taking the claim over whose call timed out (it exited) while the module went on:
// its write lands beside a holder that renewed all along. Nobody would hold the token if the
// holder yielded to it.
TEST_CASE("A holder past its first lease clears a claim of a later epoch that landed beside it",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  auto holder = TokenLease::Acquire(hsm.get(), kShort);  // epoch 1
  REQUIRE(holder.ok());
  RenewPastFirstLease(**holder);  // never lapsed, and past the first lease
  raw.CreateData("custos-instance", "custos-lease-v1\nholder=ff taker:1\nepoch=2\nbeat=0\n");
  REQUIRE(hsm->ReadTokenData("custos-instance")->size() == 2);
  CHECK((*holder)->Renew().ok());
  CHECK_THAT(OnlyClaim(*hsm), Catch::Contains("\nepoch=1\n"));
  CHECK((*holder)->Renew().ok());
}

// A lapsed renewal's read-back may miss a taker's claim that crossed it (a module slower than
// `settle`): the taker's claim shows at a later renewal, and still stands.
TEST_CASE("A holder whose lapsed renewal missed a taker's claim yields to it at the next",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  auto holder = TokenLease::Acquire(hsm.get(), kShort);  // epoch 1
  REQUIRE(holder.ok());
  RenewPastFirstLease(**holder);
  std::this_thread::sleep_for(kShort.lease + 50ms);
  REQUIRE((*holder)->Renew().ok());  // lapsed, read back alone
  raw.CreateData("custos-instance", "custos-lease-v1\nholder=00 taker:1\nepoch=2\nbeat=0\n");
  const auto before = Sorted(hsm->ReadTokenData("custos-instance").value());
  REQUIRE(before.size() == 2);
  const absl::Status lost = (*holder)->Renew();
  CHECK(lost.code() == absl::StatusCode::kAborted);
  CHECK(lost.message() ==
        "another custosd (taker:1) holds this HSM token: its claim stands over this one's");
  CHECK(Sorted(hsm->ReadTokenData("custos-instance").value()) == before);
}

// A renewal that began just inside a lease, its read served late (a slow module) after a taker
// wrote: lapsed, by the time it knows what it read.
TEST_CASE("A renewal whose read returns past a lease yields to a taker's claim it shows",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  RawToken raw(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto holder = TokenLease::Acquire(&faulty, kShort);  // epoch 1
  REQUIRE(holder.ok());
  RenewPastFirstLease(**holder);
  std::this_thread::sleep_for(kShort.lease - 150ms);
  faulty.BeforeNextCallTo("ReadTokenData", [&] {
    std::this_thread::sleep_for(250ms);
    raw.CreateData("custos-instance", "custos-lease-v1\nholder=00 taker:1\nepoch=2\nbeat=0\n");
  });
  const absl::Status lost = (*holder)->Renew();
  CHECK(lost.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(lost.message()), Catch::Contains("(taker:1) took this HSM token over"));
  CHECK(hsm->ReadTokenData("custos-instance")->size() == 2);  // nothing written
}

// A renewal stuck inside the module (past the HSM call timeout) may land after its holder lost
// the token, after the next holder released it, and after a third server claimed it.
TEST_CASE("A claim a late write left beside the holder's, from before a release, is cleared",
          "[token_lease]") {
  const bool lapsed = GENERATE(false, true);  // the holder's own renewals late too, or not
  INFO("lapsed " << lapsed);
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  {
    auto before = TokenLease::Acquire(hsm.get(), kShort);  // epoch 1
    REQUIRE(before.ok());
    REQUIRE((*before)->Release().ok());  // released at epoch 1
  }
  RawToken raw(token);
  auto holder = TokenLease::Acquire(hsm.get(), kShort);  // epoch 2
  REQUIRE(holder.ok());
  RenewPastFirstLease(**holder);
  // The greatest holder id: only its epoch puts it below the holder's.
  raw.CreateData("custos-instance", "custos-lease-v1\nholder=ff stale:1\nepoch=1\nbeat=9\n");
  REQUIRE(hsm->ReadTokenData("custos-instance")->size() == 2);
  if (lapsed) std::this_thread::sleep_for(kShort.lease + 50ms);
  CHECK((*holder)->Renew().ok());
  CHECK_THAT(OnlyClaim(*hsm), Catch::Contains("\nepoch=2\n"));
  CHECK((*holder)->Renew().ok());
}

TEST_CASE("A claim from before epochs beside a lapsed holder's stands over it", "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  auto holder = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(holder.ok());
  RawToken raw(token);
  // An older custosd taking the lapsed claim over as it renews, the two writes crossing; the
  // least holder id: only its missing epoch puts it above the holder's.
  raw.CreateData("custos-instance", "custos-lease-v1\nholder=00 older:1\nbeat=0\nstate=\n");
  const auto before = Sorted(hsm->ReadTokenData("custos-instance").value());
  REQUIRE(before.size() == 2);
  std::this_thread::sleep_for(kShort.lease + 50ms);  // lapsed
  const absl::Status lost = (*holder)->Renew();
  CHECK(lost.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(lost.message()), Catch::Contains("(older:1) took this HSM token over"));
  CHECK(Sorted(hsm->ReadTokenData("custos-instance").value()) == before);
}

// A renewal that timed out (answered at the HSM call timeout) may still land inside the module.
TEST_CASE("A holder stopping as a renewal of its own lands late still releases the claim",
          "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto stopping = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(stopping.ok());
  // Between its read and its write: this process's claim, renewed (same holder, a later beat).
  faulty.BeforeNextCallTo("ReplaceTokenData", [&] {
    const std::string claim = hsm->ReadTokenData("custos-instance")->at(0);
    REQUIRE(hsm->WriteTokenData("custos-instance", claim + "late\n").ok());
  });
  CHECK((*stopping)->Release().ok());
  const auto started = std::chrono::steady_clock::now();
  auto next = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(next.ok());
  CHECK(std::chrono::steady_clock::now() - started < kShort.lease);  // released: no wait
  CHECK((*next)->taken_over_from().empty());
}

// PKCS#11 has no compare-and-swap: a lapsed holder renewing and a server taking its claim over
// may both look at the token before either writes, and both write. The taker's claim stands
// (it counts one take-over more), and the holder stops. Run four times: the two claims' random
// ids once decided which stood, and half the runs stopped both servers.
TEST_CASE("A lapsed holder and its taker writing at once: the taker stands, the holder stops",
          "[token_lease][fault_module]") {
  // At the wrap, the holder claims the last epoch (after a forged release) and the taker 1.
  const bool at_wrap = GENERATE(false, true);
  const int run = GENERATE(range(0, 4));
  INFO("run " << run << (at_wrap ? ", at the wrap" : ""));
  SoftHsmToken token;
  FaultControl control;
  hsm::Pkcs11Options options = OptionsFor(token);
  options.module_path = CUSTOS_FAULT_MODULE_PATH;  // to hold both writes back
  auto hsm = hsm::OpenPkcs11Hsm(std::move(options));
  REQUIRE(hsm.ok());
  if (at_wrap) {
    REQUIRE((*hsm)
                ->WriteTokenData("custos-instance",
                                 "custos-lease-v1\nreleased\nepoch=4611686018427387902\n")
                .ok());
  }
  auto holder = TokenLease::Acquire(hsm->get(), kShort);
  REQUIRE(holder.ok());
  if (at_wrap) CHECK_THAT(OnlyClaim(**hsm), Catch::Contains("\nepoch=4611686018427387903\n"));
  control.Set("C_CreateObject hang\n");  // each write waits after its look
  Finally unhang([&] { control.Remove(); });
  absl::StatusOr<std::unique_ptr<TokenLease>> taker = absl::UnknownError("not run");
  std::thread taking([&] { taker = TokenLease::Acquire(hsm->get(), kShort); });
  std::this_thread::sleep_for(kShort.lease + 100ms);  // lapsed; the taker has waited a lease
  absl::Status renewed;
  std::thread renewing([&] { renewed = (*holder)->Renew(); });
  const auto deadline = std::chrono::steady_clock::now() + 1500ms;
  while (control.Count("hanging C_CreateObject") < 2 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  const int both_looked = control.Count("hanging C_CreateObject");
  control.Remove();
  taking.join();
  renewing.join();
  REQUIRE(both_looked == 2);
  INFO(taker.status().ToString());
  REQUIRE(taker.ok());
  CHECK(renewed.code() == absl::StatusCode::kAborted);
  CHECK_THAT(std::string(renewed.message()), Catch::Contains("took this HSM token over"));
  CHECK((*taker)->Renew().ok());
  CHECK_THAT(OnlyClaim(**hsm), Catch::Contains(at_wrap ? "\nepoch=1\n" : "\nepoch=2\n"));
  CHECK((*holder)->Release().ok());  // leaves the taker's claim
  CHECK((*taker)->Renew().ok());
}

// Lapses are likeliest when the HSM is slow: a renewal must not need a fast one to succeed.
TEST_CASE("A lapsed claim is renewed again however slowly the HSM reads", "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto holder = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(holder.ok());
  std::this_thread::sleep_for(kShort.lease + 50ms);  // lapsed
  std::function<void()> slow_read;
  slow_read = [&] {
    std::this_thread::sleep_for(250ms);  // past the 100 ms settle
    faulty.BeforeNextCallTo("ReadTokenData", slow_read);
  };
  faulty.BeforeNextCallTo("ReadTokenData", slow_read);
  CHECK((*holder)->Renew().ok());
  CHECK((*holder)->Confirm().ok());
  faulty.BeforeNextCallTo("ReadTokenData", nullptr);
  CHECK(hsm->ReadTokenData("custos-instance")->size() == 1);
}

TEST_CASE(
    "Renewals that fail slowly (calls left stuck in the module) back off to half a lease; "
    "fast failures and recovery renew at the usual pace",
    "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  hsm::FaultyHsm faulty(hsm.get());
  auto holder = TokenLease::Acquire(&faulty, kShort);
  REQUIRE(holder.ok());

  // Each renewal begins with one read of the claim: its start times show the pace.
  std::mutex mu;
  std::vector<std::chrono::steady_clock::time_point> reads;
  std::atomic<bool> slow{false};
  std::function<void()> watch;
  watch = [&] {
    {
      std::lock_guard lock(mu);
      reads.push_back(std::chrono::steady_clock::now());
    }
    if (slow) std::this_thread::sleep_for(80ms);  // past half the renewal interval (120 ms)
    faulty.BeforeNextCallTo("ReadTokenData", watch);
  };
  faulty.BeforeNextCallTo("ReadTokenData", watch);
  // The shortest gap between two reads among the last `n`, after `phase`.
  const auto shortest_gap = [&](std::chrono::milliseconds phase, size_t n) {
    {
      std::lock_guard lock(mu);
      reads.clear();
    }
    std::this_thread::sleep_for(phase);
    std::lock_guard lock(mu);
    REQUIRE(reads.size() >= n);
    auto shortest = std::chrono::steady_clock::duration::max();
    for (size_t i = reads.size() - n + 1; i < reads.size(); ++i) {
      shortest = std::min(shortest, reads[i] - reads[i - 1]);
    }
    return std::chrono::duration_cast<std::chrono::milliseconds>(shortest);
  };

  std::atomic<int> lost{0};
  (*holder)->KeepRenewed([&](const absl::Status&) { ++lost; });
  const auto healthy = shortest_gap(700ms, 4);
  CHECK(healthy >= 110ms);  // every lease / 5
  CHECK(healthy < 250ms);

  faulty.SetDown(true);  // failing at once: retried at the usual pace
  const auto fast = shortest_gap(700ms, 4);
  CHECK(fast < 250ms);

  slow = true;  // failing after 80 ms each: waits double up to half a lease (300 ms)
  std::this_thread::sleep_for(1s);  // 240, then 300
  const auto backed_off = shortest_gap(1500ms, 3);
  CHECK(backed_off >= 370ms);  // 300 ms of waiting and the 80 ms call
  slow = false;

  faulty.SetDown(false);  // the module answers again: back to the usual pace, the token kept
  std::this_thread::sleep_for(400ms);
  const auto recovered = shortest_gap(700ms, 4);
  CHECK(recovered < 250ms);
  CHECK(lost == 0);
  CHECK((*holder)->Confirm().ok());
  REQUIRE((*holder)->Release().ok());
}

TEST_CASE(
    "A claim its process never released (a start that failed after taking it) is released "
    "when dropped",
    "[token_lease]") {
  SoftHsmToken token;
  auto hsm = OpenHsm(token);
  {
    auto dropped = TokenLease::Acquire(hsm.get(), kShort);
    REQUIRE(dropped.ok());
    (*dropped)->KeepRenewed([](const absl::Status&) {});
  }
  const auto started = std::chrono::steady_clock::now();
  auto next = TokenLease::Acquire(hsm.get(), kShort);
  REQUIRE(next.ok());
  CHECK(std::chrono::steady_clock::now() - started < kShort.lease);
  CHECK((*next)->taken_over_from().empty());
}

}  // namespace
}  // namespace custos::testing
