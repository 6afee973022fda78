#!/usr/bin/env bash
# dnbd3-server against the real reference dnbd3-server
# (../shared/peers/dnbd3-ref/, the same image file, the same run) and, as a
# second column, a minimal C server (bench/peers/dnbd3-minimal.c, thread per
# connection, sendfile), all on loopback:
#   - sequential 1 MiB reads at queue depth 8 and random 4 KiB reads at queue
#     depth 32 on one connection (our dnbd3-bench --load);
#   - handshakes per second with the reference dnbd3-bench (connect,
#     SELECT_IMAGE, one 4 KiB GET_BLOCK, close) with 1 and 8 threads;
#   - the reference FUSE client (dnbd3-fuse) reading the 256 MiB image with
#     dd bs=1M from a fresh mount;
#   - dnbd3-nbd get of the 256 MiB image;
#   - the memory each idle client costs (1,000 clients, dnbd3-bench --idle).
# The servers take turns for every row and every run; the table shows the
# best of RUNS runs (default 3) and the ratio ours / reference of the best
# runs and of the medians (higher is better, except for memory; on a busy
# machine the medians are the steadier figure). A peer that cannot run
# prints a SKIP line.
# Environment: RUNS, REF_DIR (default ../shared/peers/dnbd3-ref), FUSE=0
# skips the FUSE row.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OURS=15201 MIN=15202 REF=15203 RUNS=${RUNS:-3} FUSE=${FUSE:-1}
HS1=${HS1:-4000} HS8=${HS8:-1000} # runs per thread of the handshake rows
gcc -O2 -o "$W/dnbd3-minimal" bench/peers/dnbd3-minimal.c -lpthread
random_file "$W/img/bench.r1" 256M
server_conf "$W/etc" "$W/img" $OURS
server_conf "$W/etc-ref" "$W/img" $REF
PIDS=()
cleanup() {
  for m in "$W"/mnt-*; do mountpoint -q "$m" 2>/dev/null && fusermount -u "$m" 2>/dev/null; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$BIN/dnbd3-server" -n -c "$W/etc" -b 127.0.0.1 > "$W/server.log" 2>&1 & S_OURS=$!; PIDS+=($S_OURS)
"$W/dnbd3-minimal" $MIN bench "$W/img/bench.r1" & S_MIN=$!; PIDS+=($S_MIN)
SIDES="ours min"
if REF_SERVER=$(ref_peer dnbd3-server); then
  "$REF_SERVER" -n -c "$W/etc-ref" -b 127.0.0.1 > "$W/server-ref.log" 2>&1 & S_REF=$!; PIDS+=($S_REF)
  SIDES="ours ref min"
  wait_port $REF
fi
REF_BENCH=$(ref_peer dnbd3-bench) || REF_BENCH=
REF_FUSE=
if [ "$FUSE" = 1 ]; then REF_FUSE=$(ref_peer dnbd3-fuse && fuse_ok) || REF_FUSE=; else echo "SKIP: FUSE row (FUSE=0)"; fi
wait_port $OURS; wait_port $MIN
cat "$W/img/bench.r1" > /dev/null # page cache warm for every server

port() { case $1 in ours) echo $OURS;; ref) echo $REF;; min) echo $MIN;; esac; }
load() { # port key args... -> the key's value from dnbd3-bench --json
  "$BIN/dnbd3-bench" -h 127.0.0.1:$1 -i bench --json "${@:3}" | awk -F'[:,]' -v k="$2" '$1 ~ "\""k"\"" {gsub(/ /,"",$2); print $2}'
}
per_s() { awk -v n="$1" -v a="$2" -v b="$(now)" 'BEGIN { printf "%.0f", n / (b - a) }'; }
hs() { # port threads -> handshakes/s with the reference dnbd3-bench
  local runs=$HS1 t out
  [ "$2" = 1 ] || runs=$HS8
  t=$(now)
  out=$("$REF_BENCH" -h 127.0.0.1:$1 -i bench -n $runs -t $2 2>&1)
  per_s $((runs * $2)) "$t"
  grep -Eq "Fails[[:space:]]*:[[:space:]]*0$" <<< "$out" || echo "WARNING: handshake failures on port $1: $(grep -A3 SUMMARY <<< "$out" | tr '\n\t' '  ')" >&2
}
fuse_dd() { # port -> MB/s of dd bs=1M through a fresh dnbd3-fuse mount
  local m=$W/mnt-$1 f i
  mkdir -p "$m"
  "$REF_FUSE" "$m" -f -h 127.0.0.1:$1 -i bench > "$W/fuse-$1.log" 2>&1 & f=$!
  for i in $(seq 200); do [ -e "$m/img" ] && break; sleep 0.05; done
  dd if="$m/img" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") s = $(i-1); printf "%.0f", $1 / s / 1e6 }'
  fusermount -u "$m"; wait $f || true
}
get_mbs() { # port -> MB/s of dnbd3-nbd get of the whole image
  local t
  t=$(now)
  "$BIN/dnbd3-nbd" get -h 127.0.0.1:$1 -i bench -S -q -o /dev/null
  awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.0f", 268435456 / (b - a) / 1e6 }'
}

declare -A R
for i in $(seq "$RUNS"); do
  for side in $SIDES; do
    p=$(port $side)
    R[seq_$side]+=" $(load $p mb_per_s --load --duration 3s --queue-depth 8 -b 1M --pattern seq)"
    R[rand_$side]+=" $(load $p iops --load --duration 3s --queue-depth 32 -b 4096 --pattern rand)"
    if [ -n "$REF_BENCH" ]; then
      R[hs1_$side]+=" $(hs $p 1)"
      R[hs8_$side]+=" $(hs $p 8)"
    fi
    if [ -n "$REF_FUSE" ] && [ $side != min ]; then R[fuse_$side]+=" $(fuse_dd $p)"; fi
    R[get_$side]+=" $(get_mbs $p)"
  done
done

mem() { # pid port -> KiB per idle client
  local before after b
  before=$(rss_kib "$1")
  "$BIN/dnbd3-bench" -h 127.0.0.1:$2 -i bench --idle 1000 --duration 3s > "$W/idle.out" &
  b=$!
  wait_until grep -q open "$W/idle.out" || true
  after=$(rss_kib "$1")
  wait $b
  awk -v a="$after" -v b="$before" 'BEGIN { printf "%.1f", (a - b) / 1000 }'
}
M_OURS=$(mem $S_OURS $OURS); M_MIN=$(mem $S_MIN $MIN); M_REF=
if [ -n "${S_REF:-}" ]; then M_REF=$(mem $S_REF $REF); fi

# cell KEY SIDE [best|median]: the best (or median) run, rounded, or n/a
cell() { local v=${R[$1_$2]:-}; if [ -n "${v// /}" ]; then printf '%.0f' "$(${3:-best} $v)"; else echo n/a; fi; }
rat() { if [ "$1" = n/a ] || [ "$2" = n/a ] || [ -z "$2" ]; then echo n/a; else ratio "$1" "$2"; fi; }
printf '\n%-40s %12s %12s %7s %7s %12s %7s\n' "dnbd3-server (best of $RUNS)" "dnbd3-server" "reference" "ratio" "median" "minimal C" "ratio"
row() { # label key
  local o r m
  o=$(cell $2 ours); r=$(cell $2 ref); m=$(cell $2 min)
  printf '%-40s %12s %12s %7s %7s %12s %7s\n' "$1" "$o" "$r" "$(rat "$o" "$r")" "$(rat "$(cell $2 ours median)" "$(cell $2 ref median)")" "$m" "$(rat "$o" "$m")"
}
row "seq 1 MiB QD8, 1 conn (MB/s)" seq
row "rand 4 KiB QD32, 1 conn (IOPS)" rand
row "handshakes/s, ref dnbd3-bench, 1 thread" hs1
row "handshakes/s, ref dnbd3-bench, 8 threads" hs8
row "ref dnbd3-fuse, dd 256 MiB (MB/s)" fuse
row "dnbd3-nbd get 256 MiB (MB/s)" get
printf '%-40s %12s %12s %7s %7s %12s %7s\n' "RSS per idle client, 1000 (KiB, lower)" "$M_OURS" "${M_REF:-n/a}" "$(rat "$M_OURS" "${M_REF:-n/a}")" "" "$M_MIN" "$(rat "$M_OURS" "$M_MIN")"
echo "(all runs:"
for k in seq rand hs1 hs8 fuse get; do
  for side in $SIDES; do
    if [ -n "${R[${k}_$side]:-}" ]; then printf '  %-5s %-4s%s\n' $k $side "$(printf ' %.0f' ${R[${k}_$side]})"; fi
  done
done
echo ")"
