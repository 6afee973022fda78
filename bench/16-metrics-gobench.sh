#!/usr/bin/env bash
# The metrics' cost on the request paths measured with the Go benchmarks
# of the server (pipelined GET_BLOCK over loopback, handshakes) and of the
# NBD engine, old code (BASE_REV, as in 15-metrics-cost.sh) against the
# current code, interleaved run by run; medians of RUNS. Lighter than
# 15-metrics-cost.sh and less disturbed by other load (one process, no
# peer), but still wall-clock figures: compare the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS=${RUNS:-6} BT=${BT:-1s}
metrics_base
(cd "$OLD/src" && go test -c -o "$W/old-server.test" ./server && go test -c -o "$W/old-nbdbridge.test" ./nbdbridge)
go test -c -o "$W/new-server.test" ./server
go test -c -o "$W/new-nbdbridge.test" ./nbdbridge
SB='^Benchmark(Rand4KiBQD32|Seq1MiBQD8|Handshake)$'
NB='^BenchmarkEngine(Read4KRandomQD32|Write4KRandomQD32|Read1MSeqQD4)$'
: > "$W/gobench.txt"
for i in $(seq "$RUNS"); do
  order="old new"; [ $((i % 2)) = 0 ] && order="new old" # no side always goes first
  for side in $order; do
    (cd server && "$W/$side-server.test" -test.run XXX -test.bench "$SB" -test.benchtime "$BT") | sed "s/^/$side /" >> "$W/gobench.txt"
    (cd nbdbridge && "$W/$side-nbdbridge.test" -test.run XXX -test.bench "$NB" -test.benchtime "$BT") | sed "s/^/$side /" >> "$W/gobench.txt"
  done
done
printf '\npeer: none; our code before the metrics (BASE_REV %s) against the current code, same run: what the metrics cost, not a comparison with the reference\n' "$(git rev-parse --short "$BASE_REV")"
printf '%-44s %12s %12s %8s %8s\n' "Go benchmarks, median ns/op of $RUNS (load $(cut -d' ' -f1 /proc/loadavg))" "before" "metrics" "ratio" "best"
for b in $(awk '$2 ~ /^Benchmark/ {sub(/-[0-9]+$/, "", $2); print $2}' "$W/gobench.txt" | sort -u); do
  # ns SIDE: the ns/op of every run of benchmark $b by SIDE (old, new)
  ns() { awk -v s="$1" -v b="$b" '$1 == s { n = $2; sub(/-[0-9]+$/, "", n); if (n == b) print $4 }' "$W/gobench.txt"; }
  med() { median $(ns "$1"); }
  low() { ns "$1" | sort -g | head -1; }
  o=$(med old) n=$(med new)
  printf '%-44s %12.0f %12.0f %8s %8s\n' "$b" "$o" "$n" "$(ratio "$n" "$o")" "$(ratio "$(low new)" "$(low old)")"
done
echo "(ratio = new/old ns per operation of the medians, best = of the fastest runs: above 1.00 is slower; raw runs in $W/gobench.txt)"
