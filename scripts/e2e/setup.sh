#!/usr/bin/env bash
# Installs what the end-to-end suite (tests/e2e) needs. Idempotent: a second run that finds
# everything in place only checks stamps and returns in about a second.
#
#   - target/e2e/venv: Python venv with matrix-synapse, pytest and requests (exact pins in
#     scripts/e2e/requirements.txt + constraints.txt); rebuilt when those files change.
#   - tests/e2e/js/node_modules: matrix-js-sdk 37.5.0 via `npm ci` from the committed lockfile.
#   - redis-server from Debian's packages when missing (the suite starts its own instance on a
#     unix socket; it never uses the machine's Redis on 6379).
#
# Environment: E2E_PYTHON=/path/to/python3 to choose the interpreter (>= 3.10; default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
e2e_target="$repo/target/e2e"
venv="$e2e_target/venv"
js_dir="$repo/tests/e2e/js"

log() { printf '[e2e-setup] %s\n' "$*" >&2; }

sha() { cat "$@" | sha256sum | cut -d' ' -f1; }

mkdir -p "$e2e_target"

# --- redis-server -------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
command -v redis-server >/dev/null || { log "redis-server still missing"; exit 1; }

# --- Node.js (matrix-js-sdk 37.5.0 needs >= 20) ---------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node/npm not found: the js-sdk scenario needs Node.js >= 20 with npm"
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    log "Node.js $(node --version) is too old: matrix-js-sdk 37.5.0 needs >= 20"
    exit 1
fi

# --- Python venv with Synapse ---------------------------------------------------------------------
py="${E2E_PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    log "$py is missing or older than 3.10 (matrix-synapse 1.163 needs >= 3.10)"
    exit 1
fi
py_stamp="$(sha "$here/requirements.txt" "$here/constraints.txt")-$("$py" -c 'import sys; print(sys.version.split()[0])')"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.e2e-stamp" 2>/dev/null)" = "$py_stamp" ]; then
    log "venv up to date ($venv)"
else
    log "creating venv $venv (matrix-synapse, pytest, requests)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install -q --no-input \
        -r "$here/requirements.txt" -c "$here/constraints.txt"
    "$venv/bin/python" -c 'import synapse, pytest, requests' # fail here, not in the suite
    echo "$py_stamp" > "$venv/.e2e-stamp"
fi

# --- matrix-js-sdk --------------------------------------------------------------------------------
js_stamp="$(sha "$js_dir/package.json" "$js_dir/package-lock.json")-$(node --version)"
if [ -d "$js_dir/node_modules/matrix-js-sdk" ] && [ "$(cat "$e2e_target/npm.stamp" 2>/dev/null)" = "$js_stamp" ]; then
    log "node_modules up to date ($js_dir)"
else
    log "npm ci in $js_dir"
    (cd "$js_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$js_stamp" > "$e2e_target/npm.stamp"
fi

log "ready"
