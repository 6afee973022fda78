#!/usr/bin/env bash
# The iSCSI target of dnbd3-server against the reference server's, both
# serving the same image from the page cache on loopback, driven by
# libiscsi's iscsi-perf (one session, 32 commands in flight): sequential
# reads of 128 KiB and 1 MiB, random reads of 4 KiB. Runs alternate
# between the two servers; the best of RUNS counts, the median is shown
# too. On a shared 2-core machine single runs of either server vary by
# +-20 %, mostly with the load of the client, iscsi-perf itself.
# Target (issue 14): >= 1.0x the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OURS=15701 PEER=15702 RUNS=${RUNS:-5} SECS=${SECS:-3}
command -v iscsi-perf >/dev/null || { echo "SKIP: iscsi-perf not installed (package libiscsi-bin; scripts/deps.sh)"; exit 0; }
random_file "$W/img/bench.r1" 256M
server_conf "$W/etc-iscsi" "$W/img" $OURS
"$BIN/dnbd3-server" -n -c "$W/etc-iscsi" -b 127.0.0.1 > "$W/iscsi-server.log" 2>&1 & S1=$!
PIDS="$S1"
trap 'kill $PIDS 2>/dev/null || true' EXIT
peer=0
if REF=$(ref_peer dnbd3-server); then
  peer=1
  server_conf "$W/etc-iscsi-ref" "$W/img" $PEER
  "$REF" -n -c "$W/etc-iscsi-ref" -b 127.0.0.1 > "$W/iscsi-ref.log" 2>&1 & S2=$!
  PIDS="$S1 $S2"
  wait_port $PEER
fi
wait_port $OURS
cat "$W/img/bench.r1" > /dev/null   # page cache warm for both

# perf PORT ARGS... -> "IOPS MB/s" (the tool's average over SECS seconds)
perf() {
  timeout $((SECS * 4 + 10)) iscsi-perf -t "$SECS" -m 32 "${@:2}" "iscsi://127.0.0.1:$1/bench:1/0" 2>&1 |
    tr '\r' '\n' | awk '/^iops average/ {iops=$3; mb=$4} END {gsub(/\(/, "", mb); print iops+0, mb+0}'
}

declare -A R
sides=(ours); [ $peer = 1 ] && sides+=(peer)
for i in $(seq "$RUNS"); do
  for side in "${sides[@]}"; do
    port=$([ "$side" = ours ] && echo $OURS || echo $PEER)
    R[seq128_$side]+=" $(perf $port -b 256 | awk '{print $2}')"
    R[seq1m_$side]+=" $(perf $port -b 2048 | awk '{print $2}')"
    R[rand_$side]+=" $(perf $port -b 8 -r | awk '{print $1}')"
  done
done

printf '\n%-36s %13s %13s %6s %9s %s\n' "iscsi-perf, 32 in flight ($RUNS runs)" "dnbd3-server" "reference" "ratio" "(median)" "target"
row() {
  local o p om pm
  o=$(best ${R[$2_ours]}); om=$(median ${R[$2_ours]}); p=n/a; pm=n/a
  if [ $peer = 1 ]; then p=$(best ${R[$2_peer]}); pm=$(median ${R[$2_peer]}); fi
  printf "%-36s %13.0f %13s %6s %9s %s\n" "$1" "$o" "$p" "$([ $peer = 1 ] && ratio "$o" "$p" || echo n/a)" \
    "($([ $peer = 1 ] && ratio "$om" "$pm" || echo n/a))" ">= 1.0x"
}
row "sequential 128 KiB reads (MB/s)" seq128
row "sequential 1 MiB reads (MB/s)" seq1m
row "random 4 KiB reads (IOPS)" rand
echo "(runs: ours seq128${R[seq128_ours]} seq1m${R[seq1m_ours]} rand${R[rand_ours]}${R[rand_peer]:+ | reference seq128${R[seq128_peer]} seq1m${R[seq1m_peer]} rand${R[rand_peer]}})"
