#!/usr/bin/env bash
# dnbd3-server against a minimal C DNBD3 server (bench/peers/dnbd3-minimal.c,
# thread per connection like the reference, sendfile) on loopback, both
# driven by dnbd3-bench (handshakes by a C client): sequential 1 MiB reads at queue depth 8 and random
# 4 KiB reads at queue depth 32 on one connection, handshakes per second,
# and the memory each idle client costs.
# Targets (issue 2): >= 3 GB/s sequential, >= 20,000 handshakes/s,
# < 64 KiB per idle client with 1,000 clients.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OURS=15201 PEER=15202 RUNS=${RUNS:-3}
gcc -O2 -o "$W/dnbd3-minimal" bench/peers/dnbd3-minimal.c -lpthread
gcc -O2 -o "$W/dnbd3-hsbench" bench/peers/dnbd3-hsbench.c -lpthread
random_file "$W/img/bench.r1" 256M
server_conf "$W/etc" "$W/img" $OURS
"$BIN/dnbd3-server" -n -c "$W/etc" -b 127.0.0.1 > "$W/server.log" 2>&1 & S1=$!
"$W/dnbd3-minimal" $PEER bench "$W/img/bench.r1" & S2=$!
trap 'kill $S1 $S2 2>/dev/null || true' EXIT
wait_port $OURS; wait_port $PEER
cat "$W/img/bench.r1" > /dev/null   # page cache warm for both

load() { # port args... -> MB/s or IOPS
  "$BIN/dnbd3-bench" -h 127.0.0.1:$1 -i bench --json "${@:2}" | awk -F'[:,]' -v k="$KEY" '$1 ~ "\""k"\"" {gsub(/ /,"",$2); print $2}'
}
# Handshakes are driven by a small C client (bench/peers/dnbd3-hsbench.c) so
# the figure measures the server, not a Go client's scheduling overhead.
hs() { "$W/dnbd3-hsbench" "$1" bench "$2" 2000 | awk '{print $1}'; }

declare -A R
for i in $(seq "$RUNS"); do
  for side in ours peer; do
    port=$([ $side = ours ] && echo $OURS || echo $PEER)
    KEY=mb_per_s R[seq_$side]+=" $(load $port --load --duration 3s --queue-depth 8 -b 1M --pattern seq)"
    KEY=iops R[rand_$side]+=" $(load $port --load --duration 3s --queue-depth 32 -b 4096 --pattern rand)"
    R[hs1_$side]+=" $(hs $port 1)"
    R[hs8_$side]+=" $(hs $port 8)"
  done
done

mem() { # pid port -> KiB per idle client
  local before after
  before=$(rss_kib "$1")
  "$BIN/dnbd3-bench" -h 127.0.0.1:$2 -i bench --idle 1000 --duration 3s > "$W/idle.out" &
  local b=$!
  wait_until grep -q open "$W/idle.out" || true
  after=$(rss_kib "$1")
  wait $b
  awk -v a="$after" -v b="$before" 'BEGIN { printf "%.1f", (a - b) / 1000 }'
}
M_OURS=$(mem $S1 $OURS); M_PEER=$(mem $S2 $PEER)

printf '\n%-38s %14s %14s %8s %s\n' "benchmark (best of $RUNS)" "dnbd3-server" "C peer" "ratio" "target"
row() { printf "%-38s %14.0f %14.0f %8s %s\n" "$1" "$2" "$3" "$(ratio "$2" "$3")" "$4"; }
row "seq 1 MiB QD8, 1 conn (MB/s)" "$(best ${R[seq_ours]})" "$(best ${R[seq_peer]})" ">= 3000 MB/s"
row "rand 4 KiB QD32, 1 conn (IOPS)" "$(best ${R[rand_ours]})" "$(best ${R[rand_peer]})" ""
row "handshakes/s, 1 thread" "$(best ${R[hs1_ours]})" "$(best ${R[hs1_peer]})" ""
row "handshakes/s, 8 threads" "$(best ${R[hs8_ours]})" "$(best ${R[hs8_peer]})" ">= 20000/s"
printf '%-38s %14s %14s %8s %s\n' "RSS per idle client, 1000 (KiB)" "$M_OURS" "$M_PEER" "$(ratio "$M_OURS" "$M_PEER")" "< 64 KiB"
echo "(runs: ours seq${R[seq_ours]} | peer seq${R[seq_peer]})"
