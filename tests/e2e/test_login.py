"""/login and /register through the proxy (DESIGN.md §2 "/login and /register")."""

import time

import pytest

from e2e_helpers import (AT_LIFETIME, CS, PASSWORD, Session, assert_alive, assert_dead,
                         assert_ok, login, login_body, register, sleep_until, unique)

EXPECTED_EXPIRES_MS = int(AT_LIFETIME * 1000)


def assert_proxy_tokens(s, what=""):
    """A login/register answer the proxy wrapped: its own AT + RT, never the upstream token."""
    assert isinstance(s.refresh_token, str) and s.refresh_token, f"{what}: no refresh_token in {sorted(s.raw)}"
    assert s.expires_in_ms == EXPECTED_EXPIRES_MS, f"{what}: expires_in_ms {s.expires_in_ms}"
    assert not s.access_token.startswith("syt_"), f"{what}: the upstream (Synapse) token reached the client"
    assert not s.refresh_token.startswith("syr_"), f"{what}: upstream refresh token format"
    assert s.access_token != s.refresh_token
    # the upstream's other fields are kept
    assert s.raw.get("home_server") == "e2e.localhost", f"{what}: home_server dropped: {sorted(s.raw)}"
    assert s.user_id.endswith(":e2e.localhost") and s.device_id


@pytest.mark.parametrize("prefix", ["/_matrix/client/v3", "/_matrix/client/r0", "/_matrix/client/api/v1"])
def test_login_with_flag(proxy, prefix):
    api = proxy.api
    user = register(api, refresh=None).user_id
    s = login(api, user, refresh=True, prefix=prefix)
    assert_proxy_tokens(s, f"login {prefix}")
    assert_alive(api, s, "whoami with the new AT")


def test_login_with_unstable_flag(proxy):
    api = proxy.api
    user = register(api, refresh=None).user_id
    s = login(api, user, refresh=True, unstable=True)
    assert_proxy_tokens(s, "login with org.matrix.msc2918.refresh_token")
    assert_alive(api, s)


@pytest.mark.parametrize("prefix", ["/_matrix/client/v3", "/_matrix/client/r0"])
def test_register_with_flag_through_uia(proxy, prefix):
    """The UIA 401 passes through untouched; only the final 200 is wrapped."""
    api = proxy.api
    body = {"username": unique("reg"), "password": PASSWORD, "refresh_token": True}
    first = api.post(f"{prefix}/register", json=body)
    assert first.status_code == 401, f"{first.status_code}: {first.text}"
    challenge = first.json()
    assert "session" in challenge and "flows" in challenge, challenge
    assert "access_token" not in challenge and "refresh_token" not in challenge, challenge
    t = time.monotonic()
    second = api.post(f"{prefix}/register",
                      json={**body, "auth": {"type": "m.login.dummy", "session": challenge["session"]}})
    s = Session.from_response(second, t)
    assert_proxy_tokens(s, f"register {prefix}")
    assert_alive(api, s)


def test_register_with_unstable_flag(proxy):
    api = proxy.api
    s = register(api, refresh=True, unstable=True)
    assert_proxy_tokens(s, "register with org.matrix.msc2918.refresh_token")
    assert_alive(api, s)


def test_without_flag_token_passes_through_and_never_expires(proxy):
    """No flag: Synapse's own token (syt_…) reaches the client and keeps working past the AT lifetime."""
    api = proxy.api
    reg = register(api, refresh=None)
    explicit_false = login(api, reg.user_id, refresh=False)
    plain = login(api, reg.user_id, refresh=None)
    for what, s in (("register", reg), ("login refresh_token=false", explicit_false), ("login", plain)):
        assert s.access_token.startswith("syt_"), f"{what}: token is not Synapse's own"
        assert s.refresh_token is None and s.expires_in_ms is None, f"{what}: {sorted(s.raw)}"
        assert_alive(api, s, what)
    sleep_until(plain.received_at + AT_LIFETIME + 1.0)
    for what, s in (("register", reg), ("login refresh_token=false", explicit_false), ("login", plain)):
        assert_alive(api, s, f"{what}, after the proxy AT lifetime")


def test_guest_registration_gets_no_refresh_token(proxy):
    api = proxy.api
    t = time.monotonic()
    r = api.post(f"{CS}/register?kind=guest", json={"refresh_token": True})
    body = assert_ok(r, "guest registration")
    assert "refresh_token" not in body and "expires_in_ms" not in body, sorted(body)
    token = body["access_token"]
    assert assert_ok(api.whoami(token))["user_id"] == body["user_id"]
    sleep_until(t + AT_LIFETIME + 1.0)
    assert assert_ok(api.whoami(token), "guest token after the proxy AT lifetime")["user_id"] == body["user_id"]


def test_register_inhibit_login_gets_no_tokens(proxy):
    api = proxy.api
    for flag in ("refresh_token", "org.matrix.msc2918.refresh_token"):
        r = api.post(f"{CS}/register", json={
            "username": unique("inhibit"), "password": PASSWORD, "auth": {"type": "m.login.dummy"},
            "inhibit_login": True, flag: True})
        body = assert_ok(r, f"register inhibit_login with {flag}")
        assert "access_token" not in body and "refresh_token" not in body, sorted(body)
        assert body["user_id"].endswith(":e2e.localhost")


def test_non_boolean_flag_rejected(proxy):
    api = proxy.api
    user = register(api, refresh=None).user_id
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
            "password": PASSWORD, "refresh_token": "yes"}
    r = api.post(f"{CS}/login", json=body)
    assert r.status_code == 400 and r.json().get("errcode") == "M_INVALID_PARAM", f"{r.status_code}: {r.text}"


def test_login_error_passes_through(proxy):
    api = proxy.api
    user = register(api, refresh=None).user_id
    r = api.post(f"{CS}/login", json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                                      "password": "wrong", "refresh_token": True})
    assert r.status_code == 403 and r.json().get("errcode") == "M_FORBIDDEN", f"{r.status_code}: {r.text}"


def test_login_with_existing_device_id_revokes_earlier_sessions(proxy):
    """Spec: logging in with an existing device_id invalidates that device's earlier tokens.
    Synapse itself keeps the old token alive, so this is the proxy's job."""
    api = proxy.api
    user = register(api, refresh=None).user_id
    other = login(api, user, refresh=True)
    first = login(api, user, refresh=True, device_id="E2EDEVICE")
    assert_alive(api, first)
    second = login(api, user, refresh=True, device_id="E2EDEVICE")
    assert second.device_id == "E2EDEVICE"
    assert_alive(api, second, "the new login")
    assert_dead(api, first, "earlier login of the same device_id:")
    assert_alive(api, second, "the new login, after the old one was probed")
    assert_alive(api, other, "another device of the user")


def test_stale_proxy_token_on_login_is_ignored(proxy):
    """js-sdk sends its old (expired or revoked) AT on /login; the login must still work."""
    api = proxy.api
    user = register(api, refresh=None).user_id
    old = login(api, user, refresh=True)
    r = api.post(f"{CS}/logout", old.access_token)
    assert_ok(r, "logout")
    t = time.monotonic()
    r = api.post(f"{CS}/login", old.access_token, json=login_body(user))
    s = Session.from_response(r, t)
    assert_proxy_tokens(s, "login carrying a revoked proxy AT")
    assert_alive(api, s)
