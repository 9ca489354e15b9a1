#!/usr/bin/env bash
# Installs whatever Debian packages are missing, builds Custos (Release) and runs the whole
# test suite: unit tests per library, the state-script test and the end-to-end tests against
# the real custosd binary. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCUSTOS_BENCH=ON >/dev/null  # bench_smoke too
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure --timeout 900
