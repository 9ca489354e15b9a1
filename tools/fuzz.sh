#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang-14 (AddressSanitizer and UBSan) and runs each
# over a copy of its seed corpus for a bounded time. Exits non-zero if any target finds a crash,
# a leak, a timeout or a broken property, printing the input that reproduces it.
#
# Usage: tools/fuzz.sh [TARGET...]       (default: every target in fuzz/CMakeLists.txt)
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_BUILD_DIR  build folder (default build-fuzz); reproducers land in its artifacts/
# Installs clang-14 and libfuzzer-14-dev (and the project's packages) if missing: needs root or
# sudo then. The committed corpus (fuzz/corpus) is never modified; to keep interesting inputs
# found, minimize them and add them by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
build="${FUZZ_BUILD_DIR:-build-fuzz}"
all_targets=(ciphertext_blob encryption_context config policy audit_record audit_verify
  peer_identity)
targets=("${@:-${all_targets[@]}}")

tools/install-deps.sh
missing=()
for p in clang-14 libfuzzer-14-dev; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^.i' || missing+=("$p")
done
if ((${#missing[@]} > 0)); then
  sudo=()
  if ((EUID != 0)); then sudo=(sudo); fi
  echo "fuzz: installing ${missing[*]}"
  # apt-get update only if the package lists do not know the packages yet.
  apt-cache show "${missing[@]}" >/dev/null 2>&1 || "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

start=$SECONDS
cmake -S fuzz -B "$build" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  >/dev/null
nice -n 10 cmake --build "$build" -j2 --target "${targets[@]/%/_fuzz}"
echo "fuzz: built in $((SECONDS - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts="$(pwd)/$build/artifacts"
mkdir -p "$artifacts"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

failed=()
for target in "${targets[@]}"; do
  corpus="$work/corpus-$target"
  mkdir -p "$corpus"
  cp -r "fuzz/corpus/$target/." "$corpus/"
  if [[ $target == peer_identity ]]; then fuzz/make_cert_seeds.sh "$corpus"; fi
  log="$work/$target.log"
  if nice -n 10 "$build/${target}_fuzz" "$corpus" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 -print_funcs=0 \
    -artifact_prefix="$artifacts/$target-" >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    echo "fuzz: $target ok (${runs:-?} runs in ${seconds} s, corpus $(find "$corpus" -type f | wc -l))"
  else
    failed+=("$target")
    echo "fuzz: $target FAILED" >&2
    grep -v -E '^(#[0-9]|INFO:|\s+NEW_FUNC)' "$log" | tail -n 40 >&2
    grep -o 'Test unit written to .*' "$log" | sed 's/^Test unit written to //' |
      while read -r input; do
        echo "fuzz: reproduce with: $build/${target}_fuzz $input" >&2
      done
  fi
done

echo "fuzz: finished in $((SECONDS - start)) s"
if ((${#failed[@]} > 0)); then
  echo "fuzz: crashes found by ${failed[*]}" >&2
  exit 1
fi
