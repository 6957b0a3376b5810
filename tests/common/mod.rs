//! Black-box harness: a private redis-server, a fake homeserver and the real proxy binary.
#![allow(dead_code)]

pub mod fake_hs;
pub mod ha;
pub mod redis;
pub mod skew;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

pub use fake_hs::FakeHs;
pub use redis::RedisServer;

/// The proxy binary under test, with its stderr captured for log assertions.
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/health/*`), unless disabled.
    pub admin: Option<SocketAddr>,
    logs: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// Token settings for a test proxy.
#[derive(Clone)]
pub struct ProxyOptions {
    pub access: &'static str,
    pub refresh: &'static str,
    pub session: &'static str,
    pub revoke_on_reuse: bool,
    pub extra: String,
    pub response_timeout: &'static str,
    /// `admin.listen` as YAML (`null` disables the admin listener).
    pub admin: &'static str,
    /// `log.format`: `pretty` or `json`.
    pub log_format: &'static str,
    /// Extra environment variables for the proxy process.
    pub env: Vec<(&'static str, String)>,
    /// More `upstream:` keys, as YAML lines indented by two spaces (`  ca_file: …\n`).
    pub upstream_extra: String,
    /// More `redis:` keys, as YAML lines indented by two spaces.
    pub redis_extra: String,
    /// Give the proxy a test clock file (`MRP_TEST_CLOCK_FILE`), so that the test can move its
    /// expiry clock with [`ProxyProcess::advance_clock`] instead of sleeping.
    pub test_clock: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            access: "1h",
            refresh: "\"7d\"",
            session: "null",
            revoke_on_reuse: true,
            extra: String::new(),
            response_timeout: "30s",
            admin: "\"127.0.0.1:0\"",
            log_format: "pretty",
            env: Vec::new(),
            upstream_extra: String::new(),
            redis_extra: String::new(),
            test_clock: false,
        }
    }
}

impl ProxyProcess {
    pub fn start(upstream: &str, redis_url: &str, o: &ProxyOptions) -> Self {
        Self::start_on(upstream, &format!("  url: \"{redis_url}\"\n"), o)
    }

    /// Like `start`, with the `redis:` section's location keys given as YAML lines indented
    /// by two spaces (`  url: …`, or `  sentinel: {…}` / `  cluster: {…}`).
    pub fn start_on(upstream: &str, redis_location: &str, o: &ProxyOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{upstream}\"\n  connect_timeout: \"2s\"\n  response_timeout: \"{}\"\n{}redis:\n{redis_location}  connect_timeout: \"500ms\"\n  response_timeout: \"1s\"\n{}tokens:\n  access_token_lifetime: \"{}\"\n  refresh_token_lifetime: {}\n  session_lifetime: {}\n  revoke_session_on_reuse: {}\nlog:\n  level: \"debug\"\n  format: \"{}\"\nadmin:\n  listen: {}\n{}",
            o.response_timeout,
            o.upstream_extra,
            o.redis_extra,
            o.access,
            o.refresh,
            o.session,
            o.revoke_on_reuse,
            o.log_format,
            o.admin,
            o.extra
        );
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, cfg).unwrap();
        let clock = dir.path().join("clock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-refresh-proxy"));
        cmd.env_remove("MRP_TEST_CLOCK_FILE");
        if o.test_clock {
            std::fs::write(&clock, "0").unwrap();
            cmd.env("MRP_TEST_CLOCK_FILE", &clock);
        }
        let mut child = cmd
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("MRP_LISTEN")
            .env_remove("MRP_UPSTREAM_URL")
            .env_remove("MRP_REDIS_URL")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(o.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // The admin line is logged first; pretty and JSON logs alike.
                if let Some(addr) = addr_after(&line, "admin listening on ") {
                    let _ = tx.send((true, addr));
                } else if let Some(addr) = addr_after(&line, "listening on ") {
                    let _ = tx.send((false, addr));
                }
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut admin = None;
        let addr = loop {
            let (is_admin, addr) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("proxy did not start; logs:\n{}", logs.lock().unwrap()));
            let addr: SocketAddr = addr.parse().unwrap();
            if !is_admin {
                break addr;
            }
            admin = Some(addr);
        };
        ProxyProcess {
            child,
            addr,
            admin,
            logs,
            _dir: dir,
        }
    }

    /// Moves the proxy's expiry clock (an offset to Redis `TIME`) forward by `d`: the proxy
    /// decides every expiry as if `d` more had passed. Needs `ProxyOptions::test_clock`.
    pub fn advance_clock(&self, d: Duration) {
        let path = self._dir.path().join("clock");
        let cur: i64 = std::fs::read_to_string(&path)
            .expect("started with test_clock")
            .trim()
            .parse()
            .unwrap();
        // Replaced whole, so the proxy never reads a partial number.
        let tmp = self._dir.path().join("clock.tmp");
        std::fs::write(&tmp, (cur + d.as_millis() as i64).to_string()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// The configuration file the process was started with (rewrite it, then `signal("HUP")`).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("config.yaml")
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for the process to exit; its exit code, or `None` if it still runs after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The admin listener's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin.expect("admin listener enabled"))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The client listener's URL when it serves TLS (`tls:` in `extra`).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The proxy's stderr so far. Lines are written in batches about 20 ms after the first of
    /// a batch (src/telemetry/mod.rs, FLUSH_EVERY): wait that out before reading, so a line
    /// logged by a request that just returned is there.
    pub fn logs(&self) -> String {
        std::thread::sleep(std::time::Duration::from_millis(80));
        self.logs_now()
    }

    /// The proxy's stderr as read so far, without waiting for a pending batch.
    pub fn logs_now(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The socket address following `marker` in a log line (pretty or JSON).
fn addr_after(line: &str, marker: &str) -> Option<String> {
    let rest = line.split(marker).nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    (!addr.is_empty()).then_some(addr)
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type TestBody = BoxBody<Bytes, std::io::Error>;

/// A response as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn errcode(&self) -> String {
        self.json()["errcode"].as_str().unwrap_or("").to_owned()
    }
}

pub fn body(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Everything a black-box test needs.
pub struct Harness {
    pub redis: RedisServer,
    pub hs: FakeHs,
    pub proxy: ProxyProcess,
    pub client: Client<HttpConnector, TestBody>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(ProxyOptions::default(), false).await
    }

    /// A harness whose access tokens live `access` (a humantime duration).
    pub async fn with_access(access: &'static str) -> Self {
        Self::with(
            ProxyOptions {
                access,
                ..Default::default()
            },
            false,
        )
        .await
    }

    /// A harness whose access tokens live `access`, with a test clock
    /// ([`ProxyProcess::advance_clock`]).
    pub async fn with_access_and_clock(access: &'static str) -> Self {
        Self::with(
            ProxyOptions {
                access,
                test_clock: true,
                ..Default::default()
            },
            false,
        )
        .await
    }

    /// Moves the proxy's expiry clock forward (see [`ProxyProcess::advance_clock`]).
    pub fn advance_clock(&self, d: Duration) {
        self.proxy.advance_clock(d);
    }

    pub async fn with(o: ProxyOptions, persistent_redis: bool) -> Self {
        let redis = if persistent_redis {
            RedisServer::start_persistent()
        } else {
            RedisServer::start()
        };
        let hs = FakeHs::start().await;
        let proxy = ProxyProcess::start(&hs.url(), &redis.url(), &o);
        Harness {
            redis,
            hs,
            proxy,
            client: client(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        b: TestBody,
    ) -> Reply {
        send_to(&self.client, &self.proxy.url(), method, path, headers, b).await
    }

    /// Another proxy (a replica) on this harness' Redis and homeserver.
    pub fn replica(&self, o: &ProxyOptions) -> ProxyProcess {
        ProxyProcess::start(&self.hs.url(), &self.redis.url(), o)
    }

    /// Requests through another proxy (a [`Harness::replica`]).
    pub fn via<'a>(&'a self, proxy: &'a ProxyProcess) -> Via<'a> {
        Via { h: self, proxy }
    }

    pub async fn post(&self, path: &str, token: Option<&str>, v: Value) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut h = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            h.push(("authorization", a.as_str()));
        }
        self.send(Method::POST, path, &h, body(v.to_string())).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut h = vec![];
        if let Some(a) = &auth {
            h.push(("authorization", a.as_str()));
        }
        self.send(Method::GET, path, &h, body(Bytes::new())).await
    }

    /// Logs in `user` asking for a refresh token; returns the response JSON (asserting 200).
    pub async fn login(&self, user: &str) -> Value {
        self.login_with(user, json!({})).await
    }

    pub async fn login_with(&self, user: &str, extra: Value) -> Value {
        let r = self
            .post("/_matrix/client/v3/login", None, login_body(user, extra))
            .await;
        assert_eq!(r.status, 200, "login failed: {:?}", r.json());
        r.json()
    }

    /// Logs `user` in without asking for a refresh token: the homeserver's own token comes back
    /// untouched (bots, old clients). Returns the response JSON (asserting 200).
    pub async fn login_plain(&self, user: &str) -> Value {
        let r = self
            .post(
                "/_matrix/client/v3/login",
                None,
                json!({"type": "m.login.password", "user": user}),
            )
            .await;
        assert_eq!(r.status, 200, "login failed: {:?}", r.json());
        r.json()
    }

    pub async fn refresh(&self, rt: &str) -> Reply {
        self.post(
            "/_matrix/client/v3/refresh",
            None,
            json!({"refresh_token": rt}),
        )
        .await
    }

    pub async fn whoami(&self, at: &str) -> Reply {
        self.get("/_matrix/client/v3/account/whoami", Some(at))
            .await
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        get_url(&self.client, &format!("{}{path}", self.proxy.admin_url())).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.admin_get("/metrics").await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.body.to_vec()).unwrap()
    }
}

/// A password login asking for a refresh token, with `extra` fields.
fn login_body(user: &str, extra: Value) -> Value {
    let mut req = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": "secret",
        "refresh_token": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    req
}

async fn send_to(
    client: &Client<HttpConnector, TestBody>,
    base: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    b: TestBody,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(b).unwrap())
        .await
        .expect("proxy answered");
    let (parts, b) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: b.collect().await.map(|c| c.to_bytes()).unwrap_or_default(),
    }
}

/// Requests through one replica of a harness (see [`Harness::via`]).
pub struct Via<'a> {
    h: &'a Harness,
    pub proxy: &'a ProxyProcess,
}

impl Via<'_> {
    pub async fn post(&self, path: &str, token: Option<&str>, v: Value) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut h = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            h.push(("authorization", a.as_str()));
        }
        send_to(
            &self.h.client,
            &self.proxy.url(),
            Method::POST,
            path,
            &h,
            body(v.to_string()),
        )
        .await
    }

    pub async fn login(&self, user: &str) -> Value {
        let r = self
            .post(
                "/_matrix/client/v3/login",
                None,
                login_body(user, json!({})),
            )
            .await;
        assert_eq!(r.status, 200, "login failed: {:?}", r.json());
        r.json()
    }

    pub async fn refresh(&self, rt: &str) -> Reply {
        self.post(
            "/_matrix/client/v3/refresh",
            None,
            json!({"refresh_token": rt}),
        )
        .await
    }

    pub async fn whoami(&self, at: &str) -> Reply {
        let auth = format!("Bearer {at}");
        send_to(
            &self.h.client,
            &self.proxy.url(),
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &[("authorization", auth.as_str())],
            body(Bytes::new()),
        )
        .await
    }
}

/// A plain `GET` of `url`.
pub async fn get_url(client: &Client<HttpConnector, TestBody>, url: &str) -> Reply {
    let req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(body(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.expect("server answered");
    let (parts, b) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: b.collect().await.map(|c| c.to_bytes()).unwrap_or_default(),
    }
}

impl Drop for Harness {
    /// Whatever a test did, the homeserver must never have seen a proxy token or a refresh flag.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for r in self.hs.requests() {
            let mut seen = format!("{:?} {}", r.query, String::from_utf8_lossy(&r.body));
            for (_, v) in r.headers.iter() {
                seen.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            assert!(
                !seen.contains("mrpat_") && !seen.contains("mrprt_"),
                "the homeserver saw a proxy token on {} {}",
                r.method,
                r.path
            );
            if r.path.ends_with("/login") || r.path.ends_with("/register") {
                let b = r.json();
                assert!(
                    b.get("refresh_token").is_none()
                        && b.get("org.matrix.msc2918.refresh_token").is_none(),
                    "the homeserver saw a refresh flag on {}",
                    r.path
                );
            }
        }
    }
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Asserts an `M_UNKNOWN_TOKEN` 401 with the given `soft_logout`.
#[track_caller]
pub fn assert_unknown_token(r: &Reply, soft: bool) {
    assert_eq!(r.status, 401, "{:?}", r.json());
    let v = r.json();
    assert_eq!(v["errcode"], "M_UNKNOWN_TOKEN", "{v}");
    assert_eq!(v["soft_logout"], soft, "{v}");
}

pub fn at(v: &Value) -> String {
    v["access_token"].as_str().expect("access_token").to_owned()
}

pub fn rt(v: &Value) -> String {
    v["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned()
}
