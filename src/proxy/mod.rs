//! The upstream side: a pooled hyper client to the homeserver, header hygiene and credential
//! rewriting.

pub mod client_ip;
pub mod connector;
pub mod credentials;
pub mod headers;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{Body, full, read_limited};
use crate::config::UpstreamConfig;
use crate::metrics::{Metrics, UpstreamCall, UpstreamFailure};
use crate::tls::TlsError;

/// Why the homeserver could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("homeserver unreachable: {0}")]
    Unreachable(String),
    #[error("homeserver timed out")]
    Timeout,
}

/// The homeserver, through a pooled keep-alive client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<connector::UpstreamConnector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Path prefix without trailing `/` ("" for none).
    base_path: String,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// Fails when the trust roots of an `https://` upstream cannot be loaded.
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let connector = connector::connector(cfg)?;
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the idle timeout below does nothing (hyper-util docs).
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        let parts = cfg.url.clone().into_parts();
        Ok(Upstream {
            client,
            scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
            authority: parts.authority.expect("validated in config"),
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            response_timeout: cfg.response_timeout,
            metrics,
        })
    }

    /// The upstream URI for a client path and query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let pq = match query {
            Some(q) if !q.is_empty() => format!("{}{path}?{q}", self.base_path),
            _ => format!("{}{path}", self.base_path),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Sends a request (already rewritten) and waits for the response headers. `call` says what
    /// for, in metrics.
    pub async fn send(
        &self,
        req: Request<Body>,
        call: UpstreamCall,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
                Err(_) => Err(UpstreamError::Timeout),
                Ok(Err(e)) => {
                    // A connect timeout surfaces as a connect error caused by a timeout.
                    if e.is_connect() && caused_by_timeout(&e) {
                        Err(UpstreamError::Timeout)
                    } else {
                        Err(UpstreamError::Unreachable(error_chain(&e)))
                    }
                }
                Ok(Ok(r)) => Ok(r),
            };
        match &result {
            Ok(_) => self.metrics.upstream_response(call, started.elapsed()),
            Err(UpstreamError::Timeout) => self
                .metrics
                .upstream_failure(call, UpstreamFailure::Timeout),
            Err(UpstreamError::Unreachable(_)) => self
                .metrics
                .upstream_failure(call, UpstreamFailure::Unreachable),
        }
        result
    }

    /// Forwards a client request: hygiene applied, `path_and_query` as given (already rewritten).
    pub async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        path: &str,
        query: Option<&str>,
        peer: IpAddr,
        call: UpstreamCall,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // Set by the listener on every client request (`http::serve`).
        let proto = match parts.extensions.get::<crate::http::ClientScheme>() {
            Some(crate::http::ClientScheme::Https) => "https",
            Some(crate::http::ClientScheme::Http) | None => "http",
        };
        let trusted = parts
            .extensions
            .get::<crate::http::TrustedPeer>()
            .is_some_and(|t| t.0);
        // HTTP/2 clients name the host in the `:authority` pseudo-header, not in `Host`.
        if !parts.headers.contains_key(http::header::HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = http::HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(http::header::HOST, v);
        }
        headers::prepare_request(&mut parts.headers, peer, proto, trusted);
        // Without a base path and with the query untouched, the client's own path and query are
        // reused as they are (no formatting, no second parse).
        let unchanged = self.base_path.is_empty()
            && parts.uri.path() == path
            && parts.uri.query().filter(|q| !q.is_empty()) == query.filter(|q| !q.is_empty());
        parts.uri = match parts.uri.path_and_query() {
            Some(pq) if unchanged => {
                let mut up = http::uri::Parts::default();
                up.scheme = Some(self.scheme.clone());
                up.authority = Some(self.authority.clone());
                up.path_and_query = Some(pq.clone());
                Uri::from_parts(up).map_err(|e| UpstreamError::Unreachable(e.to_string()))?
            }
            _ => self
                .uri(path, query)
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))?,
        };
        // The upstream connection is HTTP/1.1 whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        self.send(Request::from_parts(parts, body), call).await
    }

    /// `GET /account/whoami` with `token`: who owns a token the proxy did not issue. The client
    /// request's id goes with it, so the homeserver's logs tie the two together.
    pub async fn whoami(
        &self,
        token: &str,
        request_id: Option<&HeaderValue>,
    ) -> Result<Option<(String, Option<String>)>, UpstreamError> {
        let uri = self
            .uri("/_matrix/client/v3/account/whoami", None)
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(full(Bytes::new()))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        if !credentials::set_bearer(req.headers_mut(), token) {
            return Ok(None);
        }
        if let Some(id) = request_id {
            req.headers_mut()
                .insert(crate::http::request_id::HEADER, id.clone());
        }
        let res = self.send(req, UpstreamCall::Whoami).await?;
        if res.status() != http::StatusCode::OK {
            return Ok(None);
        }
        let body = read_limited(res.into_body(), 64 * 1024)
            .await
            .ok()
            .flatten();
        let v: Option<serde_json::Value> = body.and_then(|b| serde_json::from_slice(&b).ok());
        Ok(v.and_then(|v| {
            let user = v.get("user_id")?.as_str()?.to_owned();
            let device = v
                .get("device_id")
                .and_then(|d| d.as_str())
                .map(str::to_owned);
            Some((user, device))
        }))
    }

    /// `POST /logout` with `token`: ends a device the homeserver just logged in whose session
    /// the proxy could not store, so it is not left behind with a token nobody holds. Returns
    /// whether the homeserver answered 2xx; the body is read (bounded) so the connection is reused.
    pub async fn logout(
        &self,
        token: &str,
        request_id: Option<&HeaderValue>,
    ) -> Result<bool, UpstreamError> {
        let uri = self
            .uri("/_matrix/client/v3/logout", None)
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(full(Bytes::from_static(b"{}")))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        if !credentials::set_bearer(req.headers_mut(), token) {
            return Ok(false);
        }
        if let Some(id) = request_id {
            req.headers_mut()
                .insert(crate::http::request_id::HEADER, id.clone());
        }
        let res = self.send(req, UpstreamCall::OrphanLogout).await?;
        let ok = res.status().is_success();
        let _ = read_limited(res.into_body(), 64 * 1024).await;
        Ok(ok)
    }

    /// `GET /_matrix/client/versions` (no credential): the readiness check. Returns the status;
    /// the body is read (bounded) so the connection goes back to the pool.
    pub async fn versions(&self) -> Result<http::StatusCode, UpstreamError> {
        let uri = self
            .uri("/_matrix/client/versions", None)
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(full(Bytes::new()))
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let res = self.send(req, UpstreamCall::Readiness).await?;
        let status = res.status();
        let _ = read_limited(res.into_body(), 64 * 1024).await;
        Ok(status)
    }
}

fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<tokio::time::error::Elapsed>()
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Turns an upstream response into a client response: streamed body, hop-by-hop headers gone.
pub fn relay(res: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

/// An upstream response around a body the proxy read: hop-by-hop headers gone, length
/// recomputed.
pub fn rebuilt(mut parts: http::response::Parts, body: Bytes) -> Response<Body> {
    headers::remove_hop_by_hop(&mut parts.headers);
    headers::set_content_length(&mut parts.headers, body.len());
    Response::from_parts(parts, full(body))
}

/// [`rebuilt`] around a JSON body the proxy wrote or kept.
pub fn with_json_body(parts: http::response::Parts, body: Bytes) -> Response<Body> {
    let mut res = rebuilt(parts, body);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
