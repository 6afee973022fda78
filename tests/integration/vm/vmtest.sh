#!/usr/bin/env bash
# vmtest.sh - run Go tests that need the kernel NBD driver (and root) inside a
# throw-away qemu VM, using only Debian packages and Go.
#
# usage (from anywhere; package paths are relative to the module root):
#   tests/integration/vm/vmtest.sh [-p PKG]... [-run REGEX] [-skip REGEX] [-timeout SEC] [-files DIR]
#       [-m MiB] [-smp N] [-no-nbd] [-mod MODULE]... [-cmds PATTERN|none]
#       [-hostbin PATH]... [-env K=V]... [-disk FILE]... [-keep]
#       [-kernel VMLINUZ] [-modfile FILE.ko]... [-guestbin FILE]...
#
#   -p PKG        Go package pattern to build with `go test -c` (repeatable;
#                 default ./tests/integration/kernel/...)
#   -run REGEX    passed to the tests as -test.run
#   -skip REGEX   passed to the tests as -test.skip
#   -timeout SEC  host-side limit for the whole boot (default 600); the tests get
#                 -test.timeout of SEC-20 (or 3/4 of SEC when SEC <= 80)
#   -files DIR    copied into the guest's /testdata (it lives in guest RAM)
#   -m MiB        guest memory (default 2048); -smp N: guest CPUs (default 2)
#   -no-nbd       do not load nbd.ko (it is still at $DNBD3GO_NBD_KO in the guest)
#   -mod NAME     load another kernel module (dependencies are resolved)
#   -cmds PATTERN commands to build statically onto the guest's PATH
#                 (default ./cmd/...; "none" to skip)
#   -hostbin PATH copy a host binary with its shared libraries (mke2fs always is)
#   -env K=V      set an environment variable for the tests
#   -disk FILE    attach a raw disk image as /dev/vda, /dev/vdb, ... (virtio,
#                 writable, cache=unsafe: the file is scratch space); the
#                 tests see DNBD3GO_VM_DISKS="vda vdb ..."
#   -disk-snapshot FILE  the same, but the guest's writes go to a temporary
#                 overlay and FILE stays unchanged (a prepared disk reused
#                 by every run)
#   -keep         keep the work directory (initramfs, console log)
#   -kernel VMLINUZ  boot this kernel image instead of the package's (its
#                 modules must come from -modfile: the package's only load
#                 into the package's kernel build)
#   -modfile FILE.ko  load this module file (after the package's modules; a
#                 file named nbd.ko replaces the package's nbd and gets its
#                 parameters); the tests see DNBD3GO_VM_MODFILES="name ..."
#   -guestbin FILE  copy FILE (a static binary) into the guest's
#                 /usr/local/bin, first on PATH
#
# Guest: Debian bookworm's cloud kernel (TCG, -cpu max), busybox, nbd.ko loaded
# with nbds_max=16, the test binaries in /tests, the commands in /bin, the real
# mke2fs as /usr/sbin/mke2fs (+ /usr/sbin/mkfs.ext4; busybox's mke2fs is only in
# /bin, behind /usr/sbin on PATH), tmpfs on /tmp (the tests' working directory).
# The tests see DNBD3GO_VM=1, DNBD3GO_NBD_KO=/lib/modules/nbd.ko and
# DNBD3GO_VM_NBD=1 (0 with -no-nbd), DNBD3GO_VM_CMDS=1 (0 with -cmds none).
#
# Exit code: the tests' exit code (0 = pass); 124 when the host-side timeout
# killed the VM; 2 when the VM ended without reporting (kernel panic, harness
# error). Test output streams to stdout, harness progress to stderr.
#
# Host requirements: Debian 12 (or any apt system with bookworm's packages) and
# Go. Missing Debian packages (qemu-system-x86, ...) are installed with apt when
# run as root. The kernel and busybox are only downloaded and unpacked, never
# installed, into the cache: $DNBD3GO_VM_CACHE (default ~/.cache/dnbd3go-vm).
# Root is needed only to install missing packages and refresh apt's lists.
# Env: VMTEST_QEMU_EXTRA (extra qemu arguments).
set -euo pipefail

PKGS=(); RUN=""; SKIP=""; TMO=600; FILES=""; MEM=2048; SMP=2; NBD=1; MODS=(); CMDS=./cmd/...
HOSTBINS=(); ENVS=(); KEEP=0; DISKS=(); KERNEL=""; MODFILES=(); GUESTBINS=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    -p) PKGS+=("$2"); shift 2;;
    -run) RUN=$2; shift 2;;
    -skip) SKIP=$2; shift 2;;
    -timeout) TMO=$2; shift 2;;
    -files) FILES=$2; shift 2;;
    -m) MEM=$2; shift 2;;
    -smp) SMP=$2; shift 2;;
    -no-nbd) NBD=0; shift;;
    -mod) MODS+=("$2"); shift 2;;
    -cmds) CMDS=$2; shift 2;;
    -hostbin) HOSTBINS+=("$2"); shift 2;;
    -env) ENVS+=("$2"); shift 2;;
    -disk) DISKS+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2;;
    -disk-snapshot) DISKS+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2"):snapshot"); shift 2;;
    -keep) KEEP=1; shift;;
    -kernel) KERNEL=$2; shift 2;;
    -modfile) MODFILES+=("$2"); shift 2;;
    -guestbin) GUESTBINS+=("$2"); shift 2;;
    -h|-help|--help) usage;;
    *) echo "vmtest: unknown argument $1" >&2; usage;;
  esac
done
[ ${#PKGS[@]} -gt 0 ] || PKGS=(./tests/integration/kernel/...)
case $TMO in ''|*[!0-9]*) echo "vmtest: -timeout wants seconds" >&2; exit 2;; esac
if [ -n "$FILES" ] && [ ! -d "$FILES" ]; then echo "vmtest: -files $FILES is not a directory" >&2; exit 2; fi
[ -z "$FILES" ] || FILES=$(cd "$FILES" && pwd)
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
if [ -n "$KERNEL" ]; then
  [ -f "$KERNEL" ] || { echo "vmtest: -kernel $KERNEL: no such file" >&2; exit 2; }
  KERNEL=$(abspath "$KERNEL")
fi
declare -A MODFILE=()
for f in "${MODFILES[@]}"; do
  [ -f "$f" ] || { echo "vmtest: -modfile $f: no such file" >&2; exit 2; }
  case $f in *.ko) ;; *) echo "vmtest: -modfile $f: want a .ko file" >&2; exit 2;; esac
  b=$(basename "$f" .ko); MODFILE[${b//-/_}]=$(abspath "$f")
done
for k in "${!GUESTBINS[@]}"; do
  [ -f "${GUESTBINS[$k]}" ] || { echo "vmtest: -guestbin ${GUESTBINS[$k]}: no such file" >&2; exit 2; }
  GUESTBINS[$k]=$(abspath "${GUESTBINS[$k]}")
done

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
[ -f "$ROOT/go.mod" ] || { echo "vmtest: no go.mod in $ROOT" >&2; exit 2; }
CACHE=${DNBD3GO_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dnbd3go-vm}
mkdir -p "$CACHE"
T0=${EPOCHREALTIME/,/.}
log() {
  local now=${EPOCHREALTIME/,/.}
  local ms=$(( (${now%.*} - ${T0%.*}) * 1000 + (10#${now#*.} - 10#${T0#*.}) / 1000 ))
  printf '[vmtest %d.%02ds] %s\n' $((ms / 1000)) $((ms % 1000 / 10)) "$*" >&2
}
die() { echo "vmtest: $*" >&2; exit 2; }

# ---- 1. host packages ---------------------------------------------------------
command -v go >/dev/null || die "Go is not on PATH (install Go from https://go.dev/dl/)"
APT_UPDATED=0
apt_update() {
  [ $APT_UPDATED = 1 ] && return 0
  APT_UPDATED=1
  if [ "$(id -u)" != 0 ]; then
    log "not root: cannot run apt-get update, trying the current package lists"
    return 0
  fi
  log "apt-get update"
  apt-get update -qq || die "apt-get update failed"
}
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v mke2fs >/dev/null || [ -x /sbin/mke2fs ] || need_pkgs+=(e2fsprogs)
command -v apt-get >/dev/null || die "apt-get not found: this harness needs a Debian-based host"
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]}: run as root or: sudo apt-get install --no-install-recommends ${need_pkgs[*]}"
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null 2>&1; then
    apt_update
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null || die "apt-get install ${need_pkgs[*]} failed"
  fi
fi

# ---- 2. kernel + modules and busybox, unpacked from .debs (never installed) ---
# apt-get download works without root too (into the current directory).
apt_download() { # dir pkg
  (cd "$1" && apt-get download -qq "$2" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  ls "$1"/*.deb >/dev/null 2>&1
}
exec 9>"$CACHE/.lock"
flock 9 # one download at a time when several runs share the cache
kpkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
KPKG=$(kpkg)
# Lists may be missing or stale on a fresh machine (an old ABI no longer on the
# mirror): refresh them whenever the kernel they name is not cached yet.
if [ -z "$KPKG" ] || [ ! -f "$CACHE/$KPKG/.done" ]; then
  apt_update; KPKG=$(kpkg)
fi
if [ -z "$KPKG" ] || [ ! -f "$CACHE/$KPKG/.done" ]; then
  [ -n "$KPKG" ] || die "apt knows no linux-image-cloud-amd64 (is bookworm main in /etc/apt/sources.list?)"
  KDIR=$CACHE/$KPKG
  log "fetching $KPKG"
  rm -rf "$KDIR"; mkdir -p "$KDIR/deb"
  if ! apt_download "$KDIR/deb" "$KPKG"; then
    # offline: fall back to the newest kernel already cached
    old=$(ls -d "$CACHE"/linux-image-*/.done 2>/dev/null | sort -V | tail -1)
    [ -n "$old" ] || die "cannot download $KPKG (stale package lists? run once as root so that apt-get update can run)"
    rm -rf "$KDIR"; KPKG=$(basename "$(dirname "$old")"); log "download failed; using cached $KPKG"
  else
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/x"
    V=${KPKG#linux-image-}
    cp "$KDIR/x/boot/vmlinuz-$V" "$KDIR/vmlinuz"
    mv "$KDIR/x/lib/modules/$V" "$KDIR/modules"
    rm -rf "$KDIR/x" "$KDIR/deb"
    touch "$KDIR/.done"
  fi
fi
KDIR=$CACHE/$KPKG
VMLINUZ=$KDIR/vmlinuz
[ -n "$KERNEL" ] && VMLINUZ=$KERNEL
BB=$CACHE/busybox
if [ ! -x "$BB" ]; then
  log "fetching busybox-static"
  d=$(mktemp -d)
  if ! apt_download "$d" busybox-static; then apt_update; apt_download "$d" busybox-static || die "cannot download busybox-static"; fi
  dpkg-deb -x "$d"/busybox-static_*.deb "$d/x"
  cp "$d/x/bin/busybox" "$BB.tmp" && mv "$BB.tmp" "$BB"
  rm -rf "$d"
fi
flock -u 9

# ---- 3. work tree -----------------------------------------------------------------
W=$(mktemp -d "${TMPDIR:-/tmp}/vmtest.XXXXXX")
if [ $KEEP = 1 ]; then log "work directory $W"; else trap 'rm -rf "$W"' EXIT; fi
R=$W/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,root,tests,lib/modules,etc/vmtest}

# kernel modules: resolve dependencies from each module's .modinfo (no depmod
# data in the package; no modinfo/strings needed)
declare -A MODSEEN=()
MODORDER=()
modfile() { find "$KDIR/modules" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" 2>/dev/null | head -1; }
addmod() {
  local m=${1//-/_} f deps d
  [ -n "${MODSEEN[$m]:-}" ] && return 0
  MODSEEN[$m]=1
  f=${MODFILE[$m]:-}
  [ -n "$f" ] || f=$(modfile "$m"); [ -n "$f" ] || f=$(modfile "${1//_/-}")
  if [ -z "$f" ]; then
    grep -qE "/$m\.ko" "$KDIR/modules/modules.builtin" 2>/dev/null && return 0
    die "kernel module $1 not found in $KPKG"
  fi
  case $f in
    *.xz) command -v xz >/dev/null || die "xz is needed for $f (apt-get install xz-utils)"; xz -dc "$f" > "$R/lib/modules/$m.ko";;
    *.zst) command -v zstd >/dev/null || die "zstd is needed for $f (apt-get install zstd)"; zstd -qdc "$f" > "$R/lib/modules/$m.ko";;
    *) cp "$f" "$R/lib/modules/$m.ko";;
  esac
  deps=$(tr '\0' '\n' < "$R/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -1)
  for d in ${deps//,/ }; do addmod "$d"; done
  MODORDER+=("$m")
}
addmod nbd
[ ${#DISKS[@]} -gt 0 ] && MODS+=(virtio_pci virtio_blk)
for m in "${MODS[@]}"; do addmod "$m"; done
for m in "${!MODFILE[@]}"; do addmod "$m"; done
: > "$R/etc/vmtest/modules"
for m in "${MODORDER[@]}"; do
  case $m in
    nbd) [ $NBD = 1 ] && echo "nbd nbds_max=16" >> "$R/etc/vmtest/modules";;
    *) echo "$m" >> "$R/etc/vmtest/modules";;
  esac
done

# ---- 4. Go binaries (static) ----------------------------------------------------
cd "$ROOT"
export CGO_ENABLED=0
log "go test -c ${PKGS[*]}"
n=0
for p in $(go list "${PKGS[@]}"); do
  out=$R/tests/$(echo "${p#"$(go list -m)"/}" | tr / _).test
  go test -c -trimpath -ldflags='-s -w' -o "$out" "$p" || die "go test -c $p failed"
  [ -f "$out" ] && n=$((n + 1))
done
[ $n -gt 0 ] || die "no test binaries built from ${PKGS[*]} (no _test.go files?)"
if [ "$CMDS" != none ]; then
  log "go build $CMDS"
  go build -trimpath -ldflags='-s -w' -o "$R/bin/" "$CMDS" || die "go build $CMDS failed (use -cmds none to skip)"
fi

# ---- 5. host binaries with their shared libraries --------------------------------
copy_hostbin() { # host-path guest-path
  local src dst lib
  src=$(readlink -f "$1"); dst=$R$2
  mkdir -p "$(dirname "$dst")"; cp "$src" "$dst"
  for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$R$lib" ] && continue
    mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"
  done
}
MKE2FS=$(command -v mke2fs || echo /sbin/mke2fs)
copy_hostbin "$MKE2FS" /usr/sbin/mke2fs
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/"
printf '#!/bin/sh\nexec /usr/sbin/mke2fs -t ext4 "$@"\n' > "$R/usr/sbin/mkfs.ext4"
chmod +x "$R/usr/sbin/mkfs.ext4"
mkdir -p "$R/usr/local/bin"
for b in "${GUESTBINS[@]}"; do cp "$b" "$R/usr/local/bin/" && chmod +x "$R/usr/local/bin/$(basename "$b")"; done
for b in "${HOSTBINS[@]}"; do
  src=$(command -v "$b" || true); [ -n "$src" ] || die "host binary $b not found"
  copy_hostbin "$src" "$(readlink -f "$src")"
done

# ---- 6. busybox, files, init ------------------------------------------------------
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
if [ -n "$FILES" ]; then mkdir -p "$R/testdata"; cp -a "$FILES/." "$R/testdata/"; fi
printf '%s\n' "$RUN" > "$R/etc/vmtest/run"
printf '%s\n' "$SKIP" > "$R/etc/vmtest/skip"
if [ "$TMO" -gt 80 ]; then echo "$((TMO - 20))s"; else echo "$((TMO * 3 / 4))s"; fi > "$R/etc/vmtest/timeout"
{
  echo "DNBD3GO_VM=1"; echo "DNBD3GO_VM_NBD=$NBD"; echo "DNBD3GO_NBD_KO=/lib/modules/nbd.ko"
  echo "DNBD3GO_VM_CMDS=$([ "$CMDS" = none ] && echo 0 || echo 1)"
  if [ ${#DISKS[@]} -gt 0 ]; then
    names=""; for i in "${!DISKS[@]}"; do names="$names vd$(printf "\\x$(printf %x $((97 + i)))")"; done
    echo "DNBD3GO_VM_DISKS=${names# }"
  fi
  [ ${#MODFILE[@]} -gt 0 ] && echo "DNBD3GO_VM_MODFILES=${!MODFILE[*]}"
  for e in "${ENVS[@]}"; do echo "$e"; done
} > "$R/etc/vmtest/env"
cat > "$R/init" <<'EOF'
#!/bin/sh
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
hostname vmtest
while read -r m params; do
  [ -n "$m" ] && { insmod /lib/modules/$m.ko $params || echo "VMTEST insmod $m failed"; }
done < /etc/vmtest/modules
while IFS= read -r kv; do [ -n "$kv" ] && export "$kv"; done < /etc/vmtest/env
RUN=$(cat /etc/vmtest/run); SKIP=$(cat /etc/vmtest/skip); TT=$(cat /etc/vmtest/timeout); rc=0
echo "VMTEST ready: $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)s"
for t in /tests/*.test; do
  cd /tmp
  "$t" -test.v -test.count=1 -test.timeout "$TT" ${RUN:+-test.run "$RUN"} ${SKIP:+-test.skip "$SKIP"} || rc=$?
done
if [ $rc != 0 ]; then echo "VMTEST kernel log (tail):"; dmesg | tail -n 40; fi
echo "VMTEST EXIT=$rc uptime=$(cut -d' ' -f1 /proc/uptime)s"
echo o > /proc/sysrq-trigger
sleep 30
EOF
chmod +x "$R/init"
# uncompressed: unpacking gzip under TCG costs more than qemu loading the bytes
(cd "$R" && find . | "$BB" cpio -o -H newc 2>/dev/null) > "$W/initrd.cpio"

# ---- 7. boot ----------------------------------------------------------------------
# TCG only: KVM on nested/PVM hosts hangs or emulates itself to death; -cpu max
# gives RDRAND (no crng wait); -nic none skips the iPXE ROM.
log "booting ${KERNEL:-$KPKG} (tcg, smp=$SMP, mem=${MEM}M, initrd $(( $(stat -c %s "$W/initrd.cpio") >> 20 )) MiB)"
# A TCG guest very rarely hangs during boot (RCU stalls with qemu idle, seen
# about once in dozens of boots on this host): a boot that does not reach
# the "VMTEST ready" line within BOOT_TIMEOUT is killed and retried.
BOOT_TIMEOUT=${DNBD3GO_VM_BOOT_TIMEOUT:-90}
DISKARGS=()
for d in "${DISKS[@]}"; do
  snap=""
  case $d in *:snapshot) d=${d%:snapshot}; snap=",snapshot=on";; esac
  [ -f "$d" ] || die "-disk $d: no such file"
  DISKARGS+=(-drive "file=$d,format=raw,if=virtio,cache=unsafe$snap")
done
boot() {
  : > "$W/console.log"
  timeout -k 5 "$TMO" qemu-system-x86_64 -accel tcg -cpu max -m "$MEM" -smp "$SMP" \
    -nographic -no-reboot -nic none -kernel "$VMLINUZ" -initrd "$W/initrd.cpio" \
    -append "console=ttyS0 panic=-1 quiet" "${DISKARGS[@]}" ${VMTEST_QEMU_EXTRA:-} </dev/null >"$W/console.log" 2>&1 &
  local qpid=$!
  tail -n +1 -f --pid=$qpid "$W/console.log" |
    sed -u 's/\r$//; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g; s/^.*Booting from ROM\.*//' |
    grep --line-buffered -a -v -E '^\s*$|SeaBIOS|iPXE|sysrq: Power Off|reboot: Power down' &
  local tpid=$!
  local waited=0
  until grep -aq 'VMTEST ready' "$W/console.log"; do
    kill -0 $qpid 2>/dev/null || break
    if [ $waited -ge $((BOOT_TIMEOUT * 10)) ]; then
      kill $qpid 2>/dev/null; wait $qpid 2>/dev/null; wait $tpid 2>/dev/null
      return 200
    fi
    sleep 0.1; waited=$((waited + 1))
  done
  wait $qpid; local q=$?
  wait $tpid 2>/dev/null
  return $q
}
set +e
for attempt in 1 2 3; do
  boot; qrc=$?
  [ $qrc != 200 ] && break
  log "the guest did not finish booting within ${BOOT_TIMEOUT}s (attempt $attempt of 3)"
done
set -e
rc=$(grep -ao 'VMTEST EXIT=[0-9]*' "$W/console.log" | tail -1 | cut -d= -f2 || true)
if [ -z "$rc" ]; then
  if [ "$qrc" = 124 ]; then log "timeout after ${TMO}s: VM killed"; exit 124; fi
  log "the VM ended without reporting a result (qemu exit $qrc)"; exit 2
fi
log "done: tests exit $rc"
exit "$rc"
