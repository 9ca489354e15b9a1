#!/usr/bin/env bash
# The Python client example (examples/python/custos_envelope.py) against a real custosd:
#  1. As the app, it encrypts a 1 MiB random file: the envelope holds no plaintext, and
#     decrypting it gives the file back byte for byte.
#  2. A flipped byte in the wrapped key, in the header's context or in the ciphertext: each
#     decryption fails with its exit status and leaves no output file.
#  3. An officer's certificate cannot decrypt (PERMISSION_DENIED): officers never get keys.
#  4. Custos recorded the app's GenerateDataKey and Decrypt, and the officer's refusal.
#
# Usage: tests/scripts/python_client_test.sh BUILD_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="$(cd "${1:?usage: python_client_test.sh BUILD_DIR}" && pwd)"
work="$(mktemp -d)"
state="$work/state"
custosd_pid=""
passed=0

cleanup() {
  if [[ -n $custosd_pid ]]; then kill "$custosd_pid" 2>/dev/null && wait "$custosd_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "python_client_test: FAILED: $*" >&2
  [[ -f $state/custosd.log ]] && { echo "--- custosd.log" >&2; tail -n 20 "$state/custosd.log" >&2; }
  echo "python_client_test: $passed passed, 1 failed"
  exit 1
}
ok() {
  passed=$((passed + 1))
  echo "python_client_test: ok: $*"
}

stubs="$build/examples/python/stubs"
[[ -f $stubs/custos/v1/key_service_pb2_grpc.py ]] || fail "no Python stubs in $stubs (build custos_python_stubs)"
/usr/bin/python3 -c 'import grpc, google.protobuf, cryptography' 2>/dev/null ||
  fail "python3-grpcio, python3-protobuf or python3-cryptography missing (tools/install-deps.sh)"

# --- Custos ------------------------------------------------------------------------------
MAKE_STATE_QUIET=1 CUSTOS_PORT=0 "$repo/tools/make-state.sh" "$state" >/dev/null
export SOFTHSM2_CONF="$state/hsm/softhsm2.conf"
"$build/server/custosd" --config "$state/custosd.toml" init >"$work/init.log" 2>&1 ||
  fail "custosd init: $(cat "$work/init.log")"
"$build/server/custosd" --config "$state/custosd.toml" --port-file "$work/port" \
  >>"$state/custosd.log" 2>&1 &
custosd_pid=$!
for _ in $(seq 1 200); do
  [[ -s $work/port ]] && break
  kill -0 "$custosd_pid" 2>/dev/null || fail "custosd exited at start"
  sleep 0.05
done
port=$(sed -n 1p "$work/port")

ctl() {  # AS ARGS...
  local as=$1
  shift
  "$build/server/custosctl" --state "$state" --addr "127.0.0.1:$port" --as "$as" "$@"
}
json() {  # FIELD < JSON
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
app=spiffe://custos.local/app/demo
proposed=$(ctl officer1 propose create-key --alias files --encrypt "$app" --decrypt "$app" \
  --justification "file encryption from Python") || fail "propose: $proposed"
executed=$(ctl officer2 approve "$(json request_id <<<"$proposed")" \
  --digest "$(json digest <<<"$proposed")") || fail "approve: $executed"
[[ $(json state <<<"$executed") == EXECUTED ]] || fail "key not created: $executed"

envelope() {  # AS ARGS...: the example with AS's certificate
  local as=$1
  shift
  /usr/bin/python3 "$repo/examples/python/custos_envelope.py" --addr "127.0.0.1:$port" \
    --ca "$state/pki/ca.crt" --cert "$state/pki/clients/$as.crt" \
    --key "$state/pki/clients/$as.key" --stubs "$stubs" "$@"
}

# --- 1. round trip -----------------------------------------------------------------------
head -c 1048576 /dev/urandom >"$work/scan.bin"
envelope app encrypt --key-id files --in "$work/scan.bin" --out "$work/scan.bin.custos" \
  2>"$work/err" || fail "encrypt: $(cat "$work/err")"
size=$(stat -c %s "$work/scan.bin.custos")
((size > 1048576 && size < 1048576 + 2048)) || fail "envelope of $size bytes"
# No 64-byte run of the file appears in the envelope.
/usr/bin/python3 - "$work/scan.bin" "$work/scan.bin.custos" <<'PY' || fail "plaintext in the envelope"
import sys
plain, sealed = (open(p, "rb").read() for p in sys.argv[1:3])
sys.exit(any(plain[i:i + 64] in sealed for i in range(0, len(plain), 4096)))
PY
envelope app decrypt --in "$work/scan.bin.custos" --out "$work/scan.out" 2>"$work/err" ||
  fail "decrypt: $(cat "$work/err")"
cmp -s "$work/scan.bin" "$work/scan.out" || fail "the decrypted file differs"
ok "1 MiB encrypted and decrypted through Custos, byte for byte"

# --- 2. tampering ------------------------------------------------------------------------
# Rewrites the envelope with one change; $1 says where.
tamper() {  # WHERE OUT
  /usr/bin/python3 - "$work/scan.bin.custos" "$2" "$1" <<'PY'
import base64, json, sys
data = bytearray(open(sys.argv[1], "rb").read())
magic_end = data.index(b"\n") + 1
line_end = data.index(b"\n", magic_end)
header = json.loads(data[magic_end:line_end])
where = sys.argv[3]
if where == "wrapped":
    wrapped = bytearray(base64.b64decode(header["wrapped_key"]))
    wrapped[len(wrapped) // 2] ^= 1
    header["wrapped_key"] = base64.b64encode(bytes(wrapped)).decode()
elif where == "context":
    header["context"]["file"] = "other.bin"
if where in ("wrapped", "context"):
    data = data[:magic_end] + json.dumps(header, sort_keys=True).encode() + data[line_end:]
else:
    data[line_end + 1 + 1000] ^= 1
open(sys.argv[2], "wb").write(data)
PY
}
for where in wrapped context ciphertext; do
  tamper "$where" "$work/bad.custos"
  rm -f "$work/bad.out"
  set +e
  envelope app decrypt --in "$work/bad.custos" --out "$work/bad.out" 2>"$work/err"
  code=$?
  set -e
  case $where in
    wrapped | context) expected=2 ;;   # Custos refuses to unwrap the data key
    ciphertext) expected=3 ;;          # the data key unwraps; GCM refuses the file
  esac
  [[ $code -eq $expected ]] || fail "tampered $where: exit $code, not $expected: $(cat "$work/err")"
  [[ ! -e $work/bad.out ]] || fail "tampered $where: an output file was left"
  ls "$work"/.custos-* >/dev/null 2>&1 && fail "tampered $where: a temporary file was left"
done
grep -q "^error: INVALID_ARGUMENT: " "$work/err" && fail "ciphertext tampering reached Custos"
ok "a changed wrapped key, context or ciphertext does not decrypt, and leaves nothing"

# --- 3. separation of duties -------------------------------------------------------------
set +e
envelope officer1 decrypt --in "$work/scan.bin.custos" --out "$work/officer.out" 2>"$work/err"
code=$?
set -e
[[ $code -eq 2 ]] || fail "officer decrypt exited $code"
grep -q "^error: PERMISSION_DENIED: " "$work/err" || fail "officer decrypt: $(cat "$work/err")"
[[ ! -e $work/officer.out ]] || fail "officer decrypt left a file"
ok "an officer's certificate cannot decrypt (PERMISSION_DENIED)"

# --- 4. the audit log ---------------------------------------------------------------------
ctl auditor audit export >"$work/audit.jsonl" || fail "audit export"
/usr/bin/python3 - "$work/audit.jsonl" "$app" <<'PY' || fail "audit records missing"
import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
records = [r for r in records if "action" in r]  # the checkpoint lines have none
def count(action, principal_part, outcome):
    return sum(1 for r in records if r["action"] == action and principal_part in r["principal"]
               and r["outcome"] == outcome)
app = sys.argv[2]
ok = (count("GenerateDataKey", app, "OK") == 1 and count("Decrypt", app, "OK") == 2 and
      count("Decrypt", app, "INVALID_ARGUMENT") == 2 and
      count("Decrypt", "/officer/officer1", "PERMISSION_DENIED") == 1)
sys.exit(0 if ok else 1)
PY
ok "Custos recorded the app's data key, its decryptions and refusals, and the officer's refusal"
echo "python_client_test: $passed passed, 0 failed"
