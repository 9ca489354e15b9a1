#!/usr/bin/env bash
# deploy/Containerfile, checked without a container engine (none on the CI machine):
#  - its runtime stage is Debian 12, runs as a non-root user and checks health with
#    `custosctl health`;
#  - every shared library custosd and custosctl load comes from a package its runtime stage
#    installs (or from the base image's essentials), and every package it names exists;
#  - the health check's command line parses as custosctl's and fails (exit 1) against nothing.
#
# Usage: tests/scripts/container_file_test.sh BUILD_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="$(cd "${1:?usage: container_file_test.sh BUILD_DIR}" && pwd)"
file="$repo/deploy/Containerfile"
passed=0

fail() {
  echo "container_file_test: FAILED: $*" >&2
  echo "container_file_test: $passed passed, 1 failed"
  exit 1
}
ok() {
  passed=$((passed + 1))
  echo "container_file_test: ok: $*"
}

# The runtime stage: everything after the last FROM, continuation lines joined.
runtime="$(awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END{printf "%s", stage}' "$file" |
  sed -e ':a' -e '/\\$/N; s/\\\n//; ta')"
grep -q '^FROM debian:12' <<<"$runtime" || fail "the runtime stage is not Debian 12 based"
user="$(sed -n 's/^USER \([^ ]*\).*/\1/p' <<<"$runtime" | tail -n 1)"
[[ -n $user && ${user%%:*} != root && ${user%%:*} != 0 ]] || fail "the runtime stage runs as root"
grep -q '^HEALTHCHECK .*"custosctl",.*"health"' <<<"$runtime" ||
  fail "the health check is not custosctl health"
ok "Debian 12 runtime, user $user, health checked by custosctl health"

# Packages the runtime stage installs: the words after "install -y ... --no-install-recommends"
# up to the next "&&".
mapfile -t packages < <(grep -o 'apt-get install[^&]*' <<<"$runtime" | tr ' ' '\n' |
  grep -v -e '^$' -e '^apt-get$' -e '^install$' -e '^-')
((${#packages[@]} > 0)) || fail "no runtime packages found"
# One apt-cache run for all (each run reads the whole package index; it exits 0 when only some
# exist, so the names it knows are compared).
declare -A known=()
while read -r name; do known[$name]=1; done < <(apt-cache show "${packages[@]}" 2>/dev/null |
  sed -n 's/^Package: //p')
for p in "${packages[@]}"; do
  [[ -n ${known[$p]:-} ]] || fail "runtime package $p does not exist in Debian 12"
done
ok "${#packages[@]} runtime packages exist"

# The package of each library the binaries load, from one dpkg run. dpkg knows a file by the
# path its package installed it at, which on a merged /usr may be the /lib or the /usr/lib
# spelling, and by its real name rather than a symbolic link's: all are asked for.
# Essential in every Debian image (debian:12-slim included): the C and C++ runtimes.
# The sanitizer runtimes are there only when tools/sanitize.sh runs this test on its builds.
declare -A base=([libc6]=1 [libgcc-s1]=1 [libstdc++6]=1 [libzstd1]=1 [liblzma5]=1
  [libsystemd0]=1 [libgcrypt20]=1 [libgpg-error0]=1 [liblz4-1]=1 [libcap2]=1 [zlib1g]=1
  [libasan8]=1 [libubsan1]=1 [libtsan2]=1)
declare -A wanted=()
for p in "${packages[@]}"; do wanted[$p]=1; done
binaries=("$build/server/custosd" "$build/server/custosctl")
for binary in "${binaries[@]}"; do [[ -x $binary ]] || fail "$binary not built"; done
mapfile -t libraries < <(ldd "${binaries[@]}" | awk '/=> \//{print $3}' | sort -u)
((${#libraries[@]} > 0)) || fail "ldd found no libraries"
query=()
for library in "${libraries[@]}"; do
  real="$(realpath "$library")"
  query+=("$library" "/usr$library" "${library#/usr}" "$real" "/usr$real" "${real#/usr}")
done
declare -A owner=()  # file name -> package
while IFS= read -r line; do
  package="${line%%:*}"
  owner[$(basename "${line#*: }")]="${package%%,*}"
done < <(dpkg -S "${query[@]}" 2>/dev/null || true)
for library in "${libraries[@]}"; do
  package="${owner[$(basename "$library")]:-${owner[$(basename "$(realpath "$library")")]:-?}}"
  [[ -n ${base[$package]:-} || -n ${wanted[$package]:-} ]] ||
    fail "custosd or custosctl loads $library from $package, which the runtime stage lacks"
done
ok "every library custosd and custosctl load is installed by the runtime stage"

# The health check's arguments, as custosctl parses them: against no server, exit 1.
mapfile -t check < <(grep -o '^HEALTHCHECK .*' <<<"$runtime" | grep -o '\["custosctl".*\]' |
  tr -d '[]' | tr ',' '\n' | sed -e 's/^ *"//' -e 's/" *$//')
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
MAKE_STATE_QUIET=1 CUSTOS_PORT=0 "$repo/tools/make-state.sh" "$work/state" >/dev/null
args=()
for a in "${check[@]:1}"; do
  a="${a//\/etc\/custos\/pki\/health./$work/state/pki/clients/app.}"
  a="${a//\/etc\/custos\/pki/$work/state/pki}"
  a="${a//127.0.0.1:7443/127.0.0.1:1}"
  args+=("$a")
done
set +e
out="$("$build/server/custosctl" "${args[@]}" 2>&1)"
code=$?
set -e
[[ $code -eq 1 && $out == "error: UNAVAILABLE: "* ]] ||
  fail "the health check against no server exited $code: $out"
ok "the health check's command parses and reports no server as unhealthy (exit 1)"
echo "container_file_test: $passed passed, 0 failed"
