#!/usr/bin/env bash
# suites.sh - runs the VM scenarios (./tests/integration/kernel) as several
# boots grouped by area, each with its own time limit, and prints how long
# every test and every boot took.
#
# usage: tests/integration/vm/suites.sh [-list] [SUITE...]
#   (no SUITE: all of them, in the order below)
#
# Each suite's limit is at least twice its duration on a quiet 2-core
# machine, so a busy or slower machine makes the run slower, not red. The
# summary marks a suite whose duration came within a factor 2 of its limit
# ("MARGIN"): raise the limit or shrink the suite before it turns red.
#
# Needs out/vm-testdata (testdata.sh) and out/vm-cowdisk.img (cowdisk.sh);
# the Makefile's test-integration target makes both.
set -uo pipefail
set -f # the regular expressions below are not globs
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
VM=tests/integration/vm/vmtest.sh
DATA=out/vm-testdata
DISK=out/vm-cowdisk.img

# name | limit (s) | quiet duration (s, measured) | vmtest.sh arguments
# The bridge suite takes every test no other suite names, so a new test
# always runs somewhere. The iscsi suite loads the kernel's iSCSI
# initiator and copies the host's open-iscsi daemon and tool (package
# open-iscsi, installed by scripts/deps.sh).
SUITES=(
  # Quiet durations measured in one `make test` on an otherwise idle 2-core
  # machine (2026-12-03, whole make test 20m33s). Under a load of 8-18 the
  # same suites took 2.5-4.5x as long (bridge 577 s, cowtest-sequence
  # 1,354-1,477 s), hence limits well above twice the quiet figure.
  "bridge|900|126|-skip ^Test(COW|Merge|Cowtest|ISCSI) -files $DATA"
  "iscsi|240|21|-run ^TestISCSI -files $DATA -mod iscsi_tcp -mod sd_mod -hostbin iscsid -hostbin iscsiadm"
  "cow|300|73|-run ^Test(COW|Merge) -files $DATA"
  "cowtest-random|600|113|-run ^TestCowtestRandom$ -disk-snapshot $DISK"
  # -t 3m3s, -v of the device 2m3s, -v of the merged file 44s.
  "cowtest-sequence|1800|498|-run ^TestCowtestSequenceWithMerger$ -disk-snapshot $DISK"
)

if [ "${1:-}" = -list ]; then
  for s in "${SUITES[@]}"; do IFS='|' read -r n l q a <<<"$s"; printf '%-18s limit %5ss  quiet ~%ss  %s\n' "$n" "$l" "$q" "$a"; done
  exit 0
fi
want=("$@")
selected() {
  [ ${#want[@]} = 0 ] && return 0
  local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}
for w in "${want[@]}"; do
  found=0; for s in "${SUITES[@]}"; do [ "${s%%|*}" = "$w" ] && found=1; done
  [ $found = 1 ] || { echo "suites.sh: no suite $w (-list shows them)" >&2; exit 2; }
done

LOGDIR=out/vm-logs
mkdir -p "$LOGDIR"
summary=()
rc=0
T0=$SECONDS
for s in "${SUITES[@]}"; do
  IFS='|' read -r name limit quiet args <<<"$s"
  selected "$name" || continue
  # A suite that copies host binaries into the VM needs them here.
  missing=""
  read -ra words <<<"$args"
  for i in "${!words[@]}"; do
    if [ "${words[$i]}" = -hostbin ] && ! command -v "${words[$((i + 1))]}" >/dev/null && [ ! -x "/usr/sbin/${words[$((i + 1))]}" ]; then
      missing="$missing ${words[$((i + 1))]}"
    fi
  done
  if [ -n "$missing" ]; then
    echo "=== VM suite $name: SKIP: host commands missing:$missing (scripts/deps.sh as root installs them)"
    summary+=("$(printf '%-18s %-22s' "$name" "SKIP (missing:$missing)")")
    continue
  fi
  echo "=== VM suite $name (limit ${limit}s, about ${quiet}s on a quiet machine)"
  start=$SECONDS
  # shellcheck disable=SC2086 # args is a list of words without spaces
  "$VM" $args -timeout "$limit" 2>&1 | tee "$LOGDIR/$name.log"
  src=${PIPESTATUS[0]}
  took=$((SECONDS - start))
  state=PASS
  [ "$src" = 0 ] || { state="FAIL (exit $src)"; rc=1; }
  [ "$src" = 124 ] && state="TIMEOUT after ${limit}s"
  margin=""
  [ $((took * 2)) -gt "$limit" ] && margin="  MARGIN: took more than half its limit"
  summary+=("$(printf '%-18s %-22s %5ss of %5ss%s' "$name" "$state" "$took" "$limit" "$margin")")
  # each test's duration, from go test -v's result lines
  while read -r line; do summary+=("    $line"); done < <(grep -aE '^--- (PASS|FAIL|SKIP)' "$LOGDIR/$name.log" |
    sed -E 's/^--- (PASS|FAIL|SKIP): ([^ ]+) \(([0-9.]+)s\)/\2 \1 \3s/' | awk '{printf "%-40s %-5s %8s\n", $1, $2, $3}')
done
echo
echo "=== VM suites: $((SECONDS - T0))s in all (logs in $LOGDIR/)"
printf '%s\n' "${summary[@]}"
exit $rc
