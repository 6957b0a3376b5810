#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, then
#   1. cargo test  — unit tests and black-box tests (private redis-server children, a fake
#                    homeserver, the real proxy binary);
#   2. scripts/e2e/run.sh — end-to-end against a real Synapse and matrix-js-sdk.
# Extra arguments go to the end-to-end pytest run. SKIP_E2E=1 runs only the Rust tests.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "[test] installing redis-server (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
fi

echo "[test] cargo test" >&2
cargo test --all-targets

if [ "${SKIP_E2E:-0}" != "1" ]; then
    echo "[test] end-to-end (Synapse + matrix-js-sdk)" >&2
    bash scripts/e2e/run.sh "$@"
fi
