#!/usr/bin/env bash
# Instructions per request of the proxy, counted by valgrind's callgrind: the same count for the
# same build and load whatever else the machine does, so a change of a few hundred instructions
# per request shows, where `scripts/bench.sh`'s wall-clock ratios drift 10-40 % between runs.
# For A/B of hot-path changes (issue 11); throughput claims still come from bench.sh.
#   scripts/instructions.sh [BINARY ...]      (default: the release build of this checkout)
# Environment: INSTR_SECS (measured seconds per case, default 8), INSTR_CASES (default
# "access_token passthrough anonymous"; also "refresh": POST /refresh with fresh tokens, each
# spent once, and "login": POST /login wrapping, a new session each, as in bench.sh; Redis'
# side of those: scripts/redis-instructions.sh), INSTR_FLOOR=1 (also examples/hyper_floor.rs,
# the bare hyper proxy), INSTR_TOP=DIR (each run's 40 costliest functions, self cost per
# request, in DIR), INSTR_KEEP=DIR (each run's callgrind file, for `callgrind_annotate
# --inclusive=yes` or a viewer).
#
# One redis-server (unix socket) and one nginx (the fixed-answer upstream) serve every case. Each
# case starts the proxy under callgrind on CPU 1 (one tokio worker), logs in once (access token
# case), warms up for 2 s with wrk on CPU 0 (8 connections), counts 4 s of idle background work,
# runs wrk for INSTR_SECS, and divides the instructions (less the background's share of that
# time) by the requests wrk counted. Valgrind runs the proxy about 30x slower than natively.
#
# Valgrind's CPU has no SHA extensions, so SHA-256 runs sha2's portable code here: about 13,800
# of the access-token case's instructions per request are its two token hashes (measured on a
# thin-LTO build, where `sha2::sha256::soft::compress` is a function of its own), a few hundred
# natively with SHA-NI. Compare that case between builds, not with the other cases.
set -euo pipefail
secs="${INSTR_SECS:-8}"
idle_secs=4
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
install_missing valgrind callgrind_annotate callgrind_control wrk nginx redis-server curl python3 taskset
bins=("$@")
if ((${#bins[@]} == 0)); then
    cargo build --release --quiet --bin matrix-refresh-proxy
    bins=(target/release/matrix-refresh-proxy)
fi
if [[ -n "${INSTR_FLOOR:-}" ]]; then
    cargo build --release --quiet --example hyper_floor
fi
read -r -a cases <<<"${INSTR_CASES-access_token passthrough anonymous}"
up_port=$(free_port)

$serve redis-server --port 0 --unixsocket "$tmp/redis.sock" --save "" --appendonly no \
    --daemonize no >/dev/null &
pids+=($!)
refresh_script "$tmp/refresh.lua"
login_script "$tmp/login.lua"
upstream_conf "$up_port"
start_nginx upstream

# measure NAME PORT AUTH(at|hs|none|refresh|login) COMMAND...: prints "requests instructions
# idle-instructions-per-second".
measure() {
    local name=$1 port=$2 auth=$3
    shift 3
    $serve valgrind --tool=callgrind --callgrind-out-file="$tmp/$name.cg" "$@" >/dev/null 2>"$tmp/$name.vg" &
    local vpid=$!
    local base="http://127.0.0.1:$port/_matrix/client"
    for _ in $(seq 300); do
        curl -fs "$base/versions" >/dev/null 2>&1 && break
        sleep 0.2
    done
    local hdr=()
    case "$auth" in
        at)
            local at
            at=$(curl -fs -X POST "$base/v3/login" \
                -d "$login_body" |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
            hdr=(-H "Authorization: Bearer $at")
            ;;
        hs) hdr=(-H "Authorization: Bearer syt_YmVuY2g_homeserverTokenOfTheBench_0a1b2c") ;;
        refresh) hdr=(-s "$tmp/refresh.lua") ;;
        login) hdr=(-s "$tmp/login.lua") ;;
    esac
    local url="$base/v3/account/whoami"
    [[ "$auth" == refresh ]] && url="$base/"
    [[ "$auth" == login ]] && url="$base/v3/login"
    $load wrk -t1 -c8 -d2s "${hdr[@]}" "$url" >/dev/null
    # The proxy's background work (timers, the invalidation heartbeat, Redis pings), counted
    # while idle and taken off in proportion: otherwise it would weigh per request with how
    # fast valgrind happened to run.
    callgrind_control -z "$vpid" >/dev/null 2>&1
    sleep "$idle_secs"
    callgrind_control -d "$vpid" >/dev/null 2>&1
    local out
    out=$($load wrk -t1 -c8 -d"${secs}s" "${hdr[@]}" "$url")
    callgrind_control -d "$vpid" >/dev/null 2>&1
    kill "$vpid"
    wait "$vpid" 2>/dev/null || true
    local n idle
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    idle=$(callgrind_annotate "$tmp/$name.cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    callgrind_annotate --threshold=100 "$tmp/$name.cg.2" >"$tmp/$name.txt" 2>/dev/null
    if [[ -n "${INSTR_KEEP:-}" ]]; then
        mkdir -p "$INSTR_KEEP"
        cp "$tmp/$name.cg.2" "$INSTR_KEEP/$name.cg"
        echo "$n" >"$INSTR_KEEP/$name.requests"
    fi
    if [[ -n "${INSTR_TOP:-}" ]]; then
        mkdir -p "$INSTR_TOP"
        python3 - "$tmp/$name.txt" "$n" >"$INSTR_TOP/$name.txt" <<'PY'
import re, sys
n = int(sys.argv[2])
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S+?:(.*?)( \[.*\])?$", line)
    if m and not re.search(r"libc_start|below main|lang_start|::main$|^main$|block_on|enter_runtime|short_backtrace|^0x", m.group(2)):
        rows.append((int(m.group(1).replace(",", "")) / n, m.group(2)))
print("self instructions per request, costliest first")
for cost, fn in sorted(rows, reverse=True)[:40]:
    print(f"{cost:8.0f}  {fn[:160]}")
PY
    fi
    local total
    total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}' "$tmp/$name.txt")
    total=$((total - idle * secs / idle_secs))
    echo "$n $total $((idle / idle_secs))"
}

config() { # $1 port
    cat <<YAML
listen: "127.0.0.1:$1"
upstream: { url: "http://127.0.0.1:$up_port" }
redis: { url: "redis+unix://$tmp/redis.sock" }
tokens: { access_token_lifetime: "24h" }
log: { level: "info" }
admin: { listen: "127.0.0.1:$(free_port)" }
rate_limit: { enabled: true, login: { per_second: 1000000, burst: 1000000 }, refresh: { per_second: 1000000, burst: 1000000 } }
YAML
}

printf '%-24s %-14s %9s %10s %12s\n' build case requests instr/req "idle instr/s"
row() { # build case "n total idle-per-second"
    local n total idle
    read -r n total idle <<<"$3"
    printf '%-24s %-14s %9d %10d %12d\n' "$1" "$2" "$n" $((total / n)) "$idle"
}
if [[ -n "${INSTR_FLOOR:-}" ]]; then
    port=$(free_port)
    row hyper_floor anonymous "$(measure floor "$port" none target/release/examples/hyper_floor \
        "127.0.0.1:$port" "127.0.0.1:$up_port")"
fi
i=0
for bin in "${bins[@]}"; do
    i=$((i + 1))
    for c in "${cases[@]}"; do
        port=$(free_port)
        config "$port" >"$tmp/proxy.yaml"
        case "$c" in
            access_token) auth=at ;;
            passthrough) auth=hs ;;
            anonymous) auth=none ;;
            refresh) auth=refresh ;;
            login) auth=login ;;
            *) echo "unknown case $c" >&2 && exit 2 ;;
        esac
        row "$(basename "$bin")" "$c" "$(measure "b$i-$c" "$port" "$auth" "$bin" --config "$tmp/proxy.yaml")"
    done
done
