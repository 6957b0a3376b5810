#!/usr/bin/env bash
# Runs the proxy with ./config.yaml (or the file given as --config), from a fresh machine:
# installs and starts a local Redis on 127.0.0.1:6379 when none answers, builds the release
# binary, and runs it in the foreground (Ctrl-C stops it, draining in-flight requests).
# The homeserver is expected at upstream.url (default http://127.0.0.1:8008); MRP_UPSTREAM_URL,
# MRP_REDIS_URL and MRP_LISTEN override the file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "[run] installing redis-server (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
fi
if [ -z "${MRP_REDIS_URL:-}" ] && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "[run] starting redis-server on 127.0.0.1:6379" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi

cargo build --release --quiet --bin matrix-refresh-proxy
exec target/release/matrix-refresh-proxy "$@"
