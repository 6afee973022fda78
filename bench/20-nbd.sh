#!/usr/bin/env bash
# dnbd3-nbd serve (data from dnbd3-server on loopback) against qemu-nbd
# serving the same image file from disk, both read by fio's nbd engine
# (libnbd) over a unix socket: 1 MiB sequential reads at QD8 and 4 KiB
# random reads at QD32. Targets (issue 3): >= 1.0x qemu-nbd sequential,
# >= 0.8x at 4 KiB random.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS=${RUNS:-3} SECS=${SECS:-5}
PORT=15211
IMG=$W/img/bench.r1
random_file "$IMG" 256M
server_conf "$W/etc" "$W/img" $PORT
OURS=$W/ours.sock QEMU=$W/qemu.sock
rm -f "$OURS" "$QEMU"
"$BIN/dnbd3-server" -n -c "$W/etc" -b 127.0.0.1 > "$W/server.log" 2>&1 & S=$!
trap 'kill $S $N $Q 2>/dev/null || true' EXIT
wait_port $PORT
"$BIN/dnbd3-nbd" serve -h 127.0.0.1:$PORT -i bench --listen "unix:$OURS" --log-level warning > /dev/null & N=$!
qemu-nbd --read-only --persistent --shared=16 -f raw --socket="$QEMU" "$IMG" & Q=$!
wait_sock "$OURS" "$QEMU"
cat "$IMG" > /dev/null
declare -A R
for i in $(seq "$RUNS"); do
  for side in ours qemu; do
    sock=$([ $side = ours ] && echo "$OURS" || echo "$QEMU")
    read -r bw _ <<< "$(fio_nbd "$sock" read 1M 8 256M)"; R[seq_$side]+=" $bw"
    read -r _ iops <<< "$(fio_nbd "$sock" randread 4k 32 256M)"; R[rand_$side]+=" $iops"
  done
done
s_o=$(best ${R[seq_ours]}); s_q=$(best ${R[seq_qemu]})
r_o=$(best ${R[rand_ours]}); r_q=$(best ${R[rand_qemu]})
printf '\n%-44s %14s %14s %8s %s\n' "fio nbd engine, unix socket (best of $RUNS)" "dnbd3-nbd" "qemu-nbd" "ratio" "target"
printf '%-44s %14.0f %14.0f %8s %s\n' "seq read 1 MiB QD8 (MB/s)" "$(mb "$s_o")" "$(mb "$s_q")" "$(ratio "$s_o" "$s_q")" ">= 1.0"
printf '%-44s %14.0f %14.0f %8s %s\n' "rand read 4 KiB QD32 (IOPS)" "$r_o" "$r_q" "$(ratio "$r_o" "$r_q")" ">= 0.8"
echo "(dnbd3-nbd serve reads from dnbd3-server over loopback TCP; qemu-nbd reads the file; both from the page cache)"
