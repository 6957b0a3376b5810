"""matrix-js-sdk 37.5.0 through the proxy (tests/e2e/js/sdk_refresh.mjs, run with node)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from e2e_helpers import AT_LIFETIME

JS_DIR = Path(__file__).resolve().parent / "js"


def test_js_sdk_survives_several_token_expiries(proxy):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found (Node.js >= 20 is needed; see scripts/e2e/setup.sh)")
    if not (JS_DIR / "node_modules" / "matrix-js-sdk").is_dir():
        pytest.fail(f"matrix-js-sdk not installed in {JS_DIR}: run scripts/e2e/setup.sh")
    env = {
        **os.environ,
        "MRP_E2E_BASE_URL": proxy.base_url,
        "MRP_E2E_AT_LIFETIME_MS": str(int(AT_LIFETIME * 1000)),
        "MRP_E2E_PHASE_MS": "9000",
        "MRP_E2E_MIN_REFRESHES": "2",
    }
    p = subprocess.run([node, "sdk_refresh.mjs"], cwd=JS_DIR, env=env, capture_output=True,
                       text=True, timeout=300)
    print(p.stdout)
    assert p.returncode == 0, f"sdk_refresh.mjs exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
