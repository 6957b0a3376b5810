//! The admin listener, on its own address (`admin.listen`), never the client port:
//! `GET /metrics` (Prometheus text format), `GET /health/live` and `GET /health/ready`, and
//! with `admin.token_file` the operator session API under `/admin/v1/` ([`api`]).

pub mod api;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use crate::app::App;
use crate::body::{Body, full};
use crate::session::TokenStore;
use crate::upstream::UpstreamError;

/// How long a readiness result is reused: probes cannot hammer Redis or the homeserver.
const READY_CACHE: Duration = Duration::from_secs(1);
/// Each readiness check gives up after this long (keep probe `timeoutSeconds` above it).
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapers and probes are few; more connections than this are refused.
const MAX_CONNECTIONS: usize = 64;
/// Slowloris guard on the admin port.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Open admin connections get this long to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a readiness check failed; shown in the `/health/ready` body (no secrets: details such
/// as error texts go to the debug log only).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    #[error("PING failed")]
    PingFailed,
    #[error("unreachable")]
    Unreachable,
    #[error("timed out")]
    TimedOut,
    #[error("/versions answered {0}")]
    Status(u16),
    /// Every homeserver connection allowed (`upstream.max_connections`) is busy: this replica is
    /// full, and not ready for more.
    #[error("all homeserver connections busy")]
    Saturated,
}

/// Result of one readiness check.
pub type Check = Result<(), CheckFailure>;

/// What `/health/ready` checks.
pub trait Probes: Send + Sync + 'static {
    /// Redis answers `PING`.
    fn redis(&self) -> impl Future<Output = Check> + Send;
    /// The homeserver answers `GET /_matrix/client/versions` with 200.
    fn upstream(&self) -> impl Future<Output = Check> + Send;
}

/// The real checks, through the proxy's own store and upstream client.
pub struct AppProbes(pub Arc<App>);

impl Probes for AppProbes {
    async fn redis(&self) -> Check {
        self.0.sessions.store().ping().await.map_err(|e| {
            tracing::debug!(error = %e, "readiness: redis check failed");
            CheckFailure::PingFailed
        })
    }

    async fn upstream(&self) -> Check {
        // Asked at once: a check would otherwise wait for a connection like any request.
        if self.0.upstream.saturated() {
            return Err(CheckFailure::Saturated);
        }
        match self.0.upstream.versions().await {
            Ok(StatusCode::OK) => Ok(()),
            Ok(status) => Err(CheckFailure::Status(status.as_u16())),
            Err(UpstreamError::Timeout) => Err(CheckFailure::TimedOut),
            Err(UpstreamError::Saturated) => Err(CheckFailure::Saturated),
            Err(UpstreamError::Unreachable(why)) => {
                tracing::debug!(error = %why, "readiness: homeserver check failed");
                Err(CheckFailure::Unreachable)
            }
        }
    }
}

fn show(c: &Check) -> String {
    match c {
        Ok(()) => "ok".to_owned(),
        Err(why) => why.to_string(),
    }
}

/// The outcome of both checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub redis: Check,
    pub upstream: Check,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.redis.is_ok() && self.upstream.is_ok()
    }

    /// `{"ready": bool, "checks": {"redis": "ok" | reason, "upstream": "ok" | reason}}`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "ready": self.ready(),
            "checks": {"redis": show(&self.redis), "upstream": show(&self.upstream)},
        })
    }
}

/// Readiness with a short cache. Concurrent probes wait for the one check in progress rather
/// than starting their own.
pub struct Readiness<P> {
    probes: P,
    last: Mutex<Option<(Instant, Report)>>,
}

impl<P: Probes> Readiness<P> {
    pub fn new(probes: P) -> Self {
        Readiness {
            probes,
            last: Mutex::new(None),
        }
    }

    pub async fn check(&self) -> Report {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref()
            && at.elapsed() < READY_CACHE
        {
            return report.clone();
        }
        let timed = |c: Option<Check>| c.unwrap_or(Err(CheckFailure::TimedOut));
        let (redis, upstream) = tokio::join!(
            tokio::time::timeout(CHECK_TIMEOUT, self.probes.redis()),
            tokio::time::timeout(CHECK_TIMEOUT, self.probes.upstream()),
        );
        let report = Report {
            redis: timed(redis.ok()),
            upstream: timed(upstream.ok()),
        };
        // Log changes only: a failing dependency probed every second must not flood the logs.
        let changed = last
            .as_ref()
            .is_none_or(|(_, r)| r.ready() != report.ready());
        if changed && !report.ready() {
            tracing::warn!(
                redis = %show(&report.redis),
                upstream = %show(&report.upstream),
                "not ready"
            );
        } else if changed {
            tracing::info!("ready");
        }
        *last = Some((Instant::now(), report.clone()));
        report
    }
}

/// What the admin handlers need.
pub struct Admin<P> {
    pub app: Arc<App>,
    pub readiness: Readiness<P>,
    /// The operator API; `None` without `admin.token_file` (it answers 404).
    pub api: Option<api::AdminApi>,
}

impl Admin<AppProbes> {
    pub fn new(app: Arc<App>, api: Option<api::AdminApi>) -> Self {
        Admin {
            readiness: Readiness::new(AppProbes(app.clone())),
            app,
            api,
        }
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Answers one admin request.
pub async fn handle<P: Probes>(
    admin: &Admin<P>,
    req: &Request<Incoming>,
    peer: std::net::IpAddr,
) -> Response<Body> {
    let path = req.uri().path();
    if path.starts_with("/admin/") {
        return api::handle(
            &admin.app,
            admin.api.as_ref(),
            req.method(),
            path,
            req.uri().query(),
            req.headers(),
            peer,
        )
        .await;
    }
    let known = matches!(path, "/metrics" | "/health/live" | "/health/ready");
    if known && !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut res = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
            "text/plain; charset=utf-8",
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match path {
        "/metrics" => {
            // The limiter key count is read at scrape time (housekeeping bounds it).
            let keys = admin
                .app
                .limits
                .load()
                .key_counts()
                .iter()
                .map(|(_, n)| n)
                .sum();
            admin.app.metrics.set_limiter_keys(keys);
            text(
                StatusCode::OK,
                admin.app.metrics.encode(),
                crate::telemetry::metrics::CONTENT_TYPE,
            )
        }
        "/health/live" => text(
            StatusCode::OK,
            json!({"live": true}).to_string(),
            "application/json",
        ),
        "/health/ready" => {
            // Draining after SIGTERM: take this replica out of load balancing first.
            if admin
                .app
                .draining
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"ready": false, "draining": true}).to_string(),
                    "application/json",
                );
            }
            let report = admin.readiness.check().await;
            let status = if report.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, report.to_json().to_string(), "application/json")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: GET /metrics, /health/live or /health/ready (or /admin/v1/...)\n".into(),
            "text/plain; charset=utf-8",
        ),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    api: Option<api::AdminApi>,
    shutdown: impl Future<Output = ()>,
) {
    let admin = Arc::new(Admin::new(app, api));
    let mut builder = http1::Builder::new();
    // Without a timer hyper's header-read timeout is silently off.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(16 * 1024);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok((s, peer)) => (s, peer.ip()),
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("admin listener: too many connections; closing one");
                    continue;
                };
                let admin = admin.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(handle(&admin, &req, peer).await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "admin connection ended with an error");
                    }
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Fake {
        calls: AtomicUsize,
        redis_down: AtomicBool,
        hang: AtomicBool,
    }

    impl Probes for Arc<Fake> {
        async fn redis(&self) -> Check {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.redis_down.load(Ordering::SeqCst) {
                Err(CheckFailure::PingFailed)
            } else {
                Ok(())
            }
        }
        async fn upstream(&self) -> Check {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cached_for_a_second_then_checked_again() {
        let fake = Arc::new(Fake::default());
        let r = Readiness::new(fake.clone());
        assert!(r.check().await.ready());
        fake.redis_down.store(true, Ordering::SeqCst);
        // Within the cache window: the old answer, no new check.
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(r.check().await.ready());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        let report = r.check().await;
        assert!(!report.ready());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            report.to_json(),
            json!({"ready": false, "checks": {"redis": "PING failed", "upstream": "ok"}})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_times_out() {
        let fake = Arc::new(Fake::default());
        fake.hang.store(true, Ordering::SeqCst);
        let r = Readiness::new(fake.clone());
        let report = r.check().await;
        assert_eq!(report.redis, Err(CheckFailure::TimedOut));
        assert_eq!(report.upstream, Ok(()));
    }
}
