//! The upstream side: a pooled hyper client to the homeserver, header hygiene and credential
//! rewriting.

pub mod client_ip;
pub mod credentials;
pub mod headers;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::http::{Body, BoxError, full};

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
    client: Client<HttpConnector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Path prefix without trailing `/` ("" for none).
    base_path: String,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the idle timeout below does nothing (hyper-util docs).
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        let parts = cfg.url.clone().into_parts();
        Upstream {
            client,
            scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
            authority: parts.authority.expect("validated in config"),
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            response_timeout: cfg.response_timeout,
        }
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

    /// Sends a request (already rewritten) and waits for the response headers.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Err(e)) => {
                // A connect timeout surfaces as a connect error whose source is a timeout.
                let text = error_chain(&e);
                if e.is_connect() && text.contains("timed out") {
                    Err(UpstreamError::Timeout)
                } else {
                    Err(UpstreamError::Unreachable(text))
                }
            }
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Forwards a client request: hygiene applied, `path_and_query` as given (already rewritten).
    pub async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        path: &str,
        query: Option<&str>,
        peer: IpAddr,
    ) -> Result<Response<Incoming>, UpstreamError> {
        headers::prepare_request(&mut parts.headers, peer, "http");
        parts.uri = self
            .uri(path, query)
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        // The upstream connection is HTTP/1.1 whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        self.send(Request::from_parts(parts, body)).await
    }

    /// `GET /account/whoami` with `token`: who owns a token the proxy did not issue.
    pub async fn whoami(
        &self,
        token: &str,
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
        let res = self.send(req).await?;
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

/// Reads a body up to `limit` bytes: `Ok(None)` when it is longer.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Option<Bytes>, BoxError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(Some(c.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Turns an upstream response into a client response: streamed body, hop-by-hop headers gone.
pub fn relay(res: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

/// A JSON response with the given parts (headers kept, length recomputed).
pub fn with_json_body(mut parts: http::response::Parts, body: Vec<u8>) -> Response<Body> {
    headers::remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, full(body))
}
