#!/usr/bin/env bash
# Redis' instructions per login and per refresh, counted by valgrind's callgrind: the cost of the
# proxy's scripts and commands inside Redis, reproducible to ~1 % (issue 11: Redis' CPU is most
# of a refresh's, and its wall-clock share drifts with the VM). For A/B of Lua changes.
#   scripts/redis-instructions.sh [BINARY ...]   (default: the release build of this checkout)
# Environment: RI_CASES (default "login refresh"), RI_LOGINS (logins measured, default 300),
# RI_SESSIONS and RI_REFRESHES (sessions, and refreshes of each, default 4 x 150), RI_KEEP=DIR
# (each run's callgrind file, for `callgrind_annotate`), RI_REDIS (the redis-server binary,
# default the one on PATH: a build with symbols names Lua's and Redis' static functions).
#
# Each case starts its own redis-server under callgrind (unix socket), a fixed-answer nginx and
# the proxy (rate limits off), then drives one keep-alive connection in a fixed order (logins;
# or logins first, not counted, then each session's refresh tokens spent once, in turn), so every
# run sends Redis the same sequence. Counted: Redis' `call()` inclusive (every command, each
# script with the commands it runs), not the event loop around it, whose cost per command
# depends on how many commands one wake-up finds.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# shellcheck source=scripts/bench-common.sh
source "$repo/scripts/bench-common.sh"
install_missing valgrind callgrind_annotate callgrind_control nginx redis-server curl python3 taskset
bins=("$@")
if ((${#bins[@]} == 0)); then
    cargo build --release --quiet --bin matrix-refresh-proxy
    bins=(target/release/matrix-refresh-proxy)
fi
logins="${RI_LOGINS:-300}"
sessions="${RI_SESSIONS:-4}"
refreshes="${RI_REFRESHES:-150}"
up_port=$(free_port)
upstream_conf "$up_port"
start_nginx upstream

# The client: `drive.py PORT login N` logs in N times; `drive.py PORT sessions N FILE` logs in N
# times and writes the refresh tokens to FILE; `drive.py PORT refresh K FILE` spends K refresh
# tokens of each session in FILE, in turn. Prints the requests it made; stops at any non-200.
cat >"$tmp/drive.py" <<PY
import http.client, json, sys
port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
def post(path, body):
    c.request("POST", "/_matrix/client/v3/" + path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    d = r.read()
    if r.status != 200:
        sys.exit(f"{path}: {r.status} {d[:200]!r}")
    return json.loads(d)
login = json.loads('$login_body')
if mode in ("login", "sessions"):
    rts = [post("login", login)["refresh_token"] for _ in range(n)]
    if mode == "sessions":
        open(sys.argv[4], "w").write("\n".join(rts))
    print(n)
else:
    rts = open(sys.argv[4]).read().split()
    for _ in range(n):
        rts = [post("refresh", {"refresh_token": rt})["refresh_token"] for rt in rts]
    print(n * len(rts))
PY

# measure BINARY CASE: prints "requests redis-instructions".
measure() {
    local bin=$1 case=$2 dir
    dir=$(mktemp -d -p "$tmp")
    $serve valgrind --tool=callgrind --callgrind-out-file="$dir/redis.cg" "${RI_REDIS:-redis-server}" --port 0 \
        --unixsocket "$dir/redis.sock" --save "" --appendonly no >/dev/null 2>"$dir/vg" &
    local rpid=$!
    pids+=($rpid)
    for _ in $(seq 300); do
        redis-cli -s "$dir/redis.sock" PING >/dev/null 2>&1 && break
        sleep 0.2
    done
    local port
    port=$(free_port)
    cat >"$dir/proxy.yaml" <<YAML
listen: "127.0.0.1:$port"
upstream: { url: "http://127.0.0.1:$up_port" }
redis: { url: "redis+unix://$dir/redis.sock" }
tokens: { access_token_lifetime: "1h" }
log: { level: "warn" }
rate_limit: { enabled: false }
YAML
    $load "$bin" --config "$dir/proxy.yaml" 2>/dev/null &
    local ppid=$!
    pids+=($ppid)
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null 2>&1 && break
        sleep 0.1
    done
    # Scripts loaded and the connections warm before counting.
    python3 "$tmp/drive.py" "$port" sessions 1 "$dir/warm" >/dev/null
    python3 "$tmp/drive.py" "$port" refresh 3 "$dir/warm" >/dev/null
    [[ "$case" == refresh ]] && python3 "$tmp/drive.py" "$port" sessions "$sessions" "$dir/rts" >/dev/null
    callgrind_control -z "$rpid" >/dev/null 2>&1
    local n
    case "$case" in
        login) n=$(python3 "$tmp/drive.py" "$port" login "$logins") ;;
        refresh) n=$(python3 "$tmp/drive.py" "$port" refresh "$refreshes" "$dir/rts") ;;
    esac
    callgrind_control -d "$rpid" >/dev/null 2>&1
    kill "$ppid" "$rpid" 2>/dev/null || true
    wait "$rpid" 2>/dev/null || true
    if [[ -n "${RI_KEEP:-}" ]]; then
        mkdir -p "$RI_KEEP"
        cp "$dir"/redis.cg.* "$RI_KEEP/$(basename "$bin")-$case.cg"
    fi
    local total
    total=$(callgrind_annotate --inclusive=yes --threshold=100 "$dir"/redis.cg.* 2>/dev/null |
        awk '$NF ~ /redis/ && $(NF-1) ~ /:call$/ {gsub(",", "", $1); print $1; exit}')
    echo "$n $total"
}

printf '%-24s %-8s %9s %16s\n' build case requests "redis instr/req"
for bin in "${bins[@]}"; do
    for c in ${RI_CASES:-login refresh}; do
        read -r n total <<<"$(measure "$bin" "$c")"
        printf '%-24s %-8s %9d %16d\n' "$(basename "$bin")" "$c" "$n" $((total / n))
    done
done
