#!/usr/bin/env bash
# The README's first command, as a user runs it: deploy/quickstart.sh brings custosd up on a
# fresh state folder, the printed custosctl commands work, and a second run on the same state
# still decrypts what the first run encrypted.
#
# Usage: tests/scripts/quickstart_test.sh BUILD_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="$(cd "${1:?usage: quickstart_test.sh BUILD_DIR}" && pwd)"
work="$(mktemp -d)"
pid=""
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
fail() {
  echo "quickstart_test: FAILED: $*" >&2
  [[ -f $work/quickstart.log ]] && tail -n 20 "$work/quickstart.log" >&2
  echo "quickstart_test: $passed passed, 1 failed"
  exit 1
}
ok() { passed=$((passed + 1)); }

port="$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
ctl=("$build/server/custosctl" --addr "127.0.0.1:$port" --state "$work/state")

start() {
  CUSTOS_STATE="$work/state" CUSTOS_BUILD_DIR="$build" CUSTOS_PORT="$port" \
    "$repo/deploy/quickstart.sh" >>"$work/quickstart.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    "${ctl[@]}" --as officer1 list-keys >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || fail "quickstart exited early"
    sleep 0.2
  done
  fail "custosd did not answer within 120 s"
}
stop() {
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
}
field() { sed -n "s/.*\"$1\": \"\\([^\"]*\\)\".*/\\1/p"; }

start
grep -q "custosctl --addr 127.0.0.1:$port --state $work/state --as officer1 propose create-key" \
  "$work/quickstart.log" || fail "quickstart did not print the next commands"
ok
[[ "$(stat -c %a "$work/state")" == 700 ]] || fail "state folder is not 0700"
ok
pin="$(cat "$work/state/hsm/pin")"
grep -qF "$pin" "$work/quickstart.log" && fail "the PIN was printed"
ok

out="$("${ctl[@]}" --as officer1 propose create-key --alias billing --justification "TDE" \
  --encrypt spiffe://custos.local/app/demo --decrypt spiffe://custos.local/app/demo)" ||
  fail "propose create-key: $out"
out="$("${ctl[@]}" --as officer2 approve "$(field request_id <<<"$out")" \
  --digest "$(field digest <<<"$out")")" || fail "approve create-key: $out"
[[ "$(field state <<<"$out")" == EXECUTED ]] || fail "create-key not executed: $out"
out="$("${ctl[@]}" --as app generate-data-key --key billing --context table=patients)" ||
  fail "generate-data-key"
blob="$(field ciphertext_blob <<<"$out")"
plaintext="$(field plaintext <<<"$out")"
[[ -n $blob && -n $plaintext ]] || fail "generate-data-key printed no blob: $out"
ok
stop

start
out="$("${ctl[@]}" --as app decrypt --blob "$blob" --context table=patients)" ||
  fail "decrypt after restart: $out"
[[ "$(field plaintext <<<"$out")" == "$plaintext" ]] || fail "decrypted a different key"
ok
grep -q "root key 'custos-root' already exists" "$work/quickstart.log" ||
  fail "second run did not reuse the root key"
ok
stop

echo "quickstart_test: $passed passed, 0 failed"
