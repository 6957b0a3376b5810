#!/usr/bin/env bash
# End-to-end suite: real Synapse behind the proxy, plain HTTP scenarios and matrix-js-sdk in front.
#   scripts/e2e/run.sh [extra pytest args]     e.g. scripts/e2e/run.sh -k refresh -x
# Installs what is missing (scripts/e2e/setup.sh), builds the proxy (debug), runs pytest.
# MRP_BIN=/path/to/binary skips the build and tests that binary instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

bash "$here/setup.sh"

if [ -z "${MRP_BIN:-}" ]; then
    echo "[e2e] cargo build --bin matrix-refresh-proxy" >&2
    cargo build --quiet --bin matrix-refresh-proxy
fi

exec "$repo/target/e2e/venv/bin/pytest" -q -p no:cacheprovider tests/e2e "$@"
