#!/usr/bin/env bash
# Prepares the disk the copy-on-write VM tests run the reference test
# sequence on: an ext4 image holding
#   images/test.r1   the cowtest image: 3,892,314,112 bytes of 0x2A (dnbd3-cowtest -c)
#   normal.img       a plain copy of it, for the random test's comparison
# with room for sessions and merged revisions. Built once and reused: the
# VM gets it with -disk-snapshot, so its writes never reach the file.
set -euo pipefail
OUT=${1:?usage: cowdisk.sh OUT.img}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
[ -s "$OUT" ] && [ "$OUT" -nt "$ROOT/cmd/dnbd3-cowtest/layout.go" ] && exit 0
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
T=$(mktemp -d "$(dirname "$OUT")/cowdisk.XXXXXX")
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/tree/images"
go run "$ROOT/cmd/dnbd3-cowtest" -c "$T/tree/images/test.r1" >/dev/null
cp "$T/tree/images/test.r1" "$T/tree/normal.img"
rm -f "$OUT"
truncate -s 32G "$T/disk.img"
"$MKE2FS" -q -t ext4 -m 0 -E lazy_itable_init=1,lazy_journal_init=1 -d "$T/tree" -F "$T/disk.img"
mv "$T/disk.img" "$OUT"
