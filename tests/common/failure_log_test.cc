#include "common/failure_log.h"

#include <catch2/catch.hpp>
#include <chrono>
#include <sstream>
#include <string>
#include <thread>

#include "tests/support/captured_log.h"

namespace custos {
namespace {

using custos::testing::CapturedLog;

size_t Lines(const std::string& text) {
  return static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
}

TEST_CASE("A failure period logs its start once, summaries at most per interval, and its end",
          "[failure_log]") {
  CapturedLog log;
  FailureLog failures("HSM", std::chrono::milliseconds(200));
  failures.Succeeded();  // nothing failing: nothing said
  CHECK(log.text().empty());

  for (int i = 0; i < 50; ++i) failures.Failed(absl::UnavailableError("device error"));
  CHECK(failures.failing());
  CHECK(log.text() == "error HSM failing: UNAVAILABLE: device error\n");

  std::this_thread::sleep_for(std::chrono::milliseconds(250));
  for (int i = 0; i < 10; ++i) failures.Failed(absl::UnavailableError("token not present"));
  CHECK(Lines(log.text()) == 2);
  CHECK_THAT(log.text(), Catch::Contains("error HSM still failing after 0 s: 50 calls failed since "
                                         "the last report; last error: UNAVAILABLE: token not "
                                         "present"));

  failures.Succeeded();
  failures.Succeeded();
  CHECK_FALSE(failures.failing());
  CHECK(Lines(log.text()) == 3);
  CHECK_THAT(log.text(), Catch::EndsWith("info HSM working again after 0 s; 60 calls failed "
                                         "meanwhile\n"));

  // A new period starts afresh.
  failures.Failed(absl::UnavailableError("again"));
  CHECK_THAT(log.text(), Catch::EndsWith("error HSM failing: UNAVAILABLE: again\n"));
}

}  // namespace
}  // namespace custos
