#!/usr/bin/env bash
# Writes into a copy-on-write session through `dnbd3-nbd serve -c` against
# qemu-nbd on a qcow2 overlay over the same raw base image, both written by
# fio's nbd engine (libnbd) on a unix socket: 4 KiB random writes at QD32
# and 1 MiB sequential writes at QD8, each run on a fresh overlay.
# Then the same random writes with the upload loop running (every changed
# cluster uploaded at once to a merger that discards the data).
# Targets (issue 4): >= 1.0x qemu-nbd for both; uploads cost <= 20% IOPS.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS=${RUNS:-3} SECS=${SECS:-5}
PORT=15241 MPORT=15242
BASE=$W/cowimg/cow.r1
random_file "$BASE" 512M
server_conf "$W/cowetc" "$W/cowimg" $PORT
"$BIN/dnbd3-server" -n -c "$W/cowetc" -b 127.0.0.1 > "$W/cowserver.log" 2>&1 & S=$!
go build -o "$W/sinkmerger" ./bench/peers/sinkmerger
"$W/sinkmerger" 127.0.0.1:$MPORT & M=$!
P=""
trap 'kill $S $M $P 2>/dev/null || true' EXIT
wait_port $PORT; wait_port $MPORT

# fio_write SOCKET RW BS QD -> "bw_bytes iops"
fio_write() { fio_nbd "$@" 512M; }
start_ours() { # extra args...
  rm -rf "$W/sess" "$W/ours.sock"; mkdir -p "$W/sess"
  "$BIN/dnbd3-nbd" serve -h 127.0.0.1:$PORT -i cow --listen "unix:$W/ours.sock" -c "$W/sess" --log-level error "$@" > /dev/null & P=$!
  wait_sock "$W/ours.sock"
}
start_qemu() {
  rm -f "$W/ovl.qcow2" "$W/qemu.sock"
  qemu-img create -q -f qcow2 -b "$BASE" -F raw "$W/ovl.qcow2"
  qemu-nbd --persistent --shared=16 -f qcow2 --socket="$W/qemu.sock" "$W/ovl.qcow2" & P=$!
  wait_sock "$W/qemu.sock"
}
stop() { kill -INT $P 2>/dev/null; wait $P 2>/dev/null || true; P=""; }
cat "$BASE" > /dev/null

declare -A R
for i in $(seq "$RUNS"); do
  start_ours;  read -r _ iops <<< "$(fio_write "$W/ours.sock" randwrite 4k 32)"; stop; R[rand_ours]+=" $iops"
  start_qemu;  read -r _ iops <<< "$(fio_write "$W/qemu.sock" randwrite 4k 32)"; stop; R[rand_qemu]+=" $iops"
  start_ours;  read -r bw _ <<< "$(fio_write "$W/ours.sock" write 1M 8)"; stop; R[seq_ours]+=" $bw"
  start_qemu;  read -r bw _ <<< "$(fio_write "$W/qemu.sock" write 1M 8)"; stop; R[seq_qemu]+=" $bw"
  start_ours -C 127.0.0.1:$MPORT --upload-delay 0
  read -r _ iops <<< "$(fio_write "$W/ours.sock" randwrite 4k 32)"; stop; R[rand_up]+=" $iops"
done
r_o=$(best ${R[rand_ours]}); r_q=$(best ${R[rand_qemu]}); r_u=$(best ${R[rand_up]})
s_o=$(best ${R[seq_ours]}); s_q=$(best ${R[seq_qemu]})
printf '\n%-46s %12s %12s %8s %s\n' "fio nbd engine, writes (best of $RUNS)" "dnbd3-nbd" "qemu-nbd" "ratio" "target"
printf '%-46s %12.0f %12.0f %8s %s\n' "rand write 4 KiB QD32 (IOPS), COW vs qcow2" "$r_o" "$r_q" "$(ratio "$r_o" "$r_q")" ">= 1.0"
printf '%-46s %12.0f %12.0f %8s %s\n' "seq write 1 MiB QD8 (MB/s), COW vs qcow2" "$(mb "$s_o")" "$(mb "$s_q")" "$(ratio "$s_o" "$s_q")" ">= 1.0"
printf '%-46s %12.0f %12.0f %8s %s\n' "rand write 4 KiB QD32 (IOPS), uploads on/off" "$r_u" "$r_o" "$(ratio "$r_u" "$r_o")" ">= 0.8"
echo "(uploads: every changed cluster sent at once to bench/peers/sinkmerger; $(curl -s 127.0.0.1:$MPORT/stats | awk '{print $1" uploads, "$2" bytes"}') in total)"
