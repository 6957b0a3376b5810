#!/usr/bin/env bash
# The proxy side by side with nginx, run by hand (never in CI), loopback only, ~3 minutes:
#   scripts/bench.sh [seconds per run, default 5] [rounds, default 3] [connections, default 64]
# Environment: BENCH_BIN (a built binary to measure), BENCH_BEFORE (an older build measured in
# the same rounds), BENCH_CASES (a subset of the proxy cases, e.g. "refresh_fresh_tokens"),
# BENCH_QUICK=1 (throughput only: no latency or default-limits runs), BENCH_REDIS=1 (Redis
# commands per request of every run, from INFO commandstats), BENCH_PROFILE /
# BENCH_STRACE (directories: perf and strace of each proxy case, and of nginx), BENCH_CTX=1
# (context switches per request of the server measured and of the upstream nginx, page faults
# of the server), BENCH_FLOOR=1 (also examples/hyper_floor.rs, a bare hyper proxy with none of
# the proxy's work: what any proxy on hyper and tokio can reach here), BENCH_TOKEN_PREFIX
# (bench-common.sh: the upstream's token shape), BENCH_FLOOD=N (after the runs, N new sessions
# each use their token twice: RSS and cache gauges at the cache bound and beyond it).
#
# Installs wrk and nginx with apt when missing, builds the release proxy, then starts its own
#   - redis-server on a unix socket (never the machine's 6379),
#   - nginx with one worker as the fixed-answer upstream (`return 200`, fresh tokens on /login)
#     and, on another port, as a plain keep-alive reverse proxy in front of it (the baseline),
#   - the proxy in front of the same upstream, rate limits on with budgets above the load, log
#     level info (one line per request, to /dev/null), admin listener on,
#   - a second proxy with the default rate limits (for the 429 run).
# wrk runs on CPU 0, every server on CPU 1 (TOKIO_WORKER_THREADS=1, nginx worker_processes 1).
# Each throughput case runs `rounds` times, interleaved with the others; medians are printed
# with the ratio to nginx. Latency: p50/p99 at a fixed offered rate of 50 % of nginx's median
# rate. wrk2 is not packaged in Debian, so the fixed rate is wrk with a Lua delay() that keeps
# wrk2's schedule (the n-th request due at start + n/rate, whatever the answers' latency; wrk's
# timers tick in whole ms, and latency is counted from the actual send, so coordinated omission
# is not corrected as wrk2 does; the achieved rate is printed). Other work on the machine makes
# absolute numbers noisy: compare the ratios within one run.
set -euo pipefail
secs="${1:-5}"
rounds="${2:-3}"
conns="${3:-64}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
install_missing wrk nginx redis-server curl python3 taskset
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
# BENCH_BIN=BINARY: measure that build instead of building the release binary here.
proxy_bin="${BENCH_BIN:-target/release/matrix-refresh-proxy}"
[[ -n "${BENCH_BIN:-}" ]] || cargo build --release --quiet --bin matrix-refresh-proxy

up_port=$(free_port)
ngx_port=$(free_port)
bare_port=$(free_port)
proxy_port=$(free_port)
admin_port=$(free_port)
def_port=$(free_port)

$serve redis-server --port 0 --unixsocket "$tmp/redis.sock" --save "" --appendonly no \
    --daemonize no >/dev/null &
pids+=($!)
redis_pid=$!

upstream_conf "$up_port"
# The baseline: nginx as a plain keep-alive reverse proxy as the Synapse documentation configures
# it (X-Forwarded-For, X-Forwarded-Proto, Host), with nginx's default access log (one line per
# request, written to /dev/null like the proxy's log). On a second port the same without the log
# and the forwarding headers ("bare"), for reference.
nginx_conf baseline <<NGINX
    upstream hs { server 127.0.0.1:$up_port; keepalive 128; }
    server {
        listen 127.0.0.1:$ngx_port;
        access_log /dev/null combined;
        location / {
            proxy_pass http://hs;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header Host \$host;
        }
    }
    server {
        listen 127.0.0.1:$bare_port;
        access_log off;
        location / {
            proxy_pass http://hs;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
NGINX
declare -A nginx_master
for n in upstream baseline; do
    $serve "$nginx_bin" -c "$tmp/$n.conf" -p "$tmp/$n" 2>>"$tmp/$n/stderr.log" &
    pids+=($!)
    nginx_master[$n]=$!
done

proxy_config() { # $1 listen port, $2 admin port or null, $3 rate_limit block
    cat <<YAML
listen: "127.0.0.1:$1"
upstream: { url: "http://127.0.0.1:$up_port" }
redis: { url: "redis+unix://$tmp/redis.sock" }
tokens: { access_token_lifetime: "1h" }
log: { level: "info" }
admin: { listen: $2 }
$3
YAML
}
# Limits on, as a user runs them, with budgets far above what one load generator can send.
proxy_config "$proxy_port" "\"127.0.0.1:$admin_port\"" \
    'rate_limit: { enabled: true, login: { per_second: 1000000, burst: 1000000 }, refresh: { per_second: 1000000, burst: 1000000 } }' \
    >"$tmp/proxy.yaml"
proxy_config "$def_port" null "" >"$tmp/defaults.yaml"
$serve "$proxy_bin" --config "$tmp/proxy.yaml" 2>/dev/null &
proxy_pid=$!
pids+=($proxy_pid)
$serve "$proxy_bin" --config "$tmp/defaults.yaml" 2>/dev/null &
pids+=($!)
# BENCH_BEFORE=BINARY: an older build of the proxy, same config on its own port, measured in the
# same rounds as the current one (before/after side by side under the same machine load).
wait_ports=("$ngx_port" "$bare_port" "$proxy_port" "$def_port")
# BENCH_FLOOR=1: also measure examples/hyper_floor.rs (a bare hyper proxy: no routing, logging,
# metrics or sessions), the floor of any proxy on hyper and tokio here.
if [[ -n "${BENCH_FLOOR:-}" ]]; then
    cargo build --release --quiet --example hyper_floor
    floor_port=$(free_port)
    $serve target/release/examples/hyper_floor "127.0.0.1:$floor_port" "127.0.0.1:$up_port" &
    floor_pid=$!
    pids+=($floor_pid)
    wait_ports+=("$floor_port")
fi
if [[ -n "${BENCH_BEFORE:-}" ]]; then
    before_port=$(free_port)
    proxy_config "$before_port" null \
        'rate_limit: { enabled: true, login: { per_second: 1000000, burst: 1000000 }, refresh: { per_second: 1000000, burst: 1000000 } }' \
        >"$tmp/before.yaml"
    $serve "$BENCH_BEFORE" --config "$tmp/before.yaml" 2>/dev/null &
    pids+=($!)
    before_pid=$!
    wait_ports+=("$before_port")
fi

for port in "${wait_ports[@]}"; do
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fs "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null
done
rss() { awk '/VmRSS/ {printf "%.1f MB", $2/1024}' "/proc/$1/status"; }
rss_idle=$(rss "$proxy_pid")

at=$(curl -fs -X POST "http://127.0.0.1:$proxy_port/_matrix/client/v3/login" -d "$login_body" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
curl -fs -H "Authorization: Bearer $at" "http://127.0.0.1:$proxy_port/_matrix/client/v3/account/whoami" >/dev/null

login_script "$tmp/login.lua"
refresh_script "$tmp/refresh.lua"
# Fixed offered rate (wrk2-style schedule): RATE requests per second for the one wrk thread, the
# n-th sent at start + n/RATE whatever the answers' latency, so every target gets the same load
# (a fixed pause after each answer would offer a slower target less). wrk's timers count whole
# ms, so requests leave in bursts at each ms tick; a target more than 10 ms behind is not owed
# the backlog. Latency is wrk's (from the actual send).
cat >"$tmp/rate.lua" <<'LUA'
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } mrp_timespec;
int clock_gettime(int clock, mrp_timespec *t);
]]
local ts = ffi.new("mrp_timespec")
local function now_ms()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local interval = 1000 / tonumber(os.getenv("RATE"))
local next_at
delay = function()
    local now = now_ms()
    next_at = math.max((next_at or now) + interval, now - 10)
    return math.max(0, math.floor(next_at - now))
end
LUA

results="$tmp/results"
: >"$results"
# CPU time of a process, all threads (ns on CPU, /proc/PID/task/*/schedstat).
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{n+=$1} END {printf "%d", n}'; }
# User and kernel CPU time of a process, all threads, in clock ticks (/proc/PID/stat utime stime).
# Fields are counted after the `(name)`, which may hold spaces.
user_sys() {
    [[ -n "$1" && -r "/proc/$1/stat" ]] || { echo "0 0"; return; }
    sed 's/.*) //' "/proc/$1/stat" | awk '{printf "%d %d", $12, $13}'
}
# Context switches of a process, all threads (voluntary and not).
ctx_sw() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n+=$2} END {printf "%d", n}'; }
# Ticks of CPU N (the servers' CPU): "steal total" from /proc/stat. Steal is time the
# hypervisor gave this VM's CPU to someone else: a run with much of it measured the host, not
# the servers (printed at the end, per run).
steal_cpu="${serve#taskset -c }"
[[ -n "$serve" ]] || steal_cpu=""
steal_ticks() {
    awk -v c="cpu$steal_cpu" '$1 == c {t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t}' /proc/stat
}
: >"$tmp/steal"

# Page faults of a process (minor + major, /proc/PID/stat): each is kernel time that no system
# call count shows (an allocator returning pages to the kernel and touching them again).
faults() {
    [[ -n "$1" && -r "/proc/$1/stat" ]] || { echo 0; return; }
    sed 's/.*) //' "/proc/$1/stat" | awk '{printf "%d", $8 + $10}'
}
up_worker=$(pgrep -P "${nginx_master[upstream]}" | head -1)
base_worker=$(pgrep -P "${nginx_master[baseline]}" | head -1)
# run CASE ARGS...: one wrk run; appends "case rps p50_ms p99_ms non2xx server_us redis_us
# upstream_us kernel_share" to $results. After non2xx come the CPU time per request of the
# server measured (the proxy, or the baseline nginx for nginx cases), of redis and of the
# upstream nginx (on a shared machine they drift far less than throughput does), and the
# kernel's share of the server's time (printed as "kernel" us/req: what cheaper user-space code
# does not reduce; only fewer system calls or wake-ups do).
run() {
    local name="$1"
    shift
    local server="$proxy_pid"
    case "$name" in
        nginx* | lat_nginx*) server="$base_worker" ;;
        before_* | lat_before_*) server="$before_pid" ;;
        hyper_floor* | lat_hyper_floor*) server="$floor_pid" ;;
    esac
    local s0 r0 u0
    s0=$(cpu_ns "$server") r0=$(cpu_ns "$redis_pid") u0=$(cpu_ns "$up_worker")
    local x0 xu0 us0 f0 st0
    st0=$(steal_ticks)
    x0=$(ctx_sw "$server") xu0=$(ctx_sw "$up_worker") us0=$(user_sys "$server") f0=$(faults "$server")
    redis-cli -s "$tmp/redis.sock" CONFIG RESETSTAT >/dev/null
    $load wrk -t1 "$@" --latency >"$tmp/wrk.out" 2>&1
    # Redis commands per request (scripts' own calls included), into $tmp/redis.NAME.
    redis-cli -s "$tmp/redis.sock" INFO commandstats >"$tmp/redis.$name"
    local cpu="$(($(cpu_ns "$server") - s0)) $(($(cpu_ns "$redis_pid") - r0)) $(($(cpu_ns "$up_worker") - u0))"
    local split="$us0 $(user_sys "$server")"
    echo "$st0 $(steal_ticks)" | awk '{if ($4 > $2) printf "%.1f\n", 100 * ($3 - $1) / ($4 - $2)}' >>"$tmp/steal"
    # BENCH_CTX=1: context switches per request of the server measured and of the upstream.
    if [[ -n "${BENCH_CTX:-}" ]]; then
        local n x="$(($(ctx_sw "$server") - x0)) $(($(ctx_sw "$up_worker") - xu0)) $(($(faults "$server") - f0))"
        n=$(awk '/requests in/ {print $1}' "$tmp/wrk.out")
        awk -v n="$n" -v name="$name" -v x="$x" 'BEGIN {split(x, a, " "); printf "  ctx %s: server %.3f, upstream %.3f context switches per request; server %.4f page faults per request\n", name, a[1] / n, a[2] / n, a[3] / n}' >&2
    fi
    python3 -c '
import re, sys
name, cpu = sys.argv[1], [int(x) for x in sys.argv[2].split()]
text = open(sys.argv[3]).read()
def ms(v):
    n, u = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
n = max(1, int(re.search(r"(\d+) requests in", text).group(1)))
p50 = ms(re.search(r"\s50%\s+(\S+)", text).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", text).group(1))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
bad = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: (.*)", text)
if m: bad += sum(int(x) for x in re.findall(r"\d+", m.group(1)))
# The kernel share of the server CPU time (syscalls, the loopback TCP stack, scheduling).
u0, k0, u1, k1 = (int(x) for x in sys.argv[4].split())
kernel = (k1 - k0) / max(1, (u1 - u0) + (k1 - k0))
print(name, rps, p50, p99, bad, *(f"{c / n / 1000:.2f}" for c in cpu), f"{kernel:.3f}")
' "$name" "$cpu" "$tmp/wrk.out" "$split" >>"$results"
    # BENCH_REDIS=1: print the Redis commands per request of each run.
    if [[ -n "${BENCH_REDIS:-}" ]]; then
        python3 - "$name" "$tmp/redis.$name" "$tmp/wrk.out" <<'PY3' >&2
import re, sys
name, stats, wrk = sys.argv[1:]
n = max(1, int(re.search(r"(\d+) requests in", open(wrk).read()).group(1)))
rows = []
for line in open(stats):
    m = re.match(r"cmdstat_(\S+):calls=(\d+),usec=(\d+)", line)
    if m and m.group(1) not in ("config|resetstat", "config"):
        rows.append((int(m.group(2)), m.group(1), int(m.group(3))))
rows.sort(reverse=True)
tot = sum(r[0] for r in rows) / n
us = sum(r[2] for r in rows) / n
print(f"  redis {name}: {tot:.1f} commands, {us:.1f} us (commandstats) per request: "
      + ", ".join(f"{c} {k / n:.2f}" for k, c, _ in rows[:14]))
PY3
    fi
}

ngx="http://127.0.0.1:$ngx_port/_matrix/client/v3"
bare="http://127.0.0.1:$bare_port/_matrix/client/v3"
prx="http://127.0.0.1:$proxy_port/_matrix/client/v3"
# case_args CASE: the wrk arguments of one throughput case (connections and duration excluded);
# `before_<case>` is <case> against the BENCH_BEFORE build.
case_args() {
    local prx="$prx"
    if [[ "$1" == before_* ]]; then
        prx="http://127.0.0.1:$before_port/_matrix/client/v3"
        set -- "${1#before_}"
    fi
    case "$1" in
        nginx) echo "$ngx/account/whoami" ;;
        nginx_bare) echo "$bare/account/whoami" ;;
        hyper_floor) echo "http://127.0.0.1:$floor_port/_matrix/client/v3/account/whoami" ;;
        proxy_access_token) echo "-H|Authorization: Bearer $at|$prx/account/whoami" ;;
        hs_token_passthrough) echo "-H|Authorization: Bearer syt_bench_homeserver_token|$prx/account/whoami" ;;
        anonymous_passthrough) echo "$prx/account/whoami" ;;
        refresh_fresh_tokens) echo "-s|$tmp/refresh.lua|$prx/refresh" ;;
        login_wrapping) echo "-s|$tmp/login.lua|$prx/login" ;;
    esac
}
proxy_cases=(proxy_access_token hs_token_passthrough anonymous_passthrough refresh_fresh_tokens login_wrapping)
# BENCH_CASES="case ...": only these proxy cases (nginx always runs: every ratio needs it).
if [[ -n "${BENCH_CASES:-}" ]]; then
    read -r -a proxy_cases <<<"$BENCH_CASES"
fi
cases=(nginx nginx_bare "${proxy_cases[@]}")
[[ -z "${BENCH_FLOOR:-}" ]] || cases+=(hyper_floor)
if [[ -n "${BENCH_BEFORE:-}" ]]; then
    for c in "${proxy_cases[@]}"; do cases+=("before_$c"); done
fi
run_case() { # CASE [NAME]: one throughput run of CASE, recorded as NAME
    local args
    IFS='|' read -r -a args <<<"$(case_args "$1")"
    run "${2:-$1}" -c"$conns" -d"${secs}s" "${args[@]}"
}
echo "throughput: $rounds rounds x ${#cases[@]} cases x ${secs}s, $conns connections (wrk on CPU 0, servers on CPU 1)" >&2
echo "  load before: $(uptime)" >&2
# Even rounds run the cases in reverse order, so that no case (and no build, with BENCH_BEFORE)
# always runs in the same position of a round: on a noisy VM a single order was off by up to
# 10 % between two builds.
for r in $(seq "$rounds"); do
    order=("${cases[@]}")
    if ((r % 2 == 0)); then
        order=()
        for ((i = ${#cases[@]} - 1; i >= 0; i--)); do order+=("${cases[i]}"); done
    fi
    for c in "${order[@]}"; do run_case "$c"; done
    echo "  round $r/$rounds done" >&2
done

# Optional, after the measured rounds (both slow the proxy down, so they are never measured):
# BENCH_PROFILE=DIR: `perf record -g` of the proxy under each proxy case, top symbols in DIR;
# BENCH_CALLGRAPH=dwarf: call graphs by DWARF unwinding, for a build with line tables
# (CARGO_PROFILE_RELEASE_DEBUG=line-tables-only); inclusive costs go to DIR/<case>.children.txt.
# BENCH_STRACE=DIR: syscalls per request of the proxy under each proxy case (`strace -c -f`).
if [[ -n "${BENCH_PROFILE:-}" ]]; then
    mkdir -p "$BENCH_PROFILE"
    # nginx too (its worker): the same split of kernel and user time, for comparison.
    for c in nginx "${proxy_cases[@]}"; do
        target="$proxy_pid"
        [[ "$c" == nginx ]] && target="$base_worker"
        perf record -F 1999 --call-graph "${BENCH_CALLGRAPH:-fp}" -p "$target" -o "$BENCH_PROFILE/$c.data" -- sleep "$secs" 2>/dev/null &
        rec=$!
        # Redis under the same run (flat profile: where a session's Lua and commands cost).
        redis_rec=""
        if [[ "$c" != nginx ]]; then
            perf record -F 1999 -p "$redis_pid" -o "$BENCH_PROFILE/$c.redis.data" -- sleep "$secs" 2>/dev/null &
            redis_rec=$!
        fi
        run_case "$c" "profile_$c"
        wait "$rec" || true
        if [[ -n "$redis_rec" ]]; then
            wait "$redis_rec" || true
            perf report -i "$BENCH_PROFILE/$c.redis.data" --no-children --stdio -g none --percent-limit 0.7 \
                --sort dso,symbol 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' |
                awk '{$1=$1; print}' | head -40 >"$BENCH_PROFILE/$c.redis.txt" || true
        fi
        for sort in dso dso,symbol; do
            perf report -i "$BENCH_PROFILE/$c.data" --no-children --stdio -g none --percent-limit 0.7 \
                --sort "$sort" 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' |
                awk '{$1=$1; print}' | head -40 || true
        done >"$BENCH_PROFILE/$c.txt"
        if [[ -n "${BENCH_CALLGRAPH:-}" ]]; then
            perf report -i "$BENCH_PROFILE/$c.data" --children --stdio -g none --percent-limit 1.5 \
                2>/dev/null | grep -v '^#' | grep -v '^$' | head -80 >"$BENCH_PROFILE/$c.children.txt" || true
        fi
        echo "  profile $c: $BENCH_PROFILE/$c.txt" >&2
    done
fi
if [[ -n "${BENCH_STRACE:-}" ]]; then
    mkdir -p "$BENCH_STRACE"
    # nginx too (its worker): the syscalls a plain proxy makes per request, for comparison.
    for c in nginx "${proxy_cases[@]}"; do
        target="$proxy_pid"
        [[ "$c" == nginx ]] && target="$base_worker"
        strace -c -f -p "$target" -o "$BENCH_STRACE/$c.strace" &
        st=$!
        sleep 0.5
        run_case "$c" "strace_$c"
        kill -INT "$st"
        wait "$st" 2>/dev/null || true
        n=$(awk '/requests in/ {print $1}' "$tmp/wrk.out")
        python3 - "$BENCH_STRACE/$c.strace" "$n" "$c" <<'PY2' | tee "$BENCH_STRACE/$c.txt" >&2
import sys
path, n, case = sys.argv[1], max(1, int(sys.argv[2])), sys.argv[3]
rows = []
for line in open(path):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        rows.append((int(f[3]), f[-1]))
rows.sort(reverse=True)
print(f"{case}: {n} requests, {sum(r[0] for r in rows) / n:.2f} syscalls per request: "
      + ", ".join(f"{name} {calls / n:.2f}" for calls, name in rows[:8]))
PY2
    done
fi

if [[ -z "${BENCH_QUICK:-}" ]]; then
# Latency at 50 % of nginx's median maximum rate, same offered rate for every target.
nginx_max=$(awk '$1=="nginx" {print $2}' "$results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
rate=$(python3 -c "print(round($nginx_max * 0.5))")
# Enough connections that none has to wait for a free one at the offered rate (a burst per ms).
lat_conns=$(python3 -c "print(max(16, round($rate * 3 / 1000)))")
echo "latency: offered $rate req/s (fixed schedule, $lat_conns connections), 10s each" >&2
# BENCH_LAT_ROUNDS (default 3): rounds of the fixed-rate runs. A p99 at this rate is mostly the
# millisecond burst a server happens to queue behind, so one round says little.
for r in $(seq "${BENCH_LAT_ROUNDS:-3}"); do
    RATE=$rate BENCH_AUTH="" run lat_nginx -c"$lat_conns" -d10s -s "$tmp/rate.lua" "$ngx/account/whoami"
    RATE=$rate BENCH_AUTH="Bearer $at" run lat_proxy_access_token -c"$lat_conns" -d10s -s "$tmp/rate.lua" "$prx/account/whoami"
    if [[ -n "${BENCH_BEFORE:-}" ]]; then
        RATE=$rate BENCH_AUTH="Bearer $at" run lat_before_proxy_access_token -c"$lat_conns" -d10s -s "$tmp/rate.lua" \
            "http://127.0.0.1:$before_port/_matrix/client/v3/account/whoami"
    fi
    # The floor at the same rate: what hyper and tokio alone add to nginx's latency.
    if [[ -n "${BENCH_FLOOR:-}" ]]; then
        RATE=$rate BENCH_AUTH="" run lat_hyper_floor -c"$lat_conns" -d10s -s "$tmp/rate.lua" \
            "http://127.0.0.1:$floor_port/_matrix/client/v3/account/whoami"
    fi
done

# Default rate limits (login 0.5/s burst 10 per IP, refresh 10/s burst 100 per IP and session).
dfl="http://127.0.0.1:$def_port/_matrix/client/v3"
run defaults_refresh -c"$conns" -d"${secs}s" -s "$tmp/refresh.lua" "$dfl/refresh"
run defaults_login -c"$conns" -d"${secs}s" -s "$tmp/login.lua" "$dfl/login"
fi
rss_after=$(rss "$proxy_pid")

# BENCH_FLOOD=N (e.g. 200000: the default cache bound of 100k entries, then 100k sessions
# beyond it): after the runs, N new sessions each log in on the measured proxy and use their
# access token twice (the first use is looked up in Redis and cached, the second is a hit), in
# two halves; RSS and the cache's gauges after each half show whether memory stays flat once the
# cache is at its bound (issue 11). Redis grows by ~1.5 KB per session (session and user index).
flood_report=""
if [[ -n "${BENCH_FLOOD:-}" ]]; then
    cat >"$tmp/flood.lua" <<LUA
local target = tonumber(os.getenv("FLOOD_N"))
local login = wrk.format("POST", "/_matrix/client/v3/login",
    { ["Content-Type"] = "application/json" }, '$login_body')
local queue, head, tail, made, last, finished = {}, 1, 0, 0, nil, false
request = function()
    if head <= tail then
        local t = queue[head]
        queue[head] = nil
        head = head + 1
        return wrk.format("GET", "/_matrix/client/v3/account/whoami", { Authorization = "Bearer " .. t })
    end
    if made < target then
        return login
    end
    -- Every session made: hits on the last token until the in-flight answers are in.
    return wrk.format("GET", "/_matrix/client/v3/account/whoami", { Authorization = "Bearer " .. last })
end
response = function(status, headers, body)
    local t = string.match(body, '"access_token":"([^"]+)"')
    if t then
        made = made + 1
        last = t
        -- Each token used twice: two entries in the queue.
        queue[tail + 1] = t
        queue[tail + 2] = t
        tail = tail + 2
    elseif made >= target and head > tail and not finished then
        -- wrk's main thread sleeps out -d whatever its threads do: tell the script instead,
        -- which stops wrk with SIGINT (it then prints its summary).
        finished = true
        local f = io.open(os.getenv("FLOOD_DONE"), "w")
        f:write(made)
        f:close()
    end
end
LUA
    gauge() { curl -fs "http://127.0.0.1:$admin_port/metrics" | awk -v m="$1" '$1 == m {printf "%d", $2}'; }
    half=$((BENCH_FLOOD / 2))
    flood_report="cache flood (BENCH_FLOOD=$BENCH_FLOOD, each session logged in and its token used twice):"
    for step in 1 2; do
        rm -f "$tmp/flood.done"
        FLOOD_N=$half FLOOD_DONE="$tmp/flood.done" $load wrk -t1 -c"$conns" -d3600s -s "$tmp/flood.lua" \
            "http://127.0.0.1:$proxy_port" >"$tmp/flood.$step" 2>&1 &
        flood_pid=$!
        while [[ ! -e "$tmp/flood.done" ]] && kill -0 "$flood_pid" 2>/dev/null; do sleep 0.5; done
        kill -INT "$flood_pid" 2>/dev/null || true
        wait "$flood_pid" || true
        grep -q "Non-2xx\|Socket errors" "$tmp/flood.$step" && cat "$tmp/flood.$step" >&2
        flood_report+=$'\n'"  after $((half * step)) sessions: RSS $(rss "$proxy_pid"), cache $(gauge mrp_token_cache_entries) entries, $(gauge mrp_token_cache_bytes) bytes; Redis $(redis-cli -s "$tmp/redis.sock" INFO memory | awk -F: '/^used_memory_human/ {sub(/\r/, "", $2); print $2}')"
    done
fi
# BENCH_RESULTS=FILE: keep the raw rows (case rps p50 p99 non2xx server_us redis_us upstream_us
# kernel_share).
[[ -z "${BENCH_RESULTS:-}" ]] || cp "$results" "$BENCH_RESULTS"
echo "  load after: $(uptime)" >&2
sort -n "$tmp/steal" | awk '{v[NR] = $1} END {if (NR) printf "  steal on the servers'"'"' CPU (cpu%s) per run: median %.1f %%, max %.1f %% (time the hypervisor ran something else: ratios of a run with much of it are suspect)\n", c, v[int((NR + 1) / 2)], v[NR]}' c="${steal_cpu:-}" >&2
# The token cache of the measured proxy over the whole run: a bypass is a lookup made while the
# invalidation channel was not proven live (heartbeat older than cache.liveness_timeout).
echo "  token cache lookups: $(curl -fs "http://127.0.0.1:$admin_port/metrics" |
    awk '/^mrp_token_cache_lookups_total/ {sub(/.*result="/, ""); sub(/"}/, ""); printf "%s ", $0}')" >&2

python3 - "$results" "$rss_idle" "$rss_after" "$(nginx -v 2>&1 | sed 's/.*\///')" "$flood_report" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, bad, cs, cr, cu, ks = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), int(bad), float(cs), float(cr), float(cu), float(cs) * float(ks)))
med = lambda name, i: statistics.median(r[i] for r in rows[name])
base = med("nginx", 0)
bare = med("nginx_bare", 0)
# CPU time per request of everything on the servers' CPU (server, redis, upstream): with that
# CPU to themselves, throughput would be its inverse; "x nginx CPU" is that projected ratio.
cpu = lambda name: med(name, 4) + med(name, 5) + med(name, 6)
print(f"{'case (GET /account/whoami unless named)':42} {'req/s':>9} {'x nginx':>8} {'x bare':>7} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8} {'server us/req':>14} {'kernel':>7} {'redis':>6} {'upstream':>8} {'x nginx CPU':>12}")
names = ["nginx", "nginx_bare", "proxy_access_token", "hs_token_passthrough",
         "anonymous_passthrough", "refresh_fresh_tokens", "login_wrapping", "hyper_floor"]
names += ["before_" + n for n in names[2:] if "before_" + n in rows]
for name in [n for n in names if n in rows]:
    bad = sum(r[3] for r in rows[name])
    print(f"{name:42} {med(name,0):9.0f} {med(name,0)/base:8.2f} {med(name,0)/bare:7.2f} {med(name,1):7.2f} {med(name,2):7.2f} {bad:8} {med(name,4):14.1f} {med(name,7):7.1f} {med(name,5):6.1f} {med(name,6):8.1f} {cpu('nginx')/cpu(name):12.2f}")
print()
lat_names = [n for n in ["lat_nginx", "lat_proxy_access_token", "lat_before_proxy_access_token", "lat_hyper_floor"] if n in rows]
print(f"fixed rate (50 % of nginx max), median of {len(rows['lat_nginx']) if lat_names else 0}:")
for name in lat_names:
    print(f"  {name[4:]:40} achieved {med(name,0):7.0f} req/s  p50 {med(name,1):.3f} ms  p99 {med(name,2):.3f} ms")
# The proxy's p99 minus nginx's in the same round (they run back to back): the spread between
# rounds is the noise of that gap.
for name in lat_names[1:]:
    gaps = [p[2] - n[2] for n, p in zip(rows["lat_nginx"], rows[name])]
    print(f"  {name[4:]:40} p99 - nginx p99 per round: " + " ".join(f"{g:+.2f}" for g in gaps)
          + f" ms (median {statistics.median(gaps):+.2f})")
print()
print("default rate limits (one run each):")
for name in [n for n in ["defaults_refresh", "defaults_login"] if n in rows]:
    r = rows[name][0]
    print(f"  {name[9:]:40} {r[0]:7.0f} req/s, {r[3]} non-2xx (429 M_LIMIT_EXCEEDED)")
print()
print(f"proxy RSS: idle {sys.argv[2]}, after the runs {sys.argv[3]} (nginx {sys.argv[4]})")
if sys.argv[5]:
    print(sys.argv[5])
PY
