#!/usr/bin/env bash
# test-packages.sh DIR - checks the packages `make package` built in DIR:
#   1. lintian on every .deb: no errors (warnings are printed)
#   2. rpm -qpl lists the expected files, the /etc files are %config
#   3. every file `make install` staged is in one of the packages
#   4. as root: dpkg -i of the three .debs, the installed dnbd3-server
#      --version, systemd-analyze verify of every installed unit, the
#      server started from its unit's ExecStart line (with a test
#      configuration directory) serving `dnbd3-nbd get`, dpkg -r keeping
#      the conffiles, dpkg --purge leaving nothing but the system user
#      (Debian practice: files may still belong to it; removed here when
#      the test created it).
# Not root: step 4 is skipped with a SKIP line. Exit code 0 = all passed.
set -euo pipefail
dir=${1:?usage: test-packages.sh DIR}
pass=0 fail=0 skip=0
ok() { echo "ok: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fail=$((fail + 1)); }
skipped() { echo "SKIP: $*"; skip=$((skip + 1)); }
summary() { echo "test-packages: $pass passed, $fail failed, $skip skipped"; [ "$fail" = 0 ]; }

debs=("$dir"/*.deb)
rpms=("$dir"/*.rpm)
[ ${#debs[@]} = 3 ] && [ ${#rpms[@]} = 3 ] || { bad "want 3 .deb and 3 .rpm in $dir, got ${debs[*]} ${rpms[*]}"; summary; exit 1; }

# 1. lintian
if command -v lintian >/dev/null; then
	out=$(lintian --fail-on error "${debs[@]}" 2>&1) && rc=0 || rc=$?
	out=$(grep -v 'running with root privileges' <<<"$out" || true)
	[ -n "$out" ] && echo "$out"
	if [ $rc = 0 ] && ! grep -q '^E:' <<<"$out"; then
		ok "lintian: no errors ($(grep -c '^W:' <<<"$out" || true) warnings)"
	else
		bad "lintian reports errors"
	fi
else
	skipped "lintian not installed (scripts/deps.sh installs it)"
fi

# 2. rpm -qpl
declare -A want=(
	[dnbd3go-server]="/usr/bin/dnbd3-server /usr/bin/dnbd3-bench /usr/lib/systemd/system/dnbd3-server.service
		/etc/dnbd3-server/server.conf /etc/dnbd3-server/alt-servers /etc/dnbd3-server/rpc.acl
		/usr/share/man/man8/dnbd3-server.8.gz /usr/share/man/man1/dnbd3-bench.1.gz
		/usr/share/bash-completion/completions/dnbd3-server /usr/share/zsh/site-functions/_dnbd3-server
		/usr/share/fish/vendor_completions.d/dnbd3-server.fish /usr/share/doc/dnbd3go-server/copyright"
	[dnbd3go-client]="/usr/bin/dnbd3-nbd /usr/bin/dnbd3-cowtest /usr/lib/systemd/system/dnbd3-nbd@.service
		/usr/lib/modules-load.d/dnbd3go-client.conf /etc/dnbd3-nbd
		/usr/share/man/man1/dnbd3-nbd.1.gz /usr/share/man/man1/dnbd3-cowtest.1.gz
		/usr/share/bash-completion/completions/dnbd3-nbd /usr/share/zsh/site-functions/_dnbd3-nbd
		/usr/share/fish/vendor_completions.d/dnbd3-nbd.fish"
	[dnbd3go-merger]="/usr/bin/dnbd3-merger /usr/lib/systemd/system/dnbd3-merger.service
		/etc/dnbd3-merger/appsettings.json /usr/lib/sysusers.d/dnbd3-merger.conf
		/usr/share/man/man8/dnbd3-merger.8.gz /usr/share/bash-completion/completions/dnbd3-merger"
)
declare -A config=(
	[dnbd3go-server]="/etc/dnbd3-server/server.conf /etc/dnbd3-server/alt-servers /etc/dnbd3-server/rpc.acl"
	[dnbd3go-client]=""
	[dnbd3go-merger]="/etc/dnbd3-merger/appsettings.json"
)
if command -v rpm >/dev/null; then
	for r in "${rpms[@]}"; do
		name=$(rpm -qp --qf '%{NAME}' "$r" 2>/dev/null)
		list=$(rpm -qpl "$r" 2>/dev/null)
		conf=$(rpm -qpc "$r" 2>/dev/null)
		missing=()
		for f in ${want[$name]}; do grep -qxF "$f" <<<"$list" || missing+=("$f"); done
		for f in ${config[$name]}; do grep -qxF "$f" <<<"$conf" || missing+=("$f (as %config)"); done
		if [ ${#missing[@]} = 0 ]; then ok "rpm -qpl $name: expected files present"; else bad "rpm -qpl $name lacks: ${missing[*]}"; fi
	done
else
	skipped "rpm not installed (scripts/deps.sh installs it)"
fi

# 3. everything staged is packaged
root=$(cd "$dir/.." && pwd)/pkgroot
if [ -d "$root" ]; then
	packaged=$(for d in "${debs[@]}"; do dpkg-deb -c "$d"; done | awk '{print $6}' | sed 's#^\./#/#')
	missing=()
	while read -r f; do
		grep -qxF "${f#"$root"}" <<<"$packaged" || missing+=("${f#"$root"}")
	done < <(find "$root" -type f | sed 's#/usr/share/doc/dnbd3go/#/usr/share/doc/dnbd3go-X/#')
	# The shared doc files are packaged once per package under its own name.
	missing=($(printf '%s\n' "${missing[@]}" | grep -v '^/usr/share/doc/dnbd3go-X/' || true))
	if [ ${#missing[@]} = 0 ]; then ok "every file make install stages is in a .deb"; else bad "staged but not packaged: ${missing[*]}"; fi
fi

# 4. install, run, purge
if [ "$(id -u)" != 0 ]; then
	skipped "dpkg -i / run / purge: needs root (CI runs as root)"
	summary
	exit
fi
pkgs=(dnbd3go-server dnbd3go-client dnbd3go-merger)
for p in "${pkgs[@]}"; do
	if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'installed\|config-files'; then
		skipped "dpkg -i / run / purge: $p is already on this machine; not touching an existing installation"
		summary
		exit
	fi
done
had_user=no
getent passwd dnbd3-merger >/dev/null && had_user=yes
tmp=$(mktemp -d)
server_pid=
cleanup() {
	[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
	dpkg --purge "${pkgs[@]}" >/dev/null 2>&1 || true
	[ $had_user = no ] && userdel dnbd3-merger >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT

if dpkg -i "${debs[@]}" >"$tmp/dpkg.log" 2>&1; then ok "dpkg -i of the three packages"; else cat "$tmp/dpkg.log"; bad "dpkg -i"; summary; exit 1; fi
for p in "${pkgs[@]}"; do dpkg -L "$p" >"$tmp/$p.list"; done

v=$(/usr/bin/dnbd3-server --version 2>&1) && [[ $v == dnbd3go* ]] && ok "installed dnbd3-server --version: $v" || bad "dnbd3-server --version: $v"
conff=$(dpkg-query -W -f='${Conffiles}' dnbd3go-server dnbd3go-merger)
for f in /etc/dnbd3-server/server.conf /etc/dnbd3-server/alt-servers /etc/dnbd3-server/rpc.acl /etc/dnbd3-merger/appsettings.json; do
	grep -q " $f " <<<"$conff" || bad "$f is not a conffile"
done
ok "conffiles registered"
getent passwd dnbd3-merger >/dev/null && ok "system user dnbd3-merger created" || bad "no system user dnbd3-merger"

# systemd-analyze verify of the installed units (the template as an instance).
if command -v systemd-analyze >/dev/null; then
	man=no
	command -v man >/dev/null && man=yes
	mkdir "$tmp/units"
	cp /usr/lib/systemd/system/dnbd3-server.service /usr/lib/systemd/system/dnbd3-merger.service "$tmp/units/"
	cp /usr/lib/systemd/system/dnbd3-nbd@.service "$tmp/units/dnbd3-nbd@test.service"
	if out=$(systemd-analyze verify --man=$man "$tmp"/units/*.service 2>&1); then
		ok "systemd-analyze verify --man=$man: all units"
	else
		echo "$out"
		bad "systemd-analyze verify"
	fi
else
	skipped "systemd-analyze not installed (scripts/deps.sh installs systemd)"
fi

# The server as its unit starts it, with a test configuration directory and
# bound to loopback.
exec_start=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/dnbd3-server.service)
[[ $exec_start == "/usr/bin/dnbd3-server -n -c /etc/dnbd3-server" ]] || bad "unexpected ExecStart: $exec_start"
mkdir -p "$tmp/etc" "$tmp/base/lab"
cp /etc/dnbd3-server/* "$tmp/etc/"
port=$((20000 + RANDOM % 20000))
sed -i "s#^basePath=.*#basePath=$tmp/base#; s#^listenPort=.*#listenPort=$port#" "$tmp/etc/server.conf"
head -c 9M /dev/urandom >"$tmp/base/lab/test.r1"
cmd=${exec_start/ -c \/etc\/dnbd3-server/ -c $tmp/etc}
$cmd -b 127.0.0.1 >"$tmp/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
	grep -qs 'msg=listening' "$tmp/server.log" && break
	sleep 0.1
done
if /usr/bin/dnbd3-nbd get -q -h "127.0.0.1:$port" -i lab/test -o "$tmp/copy.img" 2>"$tmp/get.log" &&
	cmp -s "$tmp/copy.img" "$tmp/base/lab/test.r1"; then
	ok "dnbd3-nbd get from the server started as '$cmd': identical image"
else
	cat "$tmp/server.log" "$tmp/get.log"
	bad "dnbd3-nbd get from the installed server"
fi
kill -TERM "$server_pid"
wait "$server_pid" && ok "server exited 0 after SIGTERM" || bad "server exit code $? after SIGTERM"
server_pid=

# dpkg -r keeps the conffiles, --purge removes everything.
dpkg -r "${pkgs[@]}" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; bad "dpkg -r"; }
[ -f /etc/dnbd3-server/server.conf ] && [ -f /etc/dnbd3-merger/appsettings.json ] && [ ! -e /usr/bin/dnbd3-server ] &&
	ok "dpkg -r: binaries gone, conffiles kept" || bad "dpkg -r: conffiles not kept or binaries left"
dpkg --purge "${pkgs[@]}" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; bad "dpkg --purge"; }
left=()
for p in "${pkgs[@]}"; do
	while read -r f; do
		# Directories other packages own as well (/usr/bin, /etc, ...) stay.
		[ -d "$f" ] && dpkg -S "$f" >/dev/null 2>&1 && continue
		[ -e "$f" ] && left+=("$f")
	done <"$tmp/$p.list"
done
for d in /etc/dnbd3-server /etc/dnbd3-merger /etc/dnbd3-nbd /var/lib/dnbd3-merger; do
	[ -e "$d" ] && left+=("$d")
done
if [ ${#left[@]} = 0 ]; then ok "dpkg --purge: nothing left (the system user stays, as documented)"; else bad "left after purge: ${left[*]}"; fi
getent passwd dnbd3-merger >/dev/null && ok "system user dnbd3-merger kept after purge (removed by this test's cleanup)" ||
	bad "system user removed by purge, README says it stays"
summary
