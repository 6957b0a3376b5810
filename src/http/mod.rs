//! The client-facing side: listener, router and the proxy's own answers.

mod conn;
pub mod error;
mod forward;
pub mod login;
mod refresh;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tracing::Instrument;

use crate::body::{self as body, Body, BoxError, ClientBody, full, read_limited};
use crate::config::{HttpConfig, TrustedProxies};
use crate::matrix::routes::{self, Route};
use crate::ratelimit::RateLimits;
use crate::ratelimit::client_ip::client_ip;
use crate::session::Sessions;
use crate::store::Store;
use crate::telemetry::metrics::{InFlight, Metrics};
use crate::telemetry::request_id::{self, RequestId};
use crate::upstream::{ClientConn, ClientScheme, Upstream};
pub use error::ApiError;

/// Largest request head (request line and headers) the proxy accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Unread request bodies up to this size are read and discarded before a self-made answer, so
/// the keep-alive connection stays usable; larger or slower ones get `Connection: close`.
const DRAIN_LIMIT: usize = 64 * 1024;
/// Time allowed for that drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads a JSON body the proxy handles itself: at most `http.max_json_body` bytes within
/// `http.body_read_timeout` in all.
pub async fn read_body(app: &App, body: ClientBody) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(
        app.http.body_read_timeout,
        read_limited(body, app.http.max_json_body),
    )
    .await
    {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(Some(b))) => Ok(b),
        Ok(Ok(None)) => Err(ApiError::TooLarge),
        Ok(Err(e)) if e.is::<body::BodyTimeout>() => Err(ApiError::BodyTimeout),
        Ok(Err(_)) => Err(ApiError::BadRequest("Could not read the request body")),
    }
}

/// Reads a homeserver answer the proxy rewrites or inspects, at most `limit` bytes; a longer or
/// broken one is a 502.
pub async fn read_upstream(
    res: Response<Incoming>,
    limit: usize,
) -> Result<(http::response::Parts, Bytes), ApiError> {
    let (parts, body) = res.into_parts();
    match read_limited(body, limit).await {
        Ok(Some(bytes)) => Ok((parts, bytes)),
        Ok(None) | Err(_) => Err(ApiError::UpstreamInvalid),
    }
}

/// Before an HTTP/1 answer goes out while the request body is unread: read and discard a small
/// rest, or say `Connection: close` (hyper closes such a connection, and a client that was not
/// told would send its next request into it).
async fn settle_body(state: &body::BodyState, res: &mut Response<Body>) {
    if state.done() || res.headers().contains_key(header::CONNECTION) {
        return;
    }
    if let Some(rest) = state.take_leftover() {
        let small = hyper::body::Body::size_hint(&rest)
            .upper()
            .is_some_and(|n| n <= DRAIN_LIMIT as u64);
        if small
            && let Ok(Ok(Some(_))) =
                tokio::time::timeout(DRAIN_TIMEOUT, read_limited(rest, DRAIN_LIMIT)).await
        {
            return;
        }
    }
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
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
    pub sessions: Sessions<Store>,
    pub upstream: Upstream,
    pub http: HttpConfig,
    pub metrics: Arc<Metrics>,
    /// The session Redis itself, for a shared rate-limit budget built on reload.
    pub redis: crate::store::RedisStore,
    /// Swapped whole on a configuration reload (SIGHUP): budgets start afresh.
    pub limits: arc_swap::ArcSwap<RateLimits<crate::store::RedisStore>>,
    /// Set when shutdown begins: readiness turns false while connections drain.
    pub draining: std::sync::atomic::AtomicBool,
    pub trusted_proxies: TrustedProxies,
    /// TLS on the client listener (`tls:` in the config); `reload` swaps its certificate.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
}

/// The rate limits checked before routing (issue 4): `all` on every request, `login` on
/// `POST /login` and `POST /register`, and the per-IP half of `refresh` on `POST /refresh` (the
/// per-session half needs the body: `refresh.rs` checks it before the store is asked). Other
/// methods (preflights, flow discovery) cannot guess passwords or rotate tokens: only `all`
/// applies to them.
async fn rate_limit(
    app: &App,
    route: &Route,
    req: &Request<ClientBody>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    let limits = app.limits.load();
    let post = req.method() == Method::POST;
    let limited_route = post && matches!(route, Route::Login | Route::Register | Route::Refresh);
    // The common case (a passthrough request, no `all` limit) costs nothing here.
    if !limits.is_active() || !(limited_route || limits.limits_every_request()) {
        return Ok(());
    }
    let client = client_ip(peer.ip(), req.headers(), &app.trusted_proxies);
    let (limiter, result) = match limits.check_all(client).await {
        Err(l) => ("all", Err(l)),
        Ok(()) => match route {
            Route::Login | Route::Register if post => ("login", limits.check_login(client).await),
            Route::Refresh if post => ("refresh_ip", limits.check_refresh_ip(client).await),
            _ => ("all", Ok(())),
        },
    };
    result.map_err(|l| {
        tracing::debug!(%client, limiter, retry_after_ms = l.retry_after_ms(), "rate limited");
        app.metrics.rate_limited(route);
        ApiError::from(l)
    })
}

/// The Matrix user a request acted for. Handlers that know it put it in the response's
/// extensions for the request log line; it never goes on the wire.
#[derive(Clone, Debug)]
pub struct UserId(pub String);

/// Sets the [`UserId`] of a response.
pub fn with_user(mut res: Response<Body>, user_id: Option<String>) -> Response<Body> {
    if let Some(u) = user_id {
        res.extensions_mut().insert(UserId(u));
    }
    res
}

/// Routes one request, records its metrics and logs one line for it: method, route class,
/// status, latency, request id and user id when known; never the path, the query or any other
/// header.
pub async fn handle(app: Arc<App>, req: Request<Incoming>, conn: ClientConn) -> Response<Body> {
    let started = Instant::now();
    let h1 = req.version() <= http::Version::HTTP_11;
    let (parts, b) = req.into_parts();
    let (b, body_state) = ClientBody::new(b, app.http.body_read_timeout);
    let mut req = Request::from_parts(parts, b);
    let in_flight = app.metrics.in_flight();
    // Set on the request before any handler runs, so it is forwarded with it.
    let request_id = RequestId::take_or_generate(req.headers_mut());
    let method = req.method().clone();
    let route = routes::classify(req.method().as_str(), req.uri().path());
    let mut abandoned = Abandoned {
        method: &method,
        route: &route,
        request_id: &request_id,
        started,
        armed: true,
    };
    // Lines logged while handling (warnings, purges) carry the request id too.
    let span = tracing::info_span!("request", request_id = %request_id);
    let result = async {
        rate_limit(&app, &route, &req, conn.peer).await?;
        match &route {
            Route::Refresh => refresh::handle(&app, req).await,
            Route::Login | Route::Register => login::handle(&app, req, route.clone(), &conn).await,
            other => forward::handle(&app, req, other.clone(), &conn).await,
        }
    }
    .instrument(span)
    .await;
    abandoned.armed = false;
    let mut res = match result {
        Ok(r) => r,
        // A stalled body cut while streaming surfaces as an upstream failure: it is the client's.
        Err(_) if body_state.timed_out() => ApiError::BodyTimeout.into_response(),
        Err(e) => e.into_response(),
    };
    if h1 {
        settle_body(&body_state, &mut res).await;
    }
    let user = res.extensions_mut().remove::<UserId>();
    res.headers_mut()
        .insert(request_id::HEADER, request_id.header_value());
    let took = started.elapsed();
    let status = res.status().as_u16();
    app.metrics.request(&route, status, took);
    tracing::info!(
        %method,
        route = route.name(),
        status,
        latency_ms = took.as_millis() as u64,
        request_id = request_id.as_str(),
        user_id = user.as_ref().map(|u| u.0.as_str()),
        "request"
    );
    // The request stays in flight until its body is sent (or the client goes away).
    res.map(|b| {
        Tracked {
            inner: b,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

/// Logs the line of a request whose client went away before it was answered (hyper then drops
/// the handler: a long-poll `/sync` the client gave up on, typically), so that every request
/// still gets one line.
struct Abandoned<'a> {
    method: &'a http::Method,
    route: &'a Route,
    request_id: &'a RequestId,
    started: Instant,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(
                method = %self.method,
                route = self.route.name(),
                latency_ms = self.started.elapsed().as_millis() as u64,
                request_id = self.request_id.as_str(),
                "request abandoned by the client before its answer"
            );
        }
    }
}

/// A response body that holds an in-flight unit until it is dropped.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
        // Bounds the request head (431 beyond it).
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    // Past this many open connections the proxy stops accepting; the kernel backlog queues the
    // rest.
    let slots = Arc::new(Semaphore::new(app.http.max_connections));
    let idle_timeout = app.http.idle_timeout;
    let per_ip = app
        .http
        .max_connections_per_ip
        .map(|cap| conn::PerIp::new(cap, app.metrics.clone()));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
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
                // One host cannot hold every slot: past its cap the connection is closed at once.
                let ip_slot = match &per_ip {
                    Some(p) => match p.acquire(peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            tracing::debug!(peer = %peer.ip(), "connection refused: http.max_connections_per_ip");
                            continue;
                        }
                    },
                    None => None,
                };
                let _ = stream.set_nodelay(true);
                let activity = conn::Activity::new();
                // The certificate in force now; a reload affects later connections only.
                let acceptor = app.tls.as_ref().map(|t| t.acceptor());
                let conn = ClientConn {
                    peer,
                    scheme: match acceptor {
                        Some(_) => ClientScheme::Https,
                        None => ClientScheme::Http,
                    },
                    trusted: app.trusted_proxies.contains(peer.ip()),
                };
                let handshake_timeout = app.http.header_read_timeout;
                let app = app.clone();
                let act = activity.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let app = app.clone();
                    let in_flight = act.request();
                    async move {
                        let res = handle(app, req, conn).await;
                        drop(in_flight);
                        Ok::<_, Infallible>(res)
                    }
                });
                let io = conn::TrackedIo::new(stream, activity.clone());
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ip_slot = ip_slot;
                    // TLS: the handshake, bounded like a request head (the slot is held).
                    let Some(io) = crate::tls::accept(acceptor, io, handshake_timeout, peer).await
                    else {
                        return;
                    };
                    let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc));
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        },
                        // Nothing in flight and nothing moving: close (no request is cut).
                        () = activity.idle(idle_timeout) => tracing::debug!("closed an idle connection"),
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
