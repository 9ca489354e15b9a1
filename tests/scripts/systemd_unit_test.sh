#!/usr/bin/env bash
# deploy/custosd.service stays valid and hardened: systemd-analyze verifies it (with ExecStart
# pointed at the custosd just built) and rates its sandbox offline; the exposure must stay at
# most 2.0 ("OK"). No running systemd is needed.
#
# Usage: tests/scripts/systemd_unit_test.sh BUILD_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
build="$(cd "${1:?usage: systemd_unit_test.sh BUILD_DIR}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unit="$work/custosd.service"
sed "s|/usr/local/bin/custosd|$build/server/custosd|" "$repo/deploy/custosd.service" >"$unit"

# verify prints nothing for a valid unit (and exits non-zero on some errors, not all).
verified="$(cd "$work" && systemd-analyze verify "$unit" 2>&1 || true)"
if [[ -n $verified ]]; then
  echo "systemd_unit_test: FAILED: systemd-analyze verify:" >&2
  echo "$verified" >&2
  exit 1
fi

report="$(cd "$work" && systemd-analyze security --offline=true "$unit" 2>&1)"
exposure="$(sed -n 's/.*Overall exposure level for custosd.service: \([0-9.]*\).*/\1/p' <<<"$report")"
if [[ -z $exposure ]] || ! awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }'; then
  echo "systemd_unit_test: FAILED: exposure '${exposure:-none}' (at most 2.0 expected):" >&2
  echo "$report" >&2
  exit 1
fi
# The settings the deployment relies on, each present.
for setting in User=custos NoNewPrivileges=yes ProtectSystem=strict PrivateTmp=yes \
  MemoryDenyWriteExecute=yes LimitCORE=0 LimitMEMLOCK= StateDirectory=custos \
  Restart=on-failure StartLimitIntervalSec=0 TimeoutStopSec=; do
  grep -q "^$setting" "$unit" || {
    echo "systemd_unit_test: FAILED: $setting missing" >&2
    exit 1
  }
done
echo "systemd_unit_test: passed (exposure $exposure)"
