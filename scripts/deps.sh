#!/usr/bin/env bash
# Installs the Debian packages the tests, benchmarks and demo need, if they
# are missing. Safe to run repeatedly; needs root (or does nothing but say
# what is missing).
set -euo pipefail

# command -> package
declare -A want=(
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin
  [qemu-nbd]=qemu-utils [qemu-img]=qemu-utils
  [nbdkit]=nbdkit [fio]=fio
  [qemu-system-x86_64]=qemu-system-x86
  [curl]=curl [ip]=iproute2 [tc]=iproute2
  [mke2fs]=e2fsprogs [xz]=xz-utils [bc]=bc [jq]=jq
  # make package / test-packages: lintian, rpm -qpl, systemd-analyze verify
  # (with man for the units' Documentation=), completion syntax checks
  [lintian]=lintian [rpm]=rpm [systemd-analyze]=systemd [man]=man-db
  [zsh]=zsh [fish]=fish
  # iSCSI target: libiscsi's tools and compliance suite, the kernel
  # initiator's tools (copied into the test VM), QEMU's iSCSI driver
  [iscsi-test-cu]=libiscsi-bin [iscsi-ls]=libiscsi-bin [iscsi-perf]=libiscsi-bin
  [iscsiadm]=open-iscsi [iscsid]=open-iscsi
  # metrics and status pages: promtool checks the scrapes and the example
  # rules, chromium (driven by chromedp) loads the status pages
  [promtool]=prometheus [chromium]=chromium
)
# qemu-system-x86 is large; skip it when only unit tests are wanted
[ "${1:-}" = "--no-vm" ] && unset 'want[qemu-system-x86_64]'

missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${want[$cmd]}")
done
# file -> package, for packages without a command
compgen -G '/usr/lib/*/qemu/block-iscsi.so' >/dev/null || missing+=(qemu-block-extra)
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" != 0 ]; then
  echo "deps.sh: missing packages: $pkgs (run as root to install them)" >&2
  exit 0
fi
echo "deps.sh: installing $pkgs" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
