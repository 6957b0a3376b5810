"""Redis outage behind a proxy of its own: users are never logged out by it (DESIGN.md §2:
/refresh -> 503 + Retry-After with a non-JSON body; proxy tokens -> 503, never 401), requests
that need no session keep flowing, and the proxy serves again once Redis is back."""

import time

import pytest

from conftest import Proxy, Redis
from e2e_helpers import CS, assert_alive, assert_ok, login, register


@pytest.fixture(scope="module")
def outage_setup(synapse, tmp_path_factory):
    redis = Redis(tmp_path_factory.mktemp("redis-outage"), name="redis (outage)").start()
    p = Proxy(synapse, redis, tmp_path_factory.mktemp("proxy-outage"), name="proxy (outage)",
              access_token_lifetime="1h").start()
    try:
        yield p, redis
    finally:
        p.stop()
        redis.stop()


def test_redis_outage_never_logs_users_out(outage_setup):
    proxy, redis = outage_setup
    api = proxy.api
    s = register(api, refresh=True)
    plain = login(api, s.user_id, refresh=None)  # Synapse's own token: needs no store
    assert_alive(api, s)

    redis.stop()
    try:
        r = api.post(f"{CS}/refresh", json={"refresh_token": s.refresh_token})
        assert r.status_code == 503, f"/refresh during a Redis outage: {r.status_code} {r.text[:300]}"
        assert r.headers.get("Retry-After"), f"/refresh 503 without Retry-After: {dict(r.headers)}"
        try:
            r.json()
            is_json = True
        except ValueError:
            is_json = False
        assert not is_json, f"/refresh 503 body must not be JSON (js-sdk logs out on JSON errors): {r.text[:300]}"

        r = api.whoami(s.access_token)
        assert r.status_code == 503, f"proxy AT during a Redis outage: {r.status_code} {r.text[:300]}"
        assert r.headers.get("Retry-After"), dict(r.headers)

        assert_ok(api.get("/_matrix/client/versions"), "request without credentials during the outage")
        assert_ok(api.whoami(plain.access_token), "upstream token during the outage")
    finally:
        redis.start()  # same socket, empty store (the suite's Redis keeps nothing on disk)

    # service resumes: new logins work (the old session went with the store's contents)
    deadline = time.monotonic() + 15
    while True:
        r = api.post(f"{CS}/login", json={"type": "m.login.password",
                                          "identifier": {"type": "m.id.user", "user": s.user_id},
                                          "password": "e2e-Correct-Horse-1", "refresh_token": True})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, f"login after Redis came back: {r.status_code} {r.text[:300]}"
    fresh = login(api, s.user_id, refresh=True)
    assert_alive(api, fresh, "new session after the outage")
    fresh = fresh.apply_refresh(api.refresh(fresh.refresh_token))
    assert_alive(api, fresh, "refreshed session after the outage")
