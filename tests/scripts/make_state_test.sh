#!/usr/bin/env bash
# Tests tools/make-state.sh: runs it into fresh temporary folders and checks file modes, the
# certificates (chains, names, key usages), the SoftHSM2 token and its PIN, that nothing
# secret is printed, and that running it again changes nothing.
# Stops at the first failure with a message; exits 0 after "N passed, 0 failed".
set -euo pipefail

make_state="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../tools" && pwd)/make-state.sh"
readonly make_state module=/usr/lib/softhsm/libsofthsm2.so

passed=0
fail() {
  printf 'make_state_test: FAILED: %s\n' "$1" >&2
  if (($# > 1)); then printf '%s\n' "${@:2}" | sed 's/^/    /' >&2; fi
  echo "make_state_test: $passed passed, 1 failed" >&2
  exit 1
}
ok() { passed=$((passed + 1)); }
# check DESCRIPTION COMMAND...: the command must succeed.
check() {
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then ok; else fail "$what" "command: $*"; fi
}
# check_fails DESCRIPTION COMMAND...: the command must fail.
check_fails() {
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then fail "$what" "command succeeded: $*"; else ok; fi
}
# check_eq DESCRIPTION EXPECTED ACTUAL
check_eq() {
  if [[ $2 == "$3" ]]; then ok; else fail "$1" "expected: $2" "actual:   $3"; fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

# Runs make-state.sh with a clean environment of its own knobs plus the given VAR=VALUE
# settings; sets $out (stdout and stderr together) and fails the test if it fails.
run_make_state() {
  local env_settings=()
  while (($#)) && [[ $1 == *=* ]]; do
    env_settings+=("$1")
    shift
  done
  if ! out=$(env -u MAKE_STATE_QUIET -u MAKE_STATE_OTHER_CA -u CUSTOS_PORT \
    "${env_settings[@]}" bash "$make_state" "$@" 2>&1); then
    fail "make-state.sh ${env_settings[*]} $* exited with an error" "$out"
  fi
}

# Checksums of every file under a folder, with their names.
sums() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum); }
mode() { stat -c %a "$1"; }
san() { openssl x509 -in "$1" -noout -ext subjectAltName | sed -n '2s/^[[:space:]]*//p'; }
subject() { openssl x509 -in "$1" -noout -subject -nameopt RFC2253 | sed 's/^subject=//'; }
# An extension as "VALUE" or "critical|VALUE".
ext() {
  openssl x509 -in "$1" -noout -ext "$2" |
    sed -e '1{/: critical$/!d;s/.*/critical/}' -e 's/^[[:space:]]*//' | paste -sd'|'
}
verifies() { openssl verify -CAfile "$1" "$2"; }
same_public_key() {
  [[ "$(openssl pkey -in "$1" -pubout)" == "$(openssl x509 -in "$2" -noout -pubkey)" ]]
}
same_cert_key() {
  [[ "$(openssl x509 -in "$1" -noout -pubkey)" == "$(openssl x509 -in "$2" -noout -pubkey)" ]]
}

# --- first run: a relative STATE_DIR, with the other CA -----------------------------------
run_make_state MAKE_STATE_OTHER_CA=1 state
first_out=$out
st=$tmp/state
ok
check "STATE_DIR made" test -d "$st"
check "output names the absolute state folder" grep -qF "$st" <<<"$out"
check "output gives the SOFTHSM2_CONF hint" \
  grep -qF "export SOFTHSM2_CONF=$st/hsm/softhsm2.conf" <<<"$out"

# Idempotence right away: a second run must change no file at all (token files included).
before=$(sums "$st")
run_make_state MAKE_STATE_OTHER_CA=1 state
second_out=$out
after=$(sums "$st")
if [[ $before == "$after" ]]; then ok; else
  fail "second run changed files" "$(diff <(echo "$before") <(echo "$after") || true)"
fi
check_fails "second run creates nothing" grep -q created <<<"$out"
check "second run says it reused the token" grep -q "reused.*token 'custos'" <<<"$out"

# --- modes ----------------------------------------------------------------------------------
check_eq "STATE_DIR mode" 700 "$(mode "$st")"
for f in hsm/pin hsm/so-pin; do
  check_eq "$f mode" 600 "$(mode "$st/$f")"
done
keys=$(cd "$st" && find pki -name '*.key' | LC_ALL=C sort | paste -sd' ')
check_eq "private keys present" "pki/ca.key pki/clients/app.key pki/clients/auditor.key \
pki/clients/mariadb.key pki/clients/officer1.key pki/clients/officer2.key pki/other-ca/ca.key \
pki/other-ca/client.key pki/server.key" "$keys"
for k in $keys; do
  check_eq "$k mode" 600 "$(mode "$st/$k")"
done

# --- PINs and the token ---------------------------------------------------------------------
pin=$(<"$st/hsm/pin")
so_pin=$(<"$st/hsm/so-pin")
check "PIN is 32 hex characters" grep -qxE '[0-9a-f]{32}' <<<"$pin"
check "SO PIN is 32 hex characters" grep -qxE '[0-9a-f]{32}' <<<"$so_pin"
check "PIN and SO PIN differ" test "$pin" != "$so_pin"
for secret in "$pin" "$so_pin"; do
  if grep -qF "$secret" <<<"$first_out$second_out"; then fail "output shows a PIN"; else ok; fi
done
export SOFTHSM2_CONF=$st/hsm/softhsm2.conf
check "softhsm2.conf points at the state's token folder" \
  grep -qxF "directories.tokendir = $st/hsm/tokens" "$SOFTHSM2_CONF"
slots=$(softhsm2-util --show-slots 2>&1) || fail "softhsm2-util --show-slots failed" "$slots"
check "softhsm2-util --show-slots lists token 'custos'" \
  grep -qE '^[[:space:]]*Label:[[:space:]]*custos[[:space:]]*$' <<<"$slots"
check "the PIN in hsm/pin logs in to the token" \
  pkcs11-tool --module "$module" --token-label custos --login --pin "$pin" --list-objects
check_fails "a wrong PIN does not log in" \
  pkcs11-tool --module "$module" --token-label custos --login --pin 0123456789abcdef --list-objects

# --- certificates ---------------------------------------------------------------------------
pki=$st/pki
check "CA certificate verifies against itself" verifies "$pki/ca.crt" "$pki/ca.crt"
check_eq "CA subject" "CN=Custos Development CA" "$(subject "$pki/ca.crt")"
check_eq "CA basicConstraints" "critical|CA:TRUE" "$(ext "$pki/ca.crt" basicConstraints)"
check_eq "CA keyUsage" "critical|Certificate Sign, CRL Sign" "$(ext "$pki/ca.crt" keyUsage)"
ca_text=$(openssl x509 -in "$pki/ca.crt" -noout -text)
check "CA key is P-256" grep -q "NIST CURVE: P-256" <<<"$ca_text"
check "CA is signed with ECDSA SHA-256" grep -q "ecdsa-with-SHA256" <<<"$ca_text"
check "CA is valid about 10 years" openssl x509 -in "$pki/ca.crt" -noout \
  -checkend $((3649 * 86400))

check "server certificate verifies against pki/ca.crt" verifies "$pki/ca.crt" "$pki/server.crt"
check_eq "server subject" "CN=custosd" "$(subject "$pki/server.crt")"
check_eq "server SAN" "DNS:localhost, IP Address:127.0.0.1" "$(san "$pki/server.crt")"
check_eq "server extendedKeyUsage" "TLS Web Server Authentication" \
  "$(ext "$pki/server.crt" extendedKeyUsage)"
check "server key matches its certificate" same_public_key "$pki/server.key" "$pki/server.crt"
check "server certificate is valid about 2 years" openssl x509 -in "$pki/server.crt" -noout \
  -checkend $((729 * 86400))

declare -A uri=(
  [app]=spiffe://custos.local/app/demo
  [officer1]=spiffe://custos.local/officer/officer1
  [officer2]=spiffe://custos.local/officer/officer2
  [auditor]=spiffe://custos.local/auditor/auditor
  [mariadb]=spiffe://custos.local/db/mariadb
)
for name in app officer1 officer2 auditor mariadb; do
  crt=$pki/clients/$name.crt
  check "$name certificate verifies against pki/ca.crt" verifies "$pki/ca.crt" "$crt"
  check_eq "$name subject" "CN=$name" "$(subject "$crt")"
  check_eq "$name SAN" "URI:${uri[$name]}" "$(san "$crt")"
  check_eq "$name extendedKeyUsage" "TLS Web Client Authentication" \
    "$(ext "$crt" extendedKeyUsage)"
  check "$name key matches its certificate" same_public_key "$pki/clients/$name.key" "$crt"
done

other=$pki/other-ca
check_fails "other-CA client certificate does NOT verify against pki/ca.crt" \
  verifies "$pki/ca.crt" "$other/client.crt"
check "other-CA client certificate verifies against its own CA" \
  verifies "$other/ca.crt" "$other/client.crt"
check_eq "other-CA client SAN" "URI:spiffe://custos.local/app/demo" "$(san "$other/client.crt")"
check_fails "other CA has a key of its own" same_cert_key "$pki/ca.crt" "$other/ca.crt"

# --- config and policy ----------------------------------------------------------------------
expected_config='# Custos server configuration (development state made by tools/make-state.sh).
[server]
listen = "127.0.0.1:7443"

[tls]
cert = "pki/server.crt"
key = "pki/server.key"
client_ca = "pki/ca.crt"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "custos"
pin_file = "hsm/pin"

[storage]
path = "custos.db"

[policy]
file = "policy.toml"

[dual_control]
# The demo has two officers, so every change needs the approval of the other.
default_approvals = 1'
expected_policy='# Custos policy: which principal (client certificate SAN URI or CN) holds which role.
# Each principal holds exactly one role.
[roles]
app     = ["spiffe://custos.local/app/demo"]
officer = ["spiffe://custos.local/officer/officer1", "spiffe://custos.local/officer/officer2"]
auditor = ["spiffe://custos.local/auditor/auditor"]
database = ["spiffe://custos.local/db/mariadb"]'
check_eq "custosd.toml content" "$expected_config" "$(<"$st/custosd.toml")"
check_eq "policy.toml content" "$expected_policy" "$(<"$st/policy.toml")"
if command -v python3 >/dev/null; then
  check "custosd.toml and policy.toml parse as TOML" python3 -c '
import sys, tomllib
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        tomllib.load(f)' "$st/custosd.toml" "$st/policy.toml"
fi

# --- a lost certificate is remade from its kept key -----------------------------------------
app_key_sum=$(sha256sum <"$pki/clients/app.key")
rm "$pki/clients/app.crt"
run_make_state MAKE_STATE_OTHER_CA=1 MAKE_STATE_QUIET=1 state
check_eq "a lost certificate's key is kept" "$app_key_sum" "$(sha256sum <"$pki/clients/app.key")"
check "the remade certificate matches the kept key" \
  same_public_key "$pki/clients/app.key" "$pki/clients/app.crt"
check "the remade certificate verifies against pki/ca.crt" \
  verifies "$pki/ca.crt" "$pki/clients/app.crt"

# --- a token left without its user PIN (a first run killed mid-way) is finished -------------
mkdir -p "$tmp/half/hsm/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\n' "$tmp/half/hsm/tokens" \
  >"$tmp/half/softhsm2.conf"
printf 'fedcba9876543210\n' >"$tmp/half/hsm/so-pin"
chmod 600 "$tmp/half/hsm/so-pin"
SOFTHSM2_CONF=$tmp/half/softhsm2.conf pkcs11-tool --module "$module" --init-token \
  --label custos --so-pin fedcba9876543210 >/dev/null 2>&1 || fail "pkcs11-tool --init-token"
(cd "$tmp/half" && mv softhsm2.conf hsm/softhsm2.conf)
sed -i "s|^directories.tokendir = .*|directories.tokendir = $tmp/half/hsm/tokens|" \
  "$tmp/half/hsm/softhsm2.conf"
run_make_state MAKE_STATE_QUIET=1 "$tmp/half"
check "the half-made token's user PIN is set and logs in" \
  env SOFTHSM2_CONF="$tmp/half/hsm/softhsm2.conf" pkcs11-tool --module "$module" \
  --token-label custos --login --pin "$(<"$tmp/half/hsm/pin")" --list-objects
check_eq "the half-made token was finished, not replaced" 1 \
  "$(SOFTHSM2_CONF=$tmp/half/hsm/softhsm2.conf softhsm2-util --show-slots |
    grep -cE '^[[:space:]]*Label:[[:space:]]*custos[[:space:]]*$')"

# --- quiet, CUSTOS_PORT, --tls-san-ip, no other CA ------------------------------------------
run_make_state MAKE_STATE_QUIET=1 CUSTOS_PORT=0 "$tmp/second" --tls-san-ip 10.1.2.3
check_eq "MAKE_STATE_QUIET=1 prints nothing" "" "$out"
check "CUSTOS_PORT sets the listen port" grep -qxF 'listen = "127.0.0.1:0"' "$tmp/second/custosd.toml"
check_eq "--tls-san-ip is added to the server SAN" \
  "DNS:localhost, IP Address:127.0.0.1, IP Address:10.1.2.3" "$(san "$tmp/second/pki/server.crt")"
check "no other CA without MAKE_STATE_OTHER_CA=1" test ! -e "$tmp/second/pki/other-ca"
check_fails "each state folder has a CA key of its own" \
  same_cert_key "$pki/ca.crt" "$tmp/second/pki/ca.crt"

echo "make_state_test: $passed passed, 0 failed"
