//! matrix-refresh-proxy: Matrix refresh tokens (spec v1.3, MSC2918) for homeservers without them.
//!
//! See `DESIGN.md` in the shared folder for the behaviour contract, and README.md for operation.

// The whole configuration is API: the binary, the tests and the examples build and read it.
pub mod config;

mod admin;
mod app;
mod body;
mod lifecycle;
mod matrix;
mod ratelimit;
mod server;
mod session;
mod store;
mod telemetry;
mod tls;
mod upstream;

// What the binary, the tests and the examples use besides `config` and `run`; everything else
// is private, so the compiler finds what nothing uses.
pub use ratelimit::{Limited, RateLimits, SharedLimiter};
pub use session::{ProxyToken, SessionId, StoreError, TokenKind};
pub use telemetry::{flush as flush_logs, init as init_logging};
pub use tls::check_files;

/// The parsers the fuzz targets (`fuzz/`) drive.
pub mod fuzzing {
    pub use crate::matrix::login::take_flags;
    pub use crate::matrix::routes::classify;
    pub use crate::upstream::credentials::{presented, rewrite_query, strip_proxy_tokens};
}

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::app::App;
use crate::config::Config;
use crate::lifecycle::AbortOnDrop;
use crate::ratelimit::HOUSEKEEPING_INTERVAL;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    App(#[from] app::AppError),
    #[error("{0}")]
    AdminSecret(#[from] admin::api::SecretError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
}

/// How often `mrp_sessions_alive` is sampled (one SCAN pass over the session records).
const SESSIONS_ALIVE_SAMPLE: std::time::Duration = std::time::Duration::from_secs(30);
/// The pause between the sampler's `SCAN` steps: at most 10 steps (10,000 keys) a second per
/// replica, about 1 % of a Redis core, however many sessions there are.
const SESSIONS_ALIVE_PACE: std::time::Duration = std::time::Duration::from_millis(100);

async fn bind(addr: std::net::SocketAddr) -> Result<(TcpListener, std::net::SocketAddr), RunError> {
    let bind_error = |source| RunError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// Runs the proxy until `shutdown` resolves, then drains for at most `shutdown_timeout`.
/// With `config_path`, SIGHUP re-reads that file (token lifetimes and rate limits apply live).
/// Integration tests call this too.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (listener, local) = bind(config.listen).await?;
    let admin_listener = match config.admin.listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let app = Arc::new(App::new(&config)?);
    let admin_api = match &config.admin.token_file {
        Some(path) => Some(admin::api::AdminApi::from_file(path)?),
        None => None,
    };

    // The admin listener stops once the client listener has drained (readiness answers 503
    // meanwhile).
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = admin_listener.map(|(listener, addr)| {
        tracing::info!("admin listening on {addr}");
        tokio::spawn(admin::serve(listener, app.clone(), admin_api, async {
            let _ = admin_stopped.await;
        }))
    });
    log_rate_limits(&config);
    // Background tasks, aborted when `run` returns (the guards drop).
    let _master_switches = app.redis.master_switch_events().map(|mut switches| {
        let metrics = app.metrics.clone();
        AbortOnDrop(tokio::spawn(async move {
            while switches.changed().await.is_ok() {
                metrics.redis_master_switched();
            }
        }))
    });
    let limits = app.clone();
    let _housekeeping = AbortOnDrop(tokio::spawn(ratelimit::housekeeping(
        move || limits.limits.load_full(),
        HOUSEKEEPING_INTERVAL,
    )));
    // One SIGHUP handler for certificates and configuration, installed before READY=1.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(RunError::Signal)?;
    let _reload = AbortOnDrop(tokio::spawn(lifecycle::reload_on_sighup(
        app.clone(),
        config_path,
        config.clone(),
        hup,
    )));
    let _ready = AbortOnDrop(tokio::spawn(lifecycle::ready_when_store_answers(
        app.clone(),
    )));
    let _sessions_alive = AbortOnDrop(tokio::spawn(admin::api::sample_sessions_alive(
        app.clone(),
        SESSIONS_ALIVE_SAMPLE,
        SESSIONS_ALIVE_PACE,
    )));
    let _watchdog = AbortOnDrop(tokio::spawn(lifecycle::watchdog()));
    let _invalidation = app.sessions.store().cache().map(|cache| {
        store::invalidation::spawn(
            cache.clone(),
            &app.redis,
            store::invalidation::InvalidationSettings {
                heartbeat_interval: config.cache.heartbeat_interval,
                connect_timeout: config.redis.connect_timeout,
            },
        )
        .map(|tasks| tasks.map(AbortOnDrop))
    });
    tracing::info!(upstream = %config.upstream.url, "listening on {local}");
    let draining = app.clone();
    let shutdown = async move {
        shutdown.await;
        lifecycle::stopping(&draining);
    };
    server::serve(listener, app, shutdown, config.shutdown_timeout).await;
    let _ = stop_admin.send(());
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    Ok(())
}

fn log_rate_limits(config: &Config) {
    let r = &config.rate_limit;
    if !r.enabled {
        tracing::info!("rate limits disabled");
        return;
    }
    let show = |l: Option<config::LimitConfig>| match l {
        Some(l) => format!("{}/s burst {}", l.per_second, l.burst),
        None => "off".to_owned(),
    };
    tracing::info!(
        login = %show(r.login),
        refresh = %show(r.refresh),
        all = %show(r.all),
        backend = ?r.backend,
        trusted_proxies = ?config.trusted_proxies,
        "rate limits"
    );
}
