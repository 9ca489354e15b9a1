// Small file and process helpers shared by the tests and the benchmark.
#pragma once

#include <string>

namespace custos::testing {

// The whole file, bytes as they are; "" if it cannot be read.
std::string ReadFile(const std::string& path);

// Runs `command` with /bin/sh; throws std::runtime_error naming it unless it exits 0.
void RunOrThrow(const std::string& command);

}  // namespace custos::testing
