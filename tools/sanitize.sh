#!/usr/bin/env bash
# The sanitizer tier. Builds Custos twice with GCC's sanitizers and runs tests in each build:
#  1. build-asan, AddressSanitizer + UndefinedBehaviorSanitizer (leaks included): the whole
#     suite (ctest), custosd and custosctl included, since the end-to-end tests run the binaries
#     of the build they belong to.
#  2. build-tsan, ThreadSanitizer: the library tests (tests/<library>), which drive custosd's
#     own concurrent parts (group commit, caches, session pool and HSM executor, approvals,
#     root rotation) directly. Not the end-to-end tests nor test_server: Debian's gRPC and
#     abseil are not instrumented, so TSan cannot see their synchronisation and would blame
#     their threads; and the gRPC layer only hands calls to the libraries tested here.
# Every report of every process (custosd, custosctl and the tests themselves) goes to a file in
# <build>/sanitizer-logs, not to the process's stderr; any such file fails the tier, even if the
# process that wrote it was a server whose exit status no test looked at.
#
# Usage: tools/sanitize.sh [asan|tsan]...   (default: both, in that order)
#   SANITIZE_JOBS  build jobs (default 2)
# Suppressions, each explained: tools/sanitizers/lsan.supp (a leak inside c-ares, one inside
# SoftHSM2). TSan needs none. Needs what tools/test.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs="${SANITIZE_JOBS:-2}"
tiers=("$@")
if ((${#tiers[@]} == 0)); then tiers=(asan tsan); fi

tools/install-deps.sh

# -O1 and line tables only: reports name files and lines, builds and runs stay quick. No
# benchmarks: bench_smoke is the only test that runs them, and it measures throughput.
configure() {  # BUILD_DIR SANITIZERS
  cmake -S . -B "$1" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
    -DCUSTOS_SANITIZE="$2" -DCUSTOS_BENCH=OFF >/dev/null
}

# Fails if any process wrote a sanitizer report into LOG_DIR, printing the reports.
check_logs() {  # LOG_DIR NAME
  local reports
  reports=$(find "$1" -type f -size +0 | sort)
  if [[ -z $reports ]]; then return 0; fi
  echo "sanitize: $2 reports:" >&2
  for f in $reports; do
    echo "==== $f" >&2
    cat "$f" >&2
  done
  return 1
}

failed=()
reasons=()  # what failed, printed last, where a CI log's tail shows it
start=$SECONDS

# The Catch2 test cases whose blocks in console output FILE report a failure, each with its
# first failed assertion: where, what, and its expansion and messages, on one line. (Rules of
# 79 dashes or equals signs frame Catch2's blocks; spelled without intervals for any awk.)
failed_cases() {  # FILE
  awk '
    function rule(c) { return length($0) == 79 && $0 ~ ("^" c "+$") }
    function flush() {
      if (name != "" && where != "") {
        line = name " @ " where ": " what (detail != "" ? " => " detail : "")
        print substr(line, 1, 500)
      }
      name = ""; where = ""; what = ""; detail = ""; state = ""
    }
    rule("-") {
      if (!open) { flush(); open = 1; next }
      open = 0; next
    }
    open && name == "" { name = $0; next }
    open { next }
    / FAILED:$/ && where == "" {
      where = $0; sub(/: FAILED:$/, "", where); sub(/.*\//, "", where); state = "what"; next
    }
    state != "" && /^(with|due to|explicitly) .*:$/ { state = "detail"; next }
    state != "" && /^  / {
      text = $0; sub(/^ +/, "", text)
      if (state == "what") what = what (what == "" ? "" : " ") text
      else detail = detail (detail == "" ? "" : " ") text
      next
    }
    state != "" { state = "" }
    rule("=") { flush() }
    END { flush() }
  ' "$1" | sort -u
}

run_asan() {
  local build=build-asan
  local logs="$root/$build/sanitizer-logs"
  configure "$build" address,undefined
  nice -n 10 cmake --build "$build" -j"$jobs"
  echo "sanitize: asan built in $((SECONDS - start)) s"
  rm -rf "$logs" && mkdir -p "$logs"
  # detect_leaks: LeakSanitizer at every instrumented process's exit. log_path: reports to
  # files (see above). abort_on_error stays off: no core files, the exit status says enough.
  export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:\
check_initialization_order=1:strict_init_order=1:log_path=$logs/asan"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan"
  export LSAN_OPTIONS="suppressions=$root/tools/sanitizers/lsan.supp:print_suppressions=0"
  local ok=1
  # e2e runs below.
  if ! ctest --test-dir "$build" --output-on-failure --timeout 1800 -E '^e2e$' \
    2>&1 | tee "$build/ctest.out"; then
    ok=0
    reasons+=("asan ctest: $(grep -E '^\s+[0-9]+ - ' "$build/ctest.out" | tr -s ' ' | paste -sd,)")
  fi
  # The end-to-end tests but five whose fixed windows were set for a Release custosd; under
  # ASan it runs two to three times slower (a Catch2 spec: ~[.] keeps hidden tests out):
  #  - "Verifying the live database under load ..." counts verifications made in a fixed time;
  #  - "A full disk is logged as one, ..." counts log lines mentioning the full disk, and the
  #    slower the server, the likelier the health probe meets the disk full too and says so;
  #  - "A token whose store vanishes under load ..." waits a fixed 15 s for the recovery line;
  #  - "A hang of any PKCS#11 call ..." and "Callers of a key whose unwrap hangs ..." bound the
  #    latency of the calls served meanwhile (400 ms, 450 ms).
  # (Names with a comma go by their start: a comma separates alternatives in a spec.)
  local e2e_skip='~[.]~"Verifying the live database under load never disturbs custosd"'
  e2e_skip+='~"A full disk is logged as one*"~"A token whose store vanishes under load*"'
  e2e_skip+='~"A hang of any PKCS#11 call is answered UNAVAILABLE at hsm.call_timeout_ms"'
  e2e_skip+='~"Callers of a key whose unwrap hangs do not hold up calls on other keys"'
  echo "sanitize: asan test_e2e $e2e_skip"
  if ! (cd "$build/tests/e2e" && ./test_e2e "$e2e_skip") 2>&1 | tee "$build/e2e.out"; then
    ok=0
    reasons+=("asan test_e2e:"$'\n'"$(failed_cases "$build/e2e.out" | sed 's/^/    /')")
  fi
  if ! check_logs "$logs" asan; then
    ok=0
    reasons+=("asan reports: $(find "$logs" -type f -size +0 -printf '%f ')")
  fi
  unset ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS
  ((ok)) || failed+=(asan)
  echo "sanitize: asan tier done at $((SECONDS - start)) s"
}

run_tsan() {
  local build=build-tsan
  local logs="$root/$build/sanitizer-logs"
  local tests=(common hsm storage policy audit core)
  configure "$build" thread
  nice -n 10 cmake --build "$build" -j"$jobs" --target "${tests[@]/#/test_}"
  echo "sanitize: tsan built in $((SECONDS - start)) s"
  rm -rf "$logs" && mkdir -p "$logs"
  export TSAN_OPTIONS="halt_on_error=0:second_deadlock_stack=1:log_path=$logs/tsan"
  # Test cases left out here, each for a reason that is not a data race (a Catch2 spec: ~[.]
  # keeps hidden measurements out, which an exclusion alone would let in):
  local -A skip=(
    # Asserts how many batches share a WAL sync, which depends on how threads are scheduled;
    # TSan serialises them differently. The group commit itself runs in the other
    # concurrency tests of test_storage.
    [storage]='~[.]~"Concurrent batches share one sync (group commit)"'
  )
  local ok=1 t
  for t in "${tests[@]}"; do
    local args=()
    if [[ -n ${skip[$t]:-} ]]; then args=("${skip[$t]}"); fi
    echo "sanitize: tsan test_$t ${args[*]}"
    if ! (cd "$build/tests/$t" && ./"test_$t" "${args[@]}") 2>&1 | tee "$build/test_$t.out"; then
      ok=0
      reasons+=("tsan test_$t:"$'\n'"$(failed_cases "$build/test_$t.out" | sed 's/^/    /')")
    fi
  done
  if ! check_logs "$logs" tsan; then
    ok=0
    reasons+=("tsan reports: $(find "$logs" -type f -size +0 -printf '%f ')")
  fi
  unset TSAN_OPTIONS
  ((ok)) || failed+=(tsan)
  echo "sanitize: tsan tier done at $((SECONDS - start)) s"
}

for tier in "${tiers[@]}"; do
  case "$tier" in
    asan) run_asan ;;
    tsan) run_tsan ;;
    *)
      echo "usage: tools/sanitize.sh [asan|tsan]..." >&2
      exit 2
      ;;
  esac
done

echo "sanitize: finished in $((SECONDS - start)) s"
if ((${#failed[@]} > 0)); then
  echo "sanitize: failed: ${failed[*]}" >&2
  printf 'sanitize:   %s\n' "${reasons[@]}" >&2
  exit 1
fi
