#!/usr/bin/env bash
# Prepares the disk the copy-on-write VM tests run the reference test
# programs on: an ext4 image holding
#   images/test.r1   the cowtest image: 3,892,314,112 bytes of 0x2A (dnbd3-cowtest -c),
#                    for the reference CI's standard sequence
#   images/rnd.r1    1.5 GiB of 0x2A for the random test (crosses the first
#                    L2 table boundary at 1.25 GiB; truncates stay within
#                    90..110 % of it)
#   rnd-normal.img   a plain copy of rnd.r1, the random test's "normal" file
# with room for sessions and merged revisions. Built once and reused: the
# VM gets it with -disk-snapshot, so its writes never reach the file.
set -euo pipefail
OUT=${1:?usage: cowdisk.sh OUT.img}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
[ -s "$OUT" ] && [ "$OUT" -nt "$ROOT/cmd/dnbd3-cowtest/layout.go" ] && [ "$OUT" -nt "$0" ] && exit 0
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
T=$(mktemp -d "$(dirname "$OUT")/cowdisk.XXXXXX")
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/tree/images"
go build -o "$T/cowtest" "$ROOT/cmd/dnbd3-cowtest"
"$T/cowtest" -c "$T/tree/images/test.r1" >/dev/null
"$T/cowtest" -c "$T/tree/images/rnd.r1" 1610612736 >/dev/null
cp "$T/tree/images/rnd.r1" "$T/tree/rnd-normal.img"
rm -f "$OUT" "$T/cowtest"
truncate -s 32G "$T/disk.img"
"$MKE2FS" -q -t ext4 -m 0 -E lazy_itable_init=1,lazy_journal_init=1 -d "$T/tree" -F "$T/disk.img"
mv "$T/disk.img" "$OUT"
