#!/usr/bin/env bash
# For information: reads through /dev/nbdX inside the qemu TCG VM (the
# host kernel has no NBD driver), next to the same reads from the image
# file. TCG makes the absolute numbers meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/integration/vm/vmtest.sh -p ./tests/integration/vmbench/ -timeout 300 > out/bench/vm.log 2>&1 || {
  tail -20 out/bench/vm.log; echo "VM benchmark failed"; exit 1; }
echo "inside the VM (TCG, for information only):"
grep '^VMBENCH' out/bench/vm.log | sed 's/^VMBENCH /  /'
