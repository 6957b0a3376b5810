//! The application state every listener and background task shares, and how it is built from a
//! validated [`Config`].

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError, HttpConfig, TrustedProxies};
use crate::ratelimit::RateLimits;
use crate::session::{Sessions, StoreError};
use crate::store::{Cached, Instrumented, RedisSettings, RedisStore, Store, TokenCache};
use crate::telemetry::metrics::Metrics;
use crate::tls::{ServerTls, TlsError};
use crate::upstream::Upstream;

/// Everything the listeners and background tasks share.
pub struct App {
    pub sessions: Sessions<Store>,
    pub upstream: Upstream,
    pub http: HttpConfig,
    pub metrics: Arc<Metrics>,
    /// The session Redis itself, for a shared rate-limit budget built on reload.
    pub redis: RedisStore,
    /// Swapped whole on a configuration reload (SIGHUP): budgets start afresh.
    pub limits: ArcSwap<RateLimits<RedisStore>>,
    /// Set when shutdown begins: readiness turns false while connections drain.
    pub draining: AtomicBool,
    pub trusted_proxies: TrustedProxies,
    /// TLS on the client listener (`tls:` in the config); `reload` swaps its certificate.
    pub tls: Option<Arc<ServerTls>>,
}

/// Why the application state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("redis: {0}")]
    Store(#[from] StoreError),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Config(#[from] ConfigError),
}

impl App {
    /// Builds the application state from a validated config.
    pub fn new(config: &Config) -> Result<App, AppError> {
        // For the TLS configs libraries build themselves (rediss://).
        crate::tls::install_default_provider();
        let store = RedisStore::new(&RedisSettings::from_config(&config.redis)?)?;
        let metrics = Arc::new(Metrics::new());
        // With `rate_limit.backend: redis` the shared budget lives in the session Redis.
        let limits = ArcSwap::from_pointee(RateLimits::new(&config.rate_limit, store.clone()));
        // Without its invalidation tasks (started by `run`) the cache stays off-line: bypassed.
        let cache = config
            .cache
            .enabled
            .then(|| Arc::new(TokenCache::new(&config.cache, metrics.cache.clone())));
        let escrow = config.escrow_keys()?.map(Arc::new);
        if let Some(k) = &escrow {
            tracing::info!(
                key_id = %k.current().id_hex(),
                previous_key_id = %k.previous().map(|p| p.id_hex()).unwrap_or_else(|| "-".into()),
                "admin.upstream_key_file set: new sessions keep an escrow copy of the upstream token (operator upstream logout)"
            );
        }
        let sessions = Sessions::new(
            Cached::new(Instrumented::new(store.clone(), metrics.clone()), cache),
            config.tokens,
            crate::session::clock_from_env(),
            Box::new(crate::session::os_random::OsRandom::new()),
        )
        .with_escrow(escrow);
        Ok(App {
            sessions,
            upstream: Upstream::new(&config.upstream, metrics.clone())?,
            http: config.http.clone(),
            metrics,
            redis: store,
            limits,
            draining: AtomicBool::new(false),
            trusted_proxies: config.trusted_proxies.clone(),
            tls: match &config.tls {
                Some(files) => Some(Arc::new(ServerTls::load(files)?)),
                None => None,
            },
        })
    }
}
