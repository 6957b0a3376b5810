"""Client-side helpers for the end-to-end tests (plain HTTP with requests)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

import requests

# Lifetimes the proxy runs with in this suite.
AT_LIFETIME = 3.0  # seconds
RT_LIFETIME = "1h"

PASSWORD = "e2e-Correct-Horse-1"
CS = "/_matrix/client/v3"
HTTP_TIMEOUT = 60


# Every access/refresh token a test received, so the suite can check that none leaked into logs.
SEEN_TOKENS: set[str] = set()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Api:
    """A base URL plus a keep-alive session. Nothing here raises on HTTP errors."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()

    def request(self, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kw.setdefault("timeout", HTTP_TIMEOUT)
        return self.http.request(method, self.base_url + path, headers=headers, **kw)

    def get(self, path, token=None, **kw):
        return self.request("GET", path, token, **kw)

    def post(self, path, token=None, **kw):
        return self.request("POST", path, token, **kw)

    def put(self, path, token=None, **kw):
        return self.request("PUT", path, token, **kw)

    def delete(self, path, token=None, **kw):
        return self.request("DELETE", path, token, **kw)

    # --- Matrix calls -------------------------------------------------------------------------

    def whoami(self, token: str) -> requests.Response:
        return self.get(f"{CS}/account/whoami", token)

    def refresh(self, refresh_token: str, prefix: str = CS) -> requests.Response:
        return self.post(f"{prefix}/refresh", json={"refresh_token": refresh_token})


@dataclass
class Session:
    """What a login/register/refresh answered, and when: the proxy issued the tokens somewhere
    between issued_at (request sent) and received_at (answer read), so the AT expires between
    expires_earliest() and expires_latest()."""

    user_id: str
    device_id: str
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in_ms: int | None
    issued_at: float = field(default_factory=time.monotonic)
    received_at: float = field(default_factory=time.monotonic)
    raw: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def _times(r: requests.Response, issued_at: float | None) -> tuple[float, float]:
        received = time.monotonic()
        sent = issued_at if issued_at is not None else received - r.elapsed.total_seconds()
        return sent, received

    @classmethod
    def from_response(cls, r: requests.Response, issued_at: float | None = None) -> "Session":
        sent, received = cls._times(r, issued_at)
        assert r.status_code == 200, f"expected 200, got {r.status_code}: {r.text}"
        body = r.json()
        SEEN_TOKENS.update(t for t in (body.get("access_token"), body.get("refresh_token")) if t)
        return cls(
            user_id=body["user_id"],
            device_id=body["device_id"],
            access_token=body["access_token"],
            refresh_token=body.get("refresh_token"),
            expires_in_ms=body.get("expires_in_ms"),
            issued_at=sent,
            received_at=received,
            raw=body,
        )

    def expires_earliest(self) -> float:
        return self.issued_at + (self.expires_in_ms or 0) / 1000.0

    def expires_latest(self) -> float:
        return self.received_at + (self.expires_in_ms or 0) / 1000.0

    def apply_refresh(self, r: requests.Response) -> "Session":
        """The session after a successful /refresh answer r (asserts the answer's shape)."""
        sent, received = self._times(r, None)
        assert r.status_code == 200, f"/refresh: expected 200, got {r.status_code}: {r.text}"
        body = r.json()
        assert isinstance(body.get("access_token"), str) and body["access_token"], body.keys()
        assert isinstance(body.get("refresh_token"), str) and body["refresh_token"], body.keys()
        assert isinstance(body.get("expires_in_ms"), int), body.keys()
        SEEN_TOKENS.update((body["access_token"], body["refresh_token"]))
        return Session(
            user_id=self.user_id,
            device_id=self.device_id,
            access_token=body["access_token"],
            refresh_token=body["refresh_token"],
            expires_in_ms=body["expires_in_ms"],
            issued_at=sent,
            received_at=received,
            raw=body,
        )


def login_body(user: str, password: str = PASSWORD, refresh: bool | None = True,
               unstable: bool = False, device_id: str | None = None) -> dict:
    body: dict = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    }
    if refresh is not None:
        body["org.matrix.msc2918.refresh_token" if unstable else "refresh_token"] = refresh
    if device_id is not None:
        body["device_id"] = device_id
    return body


def login(api: Api, user: str, password: str = PASSWORD, refresh: bool | None = True,
          unstable: bool = False, device_id: str | None = None, prefix: str = CS) -> Session:
    t = time.monotonic()
    r = api.post(f"{prefix}/login", json=login_body(user, password, refresh, unstable, device_id))
    return Session.from_response(r, t)


def register(api: Api, username: str | None = None, password: str = PASSWORD,
             refresh: bool | None = True, unstable: bool = False, prefix: str = CS,
             **extra) -> Session:
    """Registers with m.login.dummy in one step (Synapse accepts auth without a prior session)."""
    body: dict = {
        "username": username or unique("user"),
        "password": password,
        "auth": {"type": "m.login.dummy"},
        **extra,
    }
    if refresh is not None:
        body["org.matrix.msc2918.refresh_token" if unstable else "refresh_token"] = refresh
    t = time.monotonic()
    r = api.post(f"{prefix}/register", json=body)
    return Session.from_response(r, t)


def localpart(user_id: str) -> str:
    return user_id[1:].split(":", 1)[0]


def password_auth(user_id: str, session: str, password: str = PASSWORD) -> dict:
    return {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user_id},
        "password": password,
        "session": session,
    }


def uia_request(api: Api, method: str, path: str, token: str, body: dict, user_id: str,
                password: str = PASSWORD) -> requests.Response:
    """Two-step user-interactive auth with m.login.password; returns the second answer."""
    first = api.request(method, path, token, json=body)
    assert first.status_code == 401, f"{method} {path}: expected UIA 401, got {first.status_code}: {first.text}"
    challenge = first.json()
    assert "session" in challenge and "flows" in challenge, challenge
    assert any("m.login.password" in f.get("stages", []) for f in challenge["flows"]), challenge
    return api.request(method, path, token,
                       json={**body, "auth": password_auth(user_id, challenge["session"], password)})


def device_path(device_id: str) -> str:
    return f"{CS}/devices/{quote(device_id, safe='')}"


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def wait_until_expired(s: Session, margin: float = 0.3) -> None:
    assert s.expires_in_ms is not None
    sleep_until(s.expires_latest() + margin)


def assert_ok(r: requests.Response, what: str = "") -> dict:
    assert r.status_code == 200, f"{what or r.request.method + ' ' + r.request.path_url}: expected 200, got {r.status_code}: {r.text}"
    return r.json()


def assert_unknown_token(r: requests.Response, soft_logout: bool, what: str = "") -> None:
    label = what or f"{r.request.method} {r.request.path_url.split('?')[0]}"
    assert r.status_code == 401, f"{label}: expected 401, got {r.status_code}: {r.text}"
    body = r.json()
    assert body.get("errcode") == "M_UNKNOWN_TOKEN", f"{label}: {body}"
    assert body.get("soft_logout", False) is soft_logout, f"{label}: expected soft_logout {soft_logout}: {body}"


def assert_refresh_rejected(r: requests.Response, what: str = "refresh") -> None:
    assert r.status_code == 401, f"{what}: expected 401, got {r.status_code}: {r.text}"
    assert r.json().get("errcode") == "M_UNKNOWN_TOKEN", f"{what}: {r.text}"


def assert_alive(api: Api, s: Session, what: str = "") -> None:
    """The session's current AT works and names the right user and device."""
    body = assert_ok(api.whoami(s.access_token), what or "whoami")
    assert body["user_id"] == s.user_id, body
    assert body.get("device_id") == s.device_id, body


def assert_dead(api: Api, s: Session, what: str = "") -> None:
    """A revoked proxy session: AT -> 401 soft_logout false; RT -> 401 M_UNKNOWN_TOKEN."""
    assert_unknown_token(api.whoami(s.access_token), soft_logout=False,
                         what=f"{what} whoami with revoked AT".strip())
    if s.refresh_token is not None:
        assert_refresh_rejected(api.refresh(s.refresh_token), f"{what} refresh of revoked session".strip())
