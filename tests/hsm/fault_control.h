// Helpers for hsm/ tests that drive the fault-injection PKCS#11 module (tests/fault_module):
// FaultControl points the module at a control file and a log of this test's own and edits
// them; Finally runs clean-up (releasing a hung call, joining its thread) even if a check threw.
#pragma once

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>

#include "tests/support/files.h"
#include "tests/support/temp_dir.h"

namespace custos::testing {

// Points the shim at a control file and a log in a TempDir (it reads the variables at
// C_Initialize, so this must exist before the module is loaded), and unsets them afterwards.
class FaultControl {
 public:
  FaultControl() : control_(dir_.File("control")), log_(dir_.File("log")) {
    setenv("CUSTOS_FAULT_CONTROL", control_.c_str(), 1);
    setenv("CUSTOS_FAULT_LOG", log_.c_str(), 1);
  }
  ~FaultControl() {
    unsetenv("CUSTOS_FAULT_CONTROL");
    unsetenv("CUSTOS_FAULT_LOG");
  }
  FaultControl(const FaultControl&) = delete;
  FaultControl& operator=(const FaultControl&) = delete;

  // Replaces the rules atomically, as the shim expects: a new file renamed over the old one.
  void Set(const std::string& rules) {
    const std::string temp = dir_.File("control.tmp");
    {
      std::ofstream out(temp, std::ios::trunc);
      out << rules;
      REQUIRE(out.good());
    }
    REQUIRE(std::rename(temp.c_str(), control_.c_str()) == 0);
  }
  void Remove() { std::remove(control_.c_str()); }

  std::string Log() const { return ReadFile(log_); }
  // How many times `line` appears as a whole line in the log.
  int Count(const std::string& line) const {
    std::istringstream log(Log());
    int count = 0;
    for (std::string entry; std::getline(log, entry);) count += entry == line ? 1 : 0;
    return count;
  }
  bool WaitFor(const std::string& line, std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (Count(line) == 0) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
  }

 private:
  TempDir dir_;
  std::string control_;
  std::string log_;
};

// Runs a function when the scope ends, even if a REQUIRE threw.
class Finally {
 public:
  explicit Finally(std::function<void()> f) : f_(std::move(f)) {}
  ~Finally() { f_(); }
  Finally(const Finally&) = delete;
  Finally& operator=(const Finally&) = delete;

 private:
  std::function<void()> f_;
};

}  // namespace custos::testing
