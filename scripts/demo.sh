#!/usr/bin/env bash
# make demo: create a demo image, serve it with dnbd3-server on 127.0.0.1
# using the example configuration directory, read it back through the
# client with a progress bar, print the RPC statistics and stop cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin
W=$PWD/out/demo
PORT=${DEMO_PORT:-15003}
rm -rf "$W"; mkdir -p "$W/images" "$W/etc" "$W/files"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Create a demo image: a 64 MiB ext4 filesystem with a few files"
echo "Hello from dnbd3go. This file was read from a DNBD3 image." > "$W/files/hello.txt"
cp README.md "$W/files/README.md"
head -c 4M /dev/urandom > "$W/files/random.bin"
sha256sum "$W/files/random.bin" | awk '{print $1}' > "$W/files/random.bin.sha256"
/sbin/mke2fs -q -t ext4 -L demo -d "$W/files" -F "$W/images/demo.r1" 64M
ls -l "$W/images"

step "2. Start dnbd3-server on 127.0.0.1:$PORT with examples/dnbd3-server"
cp examples/dnbd3-server/* "$W/etc/"
sed -i "s|^basePath=.*|basePath=$W/images|; s|^listenPort=.*|listenPort=$PORT|" "$W/etc/server.conf"
"$BIN/dnbd3-server" -n -c "$W/etc" -b 127.0.0.1 > "$W/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$PORT/query?q=version" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/query?q=version"; echo

step "3. Read the image back through the DNBD3 client"
"$BIN/dnbd3-nbd" get -h "127.0.0.1:$PORT" -i demo -o "$W/copy.img"
a=$(sha256sum < "$W/images/demo.r1" | awk '{print $1}')
b=$(sha256sum < "$W/copy.img" | awk '{print $1}')
echo "sha256 image: $a"
echo "sha256 copy:  $b"
[ "$a" = "$b" ] || { echo "MISMATCH"; exit 1; }
echo "copy is identical"

step "4. RPC statistics (GET /query?q=stats&q=images)"
curl -sf "http://127.0.0.1:$PORT/query?q=stats&q=images"; echo

step "5. Stop the server with SIGTERM"
kill -TERM $SERVER
wait $SERVER && echo "dnbd3-server exited cleanly" || { echo "dnbd3-server exit code $?"; exit 1; }
trap - EXIT
tail -n 3 "$W/server.log"

step "6. Attach the image as /dev/nbdX, mount it, list its files"
if [ "$(id -u)" = 0 ] && { [ -d /sys/module/nbd ] || modprobe nbd 2>/dev/null; }; then
  echo "(the kernel NBD driver is usable here: running directly)"
  PATH=$BIN:$PATH DNBD3GO_DEMO_IMAGES=$W/images go test -count=1 -v -run TestDemo ./tests/integration/demo/ | grep -v -E '^(=== RUN|--- PASS|PASS|ok )'
else
  echo "(this kernel has no usable NBD driver: running the same steps inside a throw-away qemu VM"
  echo " with Debian's cloud kernel and nbd.ko, via tests/integration/vm/vmtest.sh)"
  mkdir -p "$W/vm/images" && cp "$W/images/demo.r1" "$W/vm/images/"
  echo "booting the VM (about 10-30 s; the first run downloads the kernel)..."
  if tests/integration/vm/vmtest.sh -p ./tests/integration/demo/ -files "$W/vm" -timeout 300 > "$W/vm.log" 2>&1; then
    grep -E '^(demo:|/dev/nbd|DEVICE|total|[-d]r)' "$W/vm.log"
  else
    tail -n 40 "$W/vm.log"; echo "the VM part of the demo failed (full log: $W/vm.log)"; exit 1
  fi
fi
