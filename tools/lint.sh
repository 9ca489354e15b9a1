#!/usr/bin/env bash
# Static checks: clang-format (no changes needed), cppcheck, clang-tidy (.clang-tidy).
# Usage: tools/lint.sh [BUILD_DIR]   (a configured build dir with compile_commands.json)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build}"
sources=$(git ls-files 'common/*.cc' 'hsm/*.cc' 'storage/*.cc' 'policy/*.cc' 'audit/*.cc' \
  'core/*.cc' 'server/*.cc')
status=0
git ls-files '*.cc' '*.h' | xargs clang-format --dry-run --Werror || status=1
cppcheck --enable=warning,performance,portability --std=c++20 --quiet --error-exitcode=1 \
  --inline-suppr -I . common hsm storage policy audit core server || status=1
# shellcheck disable=SC2086
clang-tidy -p "$build" --quiet $sources 2>/dev/null | grep -E "warning:|error:" && status=1
exit $status
