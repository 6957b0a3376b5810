//! A small fake homeserver on 127.0.0.1:0: it records what it receives, knows which of its own
//! tokens are live, and can be scripted to answer a path differently (fault injection).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One request as the homeserver saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The body when it is at most 1 MiB (larger bodies are only counted and hashed).
    pub body: Bytes,
    pub body_len: usize,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn bearer(&self) -> Option<String> {
        self.headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
    }
}

/// A scripted answer for requests whose path ends with `path_suffix`.
#[derive(Clone)]
pub struct Override {
    pub method: Option<Method>,
    pub path_suffix: String,
    pub status: u16,
    pub body: Value,
    pub delay: Option<Duration>,
    /// How many requests it answers; `None` = all.
    pub times: Option<usize>,
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    /// token → (user_id, device_id)
    tokens: HashMap<String, (String, String)>,
    next: u64,
    overrides: Vec<Override>,
}

pub struct FakeHs {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    /// Serving HTTPS (`start_tls`).
    tls: bool,
}

pub const SERVER: &str = "fake.test";

/// An application service's token: it acts as the user named by `?user_id=` (spec
/// "Application Service API", "Identity assertion"), else as its sender `@bridge`, with no
/// device.
pub const AS_TOKEN: &str = "as_token_fake";

impl FakeHs {
    pub async fn start() -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to bring a homeserver "back" where one was down).
    pub async fn start_at(addr: SocketAddr) -> Self {
        Self::start_with(addr, None).await
    }

    /// An HTTPS homeserver on 127.0.0.1:0 serving `config`'s certificate.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(acceptor)).await
    }

    async fn start_with(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let is_tls = tls.is_some();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(stream, st).await,
                        Some(acceptor) => {
                            // A client that does not trust us just goes away.
                            if let Ok(s) = acceptor.accept(stream).await {
                                serve_connection(s, st).await;
                            }
                        }
                    }
                });
            }
        });
        FakeHs {
            addr,
            state,
            task,
            tls: is_tls,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests whose path ends with `suffix`.
    pub fn requests_to(&self, suffix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with(suffix))
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    pub fn add_override(&self, o: Override) {
        self.state.lock().unwrap().overrides.push(o);
    }

    /// Answer `suffix` with `status`/`body` from now on.
    pub fn answer(&self, suffix: &str, status: u16, body: Value) {
        self.add_override(Override {
            method: None,
            path_suffix: suffix.to_owned(),
            status,
            body,
            delay: None,
            times: None,
        });
    }

    /// Revokes an upstream token behind the proxy's back (an admin deleting a device).
    pub fn revoke(&self, token: &str) {
        self.state.lock().unwrap().tokens.remove(token);
    }

    pub fn is_live(&self, token: &str) -> bool {
        self.state.lock().unwrap().tokens.contains_key(token)
    }

    /// Every upstream token the fake homeserver ever issued is of this form.
    pub fn is_upstream_token(t: &str) -> bool {
        t.starts_with("syt_fake_")
    }
}

impl Drop for FakeHs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection<I>(io: I, st: Arc<Mutex<State>>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(serve(st, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn json_response(status: u16, v: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn unknown_token() -> Response<Full<Bytes>> {
    json_response(
        401,
        json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."}),
    )
}

fn uia() -> Response<Full<Bytes>> {
    json_response(
        401,
        json!({"flows": [{"stages": ["m.login.password"]}], "params": {}, "session": "uia-session-1"}),
    )
}

async fn serve(st: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Stream the body: count and hash, keep at most 1 MiB.
    let mut body = body;
    let mut kept = Vec::new();
    let mut len = 0usize;
    let mut hasher = Sha256::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len();
            hasher.update(&data);
            if kept.len() + data.len() <= 1024 * 1024 {
                kept.extend_from_slice(&data);
            }
        }
    }
    let digest = hasher.finalize();
    let body = if len <= 1024 * 1024 {
        Bytes::from(kept)
    } else {
        Bytes::new()
    };
    let rec = Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body,
        body_len: len,
    };
    let token = rec.bearer().or_else(|| {
        rec.query.as_deref().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        })
    });

    let over = {
        let mut s = st.lock().unwrap();
        s.requests.push(rec.clone());
        let i = s.overrides.iter().position(|o| {
            rec.path.ends_with(&o.path_suffix) && o.method.as_ref().is_none_or(|m| *m == rec.method)
        });
        i.map(|i| {
            let o = s.overrides[i].clone();
            if let Some(n) = s.overrides[i].times.as_mut() {
                *n -= 1;
                if *n == 0 {
                    s.overrides.remove(i);
                }
            }
            o
        })
    };
    if let Some(o) = over {
        if let Some(d) = o.delay {
            tokio::time::sleep(d).await;
        }
        return json_response(o.status, o.body);
    }

    // Route strictly, as Synapse and Conduit do: no `//`, no trailing slash, no decoding
    // outside path parameters. Anything else reaches the generic handler below.
    let strict = !rec.path.contains("//")
        && !rec.path.contains("/../")
        && !rec.path.contains("/./")
        && !rec.path.ends_with('/')
        && (!rec.path.contains('%') || rec.path.contains("/devices/"));
    let path = if strict {
        rec.path.as_str()
    } else {
        "/unrouted"
    };
    let body = rec.json();
    if path.ends_with("/sync") {
        let timeout = rec
            .query
            .as_deref()
            .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "timeout"))
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(0);
        let known = token
            .as_ref()
            .is_none_or(|t| st.lock().unwrap().tokens.contains_key(t));
        if !known {
            return unknown_token();
        }
        tokio::time::sleep(Duration::from_millis(timeout)).await;
        return json_response(200, json!({"next_batch": "s1", "rooms": {}}));
    }
    let mut s = st.lock().unwrap();
    let who = token.as_ref().and_then(|t| {
        if t == AS_TOKEN {
            let asserted = rec.query.as_deref().and_then(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "user_id")
                    .map(|(_, v)| v.into_owned())
            });
            return Some((
                asserted.unwrap_or_else(|| format!("@bridge:{SERVER}")),
                String::new(),
            ));
        }
        s.tokens.get(t).cloned()
    });

    if path.ends_with("/login") && rec.method == Method::POST {
        let user = body["identifier"]["user"]
            .as_str()
            .or(body["user"].as_str())
            .unwrap_or("alice")
            .to_owned();
        if body["password"] == "wrong" {
            return json_response(
                403,
                json!({"errcode": "M_FORBIDDEN", "error": "Invalid password"}),
            );
        }
        return issue(&mut s, &user, body["device_id"].as_str(), true);
    }
    if path.ends_with("/register") && rec.method == Method::POST {
        let guest = rec
            .query
            .as_deref()
            .is_some_and(|q| q.contains("kind=guest"));
        if !guest && body.get("auth").is_none() && body["username"] == "needs_uia" {
            return uia();
        }
        let user = body["username"].as_str().unwrap_or("newbie").to_owned();
        if body["inhibit_login"] == true {
            return json_response(200, json!({"user_id": format!("@{user}:{SERVER}")}));
        }
        return issue(&mut s, &user, body["device_id"].as_str(), !guest);
    }
    if path.ends_with("/versions") {
        return json_response(200, json!({"versions": ["r0.6.1", "v1.1"]}));
    }
    if path.starts_with("/_matrix/media/") && path.contains("/upload") {
        return json_response(
            200,
            json!({"content_uri": "mxc://fake.test/x", "len": len, "sha256": hex(&digest)}),
        );
    }
    // Everything else needs a live token when one is given.
    let Some(t) = token else {
        return json_response(200, json!({"ok": true, "anonymous": true}));
    };
    let Some((user, device)) = who else {
        return unknown_token();
    };
    if path.ends_with("/account/whoami") {
        if device.is_empty() {
            return json_response(200, json!({"user_id": user}));
        }
        return json_response(200, json!({"user_id": user, "device_id": device}));
    }
    if path.ends_with("/logout") && rec.method == Method::POST {
        s.tokens.remove(&t);
        return json_response(200, json!({}));
    }
    if path.ends_with("/logout/all") && rec.method == Method::POST {
        s.tokens.retain(|_, (u, _)| *u != user);
        return json_response(200, json!({}));
    }
    if rec.method == Method::DELETE && path.contains("/devices/") {
        if body.get("auth").is_none() {
            return uia();
        }
        let id = percent_encoding::percent_decode_str(path.rsplit('/').next().unwrap_or(""))
            .decode_utf8_lossy()
            .into_owned();
        s.tokens.retain(|_, (u, d)| !(*u == user && *d == id));
        return json_response(200, json!({}));
    }
    if path.ends_with("/delete_devices") {
        if body.get("auth").is_none() {
            return uia();
        }
        let ids: Vec<String> = body["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        s.tokens
            .retain(|_, (u, d)| !(*u == user && ids.contains(d)));
        return json_response(200, json!({}));
    }
    if path.ends_with("/account/password") {
        if body.get("auth").is_none() {
            return uia();
        }
        if body["logout_devices"] != false {
            s.tokens.retain(|_, (u, d)| !(*u == user && *d != device));
        }
        return json_response(200, json!({}));
    }
    if path.ends_with("/account/deactivate") {
        if body.get("auth").is_none() {
            return uia();
        }
        s.tokens.retain(|_, (u, _)| *u != user);
        return json_response(200, json!({"id_server_unbind_result": "no-support"}));
    }
    json_response(
        200,
        json!({"ok": true, "user_id": user, "device_id": device, "path": path, "len": len}),
    )
}

fn issue(s: &mut State, user: &str, device: Option<&str>, _normal: bool) -> Response<Full<Bytes>> {
    s.next += 1;
    let device = device
        .map(str::to_owned)
        .unwrap_or_else(|| format!("DEV{}", s.next));
    let user_id = format!("@{user}:{SERVER}");
    let token = format!("syt_fake_{}_{}", s.next, user);
    s.tokens
        .insert(token.clone(), (user_id.clone(), device.clone()));
    json_response(
        200,
        json!({
            "user_id": user_id,
            "access_token": token,
            "device_id": device,
            "home_server": SERVER,
            "well_known": {"m.homeserver": {"base_url": "https://fake.test"}},
            "unknown_field": {"kept": true},
        }),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
