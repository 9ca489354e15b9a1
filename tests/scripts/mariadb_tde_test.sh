#!/usr/bin/env bash
# MariaDB encrypts its tables with keys served by Custos (docs/TDE.md), end to end: a real
# custosd with its key/value gateway, a throw-away mariadbd (Debian's, with the
# hashicorp_key_management plugin) on a private socket and data folder.
#  1. Officers make key ids 1 and 2 of mount "mariadb" and issue a token, each by dual control;
#     the database claims the token (custosctl, as the mariadb principal).
#  2. MariaDB (innodb_encrypt_tables, innodb_encrypt_log, encrypt_tmp_files) creates an
#     encrypted table and inserts rows; after a restart it reads them back; neither the table's
#     file nor the redo log holds the rows' plaintext; Custos recorded the fetches.
#  3. Officers rotate key 1: MariaDB re-encrypts the table under version 2
#     (information_schema.innodb_tablespaces_encryption), rows still readable.
#  4. A freshly started MariaDB cannot open the table with Custos unreachable, nor with the
#     token revoked.
#
# Usage: tests/scripts/mariadb_tde_test.sh BUILD_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="$(cd "${1:?usage: mariadb_tde_test.sh BUILD_DIR}" && pwd)"
work="$(mktemp -d)"
state="$work/state"
db="$work/db"
sock="$work/mariadb.sock"
custosd_pid=""
passed=0

cleanup() {
  if [[ -S $sock ]]; then mariadb-admin --no-defaults --socket="$sock" -uroot shutdown 2>/dev/null || true; fi
  if [[ -f $work/mariadbd.pid ]]; then kill "$(cat "$work/mariadbd.pid")" 2>/dev/null || true; fi
  if [[ -n $custosd_pid ]]; then kill "$custosd_pid" 2>/dev/null && wait "$custosd_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "mariadb_tde_test: FAILED: $*" >&2
  for log in "$work/mariadbd.err" "$state/custosd.log"; do
    [[ -f $log ]] && { echo "--- $log" >&2; tail -n 25 "$log" >&2; }
  done
  echo "mariadb_tde_test: $passed passed, 1 failed"
  exit 1
}
ok() {
  passed=$((passed + 1))
  echo "mariadb_tde_test: ok: $*"
}

for tool in mariadbd mariadb-install-db mariadb mariadb-admin; do
  command -v "$tool" >/dev/null || fail "$tool not found (tools/install-deps.sh installs mariadb-server)"
done
[[ -f /usr/lib/mysql/plugin/hashicorp_key_management.so ]] ||
  fail "the hashicorp_key_management plugin is not installed"

# --- Custos ------------------------------------------------------------------------------
MAKE_STATE_QUIET=1 CUSTOS_PORT=0 "$repo/tools/make-state.sh" "$state" >/dev/null
printf '\n[gateway]\nlisten = "127.0.0.1:0"\n' >>"$state/custosd.toml"
export SOFTHSM2_CONF="$state/hsm/softhsm2.conf"
"$build/server/custosd" --config "$state/custosd.toml" init >"$work/init.log" 2>&1 ||
  fail "custosd init: $(cat "$work/init.log")"

start_custosd() {
  rm -f "$work/port"
  "$build/server/custosd" --config "$state/custosd.toml" --port-file "$work/port" \
    >>"$state/custosd.log" 2>&1 &
  custosd_pid=$!
  for _ in $(seq 1 200); do
    [[ -s $work/port ]] && [[ $(wc -l <"$work/port") -ge 2 ]] && break
    kill -0 "$custosd_pid" 2>/dev/null || fail "custosd exited at start"
    sleep 0.05
  done
  port=$(sed -n 1p "$work/port")
  gateway_port=$(sed -n 2p "$work/port")
  [[ $gateway_port -gt 0 ]] || fail "no gateway port"
}
stop_custosd() {
  kill "$custosd_pid" && wait "$custosd_pid" 2>/dev/null || true
  custosd_pid=""
}
start_custosd

ctl() {  # AS ARGS...
  local as=$1
  shift
  "$build/server/custosctl" --state "$state" --addr "127.0.0.1:$port" --as "$as" "$@"
}
json() {  # FIELD < JSON
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
# Proposes as officer1, approves as officer2 (the demo state's quorum); prints the reason.
execute() {
  local proposed id digest executed
  proposed=$(ctl officer1 propose "$@" --justification "TDE for the clinical database") ||
    fail "propose $*: $proposed"
  id=$(json request_id <<<"$proposed")
  digest=$(json digest <<<"$proposed")
  executed=$(ctl officer2 approve "$id" --digest "$digest") || fail "approve $*: $executed"
  [[ $(json state <<<"$executed") == EXECUTED ]] || fail "$* not executed: $executed"
  json reason <<<"$executed"
}

ctl officer1 create-key --alias tde-seal --description "seals MariaDB table-space keys" >/dev/null ||
  fail "create-key"
execute create-tde-key --mount mariadb --key-id 1 --key tde-seal >/dev/null
execute create-tde-key --mount mariadb --key-id 2 --key tde-seal >/dev/null
issue_token() {
  local reason id claimed
  reason=$(execute issue-database-token --principal spiffe://custos.local/db/mariadb \
    --mount mariadb --key-id 1 --key-id 2 --ttl-days 30)
  id=$(sed -n 's/.*executed; token \([0-9a-f-]\{36\}\) .*/\1/p' <<<"$reason")
  [[ -n $id ]] || fail "no token id in: $reason"
  claimed=$(ctl mariadb claim-database-token "$id") || fail "claim: $claimed"
  printf '%s %s\n' "$id" "$(json token <<<"$claimed")"
}
read -r token_id token < <(issue_token)
[[ $token == cdt.* ]] || fail "unexpected token shape"
ok "key ids 1 and 2 made and a token issued by dual control, claimed by the database"

# --- MariaDB -----------------------------------------------------------------------------
mariadb-install-db --no-defaults --user=root --datadir="$db" \
  --auth-root-authentication-method=socket >"$work/install-db.log" 2>&1 ||
  fail "mariadb-install-db: $(tail -5 "$work/install-db.log")"

# Starts mariadbd on the gateway with TOKEN; true once it answers, false if it exits.
start_mariadb() {  # TOKEN
  rm -f "$sock" "$work/mariadbd.pid"
  # The token through the environment (the plugin's fallback), not argv: ps shows argv.
  VAULT_TOKEN="$1" mariadbd --no-defaults --user=root --datadir="$db" --socket="$sock" \
    --skip-networking --pid-file="$work/mariadbd.pid" --log-error="$work/mariadbd.err" \
    --plugin-load-add=hashicorp_key_management \
    --hashicorp-key-management-vault-url="https://localhost:$gateway_port/v1/mariadb" \
    --hashicorp-key-management-vault-ca="$state/pki/ca.crt" \
    --hashicorp-key-management-timeout=5 --hashicorp-key-management-max-retries=0 \
    --hashicorp-key-management-cache-version-timeout=1000 \
    --innodb-encrypt-tables=ON --innodb-encrypt-log=ON --encrypt-tmp-files=ON \
    --innodb-encryption-threads=2 --innodb-encryption-rotate-key-age=1 &
  local pid=$!
  for _ in $(seq 1 300); do
    if mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1; then return 0; fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  fail "mariadbd neither answered nor exited within 30 s"
}
stop_mariadb() {
  local pid
  pid=$(cat "$work/mariadbd.pid")
  mariadb-admin --no-defaults --socket="$sock" -uroot shutdown
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
sql() { mariadb --no-defaults --socket="$sock" -uroot -N -B -e "$1"; }

start_mariadb "$token" || fail "mariadbd did not start on Custos's keys"
marker="PHI-MARKER-$RANDOM$RANDOM"
sql "CREATE DATABASE clinic; CREATE TABLE clinic.notes (id INT PRIMARY KEY, note VARCHAR(200))
     ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID=1;" || fail "create table"
for i in $(seq 1 50); do
  sql "INSERT INTO clinic.notes VALUES ($i, '$marker patient $i')" || fail "insert"
done
[[ $(sql "SELECT COUNT(*) FROM clinic.notes WHERE note LIKE '$marker%'") == 50 ]] || fail "rows"
stop_mariadb
start_mariadb "$token" || fail "mariadbd did not restart"
[[ $(sql "SELECT note FROM clinic.notes WHERE id = 7") == "$marker patient 7" ]] ||
  fail "rows not read back after a restart"
ok "an encrypted table's rows read back after a restart"

[[ -f $db/clinic/notes.ibd ]] || fail "no table file"
if grep -qa "$marker" "$db/clinic/notes.ibd"; then fail "the table file holds the plaintext"; fi
for log in "$db"/ib_logfile*; do
  if grep -qa "$marker" "$log"; then fail "$log holds the plaintext"; fi
done
[[ $(sql "SELECT ENCRYPTION_SCHEME, CURRENT_KEY_ID FROM information_schema.innodb_tablespaces_encryption
          WHERE NAME = 'clinic/notes'") == $'1\t1' ]] || fail "the table is not encrypted under key 1"
ok "neither the table file nor the redo log holds the rows' plaintext"

# Read whole first: `grep -q` would stop reading early, and with pipefail custosctl's SIGPIPE
# would fail the check.
fetched=$(ctl auditor audit export | grep '"action":"FetchTdeKey"' | grep '"outcome":"OK"' || true)
fetches=$(grep -c . <<<"$fetched" || true)
[[ $fetches -ge 2 ]] || fail "Custos recorded $fetches successful fetches"
grep -q '"principal":"spiffe://custos.local/db/mariadb"' <<<"$fetched" ||
  fail "fetch records name no database"
ok "Custos recorded $fetches key fetches by the database"

# --- Rotation ----------------------------------------------------------------------------
execute rotate-tde-key --mount mariadb --key-id 1 >/dev/null
version=""
for _ in $(seq 1 120); do
  version=$(sql "SELECT CURRENT_KEY_VERSION FROM information_schema.innodb_tablespaces_encryption
                 WHERE NAME = 'clinic/notes'")
  [[ $version == 2 ]] && break
  sleep 0.5
done
[[ $version == 2 ]] || fail "MariaDB did not move the table to key version 2 (at $version)"
[[ $(sql "SELECT COUNT(*) FROM clinic.notes WHERE note LIKE '$marker%'") == 50 ]] ||
  fail "rows unreadable after the rotation"
ok "after officers rotated key 1, MariaDB re-encrypted the table under version 2"
stop_mariadb

# --- Custos unreachable, then the token revoked ------------------------------------------
cannot_open() {  # WHY EXPECTED_LOG_LINE
  : >"$work/mariadbd.err"
  if start_mariadb "$token"; then
    if sql "SELECT note FROM clinic.notes WHERE id = 7" >/dev/null 2>&1; then
      fail "a fresh MariaDB read the table with $1"
    fi
    stop_mariadb
  fi
  grep -q "$2" "$work/mariadbd.err" || fail "MariaDB's log does not say '$2'"
  ok "a freshly started MariaDB cannot open the table with $1"
}
stop_custosd
cannot_open "Custos unreachable" "hashicorp: curl returned this error code: 7"
start_custosd
execute revoke-database-token --token-id "$token_id" >/dev/null
cannot_open "its token revoked" "hashicorp: Hashicorp server error: 403"

echo "mariadb_tde_test: $passed passed, 0 failed"
