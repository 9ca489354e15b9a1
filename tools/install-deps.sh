#!/usr/bin/env bash
# Installs the Debian 12 packages Custos needs to build, test and run, if any is missing.
# A machine that has them all does no apt work and prints nothing. Needs root or sudo.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  grpc-proto  # the standard health and reflection .proto files
  libssl-dev libsqlite3-dev libspdlog-dev libtomlplusplus-dev libcli11-dev nlohmann-json3-dev catch2
  softhsm2 libp11-kit-dev opensc libcpp-httplib-dev
  sqlite3 openssl ca-certificates python3
  systemd  # systemd-analyze, for the unit test of deploy/custosd.service
  mariadb-server mariadb-plugin-hashicorp-key-management  # the TDE end-to-end test
  python3-grpcio python3-protobuf python3-cryptography  # the Python client example and its test
)

command -v dpkg-query >/dev/null || {
  echo "install-deps: dpkg-query not found; this script is for Debian 12" >&2
  exit 1
}

# One dpkg-query for all: "NAME STATUS" per package dpkg knows (unknown ones only complain on
# stderr). The second letter of the status abbreviation is 'i' when the package is installed.
declare -A installed=()
while read -r name status; do
  if [[ ${status:1:1} == i ]]; then installed[$name]=1; fi
done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${packages[@]}" 2>/dev/null || true)

missing=()
for p in "${packages[@]}"; do
  if [[ -z ${installed[$p]:-} ]]; then missing+=("$p"); fi
done
if ((${#missing[@]} == 0)); then exit 0; fi

sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || {
    echo "install-deps: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  }
  sudo=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${missing[@]}"
