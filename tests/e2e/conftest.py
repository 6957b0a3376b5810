"""Fixtures of the end-to-end suite: a real Synapse, a real redis-server and the real proxy binary.

Synapse starts once per pytest session (SQLite, free port, open registration, no refresh tokens of
its own); redis-server (own child on a unix socket, never the machine's Redis) and the proxy
(access tokens live AT_LIFETIME seconds) start once per session as well. Tests isolate themselves
by registering fresh users.

When a test fails, the part of the Synapse and proxy logs written during that test is attached to
its report (pytest prints it with the failure).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_helpers import AT_LIFETIME, RT_LIFETIME, Api  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SERVER_NAME = "e2e.localhost"
START_TIMEOUT = 90.0


# --------------------------------------------------------------------------------------------
# small process helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = 20000) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return data[-limit:].decode("utf-8", "replace")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LogFile:
    """A child's log; remembers an offset so a failing test can show only its own part."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self.path = path
        self.mark = 0

    def set_mark(self) -> None:
        try:
            self.mark = self.path.stat().st_size
        except OSError:
            self.mark = 0

    def since_mark(self, limit: int = 30000) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.mark)
                data = f.read()
        except OSError as e:
            return f"<cannot read {self.path}: {e}>"
        if len(data) > limit:
            data = b"...(cut)...\n" + data[-limit:]
        return data.decode("utf-8", "replace")


LOGS: list[LogFile] = []


# --------------------------------------------------------------------------------------------
# Synapse


class Synapse:
    def __init__(self, base_url: str, server_name: str, shared_secret: str, log: LogFile, proc):
        self.base_url = base_url
        self.server_name = server_name
        self.shared_secret = shared_secret
        self.log = log
        self.proc = proc
        self.api = Api(base_url)
        self.admin_token: str | None = None
        self.admin_user_id: str | None = None

    def register_with_shared_secret(self, username: str, password: str, admin: bool) -> dict:
        """Synapse's /_synapse/admin/v1/register (what register_new_matrix_user does)."""
        url = f"{self.base_url}/_synapse/admin/v1/register"
        nonce = requests.get(url, timeout=30).json()["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(nonce.encode() + b"\x00" + username.encode() + b"\x00" + password.encode())
        mac.update(b"\x00" + (b"admin" if admin else b"notadmin"))
        body = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        r = requests.post(url, json=body, timeout=30)
        assert r.status_code == 200, f"shared-secret registration failed: {r.status_code} {r.text}"
        return r.json()


def _synapse_config(workdir: Path, port: int, shared_secret: str) -> str:
    # every rate limit Synapse has, raised far beyond what the suite does
    high = {"per_second": 100000, "burst_count": 100000}
    rc = {
        "rc_message": high,
        "rc_registration": high,
        "rc_registration_token_validity": high,
        "rc_login": {"address": high, "account": high, "failed_attempts": high},
        "rc_admin_redaction": high,
        "rc_joins": {"local": high, "remote": high},
        "rc_joins_per_room": high,
        "rc_key_requests": high,
        "rc_3pid_validation": high,
        "rc_invites": {"per_room": high, "per_user": high, "per_issuer": high},
        "rc_third_party_invite": high,
        "rc_media_create": high,
        "rc_presence": {"per_user": high},
        "rc_delayed_event_mgmt": high,
        "rc_room_creation": high,
        "rc_reports": high,
        "rc_user_directory": high,
        "rc_profile": high,
    }
    import yaml  # from the venv (Synapse depends on PyYAML)

    cfg = {
        "server_name": SERVER_NAME,
        "pid_file": str(workdir / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(workdir / "homeserver.db")}},
        "media_store_path": str(workdir / "media_store"),
        "max_upload_size": "100M",
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "allow_guest_access": True,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_hex(32),
        "form_secret": secrets.token_hex(32),
        "signing_key_path": str(workdir / "signing.key"),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "report_stats": False,
        "enable_metrics": False,
        "url_preview_enabled": False,
        "presence": {"enabled": False},
        "bcrypt_rounds": 4,  # fast password hashing: the suite registers many users
        # behave like a homeserver without refresh-token support
        "refreshable_access_token_lifetime": None,
        "refresh_token_lifetime": None,
        "nonrefreshable_access_token_lifetime": None,
        "session_lifetime": None,
        **rc,
    }
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.fixture(scope="session")
def synapse(tmp_path_factory) -> Synapse:
    workdir = tmp_path_factory.mktemp("synapse")
    port = free_port()
    shared_secret = secrets.token_hex(16)
    cfg_path = workdir / "homeserver.yaml"
    cfg_path.write_text(_synapse_config(workdir, port, shared_secret))

    import signedjson.key  # from the venv (Synapse dependency)

    with open(workdir / "signing.key", "w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("e2e")])

    log = LogFile("synapse", workdir / "homeserver.log")
    LOGS.append(log)
    with open(log.path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(cfg_path)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"Synapse exited with {proc.returncode} during startup:\n{_tail(log.path)}")
        try:
            if requests.get(f"{base}/_matrix/client/versions", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"Synapse did not answer within {START_TIMEOUT}s:\n{_tail(log.path)}")
        time.sleep(0.2)

    hs = Synapse(base, SERVER_NAME, shared_secret, log, proc)
    admin = hs.register_with_shared_secret("e2e-admin", secrets.token_urlsafe(12), admin=True)
    hs.admin_token = admin["access_token"]
    hs.admin_user_id = admin["user_id"]
    try:
        yield hs
    finally:
        _stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM, 1):
            sys.stderr.write(f"Synapse ended with {proc.returncode}:\n{_tail(log.path, 5000)}\n")


# --------------------------------------------------------------------------------------------
# redis-server


def _redis_ping(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(sock_path))
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    """Our own redis-server child on a unix socket (never the machine's Redis on 6379)."""

    def __init__(self, workdir: Path, name: str = "redis"):
        self.workdir = workdir
        self.sock = workdir / "redis.sock"
        self.log = LogFile(name, workdir / "redis.log")
        LOGS.append(self.log)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+unix://{self.sock}"

    def start(self) -> "Redis":
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            pytest.fail("redis-server not found: run scripts/e2e/setup.sh")
        with open(self.log.path, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    redis_bin,
                    "--port", "0",
                    "--unixsocket", str(self.sock),
                    "--unixsocketperm", "700",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not _redis_ping(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _stop(self.proc)
                pytest.fail(f"redis-server did not start:\n{_tail(self.log.path)}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Redis:
    r = Redis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield r
    finally:
        r.stop()


# --------------------------------------------------------------------------------------------
# the proxy


def proxy_binary() -> Path:
    if os.environ.get("MRP_BIN"):
        return Path(os.environ["MRP_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "matrix-refresh-proxy"


class Proxy:
    """The real proxy binary, configured through a YAML file like an operator would."""

    def __init__(self, synapse: Synapse, redis: Redis, workdir: Path, name: str = "proxy",
                 access_token_lifetime: str = f"{AT_LIFETIME:g}s",
                 refresh_token_lifetime: str | None = RT_LIFETIME,
                 session_lifetime: str | None = None, upstream_key: bool = False):
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api = Api(self.base_url)
        # The operator session API (admin.token_file) on a known admin port.
        self.admin_port = free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.admin_token = secrets.token_urlsafe(32)
        self.admin_token_file = workdir / "admin-token"
        self.admin_token_file.write_text(self.admin_token + "\n")
        # admin.upstream_key_file (operator upstream logout): 32 random bytes, when asked for.
        key_line = ""
        if upstream_key:
            key_file = workdir / "upstream-key"
            key_file.write_bytes(secrets.token_bytes(32))
            key_line = f'  upstream_key_file: "{key_file}"\n'
        self.log = LogFile(name, workdir / "proxy.log")
        LOGS.append(self.log)
        self.proc: subprocess.Popen | None = None

        def dur(v):
            return "null" if v is None else f'"{v}"'

        self.config = workdir / "config.yaml"
        self.config.write_text(
            f"""listen: "127.0.0.1:{self.port}"
upstream:
  url: "{synapse.base_url}"
redis:
  url: "{redis.url}"
tokens:
  access_token_lifetime: {dur(access_token_lifetime)}
  refresh_token_lifetime: {dur(refresh_token_lifetime)}
  session_lifetime: {dur(session_lifetime)}
  revoke_session_on_reuse: true
admin:
  listen: "127.0.0.1:{self.admin_port}"
  token_file: "{self.admin_token_file}"
{key_line}# the suite logs in and refreshes from one address far more often than a real client does:
# raised like Synapse's limits above, but left on so every request still passes the limiters
rate_limit:
  login: {{per_second: 1000, burst: 10000}}
  refresh: {{per_second: 1000, burst: 10000}}
"""
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status_kb(self, field: str) -> int:
        """VmRSS / VmHWM etc. of the proxy process, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def start(self) -> "Proxy":
        binary = proxy_binary()
        if not binary.exists():
            pytest.fail(f"proxy binary {binary} not found: cargo build --bin matrix-refresh-proxy")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MRP_")}
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        with open(self.log.path, "ab") as logf:
            self.proc = subprocess.Popen(
                [str(binary), "--config", str(self.config)],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"proxy exited with {self.proc.returncode} during startup:\n{_tail(self.log.path)}")
            try:
                if requests.get(f"{self.base_url}/_matrix/client/versions", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"proxy did not forward /versions within 30s:\n{_tail(self.log.path)}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def proxy(synapse: Synapse, redis_server: Redis, tmp_path_factory) -> Proxy:
    """The suite's main proxy: AT_LIFETIME access tokens, RT_LIFETIME refresh tokens."""
    p = Proxy(synapse, redis_server, tmp_path_factory.mktemp("proxy")).start()
    try:
        yield p
    finally:
        p.stop()


# --------------------------------------------------------------------------------------------
# logs on failure


@pytest.fixture
def child_logs() -> list[LogFile]:
    """The logs of every child process started so far (Synapse, redis, proxies)."""
    return list(LOGS)


@pytest.fixture(autouse=True)
def _mark_logs():
    for log in LOGS:
        log.set_mark()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for log in LOGS:
            report.sections.append((f"{log.name} log during this test", log.since_mark()))
