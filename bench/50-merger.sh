#!/usr/bin/env bash
# dnbd3-merger: upload 1 GiB of changed clusters into a session for a 4 GiB
# image with 10 parallel uploads (ingest MB/s), then merge them into the
# next revision, compared with a plain copy of the image (cp + sync) on the
# same disk in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PORT=15251
D=$W/merger
rm -rf "$D"; mkdir -p "$D/work" "$D/images"
head -c 4G /dev/urandom > "$D/images/big.r1"
sync
go build -o "$W/mergeload" ./bench/peers/mergeload
"$BIN/dnbd3-merger" --settings "" --working-dir "$D/work" --original-dir "$D/images" --destination-dir "$D/images" \
  --listen "http://127.0.0.1:$PORT" --min-free-space 0 --log-level warning > "$W/merger.log" 2>&1 & M=$!
trap 'kill $M 2>/dev/null || true; rm -rf "$D"' EXIT
wait_port $PORT

start=$(date +%s.%N)
cp "$D/images/big.r1" "$D/copy.img" && sync
copy=$(echo "$(date +%s.%N) - $start" | bc -l)
rm -f "$D/copy.img"; sync

out=$("$W/mergeload" -merger 127.0.0.1:$PORT -image big -rev 1 -mib 1024 -size $((4 << 30)) -parallel 10)
echo "$out"
merge=$(awk '/^merge/ {print $2}' <<< "$out")
ingest=$(awk '/^ingest/ {print $(NF-5)}' <<< "$out")
[ "$(stat -c %s "$D/images/big.r2")" = $((4 << 30)) ] || { echo "big.r2 missing or wrong size"; exit 1; }
printf '\n%-50s %10s %10s %8s\n' "merger" "merge" "plain cp" "ratio"
printf '%-50s %9.2fs %9.2fs %8s\n' "merge 1 GiB of clusters into a 4 GiB image" "$merge" "$copy" "$(ratio "$merge" "$copy")"
printf '%-50s %10s MB/s\n' "upload ingest, 10 parallel uploads" "$ingest"
echo "(merge: copy_file_range of the original + apply + fsync + atomic rename; ratio < 1 means faster than copying the image)"
