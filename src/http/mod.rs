//! The client-facing side: listener, router and the proxy's own answers.

pub mod error;
mod forward;
mod login;
mod refresh;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::{HttpConfig, TrustedProxies};
use crate::proxy::Upstream;
use crate::proxy::client_ip::client_ip;
use crate::ratelimit::RateLimits;
use crate::session::Sessions;
use crate::store::RedisStore;
pub use error::ApiError;
use routes::Route;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response and forwarded request: streamed or in memory.
pub type Body = BoxBody<Bytes, BoxError>;

/// An in-memory body.
pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Wraps a client request body for forwarding (streamed, never buffered).
pub fn stream(b: Incoming) -> Body {
    b.map_err(Into::into).boxed()
}

/// CORS headers on the proxy's own answers (spec "Web Browser Clients").
pub fn cors(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"),
    );
}

/// A JSON answer made by the proxy.
pub fn json_response(status: http::StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(full(v.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    cors(res.headers_mut());
    res
}

/// Everything a request handler needs.
pub struct App {
    pub sessions: Sessions<RedisStore>,
    pub upstream: Upstream,
    pub http: HttpConfig,
    pub limits: Arc<RateLimits<RedisStore>>,
    pub trusted_proxies: TrustedProxies,
}

/// The rate limits checked before routing (issue 4): `all` on every request, `login` on
/// `POST /login` and `POST /register`, and the per-IP half of `refresh` on `POST /refresh` (the
/// per-session half needs the body: `refresh.rs` checks it before the store is asked). Other
/// methods (preflights, flow discovery) cannot guess passwords or rotate tokens: only `all`
/// applies to them.
async fn rate_limit(
    app: &App,
    route: &Route,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    if !app.limits.is_active() {
        return Ok(());
    }
    let client = client_ip(peer.ip(), req.headers(), &app.trusted_proxies);
    let post = req.method() == Method::POST;
    let (limiter, result) = match app.limits.check_all(client).await {
        Err(l) => ("all", Err(l)),
        Ok(()) => match route {
            Route::Login | Route::Register if post => {
                ("login", app.limits.check_login(client).await)
            }
            Route::Refresh if post => ("refresh_ip", app.limits.check_refresh_ip(client).await),
            _ => ("all", Ok(())),
        },
    };
    result.map_err(|l| {
        tracing::debug!(%client, limiter, retry_after_ms = l.retry_after_ms(), "rate limited");
        ApiError::from(l)
    })
}

/// Routes one request and logs one line for it (method, route class, status, latency: never
/// the path's query or any header).
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let route = routes::classify(req.method(), req.uri().path());
    let route_name = route.name();
    let result = match rate_limit(&app, &route, &req, peer).await {
        Err(limited) => Err(limited),
        Ok(()) => match route {
            Route::Refresh => refresh::handle(&app, req).await,
            Route::Login | Route::Register => login::handle(&app, req, route, peer).await,
            other => forward::handle(&app, req, other, peer).await,
        },
    };
    let res = result.unwrap_or_else(ApiError::into_response);
    tracing::info!(
        %method,
        route = route_name,
        status = res.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    res
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains open connections for at
/// most `drain` (in-flight requests, long polls included, complete).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper's header-read timeout is silently off.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.http.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(app, req, peer).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining connections");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed; closing remaining connections");
    }
}
