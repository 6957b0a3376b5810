//! The in-process cache of access-token lookups (issue 11; README "Token cache").
//!
//! [`Cached`] wraps the store: a valid access token found in Redis is kept here per session, so
//! the next request with it costs no Redis round trip. What makes that safe:
//!
//! - **Never past the token's expiry on Redis's clock.** An entry is trusted until
//!   `sent + (expires_at - store_now)` on this process's monotonic clock, where `sent` is when
//!   the lookup left and `store_now` the store's clock reading in its reply: whatever the store's
//!   clock read, it read it after `sent`, so the entry ends no later than the token does there.
//!   (`max_ttl` caps it too.)
//! - **Never past a revocation by more than `liveness_timeout`.** Every purge publishes the
//!   session on the invalidation channel ([`super::invalidation`]); each replica also publishes
//!   heartbeats to itself through its data connection. A hit is served only while the newest own
//!   heartbeat received was *sent* less than `liveness_timeout` ago: Redis delivers a
//!   subscriber's messages in order, so every revocation committed before that heartbeat was
//!   sent has been applied.
//! - **Lost channel, no cache.** A closed subscriber connection or heartbeat silence flushes
//!   everything and bypasses the cache until a heartbeat sent after the flush comes back.
//! - **No stale insert.** A lookup reply that was in flight while an invalidation of its session
//!   (or a flush) was applied is not kept: each lookup notes the cache epoch and its session's
//!   stripe generation before it is sent, and the entry is dropped if either moved.
//! - **Nothing more secret than Redis holds.** An entry keeps the *sealed* upstream token (opened
//!   with the presented token's key on every hit, as for a Redis answer), the token's lookup id
//!   (a hash), user, device and expiry. No token text is kept, and nothing here is logged.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock: the system monotonic clock, which tests can pause and advance.
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::session::{
    AccessRecord, Issued, Millis, NewSession, RefreshRecord, RotateResult, Rotation, SessionId,
    SessionInfo, StoreError, TokenStore,
};
use crate::telemetry::metrics::{CacheFlush, CacheMetrics};

/// Map bookkeeping counted per entry besides its own allocation: the key, the `Arc` pointer,
/// quick_cache's slot (hash, links, state) and its hash-table slot, rounded up
/// (`entry_bytes_cover_the_map` checks it against quick_cache's own count).
const SLOT_OVERHEAD: u64 = 96;
/// `Arc`'s two counters.
const ARC_HEADER: u64 = 16;
/// Stripes of per-session generations (a power of two): an invalidation bumps its session's
/// stripe, and a lookup reply whose stripe moved while in flight is not kept. Sessions sharing
/// a stripe only cost each other a cache miss.
const STRIPES: usize = 4096;

/// One cached access token: what forwarding needs, nothing more.
pub struct Entry {
    lookup_id: Box<str>,
    sealed_upstream: Box<[u8]>,
    expires_at: Millis,
    info: SessionInfo,
    /// The lookup's send time and the store's clock in its reply: the store's clock now is at
    /// most `anchor_ms + (now - anchor)`.
    anchor: Instant,
    anchor_ms: Millis,
    /// The clock offset the lookup was made with (0 in production; tests move it).
    offset: i64,
    valid_until: Instant,
    bytes: u64,
    /// The cache's byte count, decremented when the last reference goes.
    counter: Arc<AtomicU64>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, SeqCst);
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("user_id", &self.info.user_id)
            .field("device_id", &self.info.device_id)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The store's clock now, read the way that makes tokens expire soonest.
    pub fn store_now(&self, now: Instant) -> Millis {
        self.anchor_ms + now.saturating_duration_since(self.anchor).as_millis() as u64
    }

    /// The record as the store would return it now: valid, with the store's clock read the
    /// way that makes the token expire soonest.
    pub fn record(&self, now: Instant) -> AccessRecord {
        AccessRecord::Found {
            sealed_upstream: self.sealed_upstream.to_vec(),
            valid: true,
            expires_at: self.expires_at,
            now: self.store_now(now),
            info: self.info.clone(),
        }
    }

    fn size(lookup_id: &str, sealed: &[u8], info: &SessionInfo) -> u64 {
        (std::mem::size_of::<Entry>()
            + lookup_id.len()
            + sealed.len()
            + info.user_id.capacity()
            + info.device_id.capacity()) as u64
            + ARC_HEADER
            + SLOT_OVERHEAD
    }
}

/// Weighs entries so that both bounds hold: each weighs at least `max_bytes / max_entries`, so
/// a full cache has at most `max_entries` entries and at most `max_bytes` bytes.
#[derive(Clone)]
struct Weigh {
    min: u64,
}

impl Weigh {
    /// Rounded up: rounded down, the defaults (48 MiB, 100k entries) gave 503 bytes and room for
    /// 100,062 entries, and `bench.sh`'s flood counted 100,060 (issue 11).
    fn new(config: &CacheConfig) -> Self {
        Weigh {
            min: config.max_bytes.div_ceil(config.max_entries.max(1)).max(1),
        }
    }
}

impl quick_cache::Weighter<SessionId, Arc<Entry>> for Weigh {
    fn weight(&self, _: &SessionId, e: &Arc<Entry>) -> u64 {
        e.bytes.max(self.min)
    }
}

/// A store answer for a valid access token, as [`TokenCache::admit`] keeps it.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    pub sealed_upstream: &'a [u8],
    /// The token's expiry on the store's clock (ms).
    pub expires_at: Millis,
    pub info: &'a SessionInfo,
    /// The store's clock when it answered (ms).
    pub store_now: Millis,
    /// The clock offset the lookup was made with.
    pub offset: i64,
}

/// What [`TokenCache::probe`] found.
#[derive(Debug)]
pub enum Probe {
    /// Held, and the time it was found valid at.
    Hit(Arc<Entry>, Instant),
    /// Not held: ask the store, then hand the ticket to [`TokenCache::admit`].
    Miss(Ticket),
    /// The cache is off-line: ask the store, keep nothing.
    Bypass,
}

/// The cache's state when a lookup was sent.
#[derive(Debug)]
pub struct Ticket {
    state: u64,
    stripe: usize,
    generation: u64,
    sent: Instant,
}

/// The cache itself: bounded, flushed whole when its invalidation channel is in doubt.
pub struct TokenCache {
    map: quick_cache::sync::Cache<SessionId, Arc<Entry>, Weigh>,
    /// `epoch << 1 | serving`: every flush and every return to service moves the epoch.
    state: AtomicU64,
    base: Instant,
    /// Send time (ns since `base`) of the newest own heartbeat received.
    heard_ns: AtomicU64,
    /// Time of the last flush: heartbeats sent before it cannot bring the cache back.
    flushed_ns: AtomicU64,
    stripes: Box<[AtomicU64]>,
    liveness_ns: u64,
    max_ttl: Duration,
    bytes: Arc<AtomicU64>,
    /// Serialises flushes and returns to service (rare; never on the request path).
    transition: Mutex<()>,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// An empty cache, off-line until its first heartbeat is heard.
    pub fn new(config: &CacheConfig, metrics: CacheMetrics) -> Self {
        let map = quick_cache::sync::Cache::with_weighter(
            config.max_entries.min(1 << 20) as usize,
            config.max_bytes,
            Weigh::new(config),
        );
        metrics.enabled.set(0);
        TokenCache {
            map,
            state: AtomicU64::new(0),
            base: Instant::now(),
            heard_ns: AtomicU64::new(0),
            flushed_ns: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            liveness_ns: config.liveness_timeout.as_nanos() as u64,
            max_ttl: config.max_ttl,
            bytes: Arc::new(AtomicU64::new(0)),
            transition: Mutex::new(()),
            metrics,
        }
    }

    /// This process's monotonic clock, in ns since the cache was made (heartbeat payloads).
    pub fn now_ns(&self) -> u64 {
        self.ns(Instant::now())
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn stripe(sid: &SessionId) -> usize {
        // The session id is random: its first bytes spread well.
        let b = sid.as_bytes();
        (u16::from_le_bytes([b[0], b[1]]) as usize) & (STRIPES - 1)
    }

    /// Whether hits may be served at `now`: in service, and an own heartbeat sent within
    /// `liveness_timeout` has come back.
    fn live(&self, state: u64, now: Instant) -> bool {
        state & 1 == 1 && self.ns(now).saturating_sub(self.heard_ns.load(SeqCst)) < self.liveness_ns
    }

    /// Looks `id` (an access token's lookup id) of session `sid` up, for a lookup made with
    /// clock offset `offset` (an entry made with another offset is not used).
    pub fn probe(&self, sid: SessionId, id: &str, offset: i64) -> Probe {
        let now = Instant::now();
        let state = self.state.load(SeqCst);
        if !self.live(state, now) {
            self.metrics.bypasses.inc();
            return Probe::Bypass;
        }
        let stripe = Self::stripe(&sid);
        let generation = self.stripes[stripe].load(SeqCst);
        if let Some(e) = self.map.get(&sid) {
            if now < e.valid_until && *e.lookup_id == *id && e.offset == offset {
                self.metrics.hits.inc();
                return Probe::Hit(e, now);
            }
            if now >= e.valid_until {
                self.map.remove_if(&sid, |v| Arc::ptr_eq(v, &e));
            }
        }
        self.metrics.misses.inc();
        Probe::Miss(Ticket {
            state,
            stripe,
            generation,
            sent: now,
        })
    }

    /// Keeps the store's answer for access token `id` of `sid`, unless the cache moved since
    /// `t` was issued. Returns whether it was kept.
    pub fn admit(&self, t: Ticket, sid: SessionId, id: &str, a: Answer<'_>) -> bool {
        let Answer {
            sealed_upstream,
            expires_at,
            info,
            store_now,
            offset,
        } = a;
        if expires_at <= store_now {
            return false;
        }
        let life = Duration::from_millis(expires_at - store_now).min(self.max_ttl);
        let valid_until = t.sent + life;
        let unchanged = || {
            self.state.load(SeqCst) == t.state
                && self.stripes[t.stripe].load(SeqCst) == t.generation
                && self.live(t.state, Instant::now())
        };
        if Instant::now() >= valid_until {
            return false;
        }
        if !unchanged() {
            self.metrics.races.inc();
            return false;
        }
        let bytes = Entry::size(id, sealed_upstream, info);
        self.bytes.fetch_add(bytes, SeqCst);
        let entry = Arc::new(Entry {
            lookup_id: id.into(),
            sealed_upstream: sealed_upstream.into(),
            expires_at,
            info: info.clone(),
            anchor: t.sent,
            anchor_ms: store_now,
            offset,
            valid_until,
            bytes,
            counter: self.bytes.clone(),
        });
        self.map.insert(sid, entry.clone());
        // Checked again after the insert: an invalidation or flush that ran between the check
        // above and the insert moved the state first and removes (or clears) after, so either
        // it removed this entry or this check sees it moved.
        if !unchanged() {
            self.map.remove_if(&sid, |v| Arc::ptr_eq(v, &entry));
            self.metrics.races.inc();
            return false;
        }
        true
    }

    /// Forgets a session (revoked here or on another replica).
    pub fn invalidate(&self, sid: SessionId) {
        self.stripes[Self::stripe(&sid)].fetch_add(1, SeqCst);
        self.map.remove(&sid);
        self.metrics.invalidations.inc();
    }

    /// Drops everything and bypasses the cache until a heartbeat sent after now is heard.
    pub fn flush(&self, why: CacheFlush) {
        let _g = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.state.load(SeqCst);
        self.flushed_ns.store(self.now_ns(), SeqCst);
        self.state.store(((state >> 1) + 1) << 1, SeqCst);
        self.map.clear();
        self.metrics.enabled.set(0);
        if state & 1 == 1 {
            self.metrics.flushed(why);
            tracing::warn!(
                reason = why.as_str(),
                "token cache flushed; bypassed until its invalidation channel is back"
            );
        }
    }

    /// An own heartbeat, sent at `sent_ns` ([`Self::now_ns`]), came back through the
    /// invalidation subscriber: every revocation committed before it has been applied.
    pub fn heard(&self, sent_ns: u64) {
        self.heard_ns.fetch_max(sent_ns, SeqCst);
        if self.state.load(SeqCst) & 1 == 1 || sent_ns <= self.flushed_ns.load(SeqCst) {
            return;
        }
        let _g = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.state.load(SeqCst);
        if state & 1 == 0 && sent_ns > self.flushed_ns.load(SeqCst) {
            // A new epoch: lookups sent before this moment (while revocations could be lost)
            // are not kept.
            self.state.store((((state >> 1) + 1) << 1) | 1, SeqCst);
            self.metrics.enabled.set(1);
            tracing::info!("token cache in service");
        }
    }

    /// Flushes if the heartbeats went silent (called on every heartbeat tick).
    pub fn check_liveness(&self) {
        let state = self.state.load(SeqCst);
        if state & 1 == 1 && !self.live(state, Instant::now()) {
            self.flush(CacheFlush::Liveness);
        }
    }

    /// Whether hits are being served.
    #[cfg(test)]
    pub fn serving(&self) -> bool {
        self.live(self.state.load(SeqCst), Instant::now())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held by live entries (including ones a request still holds after eviction).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(SeqCst)
    }

    /// quick_cache's own count of its structures (not the entries' heap data).
    #[cfg(test)]
    pub fn map_bytes(&self) -> usize {
        self.map.memory_used().total()
    }

    /// Updates the entry and byte gauges.
    pub fn sample_gauges(&self) {
        self.metrics.entries.set(self.map.len() as i64);
        self.metrics.bytes.set(self.bytes() as i64);
    }
}

/// A [`TokenStore`] with access-token lookups served from a [`TokenCache`] when it holds them.
/// Without a cache (`cache.enabled: false`) every call goes to the inner store.
pub struct Cached<S> {
    inner: S,
    cache: Option<Arc<TokenCache>>,
}

impl<S> Cached<S> {
    pub fn new(inner: S, cache: Option<Arc<TokenCache>>) -> Self {
        Cached { inner, cache }
    }

    pub fn cache(&self) -> Option<&Arc<TokenCache>> {
        self.cache.as_ref()
    }

    fn forget(&self, sid: SessionId) {
        if let Some(c) = &self.cache {
            c.invalidate(sid);
        }
    }
}

impl<S: TokenStore> TokenStore for Cached<S> {
    async fn create(&self, s: &NewSession, offset: i64) -> Result<Issued, StoreError> {
        self.inner.create(s, offset).await
    }

    async fn lookup_access(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
    ) -> Result<AccessRecord, StoreError> {
        // The store's future is boxed on these (rarer) paths: inline, its room (about 1 KB)
        // made this future, and every future that awaits it up to the request's, that much
        // larger, moved on every request, cache hits included (issue 11).
        let Some(cache) = &self.cache else {
            return Box::pin(self.inner.lookup_access(sid, id, offset)).await;
        };
        let ticket = match cache.probe(sid, id, offset) {
            Probe::Hit(e, now) => return Ok(e.record(now)),
            Probe::Bypass => return Box::pin(self.inner.lookup_access(sid, id, offset)).await,
            Probe::Miss(t) => t,
        };
        let record = Box::pin(self.inner.lookup_access(sid, id, offset)).await?;
        if let AccessRecord::Found {
            sealed_upstream,
            valid: true,
            expires_at,
            now,
            info,
        } = &record
        {
            let answer = Answer {
                sealed_upstream,
                expires_at: *expires_at,
                info,
                store_now: *now,
                offset,
            };
            cache.admit(ticket, sid, id, answer);
        }
        Ok(record)
    }

    async fn peek_refresh(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
        revoke_on_reuse: bool,
    ) -> Result<RefreshRecord, StoreError> {
        let r = self
            .inner
            .peek_refresh(sid, id, offset, revoke_on_reuse)
            .await;
        // A failed call may have revoked all the same: forgetting is always safe.
        if matches!(r, Ok(RefreshRecord::Reused { revoked: true, .. }) | Err(_)) {
            self.forget(sid);
        }
        r
    }

    async fn rotate(
        &self,
        sid: SessionId,
        old_id: &str,
        r: &Rotation,
        offset: i64,
    ) -> Result<RotateResult, StoreError> {
        self.inner.rotate(sid, old_id, r, offset).await
    }

    async fn purge(&self, sid: SessionId) -> Result<Option<SessionInfo>, StoreError> {
        let r = self.inner.purge(sid).await;
        // Here at once; the other replicas hear it from the purge script.
        self.forget(sid);
        r
    }

    async fn user_sessions(&self, user_id: &str) -> Result<Vec<(SessionId, String)>, StoreError> {
        self.inner.user_sessions(user_id).await
    }

    async fn index_session(
        &self,
        info: &SessionInfo,
        sid: SessionId,
        ttl: Duration,
        offset: i64,
    ) -> Result<(), StoreError> {
        self.inner.index_session(info, sid, ttl, offset).await
    }

    async fn unindex_session(&self, user_id: &str, sid: SessionId) -> Result<(), StoreError> {
        self.inner.unindex_session(user_id, sid).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn config(max_entries: u64, max_bytes: u64) -> CacheConfig {
        CacheConfig {
            max_entries,
            max_bytes,
            ..CacheConfig::default()
        }
    }

    fn sid(n: u64) -> SessionId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&n.to_le_bytes());
        b[8..].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        SessionId::from_tag(&base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            b,
        ))
        .unwrap()
    }

    fn info() -> SessionInfo {
        SessionInfo {
            user_id: "@alice:example.org".to_owned(),
            device_id: "DEVICEID01".to_owned(),
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn in_service(c: &TokenCache) {
        c.heard(c.now_ns().max(1));
        assert!(c.serving());
    }

    /// Offers a valid answer for `sid` (60 s left); returns whether it was kept.
    fn offer(c: &TokenCache, sid: SessionId, info: &SessionInfo) -> bool {
        let Probe::Miss(t) = c.probe(sid, ID, 0) else {
            panic!("expected a miss");
        };
        c.admit(t, sid, ID, answer(info, 60_000))
    }

    fn answer(info: &SessionInfo, left_ms: u64) -> Answer<'_> {
        Answer {
            sealed_upstream: &[7u8; 60],
            expires_at: 1_000_000 + left_ms,
            info,
            store_now: 1_000_000,
            offset: 0,
        }
    }

    fn new(c: CacheConfig) -> (TokenCache, Arc<Metrics>) {
        let m = Arc::new(Metrics::new());
        (TokenCache::new(&c, m.cache.clone()), m)
    }

    #[tokio::test(start_paused = true)]
    async fn off_line_until_heard_then_hit() {
        let (c, m) = new(CacheConfig::default());
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Bypass));
        in_service(&c);
        let i = info();
        assert!(offer(&c, sid(1), &i));
        let Probe::Hit(e, _) = c.probe(sid(1), ID, 0) else {
            panic!("expected a hit");
        };
        // The store's clock as the cache reads it: the answer's, plus the time since it was sent.
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(matches!(
            e.record(Instant::now()),
            AccessRecord::Found {
                valid: true,
                expires_at: 1_060_000,
                now: 1_000_005,
                ..
            }
        ));
        // A lookup made with another clock offset (tests move Redis time) is not served.
        in_service(&c);
        assert!(matches!(c.probe(sid(1), ID, 1_000), Probe::Miss(_)));
        // Another token of the same session is a miss, not a hit.
        assert!(matches!(
            c.probe(sid(1), &ID.replace('0', "f"), 0),
            Probe::Miss(_)
        ));
        let text = m.encode();
        assert!(
            text.contains("mrp_token_cache_lookups_total{result=\"hit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mrp_token_cache_lookups_total{result=\"miss\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("mrp_token_cache_lookups_total{result=\"bypass\"} 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_past_expiry_nor_max_ttl() {
        let (c, _) = new(CacheConfig::default());
        in_service(&c);
        let i = info();
        // Expired on the store's clock: not kept.
        let Probe::Miss(t) = c.probe(sid(1), ID, 0) else {
            panic!()
        };
        assert!(!c.admit(t, sid(1), ID, answer(&i, 0)));
        // 500 ms left: a hit until 500 ms after the lookup was *sent*, however long it took.
        let Probe::Miss(t) = c.probe(sid(1), ID, 0) else {
            panic!()
        };
        tokio::time::advance(Duration::from_millis(30)).await;
        in_service(&c);
        assert!(c.admit(t, sid(1), ID, answer(&i, 500)));
        tokio::time::advance(Duration::from_millis(460)).await;
        in_service(&c);
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Hit(..)));
        tokio::time::advance(Duration::from_millis(10)).await;
        in_service(&c);
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Miss(_)));
        // A long-lived token is asked again after max_ttl (60 s).
        assert!(offer(&c, sid(2), &i));
        tokio::time::advance(Duration::from_secs(60)).await;
        in_service(&c);
        assert!(matches!(c.probe(sid(2), ID, 0), Probe::Miss(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidation_in_flight_wins() {
        let (c, m) = new(CacheConfig::default());
        in_service(&c);
        let i = info();
        // The reply was on its way when the session was revoked: not kept.
        let Probe::Miss(t) = c.probe(sid(1), ID, 0) else {
            panic!()
        };
        c.invalidate(sid(1));
        assert!(!c.admit(t, sid(1), ID, answer(&i, 60_000)));
        assert!(c.is_empty());
        // Held, then revoked: gone.
        assert!(offer(&c, sid(1), &i));
        c.invalidate(sid(1));
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Miss(_)));
        // A flush while in flight: not kept either, even once back in service.
        let Probe::Miss(t) = c.probe(sid(2), ID, 0) else {
            panic!()
        };
        c.flush(CacheFlush::Disconnect);
        tokio::time::advance(Duration::from_millis(1)).await;
        in_service(&c);
        assert!(!c.admit(t, sid(2), ID, answer(&i, 60_000)));
        assert!(m.encode().contains("mrp_token_cache_races_total 2"));
    }

    #[tokio::test(start_paused = true)]
    async fn flushed_and_bypassed_until_a_later_heartbeat() {
        let (c, m) = new(CacheConfig::default());
        in_service(&c);
        let i = info();
        let before = c.now_ns();
        assert!(offer(&c, sid(1), &i));
        tokio::time::advance(Duration::from_millis(1)).await;
        c.flush(CacheFlush::Disconnect);
        assert!(c.is_empty());
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Bypass));
        // A heartbeat sent before the flush proves nothing about what was lost.
        c.heard(before);
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Bypass));
        tokio::time::advance(Duration::from_millis(1)).await;
        in_service(&c);
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Miss(_)));
        // Heartbeats go silent: bypassed at once, flushed on the next check.
        assert!(offer(&c, sid(1), &i));
        tokio::time::advance(Duration::from_millis(80)).await;
        assert!(matches!(c.probe(sid(1), ID, 0), Probe::Bypass));
        c.check_liveness();
        assert!(c.is_empty());
        let text = m.encode();
        assert!(
            text.contains("mrp_token_cache_flushes_total{reason=\"disconnect\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mrp_token_cache_flushes_total{reason=\"liveness\"} 1"),
            "{text}"
        );
        assert!(text.contains("mrp_token_cache_enabled 0"), "{text}");
    }

    /// The memory bound: 100k distinct sessions beyond the bound leave the cache at its bound,
    /// in entries and in bytes.
    #[tokio::test(start_paused = true)]
    async fn bounded_in_entries_and_bytes() {
        let i = info();
        // Bound by entries.
        let (c, _) = new(config(1_000, 32 * 1024 * 1024));
        in_service(&c);
        for n in 0..101_000 {
            offer(&c, sid(n), &i);
            assert!(c.len() <= 1_000);
        }
        // quick_cache's S3-FIFO keeps its shards a little below their share of the bound.
        assert!(c.len() > 800, "{}", c.len());
        assert!(c.bytes() <= 32 * 1024 * 1024);
        // Bound by bytes: long user ids and upstream tokens.
        let (c, _) = new(config(1_000_000, 1024 * 1024));
        in_service(&c);
        let long = SessionInfo {
            user_id: format!("@{}:example.org", "u".repeat(200)),
            device_id: "D".repeat(100),
        };
        for n in 0..101_000 {
            offer(&c, sid(n), &long);
            assert!(c.bytes() <= 1024 * 1024, "{}", c.bytes());
        }
        let per_entry = c.bytes() / c.len() as u64;
        assert!(c.bytes() > 800 * 1024, "{}", c.bytes());
        assert!((600..1000).contains(&per_entry), "{per_entry}");
        c.flush(CacheFlush::Disconnect);
        assert_eq!(c.bytes(), 0);
    }

    /// The least weight of an entry leaves room for no more than `max_entries` entries, also
    /// when `max_bytes` is not a multiple of it (the defaults are not).
    #[test]
    fn least_weight_keeps_the_entry_bound() {
        let d = CacheConfig::default();
        for (entries, bytes) in [
            (d.max_entries, d.max_bytes),
            (1_000, 500_999),
            (3, 10),
            (100_000, 1),
            (7, 7),
        ] {
            let min = Weigh::new(&config(entries, bytes)).min;
            assert!(
                bytes / min <= entries,
                "{entries} entries, {bytes} bytes: least {min}"
            );
        }
        assert_eq!(Weigh::new(&config(d.max_entries, d.max_bytes)).min, 504);
    }

    /// The bytes counted per entry cover quick_cache's own structures (what `memory_used`
    /// reports) besides the entry's allocation.
    #[tokio::test(start_paused = true)]
    async fn entry_bytes_cover_the_map() {
        let (c, _) = new(config(100_000, 64 * 1024 * 1024));
        in_service(&c);
        let i = info();
        for n in 0..50_000 {
            offer(&c, sid(n), &i);
        }
        let per_entry = c.bytes() / c.len() as u64;
        let map_per_entry = c.map_bytes() as u64 / c.len() as u64;
        eprintln!("entry bytes {per_entry}, of which quick_cache's structures {map_per_entry}");
        assert!(map_per_entry <= SLOT_OVERHEAD, "{map_per_entry}");
    }
}
