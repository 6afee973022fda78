#!/usr/bin/env bash
# The bridge table of issue 11: /dev/nbdX from `dnbd3-nbd attach` against
# the reference kernel module's /dev/dnbd0 (dnbd3.ko + dnbd3-client from
# ../shared/peers/dnbd3-ref-kmod), in the same qemu TCG boot, the same image
# and the same dnbd3-server inside the VM; sides alternate, medians of
# VMBENCH_ROUNDS (default 3). Only the ratios mean anything under TCG.
# Without the peer files the comparison prints a visible SKIP and only the
# informational figures (nbd vs the image file in tmpfs) are measured.
# Environment passed through to the guest: VMBENCH_ROUNDS, VMBENCH_SIZE_MB,
# VMBENCH_RAND_SECONDS, VMBENCH_ATTACH_ARGS, VMBENCH_ROWS, VMBENCH_VARIANTS
# (several of our devices side by side: "name=command [flags]" separated by
# ";"). VMBENCH_BASE=REV builds dnbd3-nbd of git revision REV into the
# guest as dnbd3-nbd-base, so "base=dnbd3-nbd-base" compares against it in
# the same boot.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out/bench
SHARED=${DNBD3GO_SHARED:-../shared}
KMOD=$SHARED/peers/dnbd3-ref-kmod
ARGS=(-p ./tests/integration/vmbench/ -timeout "${VMBENCH_TIMEOUT:-1200}")
if [ -n "${VMBENCH_BASE:-}" ]; then
  wt=$(mktemp -d /tmp/vmbench-base.XXXXXX)
  git worktree add -q --detach "$wt" "$VMBENCH_BASE"
  (cd "$wt" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$OLDPWD/out/bench/dnbd3-nbd-base" ./cmd/dnbd3-nbd)
  git worktree remove --force "$wt"
  ARGS+=(-guestbin out/bench/dnbd3-nbd-base)
fi
for v in VMBENCH_ROUNDS VMBENCH_SIZE_MB VMBENCH_RAND_SECONDS VMBENCH_ATTACH_ARGS VMBENCH_ROWS VMBENCH_VARIANTS; do
  [ -n "${!v:-}" ] && ARGS+=(-env "$v=${!v}")
done
if [ -f "$KMOD/vmlinuz-6.1.0-57-cloud-amd64" ] && [ -f "$KMOD/nbd.ko" ] && [ -f "$KMOD/dnbd3.ko" ] && [ -x "$KMOD/dnbd3-client" ]; then
  ARGS+=(-kernel "$KMOD/vmlinuz-6.1.0-57-cloud-amd64" -modfile "$KMOD/nbd.ko" -modfile "$KMOD/dnbd3.ko" -guestbin "$KMOD/dnbd3-client")
else
  echo "SKIP: the reference kernel module is missing ($KMOD: vmlinuz-6.1.0-57-cloud-amd64, nbd.ko, dnbd3.ko, dnbd3-client); no comparison"
fi
tests/integration/vm/vmtest.sh "${ARGS[@]}" > out/bench/vm.log 2>&1 || {
  tail -30 out/bench/vm.log; echo "VM benchmark failed"; exit 1; }
echo "inside the VM (TCG: only the ratios mean something):"
grep -a '^VMBENCH' out/bench/vm.log | grep -av 'VMBENCH round' | sed 's/^VMBENCH \{0,1\}/  /'
