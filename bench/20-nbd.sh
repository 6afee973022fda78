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
mkdir -p "$W/img" "$W/etc"
[ -f "$W/img/bench.r1" ] || head -c 256M /dev/urandom > "$W/img/bench.r1"
IMG=$W/img/bench.r1
printf '[dnbd3]\nbasePath=%s\nlistenPort=%s\n[logging]\nconsoleMask=ERROR WARNING\n' "$W/img" $PORT > "$W/etc/server.conf"
OURS=$W/ours.sock QEMU=$W/qemu.sock
rm -f "$OURS" "$QEMU"
"$BIN/dnbd3-server" -n -c "$W/etc" -b 127.0.0.1 > "$W/server.log" 2>&1 & S=$!
trap 'kill $S $N $Q 2>/dev/null || true' EXIT
wait_port $PORT
"$BIN/dnbd3-nbd" serve -h 127.0.0.1:$PORT -i bench --listen "unix:$OURS" --log-level warning > /dev/null & N=$!
qemu-nbd --read-only --persistent --shared=16 -f raw --socket="$QEMU" "$IMG" & Q=$!
for _ in $(seq 100); do [ -S "$OURS" ] && [ -S "$QEMU" ] && break; sleep 0.05; done
cat "$IMG" > /dev/null

# fio_run SOCKET RW BS QD -> "bandwidth_bytes_per_s iops"
fio_run() {
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" --iodepth="$4" \
      --size=256M --runtime="$SECS" --time_based --output-format=json 2>/dev/null |
    awk -F'[:,]' '/"read" :/ {r=1} r && /"bw_bytes"/ && bw == "" {gsub(/ /,"",$2); bw=$2} r && /"iops"/ && !i {gsub(/ /,"",$2); i=$2} END {print bw, i}'
}
declare -A R
for i in $(seq "$RUNS"); do
  for side in ours qemu; do
    sock=$([ $side = ours ] && echo "$OURS" || echo "$QEMU")
    read -r bw _ <<< "$(fio_run "$sock" read 1M 8)"; R[seq_$side]+=" $bw"
    read -r _ iops <<< "$(fio_run "$sock" randread 4k 32)"; R[rand_$side]+=" $iops"
  done
done
s_o=$(best ${R[seq_ours]}); s_q=$(best ${R[seq_qemu]})
r_o=$(best ${R[rand_ours]}); r_q=$(best ${R[rand_qemu]})
printf '\n%-44s %14s %14s %8s %s\n' "fio nbd engine, unix socket (best of $RUNS)" "dnbd3-nbd" "qemu-nbd" "ratio" "target"
printf '%-44s %14.0f %14.0f %8s %s\n' "seq read 1 MiB QD8 (MB/s)" "$(echo "$s_o/1000000" | bc -l)" "$(echo "$s_q/1000000" | bc -l)" "$(ratio "$s_o" "$s_q")" ">= 1.0"
printf '%-44s %14.0f %14.0f %8s %s\n' "rand read 4 KiB QD32 (IOPS)" "$r_o" "$r_q" "$(ratio "$r_o" "$r_q")" ">= 0.8"
echo "(dnbd3-nbd serve reads from dnbd3-server over loopback TCP; qemu-nbd reads the file; both from the page cache)"
