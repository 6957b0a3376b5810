//! Session lifecycle rules: issue, authenticate, rotate, revoke (DESIGN.md §2).
//!
//! Free of HTTP and Redis types: the rules talk to storage through [`TokenStore`] and read
//! randomness and the clock offset from injected sources, so they can be driven by tests.
//!
//! # One clock
//! Every expiry is computed, and every expired / valid / grace decision made, by the store on its
//! own clock (Redis `TIME`, inside the scripts), from the lifetimes passed to it. The proxy's wall
//! clock decides nothing, so replicas whose clocks disagree still agree on every token. The only
//! time input from this side is [`Clock::offset_ms`], added to the store's clock: 0 in
//! production, moved by tests instead of sleeping.

pub mod escrow;
pub mod os_random;
pub mod seal;
pub mod token;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;

pub use token::{ProxyToken, SessionId, TokenKind};

/// Milliseconds since the Unix epoch, on the store's clock (Redis `TIME`).
pub type Millis = u64;

/// The expiry clock, as seen from the proxy: an offset to the store's clock (Redis `TIME`),
/// which alone computes and decides every expiry (see the module docs).
pub trait Clock: Send + Sync {
    /// Milliseconds added to Redis `TIME` in every expiry computation and decision; 0 in
    /// production.
    fn offset_ms(&self) -> i64;
}

/// Production: Redis `TIME` as it is.
#[derive(Debug, Default)]
pub struct RedisTime;

impl Clock for RedisTime {
    fn offset_ms(&self) -> i64 {
        0
    }
}

/// Test-only knob of the binary (never in config.yaml): the path of a file holding a whole
/// number of ms to add to Redis `TIME` for every expiry decision. Read at each decision, so a
/// black-box test moves the proxy's expiry clock forward by rewriting it instead of sleeping.
/// The proxy warns at start when it is set; unset (production), the offset is 0.
pub const TEST_CLOCK_FILE_ENV: &str = "MRP_TEST_CLOCK_FILE";

/// The offset read from a file (see [`TEST_CLOCK_FILE_ENV`]); 0 while unreadable.
#[derive(Debug)]
pub struct FileOffset(pub std::path::PathBuf);

impl Clock for FileOffset {
    fn offset_ms(&self) -> i64 {
        std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The clock of the binary: [`RedisTime`], or [`FileOffset`] when [`TEST_CLOCK_FILE_ENV`] is set.
pub fn clock_from_env() -> Arc<dyn Clock> {
    match std::env::var_os(TEST_CLOCK_FILE_ENV) {
        Some(path) if !path.is_empty() => {
            tracing::warn!(
                "{TEST_CLOCK_FILE_ENV} is set: token expiry is decided off Redis TIME by the offset in {} (for tests only)",
                std::path::Path::new(&path).display()
            );
            Arc::new(FileOffset(path.into()))
        }
        _ => Arc::new(RedisTime),
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
pub const RETENTION_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// How long an access token superseded by a refresh is remembered after its own expiry.
pub const SUPERSEDED_ACCESS_RETENTION: Duration = Duration::from_secs(3600);
/// Garbage bound for sessions whose refresh tokens have no idle limit: a session unused this
/// long is dropped from Redis (every key has a TTL).
pub const UNLIMITED_IDLE_CAP: Duration = Duration::from_secs(365 * 24 * 3600);

/// Who a session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub user_id: String,
    pub device_id: String,
}

/// A token record to write: only its lookup id and sealed payload, never the token. Its expiry
/// is computed by the store, on its clock, from the [`Lifetimes`] written with it.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub id: String,
    pub sealed_upstream: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct NewSession {
    pub sid: SessionId,
    pub info: SessionInfo,
    pub access: NewToken,
    pub refresh: NewToken,
    /// The session ends `lifetimes.session` after its creation (store clock).
    pub lifetimes: Lifetimes,
    /// The upstream token sealed under the server's key ([`escrow`]), when one is configured.
    pub upstream_escrow: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct Rotation {
    pub access: NewToken,
    pub refresh: NewToken,
    /// The successor pair sealed under the old refresh token, for grace replays.
    pub sealed_successor: Vec<u8>,
    /// Lifetimes of the new pair (capped by the session's end, which the store knows).
    pub lifetimes: Lifetimes,
}

/// What the store computed for a pair it wrote, on its clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The store's now (Redis `TIME` + offset).
    pub now: Millis,
    pub access_expires_at: Millis,
    /// Set when the write extended the session's keys: the user index must then live at least
    /// this long (the index must outlive the session, or `/logout/all` would miss it).
    pub index_ttl: Option<Duration>,
}

impl Issued {
    /// `expires_in_ms` for the client.
    pub fn expires_in_ms(&self) -> u64 {
        self.access_expires_at.saturating_sub(self.now)
    }
}

/// How long the records of a session created now are kept: [`RETENTION_AFTER_EXPIRY`] past
/// the last moment its refresh token could be used (`pair_times` in `store/lua/common.lua`, for
/// a session that starts now). Pure durations: for the user index, written before the session.
pub fn new_session_ttl(l: &Lifetimes) -> Duration {
    let capped = |d: Duration| match l.session {
        Some(s) => d.min(s),
        None => d,
    };
    let access = capped(l.access);
    let refresh = match l.refresh_idle {
        Some(d) => Some(capped(d)),
        None => l.session,
    };
    refresh.unwrap_or(UNLIMITED_IDLE_CAP).max(access) + RETENTION_AFTER_EXPIRY
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
        /// The store's decision on its clock: `now < expires_at`.
        valid: bool,
        expires_at: Millis,
        /// The store's now (Redis `TIME` + offset) when it decided (the token cache keeps
        /// entries on this clock).
        now: Millis,
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
    /// Unused and not ended (store clock): may be rotated.
    Live {
        sealed_upstream: Vec<u8>,
        info: SessionInfo,
    },
    /// Already rotated, still in grace: the sealed successor pair.
    Grace {
        sealed_successor: Vec<u8>,
        access_expires_at: Millis,
        /// The store's now, for `expires_in_ms`.
        now: Millis,
    },
}

/// Result of a rotation attempt.
#[derive(Clone, Debug)]
pub enum RotateResult {
    Committed(Issued),
    /// Something else happened first (a concurrent rotation, a revocation, expiry).
    Lost(RefreshRecord),
}

/// A store failure: the proxy answers 503 and changes nothing.
#[derive(Debug, thiserror::Error)]
#[error("session store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where sessions live. Every method is one atomic step in the store, and every expiry is
/// computed and decided on the store's clock shifted by `offset` ms ([`Clock::offset_ms`]).
pub trait TokenStore: Send + Sync + 'static {
    fn create(
        &self,
        s: &NewSession,
        offset: i64,
    ) -> impl Future<Output = Result<Issued, StoreError>> + Send;
    /// Looks up an access token; its first use while valid ends its predecessor's grace.
    fn lookup_access(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
    ) -> impl Future<Output = Result<AccessRecord, StoreError>> + Send;
    /// A refresh token's state. `Live` may be a token past its expiry: [`Self::rotate`]
    /// decides that on the store's clock (and answers `Lost(Expired)`); every other state is
    /// final as returned.
    fn peek_refresh(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
        revoke_on_reuse: bool,
    ) -> impl Future<Output = Result<RefreshRecord, StoreError>> + Send;
    fn rotate(
        &self,
        sid: SessionId,
        old_id: &str,
        r: &Rotation,
        offset: i64,
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
        offset: i64,
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

fn aad(what: &str, id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + what.len() + id.len());
    v.extend_from_slice(b"mrp/v1/");
    v.extend_from_slice(what.as_bytes());
    v.push(b'/');
    v.extend_from_slice(id.as_bytes());
    v
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

    /// Builds a new pair for `sid` protecting `upstream`, and the records to store (their
    /// expiries are the store's to compute).
    fn new_pair(
        &self,
        sid: SessionId,
        upstream: &str,
    ) -> (ProxyToken, ProxyToken, NewToken, NewToken) {
        self.with_rng(|rng| {
            let at = ProxyToken::generate(TokenKind::Access, sid, rng);
            let rt = ProxyToken::generate(TokenKind::Refresh, sid, rng);
            // Each id is a SHA-256 of the token: computed once (it was twice, issue 11).
            let (at_id, rt_id) = (at.lookup_id(), rt.lookup_id());
            let sa = seal::seal(
                &at.sealing_key(),
                &aad("ut", &at_id),
                upstream.as_bytes(),
                rng,
            );
            let sr = seal::seal(
                &rt.sealing_key(),
                &aad("ut", &rt_id),
                upstream.as_bytes(),
                rng,
            );
            let access = NewToken {
                id: at_id,
                sealed_upstream: sa,
            };
            let refresh = NewToken {
                id: rt_id,
                sealed_upstream: sr,
            };
            (at, rt, access, refresh)
        })
    }

    /// Issues the first pair of a new session for an upstream token (login/register).
    pub async fn mint(&self, upstream: &str, info: SessionInfo) -> Result<IssuedPair, StoreError> {
        let offset = self.clock.offset_ms();
        let lifetimes = self.lifetimes();
        let sid = self.with_rng(|rng| SessionId::generate(rng));
        let (at, rt, access, refresh) = self.new_pair(sid, upstream);
        let upstream_escrow = self.escrow.as_ref().map(|k| k.seal(sid, upstream));
        // Index first: an index entry without a session is harmless, a session missing from the
        // index would survive /logout/all.
        self.store
            .index_session(&info, sid, new_session_ttl(&lifetimes), offset)
            .await?;
        let s = NewSession {
            sid,
            info,
            access,
            refresh,
            lifetimes,
            upstream_escrow,
        };
        let issued = self.store.create(&s, offset).await?;
        Ok(IssuedPair {
            access: at,
            refresh: rt,
            expires_in_ms: issued.expires_in_ms(),
        })
    }

    /// Checks an access token (already parsed as one).
    pub async fn authenticate(&self, at: &ProxyToken) -> Result<Authenticated, StoreError> {
        let id = at.lookup_id();
        match self
            .store
            .lookup_access(at.session(), &id, self.clock.offset_ms())
            .await?
        {
            AccessRecord::Unknown | AccessRecord::Revoked => Ok(Authenticated::Rejected),
            AccessRecord::Superseded => Ok(Authenticated::Superseded),
            AccessRecord::Found {
                sealed_upstream,
                valid,
                info,
                ..
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
                // Decided by the store on its clock.
                if valid {
                    Ok(Authenticated::Valid(auth))
                } else {
                    Ok(Authenticated::Expired(auth))
                }
            }
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
        let offset = self.clock.offset_ms();
        let sid = rt.session();
        let id = rt.lookup_id();
        let mut record = self
            .store
            .peek_refresh(sid, &id, offset, self.lifetimes().revoke_on_reuse)
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
                    now,
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
                } => {
                    // The token's key (a SHA-256) serves the open here and the successor's seal.
                    let key = rt.sealing_key();
                    let Some(ut) = seal::open(&key, &aad("ut", &id), &sealed_upstream)
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
                    // The store caps the new pair at the session's absolute end.
                    let (new_at, new_rt, access, refresh) = self.new_pair(sid, &ut);
                    let successor = [new_at.expose(), new_rt.expose()].join("\n");
                    let sealed_successor = self.with_rng(|rng| {
                        seal::seal(&key, &aad("next", &id), successor.as_bytes(), rng)
                    });
                    let rotation = Rotation {
                        access,
                        refresh,
                        sealed_successor,
                        lifetimes: self.lifetimes(),
                    };
                    match self.store.rotate(sid, &id, &rotation, offset).await? {
                        RotateResult::Committed(issued) => {
                            // Only when the session's keys were extended (an eighth of their
                            // lifetime at a time, store/lua/common.lua `slack`): most rotations
                            // leave the index alone. Best effort: the next rotation retries.
                            if let Some(ttl) = issued.index_ttl
                                && let Err(e) =
                                    self.store.index_session(&info, sid, ttl, offset).await
                            {
                                tracing::warn!(error = %e, "could not extend the user index TTL");
                            }
                            return Ok(Ok(Refreshed::Issued {
                                pair: IssuedPair {
                                    access: new_at,
                                    refresh: new_rt,
                                    expires_in_ms: issued.expires_in_ms(),
                                },
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
