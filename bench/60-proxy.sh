#!/usr/bin/env bash
# dnbd3-server as a caching proxy (isProxy=true), each figure against a peer
# measured in the same run. The origin is the reference dnbd3-server
# (../shared/peers/dnbd3-ref; our own server if it cannot run, with a SKIP
# line), and our proxy takes turns with the reference server as a proxy in
# front of it:
#  1. cold read of a 256 MiB image through a proxy (empty cache, no
#     background replication): our proxy vs the reference proxy, and vs the
#     same read straight from the origin, all on loopback; and the warm
#     re-read from the proxy's cache;
#  2. full background replication (bgrWindowSize=8) of a 1 GiB image,
#     triggered by a 4 KiB read: on loopback our proxy vs the reference
#     proxy and vs a plain `dnbd3-nbd get` of the whole image from the
#     origin, and (as root, in network namespaces, our origin) over a
#     tc-shaped link: our proxy vs the reference proxy, vs the link's raw
#     transfer time and vs a plain get over the same link;
#  3. the proxy's RPC (GET /query?q=stats&q=images&q=clients) with 1,000
#     idle clients connected (dnbd3-bench --idle) vs with none, and the RSS
#     each idle client costs.
# Environment: RUNS (default 3), LINK_MBIT (default 1000), NETNS=0 skips
# the namespace part.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS=${RUNS:-3} LINK_MBIT=${LINK_MBIT:-1000} NETNS=${NETNS:-1}
ORIGIN=15601 PROXY=15602 RPROXY=15603
OIP=127.0.0.1 PIP=127.0.0.2 RPIP=127.0.0.3 # each proxy gets its own loopback address
P=$W/proxy
NSP=dnbd3b-$$- # namespace prefix
PIDS=()

trap stop_all EXIT

# conf DIR BASE PORT [PROXY_KEYS...]: write server.conf (and alt-servers
# from $UPLINK when set).
conf() {
  server_conf "$1" "$2" "$3" autoFreeDiskSpaceDelay=-1 "${@:4}"
  rm -f "$1/alt-servers"
  if [ -n "${UPLINK:-}" ]; then printf '[%s]\ncomment=origin\nfor=replication\n' "$UPLINK" > "$1/alt-servers"; fi
}

# start_server NAME DIR BIND [NS] -> sets SPID (SERVER: the program, default ours)
start_server() {
  local pre=()
  [ -n "${4:-}" ] && pre=(ip netns exec "$4")
  "${pre[@]}" "${SERVER:-$BIN/dnbd3-server}" -n -c "$2" ${3:+-b "$3"} >> "$P/$1.log" 2>&1 &
  SPID=$!; PIDS+=("$SPID")
}
stop_server() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# get HOST IMAGE [NS] [ARGS...]: read the image to /dev/null, print seconds.
get() {
  local host=$1 img=$2 ns=${3:-}; shift 3 || shift $#
  local pre=() t
  [ -n "$ns" ] && pre=(ip netns exec "$ns")
  t=$(now)
  "${pre[@]}" "$BIN/dnbd3-nbd" get -h "$host" -i "$img" -S -q -o /dev/null "$@" || { echo "get $img from $host failed" >&2; echo n/a; return; }
  elapsed "$t"
}

# complete HOST:PORT IMAGE [NS]: the image's RPC complete value (or -1).
complete() {
  local pre=()
  [ -n "${3:-}" ] && pre=(ip netns exec "$3")
  "${pre[@]}" curl -s --max-time 5 "http://$1/query?q=images" |
    jq -r --arg n "$2" '[.images[] | select(.name == $n) | .complete] | (.[0] // -1)' 2>/dev/null || echo -1
}

# replicate HOST:PORT IMAGE MAPFILE [NS]: trigger full background
# replication with a 4 KiB read, print the seconds until RPC complete=100
# and the .map is gone (n/a after 300 s).
replicate() {
  local t c
  t=$(now)
  [ "$(get "$1" "$2" "${4:-}" --length 4K)" = n/a ] && { echo n/a; return; }
  for _ in $(seq 6000); do
    c=$(complete "$1" "$2" "${4:-}")
    if [ "$c" = 100 ] && [ ! -e "$3" ]; then elapsed "$t"; return; fi
    sleep 0.05
  done
  echo "replication of $2 did not finish (complete=$c)" >&2; echo n/a
}

mkdir -p "$P"
rm -f "$P"/*.log
random_file "$P/origin/img/cold.r1" 256M
random_file "$P/origin/img/big.r1" 1G
cat "$P/origin/img/cold.r1" "$P/origin/img/big.r1" > /dev/null # page cache warm

REF_SERVER=$(ref_peer dnbd3-server) || REF_SERVER=
[ -n "$REF_SERVER" ] || echo "SKIP: reference proxy rows; the origin is our own server"
conf "$P/origin/etc" "$P/origin/img" $ORIGIN
SERVER=$REF_SERVER start_server origin "$P/origin/etc" $OIP; OPID=$SPID
wait_on $OIP $ORIGIN

# ref_proxy_time KEY BGR-KEYS...: a fresh reference proxy in front of the
# origin; runs "$@" (after the keys, separated by --) against it and stops it.
ref_proxy() {
  local keys=() cmd
  while [ "$1" != -- ]; do keys+=("$1"); shift; done; shift
  rm -rf "$P/rproxy/img"
  UPLINK=$OIP:$ORIGIN conf "$P/rproxy/etc" "$P/rproxy/img" $RPROXY isProxy=true "${keys[@]}"
  SERVER=$REF_SERVER start_server rproxy "$P/rproxy/etc" $RPIP; local rp=$SPID
  wait_on $RPIP $RPROXY
  "$@"
  stop_server $rp
}

# --- 1. cold read through the proxy vs the reference proxy vs direct ------------
declare -A R
cold_ref() { R[rcold]+=" $(get $RPIP:$RPROXY cold)"; R[rwarm]+=" $(get $RPIP:$RPROXY cold)"; }
for i in $(seq "$RUNS"); do
  R[direct]+=" $(get $OIP:$ORIGIN cold)"
  rm -rf "$P/proxy/img"
  UPLINK=$OIP:$ORIGIN conf "$P/proxy/etc" "$P/proxy/img" $PROXY isProxy=true backgroundReplication=false
  start_server proxy "$P/proxy/etc" $PIP; PPID_=$SPID
  wait_on $PIP $PROXY
  R[cold]+=" $(get $PIP:$PROXY cold)"
  R[warm]+=" $(get $PIP:$PROXY cold)"
  [ "$i" = "$RUNS" ] || stop_server $PPID_
  if [ -n "$REF_SERVER" ]; then ref_proxy backgroundReplication=false -- cold_ref; fi
done
# The proxy keeps running with "cold" cached for part 3. Its copy must be right.
if cmp -s "$P/origin/img/cold.r1" "$P/proxy/img/cold.r1"; then COPY=identical; else COPY=DIFFERENT; fi

# --- 3. RPC with 1,000 idle clients vs none (on the proxy from part 1) --------
URL="http://$PIP:$PROXY/query?q=stats&q=images&q=clients"
rpc_ms() { # mean ms of 200 requests on one keep-alive connection
  local args=()
  for _ in $(seq 200); do args+=(-o /dev/null "$URL"); done
  curl -s -w '%{http_code} %{time_total}\n' "${args[@]}" |
    awk '$1 == 200 {s += $2; n++} END { if (n == 200) printf "%.3f", s / n * 1000; else print "n/a" }'
}
RPC0=$(rpc_ms)
RSS0=$(rss_kib $PPID_)
"$BIN/dnbd3-bench" -h $PIP:$PROXY -i cold --idle 1000 --duration 60s > "$P/idle.out" 2>&1 & BPID=$!; PIDS+=($BPID)
wait_until grep -q open "$P/idle.out" || true
NCLIENTS=$(curl -s "$URL" | jq '.clients | length' 2>/dev/null || echo 0)
RSS1=$(rss_kib $PPID_)
RPC1=$(rpc_ms)
RESP=$(curl -s "$URL" | wc -c)
stop_server $BPID
stop_server $PPID_
PER_CLIENT=$(awk -v a="$RSS1" -v b="$RSS0" -v n="$NCLIENTS" 'BEGIN { if (n > 0) printf "%.1f", (a - b) / n; else print "n/a" }')

# --- 2a. full background replication on loopback vs the reference, a get ----
bgr_ref() { R[rbgr1g]+=" $(replicate $RPIP:$RPROXY big "$P/rproxy/img/big.r1.map")"; }
for i in $(seq "$RUNS"); do
  R[get1g]+=" $(get $OIP:$ORIGIN big)"
  rm -rf "$P/proxy/img"
  UPLINK=$OIP:$ORIGIN conf "$P/proxy/etc" "$P/proxy/img" $PROXY isProxy=true backgroundReplication=true bgrWindowSize=8
  start_server proxy "$P/proxy/etc" $PIP; PPID_=$SPID
  wait_on $PIP $PROXY
  R[bgr1g]+=" $(replicate $PIP:$PROXY big "$P/proxy/img/big.r1.map")"
  stop_server $PPID_
  if [ -n "$REF_SERVER" ]; then ref_proxy backgroundReplication=true bgrWindowSize=8 -- bgr_ref; fi
done
if cmp -s "$P/origin/img/big.r1" "$P/proxy/img/big.r1"; then BIGCOPY=identical; else BIGCOPY=DIFFERENT; fi
if [ -n "$REF_SERVER" ]; then
  if cmp -s "$P/origin/img/big.r1" "$P/rproxy/img/big.r1"; then BIGCOPY+=", reference proxy identical"; else BIGCOPY+=", reference proxy DIFFERENT"; fi
fi
rm -rf "$P/proxy/img" "$P/rproxy/img"
stop_server $OPID

# --- 2b. the same over a shaped link between two network namespaces ----------
NS_OK=
if wan_netns; then
  NS_OK=1
  conf "$P/nsorigin/etc" "$P/origin/img" 5003
  start_server nsorigin "$P/nsorigin/etc" "" $C; NOPID=$SPID
  wait_on 10.213.9.1 5003 $C
  R[linkget]=$(get 10.213.9.1:5003 big $B)
  rm -rf "$P/nsproxy/img"
  UPLINK=10.213.9.1:5003 conf "$P/nsproxy/etc" "$P/nsproxy/img" 5003 isProxy=true backgroundReplication=true bgrWindowSize=8
  start_server nsproxy "$P/nsproxy/etc" "" $B; NPPID=$SPID
  wait_on 10.213.9.2 5003 $B
  R[linkbgr]=$(replicate 10.213.9.2:5003 big "$P/nsproxy/img/big.r1.map" $B)
  if cmp -s "$P/origin/img/big.r1" "$P/nsproxy/img/big.r1"; then NSCOPY=identical; else NSCOPY=DIFFERENT; fi
  stop_server $NPPID
  rm -rf "$P/nsproxy/img"
  if [ -n "$REF_SERVER" ]; then # the reference proxy over the same link
    rm -rf "$P/nsrproxy/img"
    UPLINK=10.213.9.1:5003 conf "$P/nsrproxy/etc" "$P/nsrproxy/img" 5003 isProxy=true backgroundReplication=true bgrWindowSize=8
    SERVER=$REF_SERVER start_server nsrproxy "$P/nsrproxy/etc" "" $B; NRPID=$SPID
    wait_on 10.213.9.2 5003 $B
    R[rlinkbgr]=$(replicate 10.213.9.2:5003 big "$P/nsrproxy/img/big.r1.map" $B)
    if cmp -s "$P/origin/img/big.r1" "$P/nsrproxy/img/big.r1"; then NSCOPY+=", reference proxy identical"; else NSCOPY+=", reference proxy DIFFERENT"; fi
    stop_server $NRPID
    rm -rf "$P/nsrproxy/img"
  fi
  stop_server $NOPID
  RAW=$(awk -v m="$LINK_MBIT" 'BEGIN { printf "%.3f", 1073741824 * 8 / (m * 1e6) }')
fi

# --- report --------------------------------------------------------------------
num() { if isnum "$1"; then printf '%.2f' "$1"; else echo n/a; fi; }
rat() { if isnum "$1" && isnum "$2"; then ratio "$1" "$2"; else echo n/a; fi; }
rowt() { printf '%-46s %12s %12s %8s %s\n' "$1" "$(num "$2")" "$(num "$3")" "$(rat "$2" "$3")" "$4"; }
# speed OURS PEER: PEER/OURS for times (higher = ours faster), n/a if either is missing
speed() { if isnum "$1" && isnum "$2"; then ratio "$2" "$1"; else echo n/a; fi; }
printf '\n%-46s %12s %12s %8s %s\n' "proxy (best of $RUNS; seconds)" "our proxy" "peer" "speed" "peer (speed = peer time / ours)"
rowt() { printf '%-46s %12s %12s %8s %s\n' "$1" "$(num "$2")" "$(num "$3")" "$(speed "$2" "$3")" "$4"; }
ORIGIN_NAME=reference; [ -n "$REF_SERVER" ] || ORIGIN_NAME=our
if [ -n "$REF_SERVER" ]; then
  rowt "cold read 256 MiB via proxy, loopback" "$(mins "${R[cold]}")" "$(mins "${R[rcold]}")" "reference proxy (median speed $(speed "$(median ${R[cold]})" "$(median ${R[rcold]})"))"
fi
rowt "cold read 256 MiB via proxy, loopback" "$(mins "${R[cold]}")" "$(mins "${R[direct]}")" "direct get from the $ORIGIN_NAME origin"
if [ -n "$REF_SERVER" ]; then
  rowt "warm re-read 256 MiB from proxy cache" "$(mins "${R[warm]}")" "$(mins "${R[rwarm]}")" "reference proxy"
fi
rowt "warm re-read 256 MiB from proxy cache" "$(mins "${R[warm]}")" "$(mins "${R[direct]}")" "direct get from the $ORIGIN_NAME origin"
if [ -n "$REF_SERVER" ]; then
  rowt "full BGR 1 GiB (window 8), loopback" "$(mins "${R[bgr1g]}")" "$(mins "${R[rbgr1g]}")" "reference proxy (median speed $(speed "$(median ${R[bgr1g]})" "$(median ${R[rbgr1g]})"))"
fi
rowt "full BGR 1 GiB (window 8), loopback" "$(mins "${R[bgr1g]}")" "$(mins "${R[get1g]}")" "plain get of 1 GiB"
if [ -n "$NS_OK" ]; then
  if [ -n "$REF_SERVER" ]; then
    rowt "full BGR 1 GiB over ${LINK_MBIT} Mbit/s link (netns)" "${R[linkbgr]}" "${R[rlinkbgr]}" "reference proxy"
  fi
  rowt "full BGR 1 GiB over ${LINK_MBIT} Mbit/s link (netns)" "${R[linkbgr]}" "$RAW" "raw link time"
  rowt "plain get 1 GiB over the same link" "${R[linkget]}" "$RAW" "raw link time"
else
  echo "(network namespace part skipped: needs root and ip netns, or NETNS=0)"
fi
printf '%-46s %12s %12s %8s %s\n' "RPC stats+images+clients (ms/request)" "$RPC1" "$RPC0" "$(rat "$RPC1" "$RPC0")" "1000 clients vs none"
printf '%-46s %12s %12s %8s %s\n' "RSS per idle client on the proxy (KiB)" "$PER_CLIENT" "" "" "$NCLIENTS clients, response $RESP bytes"
echo "(copies: cold $COPY, 1 GiB loopback $BIGCOPY${NS_OK:+, 1 GiB netns $NSCOPY}; runs: cold${R[cold]} | ref cold${R[rcold]:-} | direct${R[direct]} | bgr${R[bgr1g]} | ref bgr${R[rbgr1g]:-} | get${R[get1g]})"
