//! Session lifecycle rules: issue, authenticate, rotate, revoke (DESIGN.md §2).
//!
//! Free of HTTP and Redis types: the rules talk to storage through [`TokenStore`] and read time
//! and randomness from injected sources, so they can be driven by tests.

pub mod escrow;
pub mod seal;
pub mod token;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;

pub use token::{ProxyToken, SessionId, TokenError, TokenKind};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// A source of wall-clock time (injected so tests can drive expiry).
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> Millis;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// How long tokens and sessions live (config `tokens:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// Lifetime of each access token, advertised as `expires_in_ms`.
    pub access: Duration,
    /// Idle lifetime of a refresh token; `None` = no idle limit.
    pub refresh_idle: Option<Duration>,
    /// Absolute cap on a session from its login; `None` = none.
    pub session: Option<Duration>,
    /// Revoke the whole session when a rotated refresh token is replayed after its grace
    /// (RFC 9700 §4.14.2).
    pub revoke_on_reuse: bool,
}

/// Records that outlive their token's expiry, so the proxy can still say *expired*
/// (soft logout, 403) rather than *unknown* (hard logout), and `/logout` with an expired access
/// token still reaches the homeserver.
const RETENTION_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// How long an access token superseded by a refresh is remembered after its own expiry.
pub const SUPERSEDED_ACCESS_RETENTION: Duration = Duration::from_secs(3600);
/// Garbage bound for sessions whose refresh tokens have no idle limit: a session unused this
/// long is dropped from Redis (every key has a TTL).
const UNLIMITED_IDLE_CAP: Duration = Duration::from_secs(365 * 24 * 3600);

/// Who a session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub user_id: String,
    pub device_id: String,
}

/// A token record to write: only its lookup id and sealed payload, never the token.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub id: String,
    pub sealed_upstream: Vec<u8>,
    /// When the token stops being accepted (ms); 0 = never.
    pub expires_at: Millis,
    /// How long Redis keeps the record.
    pub ttl: Duration,
}

#[derive(Clone, Debug)]
pub struct NewSession {
    pub sid: SessionId,
    pub info: SessionInfo,
    /// Absolute end of the session (ms); 0 = none.
    pub ends_at: Millis,
    pub access: NewToken,
    pub refresh: NewToken,
    pub ttl: Duration,
    /// The upstream token sealed under the server's key ([`escrow`]), when one is configured.
    pub upstream_escrow: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct Rotation {
    pub access: NewToken,
    pub refresh: NewToken,
    /// The successor pair sealed under the old refresh token, for grace replays.
    pub sealed_successor: Vec<u8>,
    pub ttl: Duration,
}

/// What the store knows of an access token.
#[derive(Clone, Debug)]
pub enum AccessRecord {
    /// No record: never issued, or long gone.
    Unknown,
    /// The record exists but its session was revoked.
    Revoked,
    /// Superseded by later tokens of a live session; only a marker is left (no upstream token):
    /// soft logout.
    Superseded,
    Found {
        sealed_upstream: Vec<u8>,
        expires_at: Millis,
        info: SessionInfo,
    },
}

/// What the store knows of a refresh token.
#[derive(Clone, Debug)]
pub enum RefreshRecord {
    Unknown,
    /// A refresh token whose grace ended was presented again. `revoked` is true when the store
    /// revoked the session because of it.
    Reused {
        info: SessionInfo,
        revoked: bool,
    },
    /// Idle expiry or session end passed.
    Expired,
    /// Unused: may be rotated.
    Live {
        sealed_upstream: Vec<u8>,
        info: SessionInfo,
        /// The session's absolute end (ms); 0 = none.
        ends_at: Millis,
    },
    /// Already rotated, still in grace: the sealed successor pair.
    Grace {
        sealed_successor: Vec<u8>,
        access_expires_at: Millis,
    },
}

/// Result of a rotation attempt.
#[derive(Clone, Debug)]
pub enum RotateResult {
    Committed,
    /// Something else happened first (a concurrent rotation, a revocation, expiry).
    Lost(RefreshRecord),
}

/// A store failure: the proxy answers 503 and changes nothing.
#[derive(Debug, thiserror::Error)]
#[error("session store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where sessions live. Every method is one atomic step in the store.
pub trait TokenStore: Send + Sync + 'static {
    fn create(
        &self,
        s: &NewSession,
        now: Millis,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Looks up an access token; its first use while valid ends its predecessor's grace.
    fn lookup_access(
        &self,
        sid: SessionId,
        id: &str,
        now: Millis,
    ) -> impl Future<Output = Result<AccessRecord, StoreError>> + Send;
    fn peek_refresh(
        &self,
        sid: SessionId,
        id: &str,
        now: Millis,
        revoke_on_reuse: bool,
    ) -> impl Future<Output = Result<RefreshRecord, StoreError>> + Send;
    fn rotate(
        &self,
        sid: SessionId,
        old_id: &str,
        r: &Rotation,
        now: Millis,
    ) -> impl Future<Output = Result<RotateResult, StoreError>> + Send;
    /// Deletes every key of a session; returns its owner if it existed.
    fn purge(
        &self,
        sid: SessionId,
    ) -> impl Future<Output = Result<Option<SessionInfo>, StoreError>> + Send;
    /// The sessions of a user, with their device ids.
    fn user_sessions(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Vec<(SessionId, String)>, StoreError>> + Send;
    /// Keeps a user's index alive at least `ttl` (called on mint and rotation).
    fn index_session(
        &self,
        info: &SessionInfo,
        sid: SessionId,
        ttl: Duration,
        now: Millis,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn unindex_session(
        &self,
        user_id: &str,
        sid: SessionId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Liveness check for readiness probes.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A freshly issued access/refresh pair, for the client.
#[derive(Clone, Debug)]
pub struct IssuedPair {
    pub access: ProxyToken,
    pub refresh: ProxyToken,
    pub expires_in_ms: u64,
}

/// Outcome of presenting an access token.
#[derive(Debug)]
pub enum Authenticated {
    Valid(SessionAuth),
    /// Expired but its session lives: soft logout. The upstream token is still given so that
    /// `/logout` with an expired token can be forwarded.
    Expired(SessionAuth),
    /// Superseded by later tokens of a live session and no longer held in full: soft logout
    /// (also on `/logout`: the client refreshes, then logs out with its current token).
    Superseded,
    /// Revoked, never issued, or unreadable: hard logout.
    Rejected,
}

/// A session identified by an access token.
pub struct SessionAuth {
    pub sid: SessionId,
    pub info: SessionInfo,
    pub upstream_token: String,
}

impl std::fmt::Debug for SessionAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionAuth")
            .field("user_id", &self.info.user_id)
            .field("device_id", &self.info.device_id)
            .finish_non_exhaustive()
    }
}

/// Outcome of `/refresh`.
#[derive(Debug)]
pub enum Refreshed {
    /// A new pair, or the identical pair again inside the grace window.
    Issued {
        pair: IssuedPair,
        replay: bool,
        /// Whose session it is, when known (a rotation knows it; a grace replay does not): for
        /// logs only.
        owner: Option<SessionInfo>,
    },
    Unknown,
    /// Replay after grace (RFC 9700 reuse detection).
    Reused {
        info: SessionInfo,
        revoked: bool,
    },
    Expired,
}

/// The session rules over a store.
pub struct Sessions<S> {
    store: S,
    /// Swapped whole on a configuration reload (SIGHUP); sessions already issued keep the
    /// expiries they were given.
    lifetimes: std::sync::RwLock<Lifetimes>,
    clock: Arc<dyn Clock>,
    rng: Mutex<Box<dyn RngCore + Send>>,
    /// `admin.upstream_key_file`: new sessions also keep an [`escrow`] copy of the upstream token.
    escrow: Option<Arc<escrow::EscrowKeys>>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn aad(what: &str, id: &str) -> Vec<u8> {
    format!("mrp/v1/{what}/{id}").into_bytes()
}

impl<S: TokenStore> Sessions<S> {
    pub fn new(
        store: S,
        lifetimes: Lifetimes,
        clock: Arc<dyn Clock>,
        rng: Box<dyn RngCore + Send>,
    ) -> Self {
        Sessions {
            store,
            lifetimes: std::sync::RwLock::new(lifetimes),
            clock,
            rng: Mutex::new(rng),
            escrow: None,
        }
    }

    /// Seals each new session's upstream token under `keys` too (operator upstream logout).
    pub fn with_escrow(mut self, keys: Option<Arc<escrow::EscrowKeys>>) -> Self {
        self.escrow = keys;
        self
    }

    /// The keys that open [`NewSession::upstream_escrow`] values, when configured.
    pub fn escrow(&self) -> Option<&escrow::EscrowKeys> {
        self.escrow.as_deref()
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn lifetimes(&self) -> Lifetimes {
        *self.lifetimes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies new lifetimes to tokens issued from now on.
    pub fn set_lifetimes(&self, l: Lifetimes) {
        *self.lifetimes.write().unwrap_or_else(|p| p.into_inner()) = l;
    }

    fn with_rng<T>(&self, f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
        let mut g = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(g.as_mut())
    }

    /// Builds a new pair for `sid` protecting `upstream`, and the records to store.
    fn new_pair(
        &self,
        sid: SessionId,
        upstream: &str,
        now: Millis,
        ends_at: Millis,
    ) -> (IssuedPair, NewToken, NewToken, Duration) {
        let (at, rt, sealed_at, sealed_rt) = self.with_rng(|rng| {
            let at = ProxyToken::generate(TokenKind::Access, sid, rng);
            let rt = ProxyToken::generate(TokenKind::Refresh, sid, rng);
            let sa = seal::seal(
                &at.sealing_key(),
                &aad("ut", &at.lookup_id()),
                upstream.as_bytes(),
                rng,
            );
            let sr = seal::seal(
                &rt.sealing_key(),
                &aad("ut", &rt.lookup_id()),
                upstream.as_bytes(),
                rng,
            );
            (at, rt, sa, sr)
        });
        let cap = |t: Millis| if ends_at > 0 { t.min(ends_at) } else { t };
        let lifetimes = self.lifetimes();
        let at_exp = cap(now + ms(lifetimes.access));
        let rt_exp = match lifetimes.refresh_idle {
            Some(d) => cap(now + ms(d)),
            None => ends_at,
        };
        // Keep records until the refresh token could no longer be used, plus a retention so that
        // late callers learn "expired" rather than "unknown".
        let live_until = if rt_exp > 0 {
            rt_exp
        } else {
            now + ms(UNLIMITED_IDLE_CAP)
        };
        let ttl = Duration::from_millis(live_until.max(at_exp).saturating_sub(now))
            + RETENTION_AFTER_EXPIRY;
        let pair = IssuedPair {
            expires_in_ms: at_exp.saturating_sub(now),
            access: at.clone(),
            refresh: rt.clone(),
        };
        let access = NewToken {
            id: at.lookup_id(),
            sealed_upstream: sealed_at,
            expires_at: at_exp,
            ttl,
        };
        let refresh = NewToken {
            id: rt.lookup_id(),
            sealed_upstream: sealed_rt,
            expires_at: rt_exp,
            ttl,
        };
        (pair, access, refresh, ttl)
    }

    /// Issues the first pair of a new session for an upstream token (login/register).
    pub async fn mint(&self, upstream: &str, info: SessionInfo) -> Result<IssuedPair, StoreError> {
        let now = self.clock.now_ms();
        let sid = self.with_rng(|rng| SessionId::generate(rng));
        let ends_at = self.lifetimes().session.map(|d| now + ms(d)).unwrap_or(0);
        let (pair, access, refresh, ttl) = self.new_pair(sid, upstream, now, ends_at);
        let upstream_escrow = self.escrow.as_ref().map(|k| k.seal(sid, upstream));
        // Index first: an index entry without a session is harmless, a session missing from the
        // index would survive /logout/all.
        self.store.index_session(&info, sid, ttl, now).await?;
        let s = NewSession {
            sid,
            info,
            ends_at,
            access,
            refresh,
            ttl,
            upstream_escrow,
        };
        self.store.create(&s, now).await?;
        Ok(pair)
    }

    /// Checks an access token (already parsed as one).
    pub async fn authenticate(&self, at: &ProxyToken) -> Result<Authenticated, StoreError> {
        let now = self.clock.now_ms();
        let id = at.lookup_id();
        match self.store.lookup_access(at.session(), &id, now).await? {
            AccessRecord::Unknown | AccessRecord::Revoked => Ok(Authenticated::Rejected),
            AccessRecord::Superseded => Ok(Authenticated::Superseded),
            AccessRecord::Found {
                sealed_upstream,
                expires_at,
                info,
            } => {
                let Ok(ut) = seal::open(&at.sealing_key(), &aad("ut", &id), &sealed_upstream)
                else {
                    tracing::warn!(
                        "access token record failed to authenticate; treating as unknown"
                    );
                    return Ok(Authenticated::Rejected);
                };
                let Ok(upstream_token) = String::from_utf8(ut) else {
                    return Ok(Authenticated::Rejected);
                };
                let auth = SessionAuth {
                    sid: at.session(),
                    info,
                    upstream_token,
                };
                if now < expires_at {
                    Ok(Authenticated::Valid(auth))
                } else {
                    Ok(Authenticated::Expired(auth))
                }
            }
        }
    }

    /// `POST /refresh` (spec "Refreshing access tokens").
    pub async fn refresh(&self, rt_text: &str) -> Result<Refreshed, StoreError> {
        let ungated = |_| async { Ok::<(), std::convert::Infallible>(()) };
        match self.refresh_gated(rt_text, ungated).await? {
            Ok(r) => Ok(r),
            Err(never) => match never {},
        }
    }

    /// `POST /refresh`, with `gate` (the per-session rate limit) asked once the token is proven
    /// genuine, i.e. its sealed record opened with the key only the token carries, and before
    /// anything is written. A session id alone (in clear in every token) never reaches the gate,
    /// so no third party can spend the session's budget; a refused gate consumes nothing.
    pub async fn refresh_gated<E, F, Fut>(
        &self,
        rt_text: &str,
        gate: F,
    ) -> Result<Result<Refreshed, E>, StoreError>
    where
        F: FnOnce(SessionId) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let mut gate = Some(gate);
        let Ok(rt) = ProxyToken::parse_kind(rt_text, TokenKind::Refresh) else {
            return Ok(Ok(Refreshed::Unknown));
        };
        let now = self.clock.now_ms();
        let sid = rt.session();
        let id = rt.lookup_id();
        let mut record = self
            .store
            .peek_refresh(sid, &id, now, self.lifetimes().revoke_on_reuse)
            .await?;
        // Two rounds at most: a lost race turns the state into Grace (or a terminal state).
        for _ in 0..2 {
            match record {
                RefreshRecord::Unknown => return Ok(Ok(Refreshed::Unknown)),
                RefreshRecord::Expired => return Ok(Ok(Refreshed::Expired)),
                RefreshRecord::Reused { info, revoked } => {
                    if revoked {
                        self.store.unindex_session(&info.user_id, sid).await?;
                    }
                    return Ok(Ok(Refreshed::Reused { info, revoked }));
                }
                RefreshRecord::Grace {
                    sealed_successor,
                    access_expires_at,
                } => {
                    let replayed = self.replay(&rt, &id, &sealed_successor, access_expires_at, now);
                    // Only a token whose grace record opened is charged; a replay writes nothing.
                    if matches!(replayed, Refreshed::Issued { .. })
                        && let Some(g) = gate.take()
                        && let Err(e) = g(sid).await
                    {
                        return Ok(Err(e));
                    }
                    return Ok(Ok(replayed));
                }
                RefreshRecord::Live {
                    sealed_upstream,
                    info,
                    ends_at,
                } => {
                    let Some(ut) = seal::open(&rt.sealing_key(), &aad("ut", &id), &sealed_upstream)
                        .ok()
                        .and_then(|v| String::from_utf8(v).ok())
                    else {
                        tracing::warn!(
                            "refresh token record failed to authenticate; treating as unknown"
                        );
                        return Ok(Ok(Refreshed::Unknown));
                    };
                    // Genuine: charge the session's budget before anything is written.
                    if let Some(g) = gate.take()
                        && let Err(e) = g(sid).await
                    {
                        return Ok(Err(e));
                    }
                    // New tokens never outlive the session's absolute end (see `new_pair`).
                    let (pair, access, refresh, ttl) = self.new_pair(sid, &ut, now, ends_at);
                    let successor = format!("{}\n{}", pair.access.expose(), pair.refresh.expose());
                    let sealed_successor = self.with_rng(|rng| {
                        seal::seal(
                            &rt.sealing_key(),
                            &aad("next", &id),
                            successor.as_bytes(),
                            rng,
                        )
                    });
                    let rotation = Rotation {
                        access,
                        refresh,
                        sealed_successor,
                        ttl,
                    };
                    match self.store.rotate(sid, &id, &rotation, now).await? {
                        RotateResult::Committed => {
                            // Best effort: the index only needs to outlive the session.
                            if let Err(e) = self.store.index_session(&info, sid, ttl, now).await {
                                tracing::warn!(error = %e, "could not extend the user index TTL");
                            }
                            return Ok(Ok(Refreshed::Issued {
                                pair,
                                replay: false,
                                owner: Some(info),
                            }));
                        }
                        RotateResult::Lost(other) => record = other,
                    }
                }
            }
        }
        Ok(Ok(Refreshed::Unknown))
    }

    fn replay(
        &self,
        rt: &ProxyToken,
        id: &str,
        sealed: &[u8],
        access_expires_at: Millis,
        now: Millis,
    ) -> Refreshed {
        let opened = seal::open(&rt.sealing_key(), &aad("next", id), sealed)
            .ok()
            .and_then(|v| String::from_utf8(v).ok());
        let Some(text) = opened else {
            tracing::warn!("grace record failed to authenticate; treating as unknown");
            return Refreshed::Unknown;
        };
        let parsed = text.split_once('\n').and_then(|(a, r)| {
            Some((
                ProxyToken::parse_kind(a, TokenKind::Access).ok()?,
                ProxyToken::parse_kind(r, TokenKind::Refresh).ok()?,
            ))
        });
        let Some((access, refresh)) = parsed else {
            return Refreshed::Unknown;
        };
        Refreshed::Issued {
            pair: IssuedPair {
                access,
                refresh,
                // What is left, never more: clients schedule their refresh from it.
                expires_in_ms: access_expires_at.saturating_sub(now),
            },
            replay: true,
            owner: None,
        }
    }

    /// Revokes one session. Returns its owner if it existed.
    pub async fn revoke(&self, sid: SessionId) -> Result<Option<SessionInfo>, StoreError> {
        let info = self.store.purge(sid).await?;
        if let Some(i) = &info {
            self.store.unindex_session(&i.user_id, sid).await?;
        }
        Ok(info)
    }

    /// Revokes the sessions of `user_id` whose device matches `which`. Returns how many.
    pub async fn revoke_user(
        &self,
        user_id: &str,
        which: impl Fn(&str) -> bool,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for (sid, device) in self.store.user_sessions(user_id).await? {
            if which(&device) {
                if self.store.purge(sid).await?.is_some() {
                    n += 1;
                }
                self.store.unindex_session(user_id, sid).await?;
            }
        }
        Ok(n)
    }
}
