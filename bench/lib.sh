# Shared helpers for bench/*.sh (sourced).
BIN=${BIN:-$PWD/bin}
W=${W:-$PWD/out/bench/work}
mkdir -p "$W"

# wait_until CMD...: run CMD every 50 ms until it succeeds (status 0) or
# 10 s have passed (status 1).
wait_until() {
  for _ in $(seq 200); do
    "$@" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# listening IP PORT [NS]: something accepts TCP connections on IP:PORT (in
# network namespace NS).
listening() {
  local pre=()
  [ -n "${3:-}" ] && pre=(ip netns exec "$3")
  "${pre[@]}" bash -c "exec 3<>/dev/tcp/$1/$2"
}

# wait_on IP PORT [NS]: wait until something listens there.
wait_on() {
  wait_until listening "$@" || { echo "nothing listens on $1:$2${3:+ in $3}" >&2; return 1; }
}

# wait_port PORT: wait until something listens on 127.0.0.1:PORT.
wait_port() { wait_on 127.0.0.1 "$1"; }

# wait_sock PATH...: wait until every PATH is a unix socket.
wait_sock() {
  local s
  for s in "$@"; do
    wait_until test -S "$s" || { echo "no socket $s" >&2; return 1; }
  done
}

# random_file PATH SIZE: PATH holding SIZE random bytes (SIZE as for
# head -c: 256M, 1G), made once and kept for later runs.
random_file() {
  [ -f "$1" ] && return
  mkdir -p "$(dirname "$1")"
  head -c "$2" /dev/urandom > "$1.tmp" && mv "$1.tmp" "$1"
}

# server_conf DIR BASE PORT [KEY=VALUE...]: write DIR/server.conf for a
# dnbd3-server serving BASE on PORT that logs only errors and warnings, with
# the extra keys in its [dnbd3] section.
server_conf() {
  local dir=$1 base=$2 port=$3 kv; shift 3
  mkdir -p "$dir" "$base"
  { printf '[dnbd3]\nbasePath=%s\nlistenPort=%s\n' "$base" "$port"
    for kv in "$@"; do echo "$kv"; done
    printf '[logging]\nconsoleMask=ERROR WARNING\n'; } > "$dir/server.conf"
}

# fio_nbd SOCKET RW BS QD SIZE: fio's nbd engine (libnbd) on a unix socket
# for $SECS seconds; prints "bytes_per_s iops" of the reads (RW read,
# randread) or writes (write, randwrite).
fio_nbd() {
  local dir=read
  case $2 in *write) dir=write;; esac
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" --iodepth="$4" \
      --size="$5" --runtime="$SECS" --time_based --output-format=json 2>/dev/null |
    awk -F'[:,]' -v d="\"$dir\" :" 'index($0, d) {r=1} r && /"bw_bytes"/ && bw == "" {gsub(/ /,"",$2); bw=$2} r && /"iops"/ && !i {gsub(/ /,"",$2); i=$2} END {print bw, i}'
}

# ratio A B: A/B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# mb BYTES_PER_S: the same in MB/s (10^6 bytes).
mb() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1e6 }'; }

# best VALUES...: the largest number (best of several runs).
best() { printf '%s\n' "$@" | sort -g | tail -1; }

# median VALUES...: the median (the mean of the middle two for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# rss_kib PID
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/"$1"/status; }

# REF_DIR holds the reference implementation's programs (see its README).
REF_DIR=${REF_DIR:-$PWD/../shared/peers/dnbd3-ref}

# ref_peer NAME: print the path of the reference program NAME if it can run
# here. As root, Debian runtime libraries it lacks are installed once with
# apt-get. Otherwise it prints a visible SKIP line on stderr and fails.
ref_peer() {
  local p=$REF_DIR/$1 pkgs missing
  if [ ! -x "$p" ]; then echo "SKIP: reference $1: no executable $p" >&2; return 1; fi
  missing=$(ldd "$p" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
  if [ -n "$missing" ] && [ "$(id -u)" = 0 ]; then
    case $1 in
      dnbd3-server) pkgs="libjansson4";;
      dnbd3-fuse*) pkgs="libfuse2 libcurl4 fuse3";;
      *) pkgs="";;
    esac
    if [ -n "$pkgs" ]; then
      echo "bench: installing $pkgs for the reference $1" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1; } || true
      missing=$(ldd "$p" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
    fi
  fi
  if [ -n "$missing" ]; then echo "SKIP: reference $1: missing libraries: $missing" >&2; return 1; fi
  echo "$p"
}

# fuse_ok: FUSE mounts can work here (else a SKIP line on stderr).
fuse_ok() {
  [ -c /dev/fuse ] || { echo "SKIP: FUSE rows: no /dev/fuse" >&2; return 1; }
  command -v fusermount > /dev/null || { echo "SKIP: FUSE rows: no fusermount (apt-get install fuse3)" >&2; return 1; }
}

# now: the time in seconds; elapsed T0: seconds since T0 (3 decimals).
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# stop_all: for `trap stop_all EXIT`: kill and reap the pids in the array
# PIDS and, as root, delete the network namespaces whose names begin with
# $NSP (when set), killing what still runs in them.
stop_all() {
  local p ns pid
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${NSP:-}" ] && [ "$(id -u)" = 0 ]; then
    for ns in $(ip netns list 2>/dev/null | awk -v p="$NSP" 'index($1, p) == 1 {print $1}'); do
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    done
  fi
}

# metrics_base: OLD=$W/metrics-base with the tree of BASE_REV, code without
# the Prometheus metrics, unpacked in $OLD/src (kept while BASE_REV stays
# the same; $OLD/bin is emptied with it). BASE_REV defaults to where this
# branch left main; on main itself give the parent of the merge that
# brought the metrics. Exits 2 when BASE_REV is HEAD.
metrics_base() {
  BASE_REV=${BASE_REV:-$(git merge-base HEAD main)}
  if [ "$(git rev-parse "$BASE_REV")" = "$(git rev-parse HEAD)" ]; then
    echo "BASE_REV is HEAD: set BASE_REV to a revision without the metrics, e.g. the first parent of the merge that brought them" >&2
    exit 2
  fi
  OLD=$W/metrics-base
  if [ ! -d "$OLD/src" ] || [ "$(cat "$OLD/rev" 2>/dev/null)" != "$(git rev-parse "$BASE_REV")" ]; then
    rm -rf "$OLD" && mkdir -p "$OLD/src" "$OLD/bin"
    git archive "$BASE_REV" | tar -x -C "$OLD/src"
    git rev-parse "$BASE_REV" > "$OLD/rev"
  fi
}

# wan_netns: as root and with NETNS=1, the network namespaces
# ${NSP}central (10.213.9.1) and ${NSP}roomB (10.213.9.2), joined by a veth
# link wan0 shaped to LINK_MBIT Mbit/s in both directions; sets C and B to
# their names. Fails without creating anything otherwise.
wan_netns() {
  [ "${NETNS:-1}" = 1 ] && [ "$(id -u)" = 0 ] && ip netns add "${NSP}central" 2>/dev/null || return 1
  C=${NSP}central B=${NSP}roomB
  ip netns add "$B"
  ip -n "$C" link set lo up; ip -n "$B" link set lo up
  ip -n "$C" link add name wan0 type veth peer name wan0 netns "$B"
  ip -n "$C" addr add 10.213.9.1/24 dev wan0; ip -n "$B" addr add 10.213.9.2/24 dev wan0
  ip -n "$C" link set wan0 up; ip -n "$B" link set wan0 up
  local ns
  for ns in "$C" "$B"; do
    ip netns exec "$ns" tc qdisc add dev wan0 root tbf rate "${LINK_MBIT}mbit" burst 1mb latency 50ms
  done
}

# isnum V: V is a number (not n/a).
isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }

# mins "VALUES": the smallest of the numbers in VALUES (n/a entries
# ignored), n/a when there is none.
mins() { local v; v=$(printf '%s\n' $1 | grep -v n/a | sort -g | head -1); echo "${v:-n/a}"; }
