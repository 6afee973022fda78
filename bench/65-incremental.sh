#!/usr/bin/env bash
# Incremental revisions: a caching proxy replicates revision r2 of a 1 GiB
# image (r1 with a contiguous 40 MiB region changed, 4 of 64 hash blocks)
#  - with r1 present on the proxy (complete, with its .crc): the unchanged
#    hash blocks are copied locally, only the changed ones are fetched;
#  - without r1 (the peer): the whole image is fetched.
# Both with full background replication (bgrWindowSize=16), triggered by a
# 4 KiB read; the time runs until RPC complete=100 and the .map is gone.
# Reported: seconds and bytes the proxy received (and, in network
# namespaces, bytes over the link). r2 and both .crc files are made with
# dd and `dnbd3-server --crc` (the merger writes the same .crc; its own
# figures are in 50-merger.sh and the netns test TestIncrementalRevisions).
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

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$(id -u)" = 0 ]; then
    for ns in $(ip netns list 2>/dev/null | awk -v p="$NSP" 'index($1, p) == 1 {print $1}'); do
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    done
  fi
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# The origin: r1 (random), r2 = r1 with 40 MiB at 300 MiB replaced, both
# with a .crc.
mkdir -p "$P"
rm -f "$P"/*.log
O=$P/origin/img
random_file "$O/lab.r1" 1G
if [ ! -f "$O/lab.r2" ] || [ "$O/lab.r2" -ot "$O/lab.r1" ]; then
  rm -f "$O"/lab.r*.crc "$O/lab.r2"
  cp "$O/lab.r1" "$O/lab.r2.tmp"
  head -c 40M /dev/urandom | dd of="$O/lab.r2.tmp" bs=1M seek=300 conv=notrunc status=none
  mv "$O/lab.r2.tmp" "$O/lab.r2"
fi
for r in 1 2; do [ -f "$O/lab.r$r.crc" ] || "$BIN/dnbd3-server" --crc "$O/lab.r$r" > /dev/null; done
cat "$O/lab.r1" "$O/lab.r2" > /dev/null # page cache warm

NS=
if [ "$NETNS" = 1 ] && [ "$(id -u)" = 0 ] && ip netns add ${NSP}central 2>/dev/null; then
  NS=1 C=${NSP}central B=${NSP}roomB
  ip netns add $B
  ip -n $C link set lo up; ip -n $B link set lo up
  ip -n $C link add name wan0 type veth peer name wan0 netns $B
  ip -n $C addr add 10.213.9.1/24 dev wan0; ip -n $B addr add 10.213.9.2/24 dev wan0
  ip -n $C link set wan0 up; ip -n $B link set wan0 up
  for ns in $C $B; do
    ip netns exec $ns tc qdisc add dev wan0 root tbf rate ${LINK_MBIT}mbit burst 1mb latency 50ms
  done
  OADDR=10.213.9.1:5003 PADDR=10.213.9.2:5003 OBIND= PBIND= ON=$C PN=$B
else
  OADDR=127.0.0.1:15651 PADDR=127.0.0.2:15652 OBIND=127.0.0.1 PBIND=127.0.0.2 ON= PN=
fi
inns() { local ns=$1; shift; if [ -n "$ns" ]; then ip netns exec "$ns" "$@"; else "$@"; fi; }

server_conf "$P/origin/etc" "$O" "${OADDR##*:}"
inns "$ON" "$BIN/dnbd3-server" -n -c "$P/origin/etc" ${OBIND:+-b $OBIND} >> "$P/origin.log" 2>&1 & PIDS+=($!)
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

# run WITH_R1: one replication of r2 by a fresh proxy; prints
# "seconds fetched_bytes link_bytes reused_bytes" ("n/a ..." on failure).
run() {
  local base=$P/proxy/img t c rx0 recv
  rm -rf "$P/proxy"
  mkdir -p "$base"
  if [ "$1" = 1 ]; then # a complete replicated copy of r1
    cp "$O/lab.r1" "$O/lab.r1.crc" "$base/"
    printf '[main]\natime=%s\n' "$(date +%s)" > "$base/lab.r1.meta"
  fi
  server_conf "$P/proxy/etc" "$base" "${PADDR##*:}" isProxy=true backgroundReplication=true bgrWindowSize=16 autoFreeDiskSpaceDelay=-1
  printf '[%s]\ncomment=origin\nfor=replication\n' "$OADDR" > "$P/proxy/etc/alt-servers"
  inns "$PN" "$BIN/dnbd3-server" -n -c "$P/proxy/etc" ${PBIND:+-b $PBIND} >> "$P/proxy.log" 2>&1 & local pid=$!; PIDS+=($pid)
  wait_on "${PADDR%:*}" "${PADDR##*:}" "$PN"
  rx0=$(rx_bytes)
  t=$(now)
  inns "$PN" "$BIN/dnbd3-nbd" get -h "$PADDR" -i lab -r 2 -S -q -o /dev/null --offset 300M --length 4K || { echo "n/a 0 0 0"; kill $pid; wait $pid; return; }
  for _ in $(seq 6000); do
    c=$(query 2 complete)
    if [ "$c" = 100 ] && [ ! -e "$base/lab.r2.map" ]; then break; fi
    sleep 0.05
  done
  local secs; secs=$(elapsed "$t")
  [ "$c" = 100 ] || secs=n/a
  recv=$(inns "$PN" curl -s "http://$PADDR/query?q=stats" | jq '.bytesReceived')
  local reused; reused=$(query 2 bytesReused); [ "$reused" = null ] || [ "$reused" = -1 ] && reused=0
  echo "$secs $recv $(( $(rx_bytes) - rx0 )) $reused"
  if ! cmp -s "$O/lab.r2" "$base/lab.r2"; then echo "the proxy's r2 differs from the origin's" >&2; fi
  kill $pid; wait $pid 2>/dev/null || true
}

declare -A T B L U
for i in $(seq "$RUNS"); do
  for with in 1 0; do
    read -r s b l u < <(run $with)
    T[$with]+=" $s"; B[$with]=$b; L[$with]=$l; U[$with]=$u
  done
done

isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
mins() { local v; v=$(printf '%s\n' $1 | grep -v n/a | sort -g | head -1); echo "${v:-n/a}"; }
rat() { if isnum "$1" && isnum "$2"; then ratio "$1" "$2"; else echo n/a; fi; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
where="loopback (no link limit)"
[ -n "$NS" ] && where="${LINK_MBIT} Mbit/s link (netns)"
t1=$(mins "${T[1]}") t0=$(mins "${T[0]}")
printf '\n%-58s %12s %12s %8s %s\n' "incremental revisions (best of $RUNS), $where" "r1 present" "without r1" "ratio" ""
printf '%-58s %12s %12s %8s %s\n' "replication of r2 (1 GiB, 40 MiB changed): seconds" "$t1" "$t0" "$(rat "$t1" "$t0")" "full fetch"
printf '%-58s %12s %12s %8s %s\n' "  MiB the proxy received from the origin" "$(mib "${B[1]}")" "$(mib "${B[0]}")" "$(rat "${B[1]}" "${B[0]}")" "4 hash blocks = 64 MiB"
if [ -n "$NS" ]; then
  printf '%-58s %12s %12s %8s %s\n' "  MiB over the link" "$(mib "${L[1]}")" "$(mib "${L[0]}")" "$(rat "${L[1]}" "${L[0]}")" ""
fi
printf '%-58s %12s %12s %8s %s\n' "  MiB copied from r1 (RPC bytesReused)" "$(mib "${U[1]}")" "$(mib "${U[0]}")" "" ""
echo "(runs: r1 present${T[1]} | without${T[0]})"
