#!/usr/bin/env bash
# Throughput and latency of the proxy's hot path, run by hand (never in CI):
#   scripts/bench.sh [seconds] [connections]
# Starts a private redis-server (unix socket), the bench upstream (examples/bench_upstream.rs)
# and the release proxy, then drives them with wrk:
#   1. upstream directly (baseline)
#   2. through the proxy, anonymous request (routing + forwarding only)
#   3. through the proxy with a proxy access token (Redis lookup + decrypt + rewrite)
#   4. /refresh grace replays (Redis script + AEAD open)
set -euo pipefail
secs="${1:-10}"
conns="${2:-64}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
for tool in wrk redis-server curl; do
    command -v "$tool" >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk redis-server curl >/dev/null; break; }
done
cargo build --release --quiet --bin matrix-refresh-proxy --example bench_upstream
tmp="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

redis-server --port 0 --unixsocket "$tmp/redis.sock" --save "" --appendonly no --daemonize no >/dev/null &
pids+=($!)
target/release/examples/bench_upstream 127.0.0.1:18008 2>/dev/null &
pids+=($!)
cat >"$tmp/config.yaml" <<YAML
listen: "127.0.0.1:18080"
upstream: { url: "http://127.0.0.1:18008" }
redis: { url: "redis+unix://$tmp/redis.sock" }
tokens: { access_token_lifetime: "1h" }
log: { level: "warn" }
# Measures the proxy's own work: the per-IP limits would turn the refresh run into 429s.
rate_limit: { enabled: false }
admin: { listen: null }
YAML
target/release/matrix-refresh-proxy --config "$tmp/config.yaml" 2>"$tmp/proxy.log" &
pids+=($!)
for _ in $(seq 50); do curl -fs http://127.0.0.1:18080/_matrix/client/versions >/dev/null 2>&1 && break; sleep 0.1; done

login=$(curl -fs -X POST http://127.0.0.1:18080/_matrix/client/v3/login \
    -d '{"type":"m.login.password","user":"b","password":"p","refresh_token":true}')
at=$(printf '%s' "$login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
rt=$(printf '%s' "$login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["refresh_token"])')
# One refresh so the old RT sits in its grace window: replays are the idempotent path.
curl -fs -X POST http://127.0.0.1:18080/_matrix/client/v3/refresh -d "{\"refresh_token\":\"$rt\"}" >/dev/null
cat >"$tmp/refresh.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"refresh_token":"$rt"}'
wrk.headers["Content-Type"] = "application/json"
LUA

run() {
    echo "== $1"
    shift
    wrk -t2 -c"$conns" -d"${secs}s" --latency "$@" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors"
}
run "upstream directly" http://127.0.0.1:18008/_matrix/client/v3/account/whoami
run "proxy, anonymous" http://127.0.0.1:18080/_matrix/client/v3/account/whoami
run "proxy, access token" -H "Authorization: Bearer $at" http://127.0.0.1:18080/_matrix/client/v3/account/whoami
run "proxy, /refresh grace replay" -s "$tmp/refresh.lua" http://127.0.0.1:18080/_matrix/client/v3/refresh
echo "proxy RSS: $(grep VmRSS /proc/"${pids[2]}"/status)"
