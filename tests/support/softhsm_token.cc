#include "tests/support/softhsm_token.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace custos::testing {

SoftHsmToken::SoftHsmToken(std::string label) : label_(std::move(label)) {
  std::filesystem::create_directories(dir_.File("tokens"));
  const std::string conf = dir_.File("softhsm2.conf");
  std::ofstream(conf) << "directories.tokendir = " << dir_.File("tokens") << "\n"
                      << "objectstore.backend = file\nlog.level = ERROR\n";
  setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  const std::string cmd = "softhsm2-util --init-token --free --label '" + label_ + "' --pin '" +
                          pin_ + "' --so-pin '" + pin_ + "-so' >/dev/null";
  if (std::system(cmd.c_str()) != 0) throw std::runtime_error("softhsm2-util --init-token failed");
}

}  // namespace custos::testing
