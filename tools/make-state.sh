#!/usr/bin/env bash
# Creates, or completes, a local Custos state folder for development and tests:
#
#   STATE_DIR/custosd.toml          server config (relative paths resolve against STATE_DIR)
#   STATE_DIR/policy.toml           roles of the demo principals
#   STATE_DIR/hsm/softhsm2.conf     SoftHSM2 config; export SOFTHSM2_CONF=<it> to use the token
#   STATE_DIR/hsm/tokens/           SoftHSM2 token 'custos'
#   STATE_DIR/hsm/pin, so-pin       its user and SO PINs (random, 0600, never printed)
#   STATE_DIR/pki/ca.{crt,key}      development CA
#   STATE_DIR/pki/server.{crt,key}  server certificate (localhost, 127.0.0.1, --tls-san-ip ...)
#   STATE_DIR/pki/clients/NAME.{crt,key}  app, officer1, officer2, auditor, mariadb (a database)
#   STATE_DIR/pki/other-ca/{ca,client}.{crt,key}  an unrelated CA and a client it signed,
#                                   only with MAKE_STATE_OTHER_CA=1 (tests show it is refused)
#
# Idempotent: whatever already exists (PIN, key, certificate, token, config) is kept, so keys
# made before stay decryptable; only what is missing is made. To renew something, delete it
# (a certificate alone is remade from its existing key).
#
# Usage: tools/make-state.sh STATE_DIR [--tls-san-ip IP]...
# Environment: CUSTOS_PORT (listen port written to a new custosd.toml; default 7443),
#              MAKE_STATE_OTHER_CA=1, MAKE_STATE_QUIET=1 (print nothing unless failing).
set -euo pipefail
umask 077

readonly module=/usr/lib/softhsm/libsofthsm2.so
readonly token_label=custos
readonly trust_domain=custos.local

die() {
  echo "make-state: $*" >&2
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^set /{/^set /d; s/^# \{0,1\}//; p}' "$0"
}

san_ips=(127.0.0.1)
add_san_ip() {
  [[ $1 =~ ^[0-9A-Fa-f:.]+$ ]] || die "--tls-san-ip: '$1' is not an IP address"
  local ip
  for ip in "${san_ips[@]}"; do [[ $ip == "$1" ]] && return 0; done
  san_ips+=("$1")
}

state=""
while (($#)); do
  case $1 in
    --tls-san-ip)
      (($# >= 2)) || die "--tls-san-ip needs an IP address"
      add_san_ip "$2"
      shift 2
      ;;
    --tls-san-ip=*)
      add_san_ip "${1#*=}"
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      (($# <= 1)) || die "only one STATE_DIR may be given (see --help)"
      if (($#)); then
        [[ -z $state ]] || die "only one STATE_DIR may be given (see --help)"
        state=$1
        shift
      fi
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *)
      [[ -z $state ]] || die "only one STATE_DIR may be given (see --help)"
      state=$1
      shift
      ;;
  esac
done
[[ -n $state ]] || {
  usage >&2
  exit 2
}

port=${CUSTOS_PORT:-7443}
if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port > 65535)); then
  die "CUSTOS_PORT '$port' is not a port number"
fi
port=$((10#$port))
quiet=${MAKE_STATE_QUIET:-0}
other_ca=${MAKE_STATE_OTHER_CA:-0}

command -v openssl >/dev/null || die "openssl not found; run tools/install-deps.sh"
command -v softhsm2-util >/dev/null || die "softhsm2-util not found; run tools/install-deps.sh"
[[ -f $module ]] || die "$module not found; run tools/install-deps.sh"

mkdir -p -- "$state"
state=$(cd -P -- "$state" && pwd -P)
chmod 700 "$state"
cd "$state"
mkdir -p hsm/tokens pki/clients

# What was created or reused, printed at the end.
report=()
note() { report+=("$(printf '%-8s %s' "$1" "$2")"); }

# Writes stdin to $1 unless $1 exists; through a temporary file so nothing half-written is
# ever taken for a finished file by a later run.
write_if_missing() {
  if [[ -e $1 ]]; then
    note reused "$1"
    cat >/dev/null
  else
    cat >"$1.partial"
    mv -f "$1.partial" "$1"
    note created "$1"
  fi
}

# --- configuration ------------------------------------------------------------------------

write_if_missing custosd.toml <<EOF
# Custos server configuration (development state made by tools/make-state.sh).
[server]
listen = "127.0.0.1:$port"

[tls]
cert = "pki/server.crt"
key = "pki/server.key"
client_ca = "pki/ca.crt"

[hsm]
module = "$module"
token_label = "$token_label"
pin_file = "hsm/pin"

[storage]
path = "custos.db"

[policy]
file = "policy.toml"

[dual_control]
# The demo has two officers, so every change needs the approval of the other.
default_approvals = 1
EOF

if [[ -n ${CUSTOS_PORT:-} ]] && ! grep -qxF "listen = \"127.0.0.1:$port\"" custosd.toml; then
  echo "make-state: warning: custosd.toml (kept) does not listen on port $port;" \
    "edit [server] listen or delete the file and run again" >&2
fi

write_if_missing policy.toml <<EOF
# Custos policy: which principal (client certificate SAN URI or CN) holds which role.
# Each principal holds exactly one role.
[roles]
app     = ["spiffe://$trust_domain/app/demo"]
officer = ["spiffe://$trust_domain/officer/officer1", "spiffe://$trust_domain/officer/officer2"]
auditor = ["spiffe://$trust_domain/auditor/auditor"]
database = ["spiffe://$trust_domain/db/mariadb"]
EOF

# --- SoftHSM2 token -----------------------------------------------------------------------

tokendir_line="directories.tokendir = $state/hsm/tokens"
softhsm_conf() {
  cat <<EOF
# SoftHSM2 configuration of this Custos state folder (made by tools/make-state.sh).
# Anything using the token needs: export SOFTHSM2_CONF=$state/hsm/softhsm2.conf
$tokendir_line
objectstore.backend = file
log.level = ERROR
EOF
}
if [[ -e hsm/softhsm2.conf ]] && ! grep -qxF -- "$tokendir_line" hsm/softhsm2.conf; then
  # The folder was moved: the token directory path inside is stale. Rewriting the config
  # keeps the very same token (no key is lost).
  softhsm_conf >hsm/softhsm2.conf.partial
  mv -f hsm/softhsm2.conf.partial hsm/softhsm2.conf
  note updated "hsm/softhsm2.conf (tokendir now $state/hsm/tokens)"
else
  write_if_missing hsm/softhsm2.conf < <(softhsm_conf)
fi
export SOFTHSM2_CONF="$state/hsm/softhsm2.conf"

token_exists() {
  local slots
  slots=$(softhsm2-util --show-slots 2>&1) || die "softhsm2-util --show-slots failed: $slots"
  [[ $slots =~ (^|$'\n')[[:space:]]*Label:[[:space:]]*"$token_label"[[:space:]]*($'\n'|$) ]]
}

new_pin() {
  openssl rand -hex 16 >"$1.partial"
  mv -f "$1.partial" "$1"
  note created "$1"
}

# True if the token exists but its user PIN was never set (a first run died between
# C_InitToken and C_InitPIN): init_token then finishes it.
token_pin_unset() {
  local slots
  slots=$(softhsm2-util --show-slots 2>&1) || die "softhsm2-util --show-slots failed: $slots"
  [[ $slots =~ User\ PIN\ init\.:[[:space:]]*no[[:space:]]*$'\n'[[:space:]]*Label:[[:space:]]*"$token_label"[[:space:]]*($'\n'|$) ]]
}

# Initialises the token with the PINs in hsm/so-pin and hsm/pin, or finishes one whose user
# PIN was never set. softhsm2-util takes PINs only as --so-pin/--pin arguments (visible in
# `ps` while it runs) or from a terminal, so the token is initialised through PKCS#11
# directly from python3 (C_InitToken on the free slot, then C_InitPIN as SO), which reads
# the PIN files itself: the PINs are in no command line.
init_token() {
  command -v python3 >/dev/null || die "python3 is needed to initialise the token"
  python3 -I -S - "$module" "$token_label" hsm/so-pin hsm/pin <<'PY'
import ctypes as c
import sys

module, label, so_pin_file, pin_file = sys.argv[1:5]


def read_pin(path):
    with open(path, "rb") as f:
        return f.read().rstrip(b"\r\n")


so_pin, pin = read_pin(so_pin_file), read_pin(pin_file)
lib = c.CDLL(module)
ul, ulp, buf = c.c_ulong, c.POINTER(c.c_ulong), c.c_char_p
for name, args in {
    "C_Initialize": [c.c_void_p],
    "C_Finalize": [c.c_void_p],
    "C_GetSlotList": [c.c_ubyte, ulp, ulp],
    "C_GetTokenInfo": [ul, c.c_void_p],
    "C_InitToken": [ul, buf, ul, buf],
    "C_OpenSession": [ul, ul, c.c_void_p, c.c_void_p, ulp],
    "C_Login": [ul, ul, buf, ul],
    "C_InitPIN": [ul, buf, ul],
    "C_Logout": [ul],
    "C_CloseSession": [ul],
}.items():
    getattr(lib, name).argtypes, getattr(lib, name).restype = args, ul


def call(name, *args):
    rv = getattr(lib, name)(*args)
    if rv != 0:
        sys.exit(f"make-state: {name} failed with PKCS#11 error 0x{rv:08x}")


CKF_USER_PIN_INITIALIZED, CKF_TOKEN_INITIALIZED, CKU_SO = 0x8, 0x400, 0
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
call("C_Initialize", None)
count = ul(0)
call("C_GetSlotList", 1, None, c.byref(count))
slots = (ul * count.value)()
call("C_GetSlotList", 1, slots, c.byref(count))
free = unfinished = None
for slot in slots[: count.value]:
    info = c.create_string_buffer(512)  # CK_TOKEN_INFO: label, 64 more bytes of text, flags
    call("C_GetTokenInfo", slot, info)
    flags = ul.from_buffer(info, 96).value
    if not flags & CKF_TOKEN_INITIALIZED:
        free = free if free is not None else slot
    elif info.raw[:32] == label.encode().ljust(32) and not flags & CKF_USER_PIN_INITIALIZED:
        unfinished = slot
slot = unfinished if unfinished is not None else free
if slot is None:
    sys.exit("make-state: SoftHSM2 offers no free slot")
if unfinished is None:
    call("C_InitToken", slot, so_pin, len(so_pin), label.encode().ljust(32))
free = slot
session = ul(0)
call("C_OpenSession", free, CKF_RW_SESSION | CKF_SERIAL_SESSION, None, None, c.byref(session))
call("C_Login", session, CKU_SO, so_pin, len(so_pin))
call("C_InitPIN", session, pin, len(pin))
call("C_Logout", session)
call("C_CloseSession", session)
call("C_Finalize", None)
PY
}

tmp=$(mktemp -d)
token_job=""
cleanup() {
  if [[ -n $token_job ]]; then wait "$token_job" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

if token_exists && token_pin_unset; then
  if [[ ! -s hsm/so-pin ]]; then
    die "token '$token_label' exists but its user PIN was never set and hsm/so-pin is" \
      "missing (delete hsm/tokens to start over)"
  fi
  if [[ -s hsm/pin ]]; then note reused hsm/pin; else new_pin hsm/pin; fi
  note reused hsm/so-pin
  token_made="finished (its user PIN set)"
  init_token 2>"$tmp/token.err" &
  token_job=$!
elif token_exists; then
  if [[ ! -s hsm/pin ]]; then
    die "token '$token_label' exists in $state/hsm/tokens but hsm/pin is missing; the token" \
      "is unusable without it (delete hsm/tokens to start over, losing its keys)"
  fi
  note reused hsm/pin
  if [[ -s hsm/so-pin ]]; then
    note reused hsm/so-pin
  else
    echo "make-state: warning: hsm/so-pin is missing (the token's SO PIN is unknown)" >&2
  fi
  note reused "token '$token_label' (hsm/tokens)"
else
  for f in hsm/so-pin hsm/pin; do
    if [[ -s $f ]]; then note reused "$f"; else new_pin "$f"; fi
  done
  # Runs while the certificates are made; waited for below.
  token_made=created
  init_token 2>"$tmp/token.err" &
  token_job=$!
fi

# --- PKI ----------------------------------------------------------------------------------

# Extension profiles, one section per certificate kind.
leaf_ext="basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid"
server_san="DNS:localhost"
for ip in "${san_ips[@]}"; do server_san+=", IP:$ip"; done
cnf=$tmp/openssl.cnf
cat >"$cnf" <<EOF
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
$leaf_ext
extendedKeyUsage = serverAuth
subjectAltName = $server_san
[client_app]
$leaf_ext
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://$trust_domain/app/demo
[client_officer1]
$leaf_ext
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://$trust_domain/officer/officer1
[client_officer2]
$leaf_ext
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://$trust_domain/officer/officer2
[client_auditor]
$leaf_ext
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://$trust_domain/auditor/auditor
[client_mariadb]
$leaf_ext
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://$trust_domain/db/mariadb
EOF

# Every certificate (made or kept), by the CA certificate it must verify against.
declare -A signed_by=()
made_server_crt=0

# make_pair BASE CN PROFILE DAYS [CA_BASE]: BASE.key (kept if present) and BASE.crt (kept if
# present), signed by CA_BASE.{crt,key} or, without CA_BASE, self-signed. ECDSA P-256, SHA-256.
make_pair() {
  local base=$1 cn=$2 profile=$3 days=$4 ca=${5:-}
  if [[ -e $base.crt && ! -e $base.key ]]; then
    die "$base.crt exists but its key $base.key is missing; delete $base.crt to make a new pair"
  fi
  if [[ -e $base.key ]]; then
    note reused "$base.key"
  else
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
      -out "$base.key.partial" 2>"$tmp/err" || die "making $base.key failed: $(<"$tmp/err")"
    mv -f "$base.key.partial" "$base.key"
    note created "$base.key"
  fi
  signed_by[$base.crt]=${ca:-$base}.crt
  if [[ -e $base.crt ]]; then
    note reused "$base.crt"
    return 0
  fi
  local signer=(-key "$base.key")
  if [[ -n $ca ]]; then signer+=(-CA "$ca.crt" -CAkey "$ca.key"); fi
  openssl req -x509 -new -config "$cnf" -extensions "$profile" "${signer[@]}" \
    -subj "/CN=$cn" -sha256 -days "$days" -out "$base.crt.partial" 2>"$tmp/err" ||
    die "making $base.crt failed: $(<"$tmp/err")"
  mv -f "$base.crt.partial" "$base.crt"
  if [[ $base == pki/server ]]; then made_server_crt=1; fi
  note created "$base.crt"
}

make_pair pki/ca "Custos Development CA" ca 3650
make_pair pki/server custosd server 730 pki/ca
for name in app officer1 officer2 auditor mariadb; do
  make_pair "pki/clients/$name" "$name" "client_$name" 730 pki/ca
done
if [[ $other_ca == 1 ]]; then
  mkdir -p pki/other-ca
  make_pair pki/other-ca/ca "Other Development CA" ca 3650
  # Claims the demo app's identity, but from a CA that custosd does not trust.
  make_pair pki/other-ca/client app client_app 730 pki/other-ca/ca
fi

# Every certificate, new or kept, must verify against its CA (one openssl run per CA): this
# also catches kept certificates of a CA that was remade, or expired ones.
for ca_crt in pki/ca.crt pki/other-ca/ca.crt; do
  crts=()
  for crt in "${!signed_by[@]}"; do
    if [[ ${signed_by[$crt]} == "$ca_crt" ]]; then crts+=("$crt"); fi
  done
  if ((${#crts[@]} == 0)); then continue; fi
  out=$(openssl verify -CAfile "$ca_crt" "${crts[@]}" 2>&1) ||
    die "certificates do not verify against $ca_crt (delete the failing ones and run" \
      "again to remake them):"$'\n'"$out"
done

# A kept server certificate keeps its names; say so if it lacks a requested IPv4 address.
if ((!made_server_crt)); then
  sans=$(openssl x509 -in pki/server.crt -noout -ext subjectAltName 2>/dev/null || true)
  for ip in "${san_ips[@]}"; do
    if [[ $ip != *:* && ! $sans =~ "IP Address:$ip"(,|$|[[:space:]]) ]]; then
      echo "make-state: warning: pki/server.crt (kept) has no IP:$ip;" \
        "delete it and run again to add it" >&2
    fi
  done
fi

# Private material stays 0600 even if loosened by hand (custosd refuses a readable PIN file).
chmod 600 hsm/pin pki/*.key pki/clients/*.key
if [[ -e hsm/so-pin ]]; then chmod 600 hsm/so-pin; fi
if [[ -d pki/other-ca ]]; then chmod 600 pki/other-ca/*.key; fi

if [[ -n $token_job ]]; then
  job=$token_job
  token_job=""
  wait "$job" || die "initialising token '$token_label' failed: $(<"$tmp/token.err")"
  token_exists || die "token '$token_label' is missing after initialisation"
  note "$token_made" "token '$token_label' (hsm/tokens)"
fi

if [[ $quiet != 1 ]]; then
  echo "make-state: state folder $state"
  printf '  %s\n' "${report[@]}"
  echo "Anything using the token needs: export SOFTHSM2_CONF=$SOFTHSM2_CONF"
fi
