//! One client request: its id, the limits checked before routing, dispatch to a handler, one
//! log line and its metrics, and the keep-alive housekeeping of an unread body.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use hyper::body::{Frame, Incoming, SizeHint};

use super::idle::IpRequest;
use super::{ApiError, Handled, login, passthrough, refresh};
use crate::app::App;
use crate::body::{Body, BodyState, BoxError, ClientBody, read_limited};
use crate::matrix::routes::{self, Route};
use crate::ratelimit::client_ip::client_ip;
use crate::telemetry::access::{self, AccessLine};
use crate::telemetry::metrics::InFlightGauge;
use crate::telemetry::request_id::{self, RequestId};
use crate::telemetry::scope::RequestScope;
use crate::upstream::ClientConn;

/// Unread request bodies up to this size are read and discarded before a self-made answer, so
/// the keep-alive connection stays usable; larger or slower ones get `Connection: close`.
const DRAIN_LIMIT: usize = 64 * 1024;
/// `retry_after_ms` of a request refused by `http.max_requests_per_ip`: a second is about when
/// some of that client's other requests (not its long polls) have finished.
const IP_CAP_RETRY_AFTER_MS: u64 = 1000;
/// Time allowed for that drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Before an HTTP/1 answer goes out while the request body is unread: read and discard a small
/// rest, or say `Connection: close` (hyper closes such a connection, and a client that was not
/// told would send its next request into it).
async fn settle_body(state: &BodyState, res: &mut Response<Body>) {
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

/// Whether any rate limit applies to this request. The common case (a passthrough request, no
/// `all` limit) costs nothing more.
fn rate_limited_route(app: &App, route: &Route, req: &Request<ClientBody>) -> bool {
    let limits = app.limits.load();
    let limited_route = req.method() == Method::POST
        && matches!(route, Route::Login | Route::Register | Route::Refresh);
    limits.is_active() && (limited_route || limits.limits_every_request())
}

/// The rate limits checked before routing (issue 4): `all` on every request, `login` on
/// `POST /login` and `POST /register`, and the per-IP half of `refresh` on `POST /refresh` (the
/// per-session half needs the body: `refresh.rs` checks it before the store is asked). Other
/// methods (preflights, flow discovery) cannot guess passwords or rotate tokens: only `all`
/// applies to them.
/// Only called when [`rate_limited_route`] holds.
async fn rate_limit(
    app: &App,
    route: &Route,
    req: &Request<ClientBody>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    let limits = app.limits.load();
    let post = req.method() == Method::POST;
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

/// The rate limits, then the handler of `route`.
/// The futures of the rarer, larger handlers (and of the rate limits) are boxed, so that this
/// future is the size of the passthrough one (3.9 KB), which [`handle`] boxes in turn.
async fn dispatch(
    app: &App,
    route: &Route,
    req: Request<ClientBody>,
    conn: &ClientConn,
) -> Result<Handled, ApiError> {
    if rate_limited_route(app, route, &req) {
        Box::pin(rate_limit(app, route, &req, conn.peer)).await?;
    }
    match route {
        Route::Refresh => Box::pin(refresh::handle(app, req)).await,
        Route::Login | Route::Register => {
            Box::pin(login::handle(app, req, route.clone(), conn)).await
        }
        other => passthrough::handle(app, req, other.clone(), conn).await,
    }
}

/// Routes one request, records its metrics and logs one line for it: method, route class,
/// status, latency, request id and user id when known; never the path, the query or any other
/// header.
/// `ip_count`: the request's place in its client IP's requests in flight, `Some(None)` when the
/// IP has `http.max_requests_per_ip` in flight already: the request is then answered 429
/// without being handled (but for /refresh). Held by the answer's body until it ends: a body
/// still streaming holds its homeserver connection.
pub(super) async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    conn: ClientConn,
    ip_count: Option<Option<IpRequest>>,
) -> Response<Tracked> {
    let over_ip_cap = matches!(ip_count, Some(None));
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
    // Lines logged while handling (warnings, purges) carry the request id too
    // (telemetry/scope.rs). The handler's future is boxed: inline, it took its room in this
    // future twice (moved into the scope: rustc keeps both places), 10.5 KB moved by hyper on
    // every request (`memmove` 4.5 % of the proxy's CPU, the floor's 2 %); boxed, this future
    // is 1.4 KB and one allocation is cheaper (access token -3 % CPU per request side by side).
    // /refresh is never refused here: it holds no homeserver connection (what the cap protects),
    // and some SDKs log out on any JSON error from /refresh (DESIGN.md §2 "/refresh").
    let result = if over_ip_cap && route != Route::Refresh {
        // The body is left now, so that it is drained below like any unread body (not a
        // `Connection: close`).
        drop(req);
        tracing::debug!(peer = %conn.peer.ip(), "request refused: http.max_requests_per_ip");
        Err(ApiError::LimitExceeded {
            retry_after_ms: IP_CAP_RETRY_AFTER_MS,
        })
    } else {
        let handler = Box::pin(dispatch(&app, &route, req, &conn));
        RequestScope::new(request_id.clone(), handler).await
    };
    abandoned.armed = false;
    let (mut res, user) = match result {
        Ok(a) => (a.res, a.user),
        // A stalled body cut while streaming surfaces as an upstream failure: it is the client's.
        Err(_) if body_state.timed_out() => (ApiError::BodyTimeout.into_response(), None),
        Err(e) => (e.into_response(), None),
    };
    if h1 && !body_state.done() {
        Box::pin(settle_body(&body_state, &mut res)).await;
    }
    res.headers_mut()
        .insert(request_id::HEADER, request_id.header_value());
    let took = started.elapsed();
    let status = res.status().as_u16();
    app.metrics.request(&route, status, took);
    if tracing::enabled!(tracing::Level::INFO) {
        let line = AccessLine {
            method: method.as_str(),
            route: route.name(),
            status,
            latency_ms: took.as_millis() as u64,
            request_id: request_id.as_str(),
            user_id: user.as_deref(),
        };
        // The same line through `tracing` where the fast path is not set up (a terminal).
        if !access::write(&line) {
            tracing::info!(
                method = %line.method,
                route = line.route,
                status,
                latency_ms = line.latency_ms,
                request_id = line.request_id,
                user_id = line.user_id,
                "request"
            );
        }
    }
    // The request stays in flight until its body is sent (or the client goes away).
    res.map(|inner| Tracked {
        inner,
        _in_flight: in_flight,
        _ip_count: ip_count.flatten(),
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

/// A response body that holds an in-flight unit until it is dropped: the body type hyper
/// serves (not boxed again: one allocation less per request).
pub(super) struct Tracked {
    inner: Body,
    _in_flight: InFlightGauge,
    /// The request in its client IP's count (`http.max_requests_per_ip`), until the body ends.
    _ip_count: Option<IpRequest>,
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
