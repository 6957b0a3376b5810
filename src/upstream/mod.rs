//! The upstream side: a pooled hyper client to the homeserver, header hygiene and credential
//! rewriting.

pub mod connector;
pub mod credentials;
pub mod headers;
pub mod pool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::BodyExt;

use pool::{Pool, SendError};

use crate::body::{Body, full, read_limited};
use crate::config::UpstreamConfig;
use crate::telemetry::metrics::{Metrics, UpstreamCall, UpstreamFailure};
use crate::telemetry::request_id;
use crate::tls::TlsError;
pub use headers::{ClientConn, ClientScheme};

/// Bodies of the homeserver's answers to the proxy's own calls are small (read to reuse the
/// connection, or for `whoami`).
const OWN_CALL_BODY: usize = 64 * 1024;

/// Why the homeserver could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("homeserver unreachable: {0}")]
    Unreachable(String),
    #[error("homeserver timed out")]
    Timeout,
    /// Every homeserver connection allowed (`upstream.max_connections`) stayed busy.
    #[error("homeserver connections all busy")]
    Saturated,
}

/// A homeserver answer: its head, and a body that holds the connection until it ends.
pub type UpstreamResponse = Response<pool::PooledBody>;

/// The homeserver, through a pool of keep-alive connections ([`pool`]).
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
    /// `Host` for the proxy's own calls (the homeserver's authority), made once.
    host: HeaderValue,
    /// Path prefix without trailing `/` ("" for none).
    base_path: String,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// Fails when the trust roots of an `https://` upstream cannot be loaded.
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let connector = connector::connector(cfg)?;
        let parts = cfg.url.clone().into_parts();
        let scheme = parts.scheme.unwrap_or(http::uri::Scheme::HTTP);
        let authority = parts.authority.expect("validated in config");
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority from a valid URL");
        let host =
            HeaderValue::from_str(authority.as_str()).expect("an authority is a header value");
        Ok(Upstream {
            pool: Pool::new(
                connector,
                origin,
                pool::Limits {
                    max_connections: cfg.max_connections,
                    wait: cfg.connect_timeout,
                    open: metrics.upstream_connections.clone(),
                },
            ),
            host,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            response_timeout: cfg.response_timeout,
            metrics,
        })
    }

    /// The upstream URI for a client path and query, in origin form (`/path?query`: what an
    /// HTTP/1.1 request line to the homeserver carries).
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let pq = match query {
            Some(q) if !q.is_empty() => format!("{}{path}?{q}", self.base_path),
            _ => format!("{}{path}", self.base_path),
        };
        Uri::builder().path_and_query(pq).build()
    }

    /// Sends a request (already rewritten, its URI in origin form: [`Upstream::uri`]) and waits
    /// for the response headers; `Host` is the homeserver's when the request has none. `call`
    /// says what for, in metrics.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        call: UpstreamCall,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| self.host.clone());
        // The pool's future is boxed (one allocation): inline, its ~800 bytes were in this
        // future and in each one awaiting it up to the request's, and copied at every level as
        // each was created (issue 11).
        let sent = Box::pin(self.pool.send(req));
        let result = match tokio::time::timeout(self.response_timeout, sent).await {
            Err(_) => Err(UpstreamError::Timeout),
            // A connect timeout (TCP or TLS) is a timeout, answered 504 like a slow answer.
            Ok(Err(SendError::Connect(e))) if caused_by_timeout(&*e) => Err(UpstreamError::Timeout),
            Ok(Err(SendError::Connect(e))) => Err(UpstreamError::Unreachable(format!(
                "connecting: {}",
                error_chain(&*e)
            ))),
            Ok(Err(SendError::Request(e))) => Err(UpstreamError::Unreachable(error_chain(&e))),
            Ok(Err(SendError::Saturated)) => Err(UpstreamError::Saturated),
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
            Err(UpstreamError::Saturated) => self
                .metrics
                .upstream_failure(call, UpstreamFailure::Saturated),
        }
        result
    }

    /// Forwards a client request: hygiene applied for `conn`, its path as sent, and `query` as
    /// given (the client's, or rewritten without a proxy token).
    pub async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        query: Option<&str>,
        conn: &ClientConn,
        call: UpstreamCall,
    ) -> Result<UpstreamResponse, UpstreamError> {
        // HTTP/2 clients name the host in the `:authority` pseudo-header, not in `Host`.
        if !parts.headers.contains_key(http::header::HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = http::HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(http::header::HOST, v);
        }
        headers::prepare_request(&mut parts.headers, conn);
        // Without a base path and with the query untouched, the client's own path and query are
        // reused as they are (no formatting, no second parse), in origin form.
        let unchanged = self.base_path.is_empty()
            && parts.uri.query().filter(|q| !q.is_empty()) == query.filter(|q| !q.is_empty());
        parts.uri = match parts.uri.path_and_query() {
            Some(pq) if unchanged => Uri::from(pq.clone()),
            _ => self
                .uri(parts.uri.path(), query)
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))?,
        };
        // The upstream connection is HTTP/1.1 whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        self.send(Request::from_parts(parts, body), call).await
    }

    /// A call of the proxy's own: `method` on `path` with a JSON `body` (or none, when empty),
    /// no credential or `token` as Bearer (`Ok(None)` when it cannot be a header value), and the
    /// client request's id, so the homeserver's logs tie the two together.
    async fn own_call(
        &self,
        (method, path, query, body): (Method, &str, Option<&str>, &'static [u8]),
        token: Option<&str>,
        request_id: Option<&HeaderValue>,
        call: UpstreamCall,
    ) -> Result<Option<UpstreamResponse>, UpstreamError> {
        let unreachable = |e: http::Error| UpstreamError::Unreachable(e.to_string());
        let mut req = Request::builder()
            .method(method)
            .uri(self.uri(path, query).map_err(unreachable)?);
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let mut req = req
            .body(full(Bytes::from_static(body)))
            .map_err(unreachable)?;
        if let Some(token) = token
            && !credentials::set_bearer(req.headers_mut(), token)
        {
            return Ok(None);
        }
        if let Some(id) = request_id {
            req.headers_mut().insert(request_id::HEADER, id.clone());
        }
        self.send(req, call).await.map(Some)
    }

    /// Every homeserver connection allowed (`upstream.max_connections`) is busy: a request now
    /// would wait for one (readiness reports it at once instead).
    pub fn saturated(&self) -> bool {
        self.pool.saturated()
    }

    /// `GET /account/whoami` with `token`: who owns a token the proxy did not issue. `query`:
    /// the client request's, whose identity assertion (an application service's `user_id`) is
    /// passed on, so the answer names the user the homeserver acted for.
    pub async fn whoami(
        &self,
        token: &str,
        query: Option<&str>,
        request_id: Option<&HeaderValue>,
    ) -> Result<Option<(String, Option<String>)>, UpstreamError> {
        let assertion = credentials::identity_assertion(query);
        let whoami = (
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            assertion,
            &b""[..],
        );
        let Some(res) = self
            .own_call(whoami, Some(token), request_id, UpstreamCall::Whoami)
            .await?
        else {
            return Ok(None);
        };
        if res.status() != http::StatusCode::OK {
            return Ok(None);
        }
        let body = read_limited(res.into_body(), OWN_CALL_BODY)
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
        let status = self
            .logout_as(token, request_id, UpstreamCall::OrphanLogout)
            .await?;
        Ok(status.is_some_and(|s| s.is_success()))
    }

    /// `POST /_matrix/client/v3/logout` with `token`, counted under `call`. The homeserver's
    /// status, or `None` when the token cannot be put in a header (nothing sent).
    pub async fn logout_as(
        &self,
        token: &str,
        request_id: Option<&HeaderValue>,
        call: UpstreamCall,
    ) -> Result<Option<http::StatusCode>, UpstreamError> {
        let logout = (Method::POST, "/_matrix/client/v3/logout", None, &b"{}"[..]);
        let Some(res) = self.own_call(logout, Some(token), request_id, call).await? else {
            return Ok(None);
        };
        let status = res.status();
        let _ = read_limited(res.into_body(), OWN_CALL_BODY).await;
        Ok(Some(status))
    }

    /// `GET /_matrix/client/versions` (no credential): the readiness check. Returns the status;
    /// the body is read (bounded) so the connection goes back to the pool.
    pub async fn versions(&self) -> Result<http::StatusCode, UpstreamError> {
        let versions = (Method::GET, "/_matrix/client/versions", None, &b""[..]);
        let call = UpstreamCall::Readiness;
        // Without a token there is no header that could be refused.
        let Some(res) = self.own_call(versions, None, None, call).await? else {
            return Err(UpstreamError::Unreachable("no request".into()));
        };
        let status = res.status();
        let _ = read_limited(res.into_body(), OWN_CALL_BODY).await;
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
pub fn relay(res: UpstreamResponse) -> Response<Body> {
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
