//! Rate limits (issue 4; DESIGN.md §2 "/refresh", §3): keyed GCRA limiters from `governor`,
//! optionally shared by several replicas through Redis, and their housekeeping.
//!
//! | limiter | key | applies to |
//! |---|---|---|
//! | `all` | client IP | every request (off by default) |
//! | `login` | client IP | `POST /login`, `POST /register` |
//! | `refresh_ip` | client IP | `POST /refresh` |
//! | `refresh_session` | session id of a refresh token shown genuine | `POST /refresh` |
//!
//! Keys are bounded identities only: a client IP (IPv6 by its /64, the smallest block an
//! end site is given, so one host cannot mint 2^64 identities) and a session id, never a token.
//! The session id is in clear in every token, so `refresh_session` is charged only once the store
//! has shown the presented token genuine (its sealed record opened), before anything is written
//! (`Sessions::refresh_gated`): a made-up or spent token naming a session cannot spend its budget.
//!
//! The local limiter is always asked first. With the Redis backend an allowed request is then
//! checked against the shared budget (`gcra.lua`). If Redis fails the request is allowed, a
//! warning is logged, and Redis is left alone for [`SHARED_BACKOFF`]: a rate limiter must not
//! turn a store outage into refused logins or logouts.

pub mod client_ip;

use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{LimitConfig, RateLimitBackend, RateLimitConfig};
use crate::session::{SessionId, StoreError};

/// How often idle limiter keys are dropped (a key is idle once its budget is full again).
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);
/// After a Redis failure, how long the shared check is skipped (local limits only).
pub const SHARED_BACKOFF: Duration = Duration::from_secs(5);

/// A request over its limit, and how long until one more would be allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl Limited {
    /// Whole milliseconds, rounded up and at least 1 (a 0 would invite an immediate retry).
    pub fn retry_after_ms(&self) -> u64 {
        let ms = self.retry_after.as_nanos().div_ceil(1_000_000);
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }
}

/// A budget shared between replicas (implemented by the Redis store).
pub trait SharedLimiter: Send + Sync + 'static {
    /// One GCRA step on `key` with one request per `period` and `burst` at once: records the
    /// request when allowed, changes nothing when limited.
    fn acquire(
        &self,
        key: &str,
        period: Duration,
        burst: u32,
    ) -> impl Future<Output = Result<Result<(), Limited>, StoreError>> + Send;
}

type Local<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One keyed limiter.
struct Keyed<K: Hash + Eq + Clone, C: Clock> {
    name: &'static str,
    limit: LimitConfig,
    local: Local<K, C>,
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> Keyed<K, C> {
    fn new(name: &'static str, limit: Option<LimitConfig>, clock: &C) -> Option<Self> {
        let limit = limit?;
        let quota = Quota::with_period(limit.period)?.allow_burst(limit.burst);
        Some(Keyed {
            name,
            limit,
            local: RateLimiter::dashmap_with_clock(quota, clock.clone()),
        })
    }

    fn sweep(&self) {
        self.local.retain_recent();
        self.local.shrink_to_fit();
    }
}

/// The limiter key of a client address: IPv4 as is (IPv4-mapped IPv6 counts as IPv4), IPv6 by
/// its /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Every limiter of the proxy. `B` is the shared backend; `C` the clock (injected in tests).
pub struct RateLimits<B, C: Clock = DefaultClock> {
    clock: C,
    all: Option<Keyed<IpAddr, C>>,
    login: Option<Keyed<IpAddr, C>>,
    refresh_ip: Option<Keyed<IpAddr, C>>,
    refresh_session: Option<Keyed<SessionId, C>>,
    shared: Option<B>,
    /// Milliseconds since `epoch` before which the shared backend is not asked.
    shared_skip_until: AtomicU64,
    epoch: Instant,
}

impl<B: SharedLimiter> RateLimits<B> {
    /// The limiters `config` asks for; `shared` is used when the backend is `redis`.
    pub fn new(config: &RateLimitConfig, shared: B) -> Self {
        Self::with_clock(config, shared, DefaultClock::default())
    }
}

impl<B: SharedLimiter, C: Clock + Clone> RateLimits<B, C> {
    pub fn with_clock(config: &RateLimitConfig, shared: B, clock: C) -> Self {
        let on = |l: Option<LimitConfig>| l.filter(|_| config.enabled);
        RateLimits {
            all: Keyed::new("all", on(config.all), &clock),
            login: Keyed::new("login", on(config.login), &clock),
            refresh_ip: Keyed::new("refresh_ip", on(config.refresh), &clock),
            refresh_session: Keyed::new("refresh_session", on(config.refresh), &clock),
            shared: (config.enabled && config.backend == RateLimitBackend::Redis).then_some(shared),
            shared_skip_until: AtomicU64::new(0),
            epoch: Instant::now(),
            clock,
        }
    }

    /// Whether any limiter is on (else there is nothing to check or sweep).
    pub fn is_active(&self) -> bool {
        self.all.is_some()
            || self.login.is_some()
            || self.refresh_ip.is_some()
            || self.refresh_session.is_some()
    }

    /// Whether the `all` limit is configured (else most requests need no check at all).
    pub fn limits_every_request(&self) -> bool {
        self.all.is_some()
    }

    /// Every request, by client IP.
    pub async fn check_all(&self, client: IpAddr) -> Result<(), Limited> {
        let key = ip_key(client);
        self.check(self.all.as_ref(), &key, || key.to_string())
            .await
    }

    /// `POST /login` and `POST /register`, by client IP.
    pub async fn check_login(&self, client: IpAddr) -> Result<(), Limited> {
        let key = ip_key(client);
        self.check(self.login.as_ref(), &key, || key.to_string())
            .await
    }

    /// `POST /refresh`, by client IP (before the body is read).
    pub async fn check_refresh_ip(&self, client: IpAddr) -> Result<(), Limited> {
        let key = ip_key(client);
        self.check(self.refresh_ip.as_ref(), &key, || key.to_string())
            .await
    }

    /// `POST /refresh`, by the session of a refresh token shown genuine (before it is rotated).
    pub async fn check_refresh_session(&self, session: SessionId) -> Result<(), Limited> {
        self.check(self.refresh_session.as_ref(), &session, || session.tag())
            .await
    }

    async fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: Option<&Keyed<K, C>>,
        key: &K,
        shared_id: impl FnOnce() -> String,
    ) -> Result<(), Limited> {
        let Some(l) = limiter else {
            return Ok(());
        };
        if let Err(not_until) = l.local.check_key(key) {
            return Err(Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            });
        }
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let now = self.since_epoch_ms();
        if now < self.shared_skip_until.load(Ordering::Relaxed) {
            return Ok(());
        }
        // One key per limiter and identity, each its own hash tag (cluster slot).
        let key = format!("mrp:rl:{}:{{{}}}", l.name, shared_id());
        match shared
            .acquire(&key, l.limit.period, l.limit.burst.get())
            .await
        {
            Ok(decision) => decision,
            Err(e) => {
                let until = now + SHARED_BACKOFF.as_millis() as u64;
                // One warning per back-off window, however many requests fail open meanwhile.
                if self.shared_skip_until.swap(until, Ordering::Relaxed) <= now {
                    tracing::warn!(
                        error = %e,
                        limiter = l.name,
                        "shared rate limit unavailable: allowing requests on local limits only for {}s",
                        SHARED_BACKOFF.as_secs()
                    );
                }
                Ok(())
            }
        }
    }

    fn since_epoch_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Drops keys whose budget is full again and returns the memory: bounded state.
    pub fn sweep(&self) {
        if let Some(l) = &self.all {
            l.sweep();
        }
        if let Some(l) = &self.login {
            l.sweep();
        }
        if let Some(l) = &self.refresh_ip {
            l.sweep();
        }
        if let Some(l) = &self.refresh_session {
            l.sweep();
        }
    }

    /// The number of keys each limiter holds (0 when it is off), for a gauge.
    pub fn key_counts(&self) -> [(&'static str, usize); 4] {
        [
            ("all", self.all.as_ref().map_or(0, |l| l.local.len())),
            ("login", self.login.as_ref().map_or(0, |l| l.local.len())),
            (
                "refresh_ip",
                self.refresh_ip.as_ref().map_or(0, |l| l.local.len()),
            ),
            (
                "refresh_session",
                self.refresh_session.as_ref().map_or(0, |l| l.local.len()),
            ),
        ]
    }
}

/// Sweeps the limiters `current()` returns (they are swapped on reload) every `interval`,
/// forever (the caller aborts it when the server stops). The sweep walks every key, so it runs
/// on the blocking pool, off the request workers.
pub async fn housekeeping<B, C>(current: impl Fn() -> Arc<RateLimits<B, C>>, interval: Duration)
where
    B: SharedLimiter,
    C: Clock + Clone + Send + Sync + 'static,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let l = current();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || {
            let before: usize = l.key_counts().iter().map(|(_, n)| n).sum();
            l.sweep();
            (before, l.key_counts())
        })
        .await
        {
            Ok((before, counts)) => tracing::debug!(
                keys_before = before,
                ?counts,
                ms = started.elapsed().as_millis() as u64,
                "rate limit housekeeping"
            ),
            Err(e) => tracing::warn!(error = %e, "rate limit housekeeping failed"),
        }
    }
}

/// A task handle that aborts the task when dropped (stops housekeeping with the server).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// A shared backend that records its calls and answers as told.
    #[derive(Default)]
    struct FakeShared {
        calls: AtomicUsize,
        keys: Mutex<Vec<String>>,
        fail: bool,
        deny: bool,
    }

    impl SharedLimiter for Arc<FakeShared> {
        async fn acquire(
            &self,
            key: &str,
            _period: Duration,
            _burst: u32,
        ) -> Result<Result<(), Limited>, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.keys.lock().unwrap().push(key.to_owned());
            if self.fail {
                Err(StoreError("down".into()))
            } else if self.deny {
                Ok(Err(Limited {
                    retry_after: Duration::from_millis(1500),
                }))
            } else {
                Ok(Ok(()))
            }
        }
    }

    fn limit(per_second: f64, burst: u32) -> Option<LimitConfig> {
        Some(LimitConfig {
            per_second,
            burst: NonZeroU32::new(burst).unwrap(),
            period: Duration::from_secs_f64(1.0 / per_second),
        })
    }

    fn config() -> RateLimitConfig {
        RateLimitConfig {
            enabled: true,
            login: limit(0.5, 3),
            refresh: limit(1.0, 2),
            all: None,
            backend: RateLimitBackend::Local,
        }
    }

    fn limits(
        c: &RateLimitConfig,
        shared: Arc<FakeShared>,
    ) -> (
        RateLimits<Arc<FakeShared>, FakeRelativeClock>,
        FakeRelativeClock,
    ) {
        let clock = FakeRelativeClock::default();
        (RateLimits::with_clock(c, shared, clock.clone()), clock)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sid(seed: u8) -> SessionId {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed.into());
        SessionId::generate(&mut rng)
    }

    #[tokio::test]
    async fn burst_then_limited_then_replenished() {
        let (l, clock) = limits(&config(), Arc::default());
        let a = ip("203.0.113.1");
        for _ in 0..3 {
            assert_eq!(l.check_login(a).await, Ok(()));
        }
        let e = l.check_login(a).await.unwrap_err();
        // One request back every 2 s.
        assert_eq!(e.retry_after, Duration::from_secs(2));
        assert_eq!(e.retry_after_ms(), 2000);
        // Another client is not affected.
        assert_eq!(l.check_login(ip("203.0.113.2")).await, Ok(()));
        clock.advance(Duration::from_millis(1999));
        assert_eq!(
            l.check_login(a).await.unwrap_err().retry_after,
            Duration::from_millis(1)
        );
        clock.advance(Duration::from_millis(1));
        assert_eq!(l.check_login(a).await, Ok(()));
        assert!(l.check_login(a).await.is_err());
    }

    #[tokio::test]
    async fn limiters_are_independent() {
        let (l, _) = limits(&config(), Arc::default());
        let a = ip("203.0.113.1");
        for _ in 0..3 {
            l.check_login(a).await.unwrap();
        }
        assert!(l.check_login(a).await.is_err());
        // The refresh budget of the same IP is untouched, and sessions have their own.
        l.check_refresh_ip(a).await.unwrap();
        l.check_refresh_ip(a).await.unwrap();
        assert!(l.check_refresh_ip(a).await.is_err());
        let s = sid(1);
        l.check_refresh_session(s).await.unwrap();
        l.check_refresh_session(s).await.unwrap();
        assert!(l.check_refresh_session(s).await.is_err());
        l.check_refresh_session(sid(2)).await.unwrap();
        // `all` is off by default.
        for _ in 0..100 {
            l.check_all(a).await.unwrap();
        }
    }

    #[tokio::test]
    async fn ipv6_is_keyed_by_its_64_and_mapped_v4_as_v4() {
        let (l, _) = limits(&config(), Arc::default());
        for i in 0..3 {
            l.check_login(ip(&format!("2001:db8:1:2::{i:x}")))
                .await
                .unwrap();
        }
        assert!(l.check_login(ip("2001:db8:1:2:ffff::1")).await.is_err());
        l.check_login(ip("2001:db8:1:3::1")).await.unwrap();
        for _ in 0..3 {
            l.check_login(ip("::ffff:192.0.2.1")).await.unwrap();
        }
        assert!(l.check_login(ip("192.0.2.1")).await.is_err());
        assert_eq!(ip_key(ip("2001:db8::1:2:3:4")), ip("2001:db8::"));
        assert_eq!(ip_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[tokio::test]
    async fn disabled_limits_nothing() {
        let c = RateLimitConfig {
            enabled: false,
            all: limit(1.0, 1),
            backend: RateLimitBackend::Redis,
            ..config()
        };
        let shared = Arc::new(FakeShared {
            deny: true,
            ..Default::default()
        });
        let (l, _) = limits(&c, shared.clone());
        assert!(!l.is_active());
        let a = ip("203.0.113.1");
        for _ in 0..50 {
            l.check_all(a).await.unwrap();
            l.check_login(a).await.unwrap();
            l.check_refresh_ip(a).await.unwrap();
            l.check_refresh_session(sid(1)).await.unwrap();
        }
        assert_eq!(shared.calls.load(Ordering::SeqCst), 0);
        assert_eq!(l.key_counts().iter().map(|c| c.1).sum::<usize>(), 0);
    }

    #[tokio::test]
    async fn null_limit_is_off() {
        let c = RateLimitConfig {
            login: None,
            ..config()
        };
        let (l, _) = limits(&c, Arc::default());
        for _ in 0..50 {
            l.check_login(ip("203.0.113.1")).await.unwrap();
        }
        assert!(l.is_active());
    }

    #[tokio::test]
    async fn shared_backend_is_asked_after_local_and_can_deny() {
        let c = RateLimitConfig {
            backend: RateLimitBackend::Redis,
            ..config()
        };
        let shared = Arc::new(FakeShared {
            deny: true,
            ..Default::default()
        });
        let (l, _) = limits(&c, shared.clone());
        let e = l.check_login(ip("203.0.113.1")).await.unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(1500));
        let e = l.check_refresh_session(sid(3)).await.unwrap_err();
        assert_eq!(e.retry_after_ms(), 1500);
        let keys = shared.keys.lock().unwrap().clone();
        assert_eq!(keys[0], "mrp:rl:login:{203.0.113.1}");
        assert_eq!(
            keys[1],
            format!("mrp:rl:refresh_session:{{{}}}", sid(3).tag())
        );

        // Local first: once the local budget is spent, the shared one is not asked.
        let shared = Arc::new(FakeShared::default());
        let (l, _) = limits(&c, shared.clone());
        for _ in 0..3 {
            l.check_login(ip("203.0.113.1")).await.unwrap();
        }
        assert!(l.check_login(ip("203.0.113.1")).await.is_err());
        assert_eq!(shared.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn shared_failure_fails_open_and_backs_off() {
        let c = RateLimitConfig {
            backend: RateLimitBackend::Redis,
            login: limit(0.5, 100),
            ..config()
        };
        let shared = Arc::new(FakeShared {
            fail: true,
            ..Default::default()
        });
        let (l, _) = limits(&c, shared.clone());
        for i in 0..20 {
            assert_eq!(l.check_login(ip(&format!("203.0.113.{i}"))).await, Ok(()));
        }
        // Asked once, then left alone for the back-off window.
        assert_eq!(shared.calls.load(Ordering::SeqCst), 1);
        // Local limits still hold meanwhile.
        let c = RateLimitConfig {
            backend: RateLimitBackend::Redis,
            ..config()
        };
        let (l, _) = limits(&c, shared.clone());
        for _ in 0..3 {
            l.check_login(ip("203.0.113.1")).await.unwrap();
        }
        assert!(l.check_login(ip("203.0.113.1")).await.is_err());
    }

    #[tokio::test]
    async fn sweep_drops_idle_keys_and_counts_them() {
        let c = RateLimitConfig {
            all: limit(10.0, 10),
            ..config()
        };
        let (l, clock) = limits(&c, Arc::default());
        for i in 0..1000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.check_all(a).await.unwrap();
            l.check_login(a).await.unwrap();
        }
        l.check_refresh_session(sid(1)).await.unwrap();
        let counts = l.key_counts();
        assert_eq!(
            counts,
            [
                ("all", 1000),
                ("login", 1000),
                ("refresh_ip", 0),
                ("refresh_session", 1)
            ]
        );
        // Nothing is idle yet: a key is dropped only once its budget is full again.
        l.sweep();
        assert_eq!(l.key_counts(), counts);
        clock.advance(Duration::from_secs(3));
        l.sweep();
        // `all` (10/s) and the session (1/s) are full again; login (one per 2 s) is not.
        assert_eq!(
            l.key_counts(),
            [
                ("all", 0),
                ("login", 1000),
                ("refresh_ip", 0),
                ("refresh_session", 0)
            ]
        );
        clock.advance(Duration::from_secs(2));
        l.sweep();
        assert_eq!(l.key_counts().iter().map(|c| c.1).sum::<usize>(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn housekeeping_task_sweeps_on_its_interval() {
        let (l, clock) = limits(&config(), Arc::default());
        let l = Arc::new(l);
        l.check_login(ip("203.0.113.1")).await.unwrap();
        let current = l.clone();
        let task = AbortOnDrop(tokio::spawn(housekeeping(
            move || current.clone(),
            Duration::from_secs(30),
        )));
        clock.advance(Duration::from_secs(60));
        assert_eq!(l.key_counts()[1], ("login", 1));
        // Wait (in paused tokio time) for one tick; the sweep runs on the blocking pool.
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if l.key_counts()[1].1 == 0 {
                break;
            }
        }
        assert_eq!(l.key_counts()[1], ("login", 0));
        drop(task);
    }

    #[test]
    fn retry_after_rounds_up() {
        let ms = |d: Duration| Limited { retry_after: d }.retry_after_ms();
        assert_eq!(ms(Duration::from_nanos(1)), 1);
        assert_eq!(ms(Duration::ZERO), 1);
        assert_eq!(ms(Duration::from_micros(1001)), 2);
        assert_eq!(ms(Duration::from_secs(2)), 2000);
    }
}
