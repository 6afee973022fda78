#!/usr/bin/env bash
# make bench: every benchmark script under bench/ plus the Go benchmarks.
# Each script reports our figures as ratios against a peer measured in the
# same run; absolute numbers on shared machines are noise.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out/bench
for s in bench/[0-9]*.sh; do
  echo "### $s"
  "$s" 2>&1 | tee "out/bench/$(basename "$s" .sh).txt"
done
echo "### go test -bench"
go test -run XXX -bench . -benchtime 2s ./server/ ./client/ 2>&1 | grep -E '^(Benchmark|ok|FAIL)' | tee out/bench/go-bench.txt
echo "results in out/bench/"
