#!/usr/bin/env bash
# Incremental revisions (issue 16): a caching proxy replicates a new
# revision of a 1 GiB image (64 hash blocks of 16 MiB) whose previous
# revision r1 it holds complete, with its .crc:
#  - r2 = r1 with a contiguous 40 MiB region changed (300-340 MiB, 4 hash
#    blocks): the 60 unchanged hash blocks are copied locally, only the 4
#    changed ones are fetched; against the same replication by a proxy
#    without r1 (the whole image is fetched);
#  - r3 = r1 with 2,000 scattered 4 KiB blocks changed: every hash block
#    is touched, so nothing can be reused (16 MiB granularity); against
#    the same without r1.
# The reference dnbd3-server (../shared/peers/dnbd3-ref) as the proxy,
# replicating the same revision in the same run, is the peer: it has no
# incremental revisions and always fetches the whole image, as ours does
# without r1 (a SKIP line and no column when it cannot run).
# Each with full background replication (bgrWindowSize=16), triggered by a
# 4 KiB read; the time runs until RPC complete=100 and the .map is gone.
# Reported: seconds and bytes the proxy received (and, in network
# namespaces, bytes over the link). The revisions and their .crc are made
# with dd and `dnbd3-server --crc` (the merger writes the same .crc; the
# merger-fed version of this is the netns test TestIncrementalRevisions).
# As root the origin and the proxy are joined by a tc-shaped link
# (LINK_MBIT, default 1000), else both run on loopback (no link limit).
# Environment: RUNS (default 3), LINK_MBIT, NETNS=0 forces loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS=${RUNS:-3} LINK_MBIT=${LINK_MBIT:-1000} NETNS=${NETNS:-1}
P=$W/incremental
NSP=dnbd3i-$$- # namespace prefix
PIDS=()

trap stop_all EXIT

# The origin: r1 (random), r2 = r1 with 40 MiB at 300 MiB replaced, r3 =
# r1 with 2,000 scattered 4 KiB blocks replaced, each with a .crc. Kept
# for later runs while younger than r1.
mkdir -p "$P"
rm -f "$P"/*.log
O=$P/origin/img
random_file "$O/lab.r1" 1G
if [ ! -f "$O/lab.r2" ] || [ "$O/lab.r2" -ot "$O/lab.r1" ]; then
  rm -f "$O/lab.r2.crc"
  cp "$O/lab.r1" "$O/lab.r2.tmp"
  head -c 40M /dev/urandom | dd of="$O/lab.r2.tmp" bs=1M seek=300 conv=notrunc status=none
  mv "$O/lab.r2.tmp" "$O/lab.r2"
fi
if [ ! -f "$O/lab.r3" ] || [ "$O/lab.r3" -ot "$O/lab.r1" ]; then
  rm -f "$O/lab.r3.crc"
  cp "$O/lab.r1" "$O/lab.r3.tmp"
  head -c 8000K /dev/urandom > "$P/scatter.data"
  i=0
  for b in $(shuf -i 0-262143 -n 2000); do # 4 KiB blocks of 1 GiB
    dd if="$P/scatter.data" of="$O/lab.r3.tmp" bs=4K skip=$i seek="$b" count=1 conv=notrunc status=none
    i=$((i + 1))
  done
  mv "$O/lab.r3.tmp" "$O/lab.r3"
fi
for r in 1 2 3; do [ -f "$O/lab.r$r.crc" ] || "$BIN/dnbd3-server" --crc "$O/lab.r$r" > /dev/null; done
cat "$O"/lab.r[123] > /dev/null # page cache warm

NS=
if wan_netns; then
  NS=1
  OADDR=10.213.9.1:5003 PADDR=10.213.9.2:5003 OBIND= PBIND= ON=$C PN=$B
else
  OADDR=127.0.0.1:15651 PADDR=127.0.0.2:15652 OBIND=127.0.0.1 PBIND=127.0.0.2 ON= PN=
fi
inns() { local ns=$1; shift; if [ -n "$ns" ]; then ip netns exec "$ns" "$@"; else "$@"; fi; }

# server NS CONFDIR BIND LOG: start dnbd3-server ($SERVER, default ours) in the background (in
# namespace NS, bound to BIND, if given); its pid is left in SPID. nsenter
# execs the server (`ip netns exec` forks and waits, so killing it would
# leave the server running).
server() {
  local args=(-n -c "$2" ${3:+-b "$3"})
  if [ -n "$1" ]; then
    nsenter --net="/run/netns/$1" "${SERVER:-$BIN/dnbd3-server}" "${args[@]}" >> "$4" 2>&1 &
  else
    "${SERVER:-$BIN/dnbd3-server}" "${args[@]}" >> "$4" 2>&1 &
  fi
  SPID=$!
}

server_conf "$P/origin/etc" "$O" "${OADDR##*:}"
server "$ON" "$P/origin/etc" "$OBIND" "$P/origin.log"; PIDS+=("$SPID")
wait_on "${OADDR%:*}" "${OADDR##*:}" "$ON"

# rx_bytes: what room B received on the link (0 on loopback).
rx_bytes() {
  if [ -n "$NS" ]; then ip -n "$PN" -s -j link show wan0 | jq '.[0].stats64.rx.bytes'; else echo 0; fi
}

# query IMAGE-RID FIELD: the proxy's RPC images[] field of lab rid RID.
query() {
  inns "$PN" curl -s --max-time 5 "http://$PADDR/query?q=stats&q=images" |
    jq -r --argjson r "$1" --arg f "$2" '[.images[] | select(.name == "lab" and .rid == $r) | .[$f]] | (.[0] // -1)' 2>/dev/null || echo -1
}

# run WITH_R1 RID: one replication of revision RID by a fresh proxy (with
# a complete copy of r1 when WITH_R1 is 1; the reference server without r1
# when WITH_R1 is ref); prints "seconds fetched_bytes
# link_bytes reused_bytes" ("n/a ..." on failure, or when the proxy's copy
# differs from the origin's).
run() {
  local base=$P/proxy/img rid=$2 t c rx0 recv
  rm -rf "$P/proxy"
  mkdir -p "$base"
  local server=$BIN/dnbd3-server
  [ "$1" = ref ] && server=$REF_SERVER
  if [ "$1" = 1 ]; then # a complete replicated copy of r1
    cp "$O/lab.r1" "$O/lab.r1.crc" "$base/"
    printf '[main]\natime=%s\n' "$(date +%s)" > "$base/lab.r1.meta"
  fi
  sync -f "$base" # the copy's writeback does not count
  server_conf "$P/proxy/etc" "$base" "${PADDR##*:}" isProxy=true backgroundReplication=true bgrWindowSize=16 autoFreeDiskSpaceDelay=-1
  printf '[%s]\ncomment=origin\nfor=replication\n' "$OADDR" > "$P/proxy/etc/alt-servers"
  SERVER=$server server "$PN" "$P/proxy/etc" "$PBIND" "$P/proxy.log"; local pid=$SPID
  wait_on "${PADDR%:*}" "${PADDR##*:}" "$PN"
  rx0=$(rx_bytes)
  t=$(now)
  inns "$PN" "$BIN/dnbd3-nbd" get -h "$PADDR" -i lab -r "$rid" -S -q -o /dev/null --offset 300M --length 4K || { echo "n/a 0 0 0"; kill $pid; wait $pid; return; }
  for _ in $(seq 6000); do
    c=$(query "$rid" complete)
    if [ "$c" = 100 ] && [ ! -e "$base/lab.r$rid.map" ]; then break; fi
    sleep 0.05
  done
  local secs; secs=$(elapsed "$t")
  [ "$c" = 100 ] || secs=n/a
  recv=$(inns "$PN" curl -s "http://$PADDR/query?q=stats" | jq '.bytesReceived')
  local reused; reused=$(query "$rid" bytesReused); { [ "$reused" = null ] || [ "$reused" = -1 ]; } && reused=0
  local line; line="$secs $recv $(( $(rx_bytes) - rx0 )) $reused"
  kill $pid; wait $pid 2>/dev/null || true
  if ! cmp -s "$O/lab.r$rid" "$base/lab.r$rid"; then echo "the proxy's r$rid differs from the origin's" >&2; line="n/a 0 0 0"; fi
  echo "$line" # last: the caller's read returns on it and starts the next run
}

REF_SERVER=$(ref_peer dnbd3-server) || REF_SERVER=
SIDES="1 0"
if [ -n "$REF_SERVER" ]; then SIDES+=" ref"; else echo "SKIP: reference proxy column"; fi

# T, B, L, U by "RID WITH_R1": times (all runs), bytes received, bytes
# over the link, bytes reused (last run).
declare -A T B L U
for i in $(seq "$RUNS"); do
  for rid in 2 3; do
    for with in $SIDES; do
      read -r s b l u < <(run $with $rid)
      T[$rid$with]+=" $s"; B[$rid$with]=$b; L[$rid$with]=$l; U[$rid$with]=$u
    done
  done
done

rat() { if isnum "$1" && isnum "$2"; then ratio "$1" "$2"; else echo n/a; fi; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
# row LABEL R1 WITHOUT RATIO REFERENCE RATIO NOTE
row() { printf '%-62s %12s %12s %8s %12s %8s %s\n' "$@"; }
# rmib KEY: MiB of a reference figure, n/a without the reference
rmib() { if [ -n "$REF_SERVER" ]; then mib "$1"; else echo n/a; fi; }
where="loopback (no link limit)"
[ -n "$NS" ] && where="${LINK_MBIT} Mbit/s link (netns)"
printf '\n%s\n' "peer: the reference dnbd3-server as the proxy, same revision, same run (no incremental revisions: it fetches the whole image)"
row "incremental revisions (best of $RUNS), $where" "r1 present" "without r1" "ratio" "reference" "r1/ref" ""
for rid in 2 3; do
  t1=$(mins "${T[${rid}1]}") t0=$(mins "${T[${rid}0]}") tr=$(mins "${T[${rid}ref]:-}")
  if [ $rid = 2 ]; then
    row "replication of r2 (1 GiB, 40 MiB contiguous changed): seconds" "$t1" "$t0" "$(rat "$t1" "$t0")" "$tr" "$(rat "$t1" "$tr")" "without r1: full fetch"
    touched="4 hash blocks = 64 MiB"
  else
    row "replication of r3 (1 GiB, 2,000 x 4 KiB scattered): seconds" "$t1" "$t0" "$(rat "$t1" "$t0")" "$tr" "$(rat "$t1" "$tr")" "all 64 hash blocks touched"
    touched="64 hash blocks = 1024 MiB"
  fi
  row "  MiB the proxy received from the origin" "$(mib "${B[${rid}1]}")" "$(mib "${B[${rid}0]}")" "$(rat "${B[${rid}1]}" "${B[${rid}0]}")" \
    "$(rmib "${B[${rid}ref]:-}")" "$(rat "${B[${rid}1]}" "${B[${rid}ref]:-}")" "$touched"
  if [ -n "$NS" ]; then
    row "  MiB over the link" "$(mib "${L[${rid}1]}")" "$(mib "${L[${rid}0]}")" "$(rat "${L[${rid}1]}" "${L[${rid}0]}")" \
      "$(rmib "${L[${rid}ref]:-}")" "$(rat "${L[${rid}1]}" "${L[${rid}ref]:-}")" ""
  fi
  row "  MiB copied from r1 (RPC bytesReused)" "$(mib "${U[${rid}1]}")" "$(mib "${U[${rid}0]}")" "" "" "" ""
done
echo "(runs: r2 with r1${T[21]} | without${T[20]}${T[2ref]:+ | reference${T[2ref]}}; r3 with r1${T[31]} | without${T[30]}${T[3ref]:+ | reference${T[3ref]}}; load average $(cut -d' ' -f1-3 /proc/loadavg))"
