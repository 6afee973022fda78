#!/usr/bin/env bash
# Prepares the files the in-VM tests get as /testdata (vmtest.sh -files DIR):
#   images/fs.r1      an ext4 filesystem made on the host with mke2fs -d
#   fs.manifest       "sha256  path" of every file in it
set -euo pipefail
OUT=${1:?usage: testdata.sh OUTDIR}
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
rm -rf "$OUT"; mkdir -p "$OUT/images" "$OUT/tree/docs/deep/er"
echo "hello from an ext4 filesystem built on the host" > "$OUT/tree/hello.txt"
head -c 3M /dev/urandom > "$OUT/tree/blob.bin"
head -c 100000 /dev/urandom > "$OUT/tree/docs/deep/er/odd-size.bin"
seq 1 20000 > "$OUT/tree/docs/numbers.txt"
"$MKE2FS" -q -t ext4 -L dnbd3test -d "$OUT/tree" -F "$OUT/images/fs.r1" 48M
(cd "$OUT/tree" && find . -type f | sort | xargs sha256sum) > "$OUT/fs.manifest"
rm -rf "$OUT/tree"
