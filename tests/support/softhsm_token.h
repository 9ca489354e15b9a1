// SoftHsmToken: a real SoftHSM2 token initialised in a temporary directory for one test.
//
// Writes a softhsm2.conf under the directory, points SOFTHSM2_CONF at it (process-wide), and
// initialises a token with softhsm2-util. Tests then open it through the real PKCS#11 module.
#pragma once

#include <string>

#include "tests/support/temp_dir.h"

namespace custos::testing {

inline constexpr char kSoftHsmModule[] = "/usr/lib/softhsm/libsofthsm2.so";

class SoftHsmToken {
 public:
  explicit SoftHsmToken(std::string label = "custos-test");

  const std::string& label() const { return label_; }
  const std::string& pin() const { return pin_; }
  const std::string& dir() const { return dir_.path(); }

 private:
  TempDir dir_;
  std::string label_;
  std::string pin_ = "1234-test-pin";
};

}  // namespace custos::testing
