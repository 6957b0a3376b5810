//! Prometheus metrics, served on the admin listener (`GET /metrics`, text format 0.0.4).
//!
//! Every label value comes from a closed set: route classes ([`Route::name`]), status codes,
//! and the enums below. No path, user id, device id or token ever becomes a label, so the number
//! of series is bounded and nothing secret can reach a scrape.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use crate::matrix::purge::PurgeCause;
use crate::matrix::routes::Route;

/// Prefix of every metric name.
pub const PREFIX: &str = "mrp";

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every route class, so each series exists (at 0) before its first request.
const ROUTE_CLASSES: [&str; 7] = [
    "login",
    "register",
    "refresh",
    "logout",
    "devices",
    "account",
    "passthrough",
];

/// Buckets for client requests and homeserver calls (seconds): long-poll `/sync` lands high.
const HTTP_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for Redis commands (seconds): usually well under a millisecond.
const REDIS_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Outcome of a `/refresh` call with a well-formed body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A new pair was issued.
    Ok,
    /// The previous refresh token again inside its grace window: the same pair was returned.
    GraceReplay,
    /// A refresh token replayed after its grace (RFC 9700 §4.14.2).
    ReuseDetected,
    /// Idle expiry or session end passed (403).
    Expired,
    /// Unknown, malformed or revoked refresh token (401).
    Unknown,
    /// The session store failed (503).
    StoreError,
}

impl RefreshOutcome {
    pub const ALL: [RefreshOutcome; 6] = [
        RefreshOutcome::Ok,
        RefreshOutcome::GraceReplay,
        RefreshOutcome::ReuseDetected,
        RefreshOutcome::Expired,
        RefreshOutcome::Unknown,
        RefreshOutcome::StoreError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Ok => "ok",
            RefreshOutcome::GraceReplay => "grace_replay",
            RefreshOutcome::ReuseDetected => "reuse_detected",
            RefreshOutcome::Expired => "expired",
            RefreshOutcome::Unknown => "unknown",
            RefreshOutcome::StoreError => "store_error",
        }
    }
}

/// One kind of session-store call (one Redis round trip each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Create,
    LookupAccess,
    PeekRefresh,
    Rotate,
    Purge,
    UserSessions,
    IndexSession,
    UnindexSession,
    Ping,
}

impl StoreOp {
    pub const ALL: [StoreOp; 9] = [
        StoreOp::Create,
        StoreOp::LookupAccess,
        StoreOp::PeekRefresh,
        StoreOp::Rotate,
        StoreOp::Purge,
        StoreOp::UserSessions,
        StoreOp::IndexSession,
        StoreOp::UnindexSession,
        StoreOp::Ping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Create => "create",
            StoreOp::LookupAccess => "lookup_access",
            StoreOp::PeekRefresh => "peek_refresh",
            StoreOp::Rotate => "rotate",
            StoreOp::Purge => "purge",
            StoreOp::UserSessions => "user_sessions",
            StoreOp::IndexSession => "index_session",
            StoreOp::UnindexSession => "unindex_session",
            StoreOp::Ping => "ping",
        }
    }
}

/// Why a homeserver call produced no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    Unreachable,
    Timeout,
    /// `upstream.max_connections` all busy for the wait.
    Saturated,
}

impl UpstreamFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Unreachable => "unreachable",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Saturated => "saturated",
        }
    }
}

/// What a homeserver call was made for: a client route class, or one of the proxy's own calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamCall {
    /// A forwarded client request of this route class ([`Route::name`]).
    Route(&'static str),
    /// `GET /account/whoami` to learn who owns a token the proxy did not issue.
    Whoami,
    /// `GET /_matrix/client/versions` for `/health/ready`.
    Readiness,
    /// `POST /logout` of a device whose login could not be stored (it would be orphaned).
    OrphanLogout,
    /// `POST /logout` of a session an operator ended with `?logout_upstream=true`.
    AdminLogout,
}

impl UpstreamCall {
    pub fn for_route(route: &Route) -> Self {
        UpstreamCall::Route(route.name())
    }

    fn as_str(self) -> &'static str {
        match self {
            UpstreamCall::Route(name) => name,
            UpstreamCall::Whoami => "whoami",
            UpstreamCall::Readiness => "readiness",
            UpstreamCall::OrphanLogout => "orphan_logout",
            UpstreamCall::AdminLogout => "admin_logout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    route: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

fn redis_histogram() -> Histogram {
    Histogram::new(REDIS_BUCKETS)
}

/// The proxy's metrics. Cheap to share (`Arc`); every method is lock-free or takes a short
/// read lock.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabel>,
    in_flight: Gauge,
    upstream_duration: HistogramFamily<RouteLabel>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    refresh: Family<OutcomeLabel, Counter>,
    minted: Family<RouteLabel, Counter>,
    purged: Family<CauseLabel, Counter>,
    store_duration: HistogramFamily<OpLabel>,
    store_errors: Family<OpLabel, Counter>,
    rate_limited: Family<RouteLabel, Counter>,
    limiter_keys: Gauge,
    sessions_alive: Gauge,
    redis_master_switches: Counter,
    admin_calls: Family<AdminCallLabels, Counter>,
    admin_upstream_logouts: Family<OutcomeLabel, Counter>,
    /// Logins and refreshes of the last minute, for `GET /admin/v1/stats`.
    recent_logins: RecentCounter,
    recent_refreshes: RecentCounter,
    connections_rejected: Family<ReasonLabel, Counter>,
    connection_ips: Gauge,
    /// Homeserver connections open (busy and idle), kept by the upstream pool.
    pub upstream_connections: Gauge,
    /// The token cache's handles (`mrp_token_cache_*`), shared with the cache itself.
    pub cache: CacheMetrics,
    /// Pre-resolved handles of the per-request series (no label hashing or family lock on the
    /// hot path): created on first use, so a series still appears with its first sample.
    hot: HotHandles,
}

/// Status codes whose `http_requests_total` series get a pre-resolved handle; others go through
/// the family.
const HOT_STATUSES: [u16; 8] = [200, 400, 401, 403, 404, 429, 502, 503];

#[derive(Default)]
struct HotHandles {
    requests: [[std::sync::OnceLock<Counter>; HOT_STATUSES.len()]; ROUTE_CLASSES.len()],
    request_duration: [std::sync::OnceLock<Histogram>; ROUTE_CLASSES.len()],
    upstream_duration: [std::sync::OnceLock<Histogram>; ROUTE_CLASSES.len()],
    store_duration: [std::sync::OnceLock<Histogram>; StoreOp::ALL.len()],
}

fn route_index(route: &str) -> Option<usize> {
    ROUTE_CLASSES.iter().position(|r| *r == route)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::with_prefix(PREFIX),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(http_histogram),
            in_flight: Gauge::default(),
            upstream_duration: Family::new_with_constructor(http_histogram),
            upstream_errors: Family::default(),
            refresh: Family::default(),
            minted: Family::default(),
            purged: Family::default(),
            store_duration: Family::new_with_constructor(redis_histogram),
            store_errors: Family::default(),
            rate_limited: Family::default(),
            limiter_keys: Gauge::default(),
            sessions_alive: Gauge::default(),
            redis_master_switches: Counter::default(),
            admin_calls: Family::default(),
            admin_upstream_logouts: Family::default(),
            recent_logins: RecentCounter::default(),
            recent_refreshes: RecentCounter::default(),
            connections_rejected: Family::default(),
            connection_ips: Gauge::default(),
            upstream_connections: Gauge::default(),
            cache: CacheMetrics::default(),
            hot: HotHandles::default(),
        };
        m.connections_rejected
            .get_or_create_owned(&ReasonLabel { reason: "per_ip" });
        // Bounded label sets start at 0, so dashboards and alerts see every series from the
        // start (a counter that appears only on its first increment hides that first increase).
        for o in RefreshOutcome::ALL {
            m.refresh.get_or_create_owned(&OutcomeLabel {
                outcome: o.as_str(),
            });
        }
        for outcome in UPSTREAM_LOGOUT_OUTCOMES {
            m.admin_upstream_logouts
                .get_or_create_owned(&OutcomeLabel { outcome });
        }
        for c in PurgeCause::ALL {
            m.purged
                .get_or_create_owned(&CauseLabel { cause: c.as_str() });
        }
        for op in StoreOp::ALL {
            m.store_errors
                .get_or_create_owned(&OpLabel { op: op.as_str() });
        }
        for route in ["login", "register"] {
            m.minted.get_or_create_owned(&RouteLabel { route });
        }
        for route in ROUTE_CLASSES {
            m.rate_limited.get_or_create_owned(&RouteLabel { route });
        }
        m.register()
    }

    fn register(mut self) -> Self {
        let r = &mut self.registry;
        // Counter names get `_total` appended by the encoder.
        r.register(
            "http_requests",
            "Client requests answered, by route class and status code",
            self.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to the response headers of client requests, by route class",
            self.request_duration.clone(),
        );
        r.register(
            "http_requests_in_flight",
            "Client requests being handled or streaming their response body",
            self.in_flight.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time to the homeserver's response headers, by route class or proxy call \
             (whoami, readiness); passthrough includes long-poll /sync",
            self.upstream_duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Homeserver calls without a response, by route class or proxy call and kind \
             (unreachable, timeout)",
            self.upstream_errors.clone(),
        );
        r.register(
            "refresh",
            "Outcomes of /refresh calls with a well-formed body",
            self.refresh.clone(),
        );
        r.register(
            "sessions_minted",
            "Proxy sessions created, by route class (login, register)",
            self.minted.clone(),
        );
        r.register(
            "sessions_purged",
            "Proxy sessions ended, by cause",
            self.purged.clone(),
        );
        r.register(
            "redis_command_duration_seconds",
            "Duration of session-store calls to Redis, by operation (errors included)",
            self.store_duration.clone(),
        );
        r.register(
            "redis_errors",
            "Failed session-store calls to Redis, by operation",
            self.store_errors.clone(),
        );
        r.register(
            "rate_limited_requests",
            "Client requests refused by a rate limiter, by route class",
            self.rate_limited.clone(),
        );
        r.register(
            "rate_limiter_keys",
            "Keys (clients, users) currently tracked by the rate limiters",
            self.limiter_keys.clone(),
        );
        r.register(
            "sessions_alive",
            "Proxy session records in Redis (sampled every 30 s by a SCAN; includes sessions \
             within their 24 h retention after expiry)",
            self.sessions_alive.clone(),
        );
        r.register(
            "redis_master_switches",
            "Redis master changes followed (Sentinel: +switch-master, poll or connection error)",
            self.redis_master_switches.clone(),
        );
        r.register(
            "admin_calls",
            "Admin API calls (/admin/v1/...), by action and status code",
            self.admin_calls.clone(),
        );
        r.register(
            "admin_upstream_logouts",
            "Upstream logouts of sessions ended by the admin API with logout_upstream=true, by \
             outcome (done, failed, not_possible: no escrow copy under a configured key)",
            self.admin_upstream_logouts.clone(),
        );
        r.register(
            "connections_rejected",
            "Client connections closed at accept, by reason (per_ip: http.max_connections_per_ip)",
            self.connections_rejected.clone(),
        );
        r.register(
            "connection_tracked_ips",
            "Client IPs with open connections, tracked for http.max_connections_per_ip",
            self.connection_ips.clone(),
        );
        r.register(
            "upstream_connections_open",
            "Homeserver connections open, busy and idle (at most upstream.max_connections)",
            self.upstream_connections.clone(),
        );
        self.cache.register(r);
        self
    }

    /// The scrape body (Prometheus text format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// A client request answered (`status` as sent to the client).
    pub fn request(&self, route: &Route, status: u16, took: Duration) {
        let route = route.name();
        let idx = route_index(route);
        let hot = idx.zip(HOT_STATUSES.iter().position(|s| *s == status));
        match hot {
            Some((r, s)) => self.hot.requests[r][s]
                .get_or_init(|| {
                    self.requests
                        .get_or_create_owned(&RequestLabels { route, status })
                })
                .inc(),
            None => self
                .requests
                .get_or_create(&RequestLabels { route, status })
                .inc(),
        };
        let secs = took.as_secs_f64();
        match idx {
            Some(r) => self.hot.request_duration[r]
                .get_or_init(|| {
                    self.request_duration
                        .get_or_create_owned(&RouteLabel { route })
                })
                .observe(secs),
            None => self
                .request_duration
                .get_or_create(&RouteLabel { route })
                .observe(secs),
        }
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub fn in_flight(&self) -> InFlightGauge {
        self.in_flight.inc();
        InFlightGauge(self.in_flight.clone())
    }

    /// A homeserver call that got response headers after `took`.
    pub fn upstream_response(&self, call: UpstreamCall, took: Duration) {
        let route = call.as_str();
        let secs = took.as_secs_f64();
        match route_index(route).filter(|_| matches!(call, UpstreamCall::Route(_))) {
            Some(r) => self.hot.upstream_duration[r]
                .get_or_init(|| {
                    self.upstream_duration
                        .get_or_create_owned(&RouteLabel { route })
                })
                .observe(secs),
            None => self
                .upstream_duration
                .get_or_create(&RouteLabel { route })
                .observe(secs),
        }
    }

    /// A homeserver call that failed.
    pub fn upstream_failure(&self, call: UpstreamCall, kind: UpstreamFailure) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: call.as_str(),
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn refresh(&self, outcome: RefreshOutcome) {
        if outcome == RefreshOutcome::Ok {
            self.recent_refreshes.add(coarse_now_secs());
        }
        self.refresh
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A new session issued on `route` (login or register).
    pub fn session_minted(&self, route: &Route) {
        self.recent_logins.add(coarse_now_secs());
        self.minted
            .get_or_create(&RouteLabel {
                route: route.name(),
            })
            .inc();
    }

    /// `n` sessions ended for `cause`.
    pub fn sessions_purged(&self, cause: PurgeCause, n: usize) {
        if n > 0 {
            self.purged
                .get_or_create(&CauseLabel {
                    cause: cause.as_str(),
                })
                .inc_by(n as u64);
        }
    }

    /// A session-store call finished after `took`; `ok` is false when it failed.
    pub fn store_call(&self, op: StoreOp, took: Duration, ok: bool) {
        let label = OpLabel { op: op.as_str() };
        let i = StoreOp::ALL.iter().position(|o| *o == op).unwrap_or(0);
        self.hot.store_duration[i]
            .get_or_init(|| self.store_duration.get_or_create_owned(&label))
            .observe(took.as_secs_f64());
        if !ok {
            self.store_errors.get_or_create(&label).inc();
        }
    }

    /// A client request refused by a rate limiter (for the rate-limiting module).
    pub fn rate_limited(&self, route: &Route) {
        self.rate_limited
            .get_or_create(&RouteLabel {
                route: route.name(),
            })
            .inc();
    }

    /// The number of keys the rate limiters currently track (for the rate-limiting module's
    /// housekeeping task).
    pub fn set_limiter_keys(&self, n: usize) {
        self.limiter_keys.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A connection closed at accept because its IP holds `http.max_connections_per_ip`.
    pub fn connection_rejected_per_ip(&self) {
        self.connections_rejected
            .get_or_create(&ReasonLabel { reason: "per_ip" })
            .inc();
    }

    /// The number of client IPs with open connections.
    pub fn set_connection_ips(&self, n: usize) {
        self.connection_ips
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl Metrics {
    /// One Redis master change followed (Sentinel).
    pub fn redis_master_switched(&self) {
        self.redis_master_switches.inc();
    }

    /// The sampled number of session records (see `admin::sample_sessions_alive`).
    pub fn set_sessions_alive(&self, n: u64) {
        self.sessions_alive
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One admin API call answered with `status`; `action` is from a closed set.
    pub fn admin_call(&self, action: &'static str, status: u16) {
        self.admin_calls
            .get_or_create(&AdminCallLabels { action, status })
            .inc();
    }

    /// Upstream logouts of an admin call: `done`, `failed`, `not_possible`.
    pub fn admin_upstream_logouts(&self, done: u64, failed: u64, not_possible: u64) {
        for (outcome, n) in UPSTREAM_LOGOUT_OUTCOMES
            .into_iter()
            .zip([done, failed, not_possible])
        {
            self.admin_upstream_logouts
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }

    /// Logins (sessions minted) and refreshes (new pairs issued) in the last minute, on this
    /// replica.
    pub fn last_minute(&self) -> (u64, u64) {
        let now = coarse_now_secs();
        (self.recent_logins.sum(now), self.recent_refreshes.sum(now))
    }
}

fn coarse_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Outcomes of `mrp_admin_upstream_logouts_total`.
const UPSTREAM_LOGOUT_OUTCOMES: [&str; 3] = ["done", "failed", "not_possible"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminCallLabels {
    action: &'static str,
    status: u16,
}

/// Events of the last 60 seconds: one bucket per second, reused round-robin (fixed size).
#[derive(Debug)]
struct RecentCounter {
    /// (second the bucket counts, count) per slot.
    slots: std::sync::Mutex<[(u64, u64); 60]>,
}

impl Default for RecentCounter {
    fn default() -> Self {
        RecentCounter {
            slots: std::sync::Mutex::new([(0, 0); 60]),
        }
    }
}

impl RecentCounter {
    fn add(&self, now: u64) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut s[(now % 60) as usize];
        if slot.0 != now {
            *slot = (now, 0);
        }
        slot.1 += 1;
    }

    fn sum(&self, now: u64) -> u64 {
        let s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.iter()
            .filter(|(at, _)| now.saturating_sub(*at) < 60 && *at <= now)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Holds one unit of the in-flight gauge; dropping it releases it.
#[derive(Debug)]
pub struct InFlightGauge(Gauge);

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why the token cache was flushed (and bypassed until its invalidation channel is proven again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheFlush {
    /// The invalidation subscriber's connection closed (or could not subscribe).
    Disconnect,
    /// No own heartbeat came back within `cache.liveness_timeout`.
    Liveness,
    /// An invalidation message that names no session: everything goes.
    BadMessage,
    /// The Redis master changed (Sentinel): the subscriber moves to the new one.
    MasterSwitch,
}

impl CacheFlush {
    pub const ALL: [CacheFlush; 4] = [
        CacheFlush::Disconnect,
        CacheFlush::Liveness,
        CacheFlush::BadMessage,
        CacheFlush::MasterSwitch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheFlush::Disconnect => "disconnect",
            CacheFlush::Liveness => "liveness",
            CacheFlush::BadMessage => "bad_message",
            CacheFlush::MasterSwitch => "master_switch",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Pre-resolved handles of the token cache's metrics: the hot path only increments atomics.
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    lookups: Family<ResultLabel, Counter>,
    pub hits: Counter,
    pub misses: Counter,
    /// Looked up in Redis because the cache is off-line (flushed, invalidation channel down).
    pub bypasses: Counter,
    pub entries: Gauge,
    pub bytes: Gauge,
    /// 1 while the cache serves hits, 0 while it is flushed and bypassed.
    pub enabled: Gauge,
    flushes: Family<ReasonLabel, Counter>,
    pub invalidations: Counter,
    /// Lookup replies not kept because an invalidation or flush raced with them.
    pub races: Counter,
}

impl CacheMetrics {
    fn register(&mut self, r: &mut Registry) {
        for (result, c) in [
            ("hit", &mut self.hits),
            ("miss", &mut self.misses),
            ("bypass", &mut self.bypasses),
        ] {
            *c = self.lookups.get_or_create_owned(&ResultLabel { result });
        }
        for f in CacheFlush::ALL {
            self.flushes
                .get_or_create_owned(&ReasonLabel { reason: f.as_str() });
        }
        r.register(
            "token_cache_lookups",
            "Access-token lookups by the in-process cache: hit (no Redis call), miss (Redis, then \
             kept), bypass (Redis; the cache is flushed while its invalidation channel is down)",
            self.lookups.clone(),
        );
        r.register(
            "token_cache_entries",
            "Sessions held by the token cache",
            self.entries.clone(),
        );
        r.register(
            "token_cache_bytes",
            "Bytes held by the token cache's entries (heap data and per-entry map bookkeeping)",
            self.bytes.clone(),
        );
        r.register(
            "token_cache_enabled",
            "1 while the token cache serves hits; 0 while flushed and bypassed",
            self.enabled.clone(),
        );
        r.register(
            "token_cache_flushes",
            "Token cache flushes, by reason (disconnect, liveness, bad_message)",
            self.flushes.clone(),
        );
        r.register(
            "token_cache_invalidations",
            "Session invalidations applied to the token cache (from any replica, or local)",
            self.invalidations.clone(),
        );
        r.register(
            "token_cache_races",
            "Lookup replies not cached because an invalidation or flush arrived while in flight",
            self.races.clone(),
        );
    }

    pub fn flushed(&self, why: CacheFlush) {
        self.flushes
            .get_or_create(&ReasonLabel {
                reason: why.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, start: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(start))
    }

    const ALWAYS: [&str; 7] = [
        "mrp_http_requests_in_flight",
        "mrp_refresh_total",
        "mrp_sessions_minted_total",
        "mrp_sessions_purged_total",
        "mrp_redis_errors_total",
        "mrp_rate_limited_requests_total",
        "mrp_rate_limiter_keys",
    ];
    /// Label-keyed families without a fixed label set appear from their first sample.
    const ON_USE: [&str; 5] = [
        "mrp_http_requests_total",
        "mrp_http_request_duration_seconds",
        "mrp_upstream_request_duration_seconds",
        "mrp_upstream_errors_total",
        "mrp_redis_command_duration_seconds",
    ];

    fn has_type(t: &str, name: &str) -> bool {
        t.contains(&format!("# TYPE {name} "))
    }

    #[test]
    fn bounded_series_exist_from_the_start() {
        let t = Metrics::new().encode();
        for name in ALWAYS {
            assert!(has_type(&t, name), "{name} missing:\n{t}");
        }
        assert_eq!(
            line(&t, "mrp_refresh_total{outcome=\"grace_replay\"}"),
            Some("mrp_refresh_total{outcome=\"grace_replay\"} 0")
        );
        assert!(
            line(
                &t,
                "mrp_sessions_purged_total{cause=\"upstream_revoked\"} 0"
            )
            .is_some()
        );
        assert!(line(&t, "mrp_redis_errors_total{op=\"rotate\"} 0").is_some());
        assert!(line(&t, "mrp_rate_limited_requests_total{route=\"refresh\"} 0").is_some());
    }

    #[test]
    fn recording() {
        let m = Metrics::new();
        m.request(&Route::Login, 200, Duration::from_millis(3));
        m.request(
            &Route::DeleteDevice("ABC".into()),
            401,
            Duration::from_millis(3),
        );
        m.refresh(RefreshOutcome::ReuseDetected);
        m.sessions_purged(PurgeCause::Reuse, 2);
        m.store_call(StoreOp::Ping, Duration::from_micros(300), false);
        m.rate_limited(&Route::Refresh);
        m.set_limiter_keys(42);
        m.upstream_failure(UpstreamCall::Whoami, UpstreamFailure::Timeout);
        {
            let _a = m.in_flight();
            let _b = m.in_flight();
            assert!(m.encode().contains("\nmrp_http_requests_in_flight 2\n"));
        }
        m.upstream_response(UpstreamCall::Route("login"), Duration::from_millis(5));
        let t = m.encode();
        for name in ALWAYS.iter().chain(&ON_USE) {
            assert!(has_type(&t, name), "{name} missing:\n{t}");
        }
        assert!(t.contains("\nmrp_http_requests_in_flight 0\n"));
        assert!(t.contains("mrp_http_requests_total{route=\"login\",status=\"200\"} 1"));
        // A path parameter never becomes a label: the device id is nowhere.
        assert!(t.contains("mrp_http_requests_total{route=\"devices\",status=\"401\"} 1"));
        assert!(!t.contains("ABC"));
        assert!(t.contains("mrp_refresh_total{outcome=\"reuse_detected\"} 1"));
        assert!(t.contains("mrp_sessions_purged_total{cause=\"reuse\"} 2"));
        assert!(t.contains("mrp_redis_errors_total{op=\"ping\"} 1"));
        assert!(t.contains("mrp_redis_command_duration_seconds_count{op=\"ping\"} 1"));
        assert!(t.contains("mrp_rate_limited_requests_total{route=\"refresh\"} 1"));
        assert!(t.contains("\nmrp_rate_limiter_keys 42\n"));
        assert!(t.contains("mrp_upstream_errors_total{route=\"whoami\",kind=\"timeout\"} 1"));
        assert!(
            t.contains("mrp_http_request_duration_seconds_bucket{le=\"0.005\",route=\"login\"} 1")
                || t.contains(
                    "mrp_http_request_duration_seconds_bucket{route=\"login\",le=\"0.005\"} 1"
                )
        );
    }
}
