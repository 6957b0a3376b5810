"""/refresh served by the proxy, expiry, and requests that span a refresh or an expiry."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e_helpers import (AT_LIFETIME, CS, Api, assert_alive, assert_dead, assert_ok,
                         assert_refresh_rejected, assert_unknown_token, login, register,
                         sleep_until, unique, wait_until_expired)

EXPECTED_EXPIRES_MS = int(AT_LIFETIME * 1000)


def test_refresh_chain_each_new_token_used(proxy):
    api = proxy.api
    s = register(api, refresh=True)
    assert_alive(api, s)
    seen = {s.access_token, s.refresh_token}
    for i in range(4):
        s = s.apply_refresh(api.refresh(s.refresh_token))
        assert s.expires_in_ms == EXPECTED_EXPIRES_MS, f"rotation {i}: expires_in_ms {s.expires_in_ms}"
        assert s.access_token not in seen and s.refresh_token not in seen, f"rotation {i} reused a token"
        seen |= {s.access_token, s.refresh_token}
        assert_alive(api, s, f"whoami after rotation {i}")  # same user and device


@pytest.mark.parametrize("prefix", [
    "/_matrix/client/v3",
    "/_matrix/client/r0",
    "/_matrix/client/v1",
    "/_matrix/client/unstable",
    "/_matrix/client/unstable/org.matrix.msc2918",
])
def test_refresh_paths(proxy, prefix):
    """Every /refresh spelling is served by the proxy (Synapse has no refresh tokens: a
    forwarded request would fail)."""
    api = proxy.api
    s = register(api, refresh=True)
    s = s.apply_refresh(api.refresh(s.refresh_token, prefix=prefix))
    assert_alive(api, s, f"whoami after refresh via {prefix}")
    s = s.apply_refresh(api.refresh(s.refresh_token, prefix=prefix))
    assert_alive(api, s, f"whoami after a second refresh via {prefix}")


def test_unstable_msc2918_refresh_with_unstable_login(proxy):
    """What matrix-rust-sdk does against a homeserver that advertises < v1.3."""
    api = proxy.api
    user = register(api, refresh=None).user_id
    s = login(api, user, refresh=True, unstable=True)
    prefix = "/_matrix/client/unstable/org.matrix.msc2918"
    for _ in range(2):
        s = s.apply_refresh(api.refresh(s.refresh_token, prefix=prefix))
        assert_alive(api, s)
    wait_until_expired(s)
    assert_unknown_token(api.whoami(s.access_token), soft_logout=True)
    s = s.apply_refresh(api.refresh(s.refresh_token, prefix=prefix))
    assert_alive(api, s, "after expiry and an unstable refresh")


def test_expired_token_soft_logout_then_refresh(proxy):
    api = proxy.api
    s = register(api, refresh=True)
    assert_alive(api, s)
    wait_until_expired(s)
    r = api.whoami(s.access_token)
    assert_unknown_token(r, soft_logout=True, what="whoami with an expired AT")
    # also through ?access_token=
    r = api.get(f"{CS}/account/whoami", params={"access_token": s.access_token})
    assert_unknown_token(r, soft_logout=True, what="whoami with an expired AT in the query")
    s = s.apply_refresh(api.refresh(s.refresh_token))
    assert_alive(api, s, "whoami after refresh")
    r = api.get(f"{CS}/account/whoami", params={"access_token": s.access_token})
    assert assert_ok(r, "whoami with the new AT in the query")["user_id"] == s.user_id


def test_refresh_grace_returns_identical_pair_then_reuse_revokes(proxy):
    api = proxy.api
    s = register(api, refresh=True)
    r1 = api.refresh(s.refresh_token)
    r2 = api.refresh(s.refresh_token)  # inside the grace: nothing of the successor used yet
    n1, n2 = s.apply_refresh(r1), s.apply_refresh(r2)
    assert (n1.access_token, n1.refresh_token) == (n2.access_token, n2.refresh_token), \
        "a repeated refresh inside the grace must return the identical successor pair"
    assert_alive(api, n1)  # ends the grace of s.refresh_token
    reuse = api.refresh(s.refresh_token)
    assert_refresh_rejected(reuse, "reuse of a rotated RT after the grace")
    # revoke_session_on_reuse: true -> the whole session is gone
    assert_dead(api, n1, "session after RT reuse:")


def test_unknown_refresh_token(proxy):
    api = proxy.api
    for rt in ("not-a-token", "syr_" + "a" * 40, unique("garbage") * 4):
        assert_refresh_rejected(api.refresh(rt), f"refresh with {rt[:8]}…")
    r = api.post(f"{CS}/refresh", json={})
    assert r.status_code == 400 and r.json().get("errcode") == "M_MISSING_PARAM", f"{r.status_code} {r.text}"


def test_txn_id_continuity_across_refresh(proxy):
    """Same txn id before and after a refresh -> the same event (the AT maps to the same device)."""
    api = proxy.api
    s = register(api, refresh=True)
    room = assert_ok(api.post(f"{CS}/createRoom", s.access_token, json={}))["room_id"]
    txn = unique("txn")
    path = f"{CS}/rooms/{room}/send/m.room.message/{txn}"
    content = {"msgtype": "m.text", "body": "hello through the proxy"}
    first = assert_ok(api.put(path, s.access_token, json=content), "send before refresh")["event_id"]
    s = s.apply_refresh(api.refresh(s.refresh_token))
    again = assert_ok(api.put(path, s.access_token, json=content), "send after refresh")["event_id"]
    assert again == first, "the retried transaction created a second event"
    # and across an expiry + refresh as well
    wait_until_expired(s)
    assert_unknown_token(api.put(path, s.access_token, json=content), soft_logout=True)
    s = s.apply_refresh(api.refresh(s.refresh_token))
    third = assert_ok(api.put(path, s.access_token, json=content), "send after expiry + refresh")["event_id"]
    assert third == first
    msgs = assert_ok(api.get(f"{CS}/rooms/{room}/messages", s.access_token,
                             params={"dir": "b", "limit": 50}))["chunk"]
    assert [e["event_id"] for e in msgs if e["type"] == "m.room.message"] == [first]


def test_long_poll_sync_started_just_before_expiry_completes(proxy):
    api = proxy.api
    s = register(api, refresh=True)
    since = assert_ok(api.get(f"{CS}/sync", s.access_token, params={"timeout": 0}))["next_batch"]
    poll_ms = 5000
    # start the long poll ~0.8 s before the AT expires; it must run to its end (200)
    sleep_until(s.expires_earliest() - 0.8)
    started = time.monotonic()
    r = api.get(f"{CS}/sync", s.access_token, params={"since": since, "timeout": poll_ms})
    ended = time.monotonic()
    assert started < s.expires_earliest(), "the test started the sync too late"
    assert_ok(r, "long-poll sync spanning the AT expiry")
    assert ended > s.expires_latest() + 1.0, \
        f"the sync returned after {ended - started:.1f}s, before the AT expired: nothing was proved"
    assert "next_batch" in r.json()
    assert_unknown_token(api.whoami(s.access_token), soft_logout=True, what="whoami after the sync")


def test_long_poll_sync_released_by_event_after_expiry(proxy):
    """The long poll also delivers an event that arrives after the AT has expired."""
    api = proxy.api
    s = register(api, refresh=True)
    room = assert_ok(api.post(f"{CS}/createRoom", s.access_token, json={}))["room_id"]
    other = login(api, s.user_id, refresh=True)  # before `since`: a new device wakes syncs up
    since = assert_ok(api.get(f"{CS}/sync", s.access_token, params={"timeout": 0}))["next_batch"]
    result = {}

    def poll():
        result["r"] = api.get(f"{CS}/sync", s.access_token, params={"since": since, "timeout": 20000})

    sleep_until(s.expires_earliest() - 0.8)
    t = threading.Thread(target=poll)
    t.start()
    sleep_until(s.expires_latest() + 1.0)
    other = other.apply_refresh(api.refresh(other.refresh_token))
    ev = assert_ok(api.put(f"{CS}/rooms/{room}/send/m.room.message/{unique('t')}", other.access_token,
                           json={"msgtype": "m.text", "body": "wake up"}))["event_id"]
    t.join(30)
    assert not t.is_alive(), "long-poll sync did not return"
    body = assert_ok(result["r"], "long-poll sync released by an event after expiry")
    events = body.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {}).get("events", [])
    assert ev in [e["event_id"] for e in events]


def test_parallel_refreshes_of_one_token_agree(proxy):
    """Two processes refreshing at once (the grace): every answer is 200 with the same pair."""
    s = register(proxy.api, refresh=True)
    apis = [Api(proxy.base_url) for _ in range(8)]  # separate connections
    with ThreadPoolExecutor(len(apis)) as pool:
        answers = list(pool.map(lambda a: a.refresh(s.refresh_token), apis))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * len(apis), f"parallel refreshes answered {codes}"
    pairs = {(r.json()["access_token"], r.json()["refresh_token"]) for r in answers}
    assert len(pairs) == 1, f"parallel refreshes of one RT returned {len(pairs)} different pairs"
    assert_alive(proxy.api, s.apply_refresh(answers[0]))


def test_refresh_endpoint_methods(proxy):
    api = proxy.api
    r = api.request("OPTIONS", f"{CS}/refresh", headers={"Origin": "https://app.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200, f"OPTIONS /refresh: {r.status_code} {r.text}"
    assert r.headers.get("Access-Control-Allow-Origin"), dict(r.headers)
    r = api.get(f"{CS}/refresh")
    assert r.status_code == 405 and r.json().get("errcode") == "M_UNRECOGNIZED", f"GET /refresh: {r.status_code} {r.text}"
    # no credential needed and any Authorization ignored; no Content-Type needed
    s = register(api, refresh=True)
    r = api.post(f"{CS}/refresh", "mrpat_garbage", data=f'{{"refresh_token": "{s.refresh_token}"}}')
    assert_alive(api, s.apply_refresh(r))
    r = api.post(f"{CS}/refresh", data=b"not json")
    assert r.status_code == 400 and r.json().get("errcode") == "M_NOT_JSON", f"{r.status_code} {r.text}"
