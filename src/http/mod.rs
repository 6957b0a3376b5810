//! The client-facing side: listener, router and the proxy's own answers.

mod conn;
pub mod error;
mod forward;
pub mod login;
mod refresh;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::HttpConfig;
use crate::proxy::Upstream;
use crate::session::Sessions;
use crate::store::RedisStore;
pub use error::ApiError;
use routes::Route;

/// Largest request head (request line and headers) the proxy accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;

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
}

/// Routes one request and logs one line for it (method, route class, status, latency: never
/// the path's query or any header).
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let route = routes::classify(req.method(), req.uri().path());
    let route_name = route.name();
    let result = match route {
        Route::Refresh => refresh::handle(&app, req).await,
        Route::Login | Route::Register => login::handle(&app, req, route, peer).await,
        other => forward::handle(&app, req, other, peer).await,
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
                let _ = stream.set_nodelay(true);
                let activity = conn::Activity::new();
                let app = app.clone();
                let act = activity.clone();
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    let in_flight = act.request();
                    async move {
                        let res = handle(app, req, peer).await;
                        drop(in_flight);
                        Ok::<_, Infallible>(res)
                    }
                });
                let io = TokioIo::new(conn::TrackedIo::new(stream, activity.clone()));
                let conn = graceful.watch(builder.serve_connection(io, svc).into_owned());
                tokio::spawn(async move {
                    let _permit = permit;
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
