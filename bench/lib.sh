# Shared helpers for bench/*.sh (sourced).
BIN=${BIN:-$PWD/bin}
W=${W:-$PWD/out/bench/work}
mkdir -p "$W"

# wait_port PORT: wait until something listens on 127.0.0.1:PORT.
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2; return 1
}

# ratio A B: A/B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# best VALUES...: the largest number (best of several runs).
best() { printf '%s\n' "$@" | sort -g | tail -1; }

# rss_kib PID
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/"$1"/status; }
