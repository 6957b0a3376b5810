//! The client listener: accept loop, connection caps (all, and per client IP), the TLS
//! handshake, idle keep-alive closing, and the graceful drain at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::head_timer::{HeadClock, HeadTimer};
use super::idle::{Activity, IpRequests, IpSlot, PerIp, TrackedIo};
use super::request::handle;
use crate::app::App;
use crate::config::HttpConfig;
use crate::upstream::{ClientConn, ClientScheme};

/// Largest request head (request line and headers) the proxy accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Requests in flight at once on one HTTP/2 connection (nginx's default is 128; RFC 9113
/// §6.5.2 recommends no fewer than 100). Each may hold a homeserver connection, so with
/// `http.max_connections_per_ip` it bounds what one client can have in flight; the homeserver
/// connections themselves are capped by `upstream.max_connections`.
const MAX_STREAMS: u32 = 100;

/// The connection builder: HTTP/1 and HTTP/2, each with a timer (without one hyper's
/// header-read timeout is silently off; HTTP/1's is set per connection) and a bounded request
/// head (431 beyond it).
fn builder(http: &HttpConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The HTTP/1 timer is set per connection (`serve_connection`: a `HeadTimer`).
    builder
        .http1()
        .header_read_timeout(http.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        // One buffer and one write(2) per answer instead of a writev(2) of head and body
        // slices: cheaper for the small answers of the hot path (issue 11: +2-5 % req/s and
        // -3-6 % CPU per request side by side, access-token and passthrough cases). A large
        // body is copied once more in user space, chunk by chunk.
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS);
    builder
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains open connections for at
/// most `drain` (in-flight requests, long polls included, complete).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let builder = builder(&app.http);
    let graceful = GracefulShutdown::new();
    // Past this many open connections the proxy stops accepting; the kernel backlog queues the
    // rest.
    let slots = Arc::new(Semaphore::new(app.http.max_connections));
    // Connections and requests in flight per client IP (either cap set).
    let per_ip = (app.http.max_connections_per_ip.is_some()
        || app.http.max_requests_per_ip.is_some())
    .then(|| {
        PerIp::new(
            app.http.max_connections_per_ip,
            app.http.max_requests_per_ip,
            app.metrics.clone(),
        )
    });
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
                // The certificate in force now; a reload affects later connections only.
                let acceptor = app.tls.as_ref().map(|t| t.acceptor());
                let slots = (permit, ip_slot);
                let conn = (stream, peer, acceptor);
                tokio::spawn(serve_connection(app.clone(), conn, slots, builder.clone(), graceful.watcher()));
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

/// One accepted connection, holding its slots until it closes: the TLS handshake (bounded like
/// a request head), then requests until the client closes, the drain ends it, or it is idle.
async fn serve_connection(
    app: Arc<App>,
    (stream, peer, acceptor): (TcpStream, SocketAddr, Option<TlsAcceptor>),
    slots: (OwnedSemaphorePermit, Option<IpSlot>),
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
) {
    let _ = stream.set_nodelay(true);
    let scheme = match acceptor {
        Some(_) => ClientScheme::Https,
        None => ClientScheme::Http,
    };
    let conn = ClientConn::new(peer, scheme, app.trusted_proxies.contains(peer.ip()));
    // Bounds the TLS handshake and, through hyper, every request head.
    let header_timeout = app.http.header_read_timeout;
    let idle_timeout = app.http.idle_timeout;
    let activity = Activity::new();
    let act = activity.clone();
    let ip_requests = slots.1.as_ref().and_then(IpSlot::requests);
    let svc = service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let active = act.request();
        let conn = conn.clone();
        // `None` inside: the IP has `http.max_requests_per_ip` in flight already. The count
        // goes with the answer's body (`Tracked`).
        let counted = ip_requests.as_ref().map(IpRequests::enter);
        async move {
            let res = handle(app, req, conn, counted).await;
            drop(active);
            Ok::<_, Infallible>(res)
        }
    });
    let io = TrackedIo::new(stream, activity.clone());
    let Some(io) = crate::tls::accept(acceptor, io, header_timeout, peer).await else {
        return;
    };
    // hyper's HTTP/1 header-read timer, fired by this connection's own watcher (head_timer.rs).
    let head_clock = HeadClock::new();
    let mut builder = builder;
    builder.http1().timer(HeadTimer(head_clock.clone()));
    let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc));
    // The connection's two watchers run in a task of their own, aborted when the connection
    // ends (should this task be dropped instead, the watcher still ends by itself once the dead
    // connection has been idle for `idle_timeout`). Awaited beside the connection in a
    // `select!`, their sleeps were polled on every wake-up of the connection, several times per
    // request (issue 11); the idle watcher now closes the connection through its I/O
    // (`Activity::close`: the next read is end-of-file).
    let watchers = tokio::spawn(async move {
        tokio::select! {
            // Nothing in flight and nothing moving: close (no request is cut).
            () = activity.idle(idle_timeout) => {
                tracing::debug!("closing an idle connection");
                activity.close();
            }
            () = head_clock.watch(header_timeout) => {}
        }
    });
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    watchers.abort();
}
