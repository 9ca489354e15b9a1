#!/usr/bin/env bash
# Custos quickstart: installs what is missing, builds (Release), creates a local state folder
# (SoftHSM2 token, development CA, demo client certificates, config and policy), creates the
# root key once, and runs custosd on loopback in the foreground. Run it again to restart on
# the same state: keys made before still decrypt.
#
#   deploy/quickstart.sh     state in ./var/custos, build in ./build
#   Environment: CUSTOS_STATE=DIR, CUSTOS_BUILD_DIR=DIR, CUSTOS_PORT=N (for a new state only)
#   A CUSTOS_BUILD_DIR configured already keeps its configuration (a sanitizer build, say).
set -euo pipefail
cd "$(dirname "$0")/.."

state="${CUSTOS_STATE:-var/custos}"
build="${CUSTOS_BUILD_DIR:-build}"
tools/install-deps.sh
if [[ -n ${CUSTOS_BUILD_DIR:-} && -f $build/CMakeCache.txt ]]; then
  cmake -S . -B "$build" >/dev/null
else
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$build" -j"$(nproc)"
tools/make-state.sh "$state"
state="$(cd "$state" && pwd)"
export SOFTHSM2_CONF="$state/hsm/softhsm2.conf"
"$build/server/custosd" --config "$state/custosd.toml" init

listen="$(sed -n 's/^listen = "\(.*\)"/\1/p' "$state/custosd.toml")"
ctl="$build/server/custosctl --addr $listen --state $state"
cat <<MSG

custosd is starting on $listen with state in $state (Ctrl-C stops it).
In another terminal, from $(pwd):

  # an officer proposes a key the demo app may use; another officer approves it
  $ctl --as officer1 propose create-key --alias billing --justification "billing DB TDE" \\
      --encrypt spiffe://custos.local/app/demo --decrypt spiffe://custos.local/app/demo
  $ctl --as officer2 approve <request_id> --digest <digest>

  # the app gets a data key bound to an encryption context, then decrypts its blob
  $ctl --as app generate-data-key --key billing --context table=patients
  $ctl --as app decrypt --blob <ciphertext_blob from above> --context table=patients

  # officers see metadata, never key material
  $ctl --as officer2 list-keys
  $ctl --as officer2 describe-key billing

MSG
exec "$build/server/custosd" --config "$state/custosd.toml"
