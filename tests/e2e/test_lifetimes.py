"""Refresh-token idle expiry and the absolute session lifetime, with a proxy of their own
(short lifetimes) in front of the same Synapse: both end with 403 M_FORBIDDEN on /refresh."""

import time

import pytest

from conftest import Proxy, Redis
from e2e_helpers import assert_alive, assert_ok, login, register, sleep_until

AT = 1.0
RT_IDLE = 3.0
SESSION = 6.0


@pytest.fixture(scope="module")
def short_proxy(synapse, tmp_path_factory):
    redis = Redis(tmp_path_factory.mktemp("redis-lifetimes"), name="redis (lifetimes)").start()
    p = Proxy(synapse, redis, tmp_path_factory.mktemp("proxy-lifetimes"), name="proxy (lifetimes)",
              access_token_lifetime=f"{AT:g}s", refresh_token_lifetime=f"{RT_IDLE:g}s",
              session_lifetime=f"{SESSION:g}s").start()
    try:
        yield p
    finally:
        p.stop()
        redis.stop()


def _assert_forbidden(r, what):
    assert r.status_code == 403, f"{what}: expected 403, got {r.status_code}: {r.text}"
    assert r.json().get("errcode") == "M_FORBIDDEN", f"{what}: {r.text}"


def test_refresh_token_idle_expiry(short_proxy):
    api = short_proxy.api
    s = register(api, refresh=True)
    assert s.expires_in_ms == int(AT * 1000)
    sleep_until(s.received_at + RT_IDLE + 0.7)
    _assert_forbidden(api.refresh(s.refresh_token), "refresh after the RT idle lifetime")


def test_session_lifetime_caps_a_refreshed_session(short_proxy):
    api = short_proxy.api
    user = register(api, refresh=None).user_id
    s = login(api, user, refresh=True)
    start, login_done = s.issued_at, s.received_at  # the session lifetime counts from the login
    refreshed = 0
    # keep the RT fresh (well inside its idle lifetime) until the session's end
    while time.monotonic() < start + SESSION - 1.2:
        time.sleep(1.0)
        r = api.refresh(s.refresh_token)
        if time.monotonic() > start + SESSION - 0.3:
            break  # too close to call
        s = s.apply_refresh(r)
        assert_alive(api, s, f"after refresh {refreshed} inside the session lifetime")
        refreshed += 1
    assert refreshed >= 3
    sleep_until(login_done + SESSION + 0.7)
    _assert_forbidden(api.refresh(s.refresh_token), "refresh after the session lifetime")
    # the user can log in again
    assert_alive(api, login(api, user, refresh=True))
    assert_ok(api.get("/_matrix/client/versions"))
