"""The operator session API (issue 13) against a real Synapse: an operator lists the session a
real login made and ends it; the client's tokens are dead at once, /refresh included."""

import json
import subprocess

import pytest
import requests

from conftest import Proxy, proxy_binary
from e2e_helpers import (Api, assert_alive, assert_ok, assert_refresh_rejected,
                         assert_unknown_token, login, register)


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


# ---- ?logout_upstream=true (admin.upstream_key_file) ----

def _devices(synapse, user_id):
    """The user's devices as Synapse itself knows them (its admin API)."""
    r = requests.get(f"{synapse.base_url}/_synapse/admin/v2/users/{user_id}/devices",
                     headers={"Authorization": f"Bearer {synapse.admin_token}"}, timeout=10)
    return {d["device_id"] for d in assert_ok(r, "synapse admin devices")["devices"]}


@pytest.fixture(scope="module")
def keyed_proxy(synapse, redis_server, tmp_path_factory):
    """A second proxy on the suite's Redis and Synapse, with admin.upstream_key_file set."""
    p = Proxy(synapse, redis_server, tmp_path_factory.mktemp("proxy-upstream-key"),
              name="proxy (upstream key)", upstream_key=True).start()
    try:
        yield p
    finally:
        p.stop()


def test_logout_upstream_ends_the_synapse_device(keyed_proxy, synapse):
    api = keyed_proxy.api
    first = register(api, refresh=True)
    second = login(api, first.user_id, refresh=True)
    # A plain Synapse session of the same user, straight at Synapse: it watches the devices.
    witness = login(Api(synapse.base_url), first.user_id, refresh=False)
    assert {first.device_id, second.device_id} <= _devices(synapse, first.user_id)
    mine = assert_ok(Api(synapse.base_url).get("/_matrix/client/v3/devices", witness.access_token),
                     "witness /devices")
    assert first.device_id in {d["device_id"] for d in mine["devices"]}, mine

    listed = assert_ok(_admin(keyed_proxy, "GET", f"/users/{first.user_id}/sessions"))["sessions"]
    sid = next(s["session_id"] for s in listed if s["device_id"] == first.device_id)
    r = _admin(keyed_proxy, "DELETE", f"/sessions/{sid}?logout_upstream=true")
    assert assert_ok(r, "revoke with upstream logout") == {
        "ended": 1, "upstream_logout": {"done": 1, "failed": 0, "not_possible": 0}}, r.text
    # The proxy session is over, and Synapse logged the device out: gone from /devices, seen by
    # the user's other Synapse session and by Synapse's admin API.
    assert_unknown_token(api.whoami(first.access_token), soft_logout=False,
                         what="AT of a session ended with logout_upstream")
    assert_refresh_rejected(api.refresh(first.refresh_token), "refresh after logout_upstream")
    mine = assert_ok(Api(synapse.base_url).get("/_matrix/client/v3/devices", witness.access_token))
    assert first.device_id not in {d["device_id"] for d in mine["devices"]}, mine
    assert first.device_id not in _devices(synapse, first.user_id)
    # The other session, proxy and Synapse side, lives on.
    assert_alive(api, second, "the user's other proxy session")
    assert second.device_id in _devices(synapse, first.user_id)

    # The CLI, for all of the user's proxy sessions; the witness (not a proxy session) survives.
    out = subprocess.run(
        [str(proxy_binary()), "--config", str(keyed_proxy.config), "sessions", "revoke", "--user",
         first.user_id, "--logout-upstream", "--json"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "ended": 1, "upstream_logout": {"done": 1, "failed": 0, "not_possible": 0}}, out.stdout
    assert_unknown_token(api.whoami(second.access_token), soft_logout=False, what="after --logout-upstream")
    assert _devices(synapse, first.user_id) == {witness.device_id}
    assert_ok(Api(synapse.base_url).get("/_matrix/client/v3/account/whoami", witness.access_token))
    # No upstream token in the proxy's log.
    log = keyed_proxy.log.path.read_text(errors="replace")
    assert "syt_" not in log, "an upstream token in the proxy log"


def test_logout_upstream_without_a_key_says_how_to_enable_it(proxy):
    api = proxy.api
    s = register(api, refresh=True)
    r = _admin(proxy, "DELETE", f"/users/{s.user_id}/sessions?logout_upstream=true")
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["errcode"] == "M_INVALID_PARAM", body
    assert "admin.upstream_key_file" in body["error"], body
    assert_alive(api, s, "nothing changed")
