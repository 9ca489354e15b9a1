// Small file and process helpers shared by the tests and the benchmark.
#pragma once

#include <cstddef>
#include <string>

namespace custos::testing {

// The whole file, bytes as they are; "" if it cannot be read.
std::string ReadFile(const std::string& path);

// Runs `command` with /bin/sh; throws std::runtime_error naming it unless it exits 0.
void RunOrThrow(const std::string& command);

// Resident memory of this process, in bytes.
size_t ResidentBytes();

}  // namespace custos::testing
