"""The operator session API (issue 13) against a real Synapse: an operator lists the session a
real login made and ends it; the client's tokens are dead at once, /refresh included."""

import json
import subprocess

import requests

from conftest import proxy_binary
from e2e_helpers import (assert_alive, assert_ok, assert_refresh_rejected, assert_unknown_token,
                         login, register)


def _admin(proxy, method, path):
    return requests.request(method, f"{proxy.admin_url}/admin/v1{path}",
                            headers={"Authorization": f"Bearer {proxy.admin_token}"}, timeout=10)


def _cli(proxy, *args):
    out = subprocess.run(
        [str(proxy_binary()), "--config", str(proxy.config), *args],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, f"CLI {args} failed: {out.stderr}"
    return out.stdout


def test_list_shows_a_real_login_and_revoke_ends_it(proxy):
    api = proxy.api
    first = register(api, refresh=True)
    second = login(api, first.user_id, refresh=True)

    # The CLI (URL and secret from the same config.yaml) and the API agree.
    listed = json.loads(_cli(proxy, "sessions", "list", first.user_id, "--json"))["sessions"]
    by_device = {s["device_id"]: s for s in listed}
    assert set(by_device) == {first.device_id, second.device_id}, listed
    for s in listed:
        assert s["created_at"] and s["created_at"] > 1_600_000_000_000, s
    text = json.dumps(listed)
    for secret in (first.access_token, first.refresh_token, second.access_token):
        assert secret not in text
    human = _cli(proxy, "sessions", "list", first.user_id)
    assert first.device_id in human and "2 session(s)" in human, human

    r = _admin(proxy, "DELETE", f"/sessions/{by_device[first.device_id]['session_id']}")
    assert assert_ok(r, "admin revoke") == {"ended": 1}
    assert_unknown_token(api.whoami(first.access_token), soft_logout=False,
                         what="AT of a session the operator ended")
    assert_refresh_rejected(api.refresh(first.refresh_token), "refresh of a session the operator ended")
    assert_alive(api, second, "the user's other session")

    out = _cli(proxy, "sessions", "revoke", "--user", first.user_id, "--json")
    assert json.loads(out) == {"ended": 1}, out
    assert_unknown_token(api.whoami(second.access_token), soft_logout=False, what="after revoke --user")
    assert_refresh_rejected(api.refresh(second.refresh_token), "refresh after revoke --user")
    r = _admin(proxy, "GET", f"/users/{first.user_id}/sessions")
    assert assert_ok(r)["sessions"] == []

    stats = assert_ok(_admin(proxy, "GET", "/stats"))
    assert stats["logins_last_minute"] >= 2, stats


def test_wrong_secret_is_refused(proxy):
    r = requests.get(f"{proxy.admin_url}/admin/v1/stats",
                     headers={"Authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401, r.text
    # never on the client port
    r = requests.get(f"{proxy.base_url}/admin/v1/stats",
                     headers={"Authorization": f"Bearer {proxy.admin_token}"}, timeout=10)
    assert r.status_code != 200 or "sessions_alive" not in r.text
