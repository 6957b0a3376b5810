//! The Redis [`TokenStore`]: one Lua script per lifecycle step.
//!
//! # Key layout
//! `T` is the session id's base64url tag ([`SessionId::tag`]); it is the hash tag of every key of
//! the session, so a session lives in one Redis Cluster slot and each script is atomic over it.
//! Ids are SHA-256 lookup ids of tokens ([`ProxyToken::lookup_id`]); Redis never holds a token.
//!
//! | key | type | fields / members | TTL |
//! |---|---|---|---|
//! | `mrp:{T}:s` | hash | `u` user id, `d` device id, `end` absolute end ms (0 none), `c` created ms, `lr` last refresh ms (0 none yet), `aexp` current access expiry ms, `rexp` current refresh idle expiry ms (0 none), `sa` id of the newest superseded access token still held in full | longest of its records |
//! | `mrp:{T}:a:<id>` | hash | `ut` sealed upstream token, `exp` expiry ms, `used` 0/1, `prev` predecessor refresh id | as the session; superseded: expiry + 1 h, and deleted once a newer one is superseded |
//! | `mrp:{T}:r:<id>` | hash | `st` live/rotated, `ut` sealed upstream token (live only), `exp` idle expiry ms (0 none), `at` paired access id, `prev` predecessor refresh id, `next` sealed successor pair and `natexp` its access expiry (rotated only) | idle expiry + 24 h; rotated: deleted when its grace ends |
//! | `mrp:{T}:k` | zset | names of the session's live token keys (`a:`, `r:`), scored by their expiry; a name leaves when its key is deleted, and is rescored when its TTL is shortened | as the session |
//! | `mrp:{T}:x` | zset | markers of superseded access tokens: the first 22 characters of the id, scored by its expiry; the 16 newest, each until expiry + 1 h (answers soft logout once the full record is gone) | as the session |
//! | `mrp:{T}:used` | zset | the first 22 characters of the ids of the 64 latest refresh tokens whose grace ended (reuse detection) | as the session |
//! | `mrp:u:{<user id>}` | hash | session tag → `device id \n expiry ms` | longest of the user's sessions |
//! | `mrp:rl:<limiter>:{<id>}` | string | shared rate limit (`rate_limit.backend: redis`): GCRA arrival time in µs of Redis `TIME`; `<id>` is a client IP or a session tag | until the budget is full again |
//!
//! So a session holds at most 8 keys whatever its number of refreshes: `s`, `k`, `x`, `used`, the
//! live refresh token, the rotated one in grace (if any), the current access token, its
//! predecessor (until the next one is used) and the newest superseded one; logout deletes the
//! names in `k` (at most 5) and the four fixed keys (`tests/state_bounds.rs`).
//!
//! Sealed values are ChaCha20-Poly1305 under a key derived from the token that points to them
//! ([`crate::session::seal`]).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use crate::ratelimit::{Limited, SharedLimiter};
use crate::session::{
    AccessRecord, Millis, NewSession, RefreshRecord, RotateResult, Rotation,
    SUPERSEDED_ACCESS_RETENTION, SessionId, SessionInfo, StoreError, TokenStore,
};

const COMMON: &str = include_str!("lua/common.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

/// Connection settings for [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// For `rediss://`: trust only this CA bundle (PEM) instead of the system roots.
    pub ca_file: Option<std::path::PathBuf>,
}

struct Scripts {
    create: Script,
    lookup_access: Script,
    peek_refresh: Script,
    rotate: Script,
    purge: Script,
    index_add: Script,
    gcra: Script,
}

/// Session storage on Redis through redis-rs' reconnecting [`ConnectionManager`].
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// For the dedicated invalidation subscriber ([`super::invalidation`]).
    client: redis::Client,
    scripts: std::sync::Arc<Scripts>,
}

fn err(e: redis::RedisError) -> StoreError {
    // RedisError's text never contains arguments, so no token material can leak through it.
    StoreError(e.to_string())
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

struct Keys {
    prefix: String,
}

impl Keys {
    fn new(sid: SessionId) -> Self {
        Keys {
            prefix: format!("mrp:{{{}}}:", sid.tag()),
        }
    }
    fn session(&self) -> String {
        format!("{}s", self.prefix)
    }
    fn index(&self) -> String {
        format!("{}k", self.prefix)
    }
    fn used(&self) -> String {
        format!("{}used", self.prefix)
    }
    fn access(&self, id: &str) -> String {
        format!("{}a:{id}", self.prefix)
    }
    fn refresh(&self, id: &str) -> String {
        format!("{}r:{id}", self.prefix)
    }
}

fn user_key(user_id: &str) -> String {
    format!("mrp:u:{{{user_id}}}")
}

/// Reads a script reply: an array whose first element is a status word.
fn reply(v: Value) -> Result<(String, Vec<Value>), StoreError> {
    let Value::Array(mut items) = v else {
        return Err(StoreError("unexpected script reply".into()));
    };
    if items.is_empty() {
        return Err(StoreError("empty script reply".into()));
    }
    let status = text(items.remove(0))?;
    Ok((status, items))
}

fn bytes(v: Value) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        _ => Err(StoreError("unexpected value in script reply".into())),
    }
}

fn text(v: Value) -> Result<String, StoreError> {
    String::from_utf8(bytes(v)?).map_err(|_| StoreError("non-UTF-8 value in script reply".into()))
}

fn number(v: Value) -> Result<u64, StoreError> {
    text(v)?
        .parse()
        .map_err(|_| StoreError("non-numeric value in script reply".into()))
}

fn info(user: Value, device: Value) -> Result<SessionInfo, StoreError> {
    Ok(SessionInfo {
        user_id: text(user)?,
        device_id: text(device)?,
    })
}

fn grace(mut rest: std::vec::IntoIter<Value>) -> Result<RefreshRecord, StoreError> {
    let sealed = bytes(rest.next().ok_or_else(short)?)?;
    let exp = number(rest.next().ok_or_else(short)?)?;
    Ok(RefreshRecord::Grace {
        sealed_successor: sealed,
        access_expires_at: exp,
    })
}

fn short() -> StoreError {
    StoreError("short script reply".into())
}

impl RedisStore {
    /// Creates the store without connecting: the proxy starts (and serves anonymous traffic)
    /// while Redis is down, and connects on first use.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = match &settings.ca_file {
            None => redis::Client::open(settings.url.as_str()).map_err(err)?,
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| StoreError(format!("cannot read {}: {e}", ca.display())))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(settings.url.as_str(), certs).map_err(err)?
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout))
            // Fail fast while Redis is down (the caller answers 503); reconnect on next use.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(err)?;
        Ok(RedisStore {
            conn,
            client,
            scripts: std::sync::Arc::new(Scripts {
                create: script(include_str!("lua/create.lua")),
                lookup_access: script(include_str!("lua/lookup_access.lua")),
                peek_refresh: script(include_str!("lua/peek_refresh.lua")),
                rotate: script(include_str!("lua/rotate.lua")),
                purge: script(include_str!("lua/purge.lua")),
                index_add: script(include_str!("lua/index_add.lua")),
                // Self-contained: no session helpers.
                gcra: Script::new(include_str!("lua/gcra.lua")),
            }),
        })
    }
}

impl TokenStore for RedisStore {
    async fn create(&self, s: &NewSession, now: Millis) -> Result<(), StoreError> {
        let k = Keys::new(s.sid);
        let mut c = self.conn.clone();
        let _: Value = self
            .scripts
            .create
            .key(k.session())
            .key(k.access(&s.access.id))
            .key(k.refresh(&s.refresh.id))
            .key(k.index())
            .arg(&s.info.user_id)
            .arg(&s.info.device_id)
            .arg(s.ends_at)
            .arg(now)
            .arg(&s.access.sealed_upstream[..])
            .arg(s.access.expires_at)
            .arg(ms(s.access.ttl))
            .arg(&s.refresh.sealed_upstream[..])
            .arg(s.refresh.expires_at)
            .arg(ms(s.refresh.ttl))
            .arg(ms(s.ttl))
            .arg(&s.access.id)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn lookup_access(
        &self,
        sid: SessionId,
        id: &str,
        now: Millis,
    ) -> Result<AccessRecord, StoreError> {
        let k = Keys::new(sid);
        let mut c = self.conn.clone();
        let v: Value = self
            .scripts
            .lookup_access
            .key(k.access(id))
            .key(k.session())
            .key(k.used())
            .arg(now)
            .arg(&k.prefix)
            .arg(ms(SUPERSEDED_ACCESS_RETENTION))
            .arg(id)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        let (status, rest) = reply(v)?;
        let mut rest = rest.into_iter();
        Ok(match status.as_str() {
            "superseded" => AccessRecord::Superseded,
            "found" => {
                let sealed = bytes(rest.next().ok_or_else(short)?)?;
                let exp = number(rest.next().ok_or_else(short)?)?;
                let info = info(
                    rest.next().ok_or_else(short)?,
                    rest.next().ok_or_else(short)?,
                )?;
                AccessRecord::Found {
                    sealed_upstream: sealed,
                    expires_at: exp,
                    info,
                }
            }
            "revoked" => AccessRecord::Revoked,
            _ => AccessRecord::Unknown,
        })
    }

    async fn peek_refresh(
        &self,
        sid: SessionId,
        id: &str,
        now: Millis,
        revoke_on_reuse: bool,
    ) -> Result<RefreshRecord, StoreError> {
        let k = Keys::new(sid);
        let mut c = self.conn.clone();
        let v: Value = self
            .scripts
            .peek_refresh
            .key(k.refresh(id))
            .key(k.session())
            .key(k.index())
            .key(k.used())
            .arg(now)
            .arg(id)
            .arg(if revoke_on_reuse { "1" } else { "0" })
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        let (status, rest) = reply(v)?;
        let mut rest = rest.into_iter();
        Ok(match status.as_str() {
            "live" => {
                let sealed = bytes(rest.next().ok_or_else(short)?)?;
                let info = info(
                    rest.next().ok_or_else(short)?,
                    rest.next().ok_or_else(short)?,
                )?;
                let ends_at = number(rest.next().ok_or_else(short)?)?;
                RefreshRecord::Live {
                    sealed_upstream: sealed,
                    info,
                    ends_at,
                }
            }
            "grace" => grace(rest)?,
            "reused" => {
                let info = info(
                    rest.next().ok_or_else(short)?,
                    rest.next().ok_or_else(short)?,
                )?;
                let revoked = text(rest.next().ok_or_else(short)?)? == "1";
                RefreshRecord::Reused { info, revoked }
            }
            "expired" => RefreshRecord::Expired,
            _ => RefreshRecord::Unknown,
        })
    }

    async fn rotate(
        &self,
        sid: SessionId,
        old_id: &str,
        r: &Rotation,
        now: Millis,
    ) -> Result<RotateResult, StoreError> {
        let k = Keys::new(sid);
        let mut c = self.conn.clone();
        let v: Value = self
            .scripts
            .rotate
            .key(k.refresh(old_id))
            .key(k.session())
            .key(k.index())
            .key(k.used())
            .key(k.access(&r.access.id))
            .key(k.refresh(&r.refresh.id))
            .arg(now)
            .arg(old_id)
            .arg(&r.access.id)
            .arg(&r.refresh.id)
            .arg(&r.access.sealed_upstream[..])
            .arg(r.access.expires_at)
            .arg(ms(r.access.ttl))
            .arg(&r.refresh.sealed_upstream[..])
            .arg(r.refresh.expires_at)
            .arg(ms(r.refresh.ttl))
            .arg(&r.sealed_successor[..])
            .arg(ms(r.ttl))
            .arg(&k.prefix)
            .arg(ms(SUPERSEDED_ACCESS_RETENTION))
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        let (status, rest) = reply(v)?;
        Ok(match status.as_str() {
            "ok" => RotateResult::Committed,
            "grace" => RotateResult::Lost(grace(rest.into_iter())?),
            "expired" => RotateResult::Lost(RefreshRecord::Expired),
            _ => RotateResult::Lost(RefreshRecord::Unknown),
        })
    }

    async fn purge(&self, sid: SessionId) -> Result<Option<SessionInfo>, StoreError> {
        let k = Keys::new(sid);
        let mut c = self.conn.clone();
        let v: Value = self
            .scripts
            .purge
            .key(k.session())
            .key(k.index())
            .key(k.used())
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        let Value::Array(items) = v else {
            return Ok(None);
        };
        let mut it = items.into_iter();
        match (it.next(), it.next()) {
            (Some(u), Some(d)) => Ok(Some(info(u, d)?)),
            _ => Ok(None),
        }
    }

    async fn user_sessions(&self, user_id: &str) -> Result<Vec<(SessionId, String)>, StoreError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(user_key(user_id))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(all
            .into_iter()
            .filter_map(|(tag, v)| {
                let device = v.rsplit_once('\n').map(|(d, _)| d).unwrap_or(&v).to_owned();
                Some((SessionId::from_tag(&tag)?, device))
            })
            .collect())
    }

    async fn index_session(
        &self,
        info: &SessionInfo,
        sid: SessionId,
        ttl: Duration,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: Value = self
            .scripts
            .index_add
            .key(user_key(&info.user_id))
            .arg(sid.tag())
            .arg(&info.device_id)
            .arg(ms(ttl))
            .arg(now)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn unindex_session(&self, user_id: &str, sid: SessionId) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: Value = redis::cmd("HDEL")
            .arg(user_key(user_id))
            .arg(sid.tag())
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await.map_err(err)?;
        Ok(())
    }
}

/// The shared rate-limit budget of `rate_limit.backend: redis` (`lua/gcra.lua`). Keys
/// `mrp:rl:<limiter>:{<client IP or session tag>}` hold one number and expire when the budget is
/// full again.
impl SharedLimiter for RedisStore {
    async fn acquire(
        &self,
        key: &str,
        period: Duration,
        burst: u32,
    ) -> Result<Result<(), Limited>, StoreError> {
        let mut c = self.conn.clone();
        let period_us = period.as_micros().clamp(1, u64::MAX as u128) as u64;
        let (allowed, wait_us): (i64, i64) = self
            .scripts
            .gcra
            .key(key)
            .arg(period_us)
            .arg(burst)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        if allowed == 1 {
            Ok(Ok(()))
        } else {
            Ok(Err(Limited {
                retry_after: Duration::from_micros(wait_us.max(0) as u64),
            }))
        }
    }
}

impl RedisStore {
    /// The connection, for the operator views in [`super::sessions_view`].
    pub(super) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The client the invalidation subscriber opens its own pub/sub connection with (the node
    /// the data connection talks to).
    pub(super) fn client(&self) -> &redis::Client {
        &self.client
    }
}
