#!/usr/bin/env bash
# What the Prometheus metrics cost (issue 13: at most 3 % off the server's
# and the bridge's figures). The binaries before the metrics (BASE_REV,
# see below) run side by side with
# the current ones, alternating run by run, while a scraper reads the new
# ones' /metrics every second (15x more often than a usual Prometheus):
#   dnbd3-server: sequential 1 MiB QD8, random 4 KiB QD32, handshakes/s
#   dnbd3-nbd serve (--metrics-listen, both reading the same server):
#   fio's nbd engine, sequential 1 MiB QD8 and random 4 KiB QD32.
# Ratios are new/old, of the best of RUNS and of the medians. Throughput on a loaded machine is
# noise, so the script also reports the CPU time the server or bridge
# process used per request or per MB (from /proc/PID/stat, lowest of
# RUNS): that is what the metrics add, and other load hardly changes it.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS=${RUNS:-5} SECS=${SECS:-4}
OLD_PORT=15221 NEW_PORT=15222 SCRAPE_EVERY=${SCRAPE_EVERY:-1}
metrics_base
[ -x "$OLD/bin/dnbd3-server" ] ||
  (cd "$OLD/src" && go build -trimpath -o "$OLD/bin/" ./cmd/dnbd3-server ./cmd/dnbd3-nbd ./cmd/dnbd3-bench)
gcc -O2 -o "$W/dnbd3-hsbench" bench/peers/dnbd3-hsbench.c -lpthread
random_file "$W/img/bench.r1" 256M
server_conf "$W/etc-old" "$W/img" $OLD_PORT
server_conf "$W/etc-new" "$W/img" $NEW_PORT
OLDSOCK=$W/old.sock NEWSOCK=$W/new.sock MPORT=15223
rm -f "$OLDSOCK" "$NEWSOCK"
"$OLD/bin/dnbd3-server" -n -c "$W/etc-old" -b 127.0.0.1 > "$W/old.log" 2>&1 & S1=$!
"$BIN/dnbd3-server" -n -c "$W/etc-new" -b 127.0.0.1 > "$W/new.log" 2>&1 & S2=$!
PIDS="$S1 $S2"
trap 'kill $PIDS 2>/dev/null || true' EXIT
wait_port $OLD_PORT; wait_port $NEW_PORT
# both bridges read from the old server, so only the bridge differs
"$OLD/bin/dnbd3-nbd" serve -h 127.0.0.1:$OLD_PORT -i bench --listen "unix:$OLDSOCK" --log-level warning > /dev/null & N1=$!
"$BIN/dnbd3-nbd" serve -h 127.0.0.1:$OLD_PORT -i bench --listen "unix:$NEWSOCK" --log-level warning \
  --metrics-listen 127.0.0.1:$MPORT > /dev/null & N2=$!
PIDS="$PIDS $N1 $N2"
wait_sock "$OLDSOCK" "$NEWSOCK"; wait_port $MPORT
( while sleep "$SCRAPE_EVERY"; do
    curl -sf "http://127.0.0.1:$NEW_PORT/metrics" > /dev/null
    curl -sf "http://127.0.0.1:$MPORT/metrics" > /dev/null
  done ) & SCR=$!
PIDS="$PIDS $SCR"
cat "$W/img/bench.r1" > /dev/null

load() { # bin port key args...
  "$1" -h 127.0.0.1:$2 -i bench --json "${@:4}" | awk -F'[:,]' -v k="$3" '$1 ~ "\""k"\"" {gsub(/ /,"",$2); print $2}'
}
hs() { "$W/dnbd3-hsbench" "$1" bench 8 2000 | awk '{print $1}'; }
TCK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# per PID T0 AMOUNT: microseconds of CPU of PID since T0 ticks per unit
per() { awk -v t0="$2" -v t1="$(ticks "$1")" -v n="$3" -v hz="$TCK" 'BEGIN { if (n > 0) printf "%.3f", (t1 - t0) / hz * 1e6 / n; else print 0 }'; }
least() { printf '%s\n' "$@" | sort -g | head -1; }
declare -A R
for i in $(seq "$RUNS"); do
  order="old new"; [ $((i % 2)) = 0 ] && order="new old" # no side always goes first
  for side in $order; do
    if [ $side = old ]; then port=$OLD_PORT bench=$OLD/bin/dnbd3-bench sock=$OLDSOCK spid=$S1 npid=$N1
    else port=$NEW_PORT bench=$BIN/dnbd3-bench sock=$NEWSOCK spid=$S2 npid=$N2; fi
    t0=$(ticks $spid); v=$(load "$bench" $port mb_per_s --load --duration ${SECS}s --queue-depth 8 -b 1M --pattern seq)
    R[seq_$side]+=" $v"; R[cseq_$side]+=" $(per $spid "$t0" "$(awk -v v="$v" -v s="$SECS" 'BEGIN {print v * s}')")"
    t0=$(ticks $spid); v=$(load "$bench" $port iops --load --duration ${SECS}s --queue-depth 32 -b 4096 --pattern rand)
    R[rand_$side]+=" $v"; R[crand_$side]+=" $(per $spid "$t0" "$(awk -v v="$v" -v s="$SECS" 'BEGIN {print v * s}')")"
    t0=$(ticks $spid); v=$(hs $port)
    R[hs_$side]+=" $v"; R[chs_$side]+=" $(per $spid "$t0" 16000)"
    t0=$(ticks $npid); read -r bw _ <<< "$(fio_nbd "$sock" read 1M 8 256M)"
    R[nseq_$side]+=" $bw"; R[cnseq_$side]+=" $(per $npid "$t0" "$(awk -v v="$bw" -v s="$SECS" 'BEGIN {print v * s / 1e6}')")"
    t0=$(ticks $npid); read -r _ iops <<< "$(fio_nbd "$sock" randread 4k 32 256M)"
    R[nrand_$side]+=" $iops"; R[cnrand_$side]+=" $(per $npid "$t0" "$(awk -v v="$iops" -v s="$SECS" 'BEGIN {print v * s}')")"
  done
done
printf '\npeer: none; our code before the metrics (BASE_REV %s) against the current code, same run: what the metrics cost, not a comparison with the reference\n' "$(git rev-parse --short "$BASE_REV")"
printf '%-40s %12s %12s %8s %8s\n' "metrics cost (best of $RUNS, load $(cut -d' ' -f1 /proc/loadavg))" "before" "metrics" "ratio" "median"
# row LABEL KEY [SCALE]: best of each side, their ratio and the ratio of the medians
row() {
  local o=${R[${2}_old]} n=${R[${2}_new]} bo bn
  bo=$(best $o) bn=$(best $n)
  [ "${3:-}" = mb ] && { bo=$(mb "$bo"); bn=$(mb "$bn"); }
  printf "%-40s %12.0f %12.0f %8s %8s\n" "$1" "$bo" "$bn" "$(ratio "$bn" "$bo")" "$(ratio "$(median $n)" "$(median $o)")"
}
row "server seq 1 MiB QD8 (MB/s)" seq
row "server rand 4 KiB QD32 (IOPS)" rand
row "server handshakes/s, 8 threads" hs
row "bridge seq 1 MiB QD8 (MB/s)" nseq mb
row "bridge rand 4 KiB QD32 (IOPS)" nrand
printf '\n%-40s %12s %12s %8s %8s\n' "CPU time of the process (lowest of $RUNS)" "before" "metrics" "ratio" "median"
# crow LABEL KEY: lowest of each side, their ratio and the ratio of the medians
crow() {
  local o=${R[${2}_old]} n=${R[${2}_new]}
  printf "%-40s %12.3f %12.3f %8s %8s\n" "$1" "$(least $o)" "$(least $n)" "$(ratio "$(least $n)" "$(least $o)")" "$(ratio "$(median $n)" "$(median $o)")"
}
crow "server seq: CPU us per MB" cseq
crow "server rand 4 KiB: CPU us per request" crand
crow "server: CPU us per handshake" chs
crow "bridge seq: CPU us per MB" cnseq
crow "bridge rand 4 KiB: CPU us per request" cnrand
echo "(runs old/new: rand${R[rand_old]} /${R[rand_new]}; bridge rand${R[nrand_old]} /${R[nrand_new]})"
echo "(new: scraped every ${SCRAPE_EVERY}s; scrape of the server: $(curl -s -o /dev/null -w '%{size_download} bytes in %{time_total}s' http://127.0.0.1:$NEW_PORT/metrics))"
