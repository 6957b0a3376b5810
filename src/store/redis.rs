//! The Redis [`TokenStore`]: one Lua script per lifecycle step.
//!
//! # Key layout
//! `T` is the session id's base64url tag ([`SessionId::tag`]); it is the hash tag of every key of
//! the session, so a session lives in one Redis Cluster slot and each script is atomic over it.
//! Ids are SHA-256 lookup ids of tokens ([`ProxyToken::lookup_id`]); Redis never holds a token.
//!
//! | key | type | fields / members | TTL |
//! |---|---|---|---|
//! | `mrp:{T}:s` | hash | `u` user id, `d` device id, `end` absolute end ms (0 none), `c` created ms, `lr` last refresh ms (0 none yet), `aexp` current access expiry ms, `rexp` current refresh idle expiry ms (0 none), `cr` id of the live refresh token, `sa` id of the newest superseded access token still held in full, `ux` 1 once `x` and `used` have their TTL, `n` refresh tokens whose grace ended (both sets are trimmed on every 8th), `sx` when the session's fixed keys (`s`, `x`, `used`) expire (Redis `TIME`, no offset: they are extended only when a rotation's records would outlive them, by an eighth of the TTL at most a day more, and the user index with them), `ue` the upstream token sealed under the server key (only with `admin.upstream_key_file`, [`crate::session::escrow`]) | longest of its records |
//! | `mrp:{T}:a:<id>` | hash | `ut` sealed upstream token, `exp` expiry ms, `used` 0/1, `prev` predecessor refresh id, `seen` 1 once looked up while expired (a cache may hold it: its deletion is published) | as the session; superseded: expiry + 1 h, and deleted once a newer one is superseded |
//! | `mrp:{T}:r:<id>` | hash | `st` live/rotated, `ut` sealed upstream token (live only), `exp` idle expiry ms (0 none), `at` paired access id, `aexp` its expiry ms, `prev` predecessor refresh id, `next` sealed successor pair and `natexp` its access expiry (rotated only) | idle expiry + 24 h; rotated: deleted when its grace ends |
//! | `mrp:{T}:k` | zset | written by earlier versions only: names of the session's token keys; still deleted, with the names in it, by a purge | as the session |
//! | `mrp:{T}:x` | zset | markers of superseded access tokens: the first 22 characters of the id, scored by its expiry; the 16 newest (up to 7 more between trims), each until expiry + 1 h (answers soft logout once the full record is gone) | as the session |
//! | `mrp:{T}:used` | zset | the first 22 characters of the ids of the 64 latest refresh tokens whose grace ended (reuse detection; up to 7 more between trims), scored by the negated time their grace ended (the newest first in the listpack; positive scores of earlier versions rank last and are trimmed first) | as the session |
//! | `mrp:us:{<user id>}` | zset | the user's session tags, scored by when the session's keys expire (Redis `TIME`, no offset); O(log n) per login/refresh (`lua/index_add.lua`: ZADD, and at most 8 expired entries pruned), no cap | longest of the user's sessions |
//! | `mrp:ud:{<user id>}` | hash | session tag → device id, the same entries as `mrp:us:` | as `mrp:us:` |
//! | `mrp:u:{<user id>}` | hash | index of earlier versions (session tag → `device id \n expiry ms`): still read by `/logout/all` and the admin API, emptied as its sessions are touched, never written | as left by the earlier version |
//! | `mrp:rl:<limiter>:{<id>}` | string | shared rate limit (`rate_limit.backend: redis`): GCRA arrival time in µs of Redis `TIME`; `<id>` is a client IP or a session tag | until the budget is full again |
//!
//! So a session holds at most 7 keys whatever its number of refreshes: `s`, `x`, `used`, the
//! live refresh token, the rotated one in grace (if any), the current access token, its
//! predecessor (until the next one is used) and the newest superseded one. No list of them is
//! kept: a purge finds them from the session hash (`cr`, each refresh record's `prev` and `at`,
//! and `sa`; `purge_session` in `lua/common.lua`), and `tests/state_bounds.rs` checks after
//! every step that it would find every key of the session.
//!
//! Sealed values are ChaCha20-Poly1305 under a key derived from the token that points to them
//! ([`crate::session::seal`]).
//!
//! # One clock
//! Every time above (`exp`, `end`, `aexp`, `rexp`, `c`, `lr`, marker scores) is on the expiry
//! clock: Redis `TIME` read inside the script (`clock()` in `lua/common.lua`) plus the offset
//! passed as ARGV ([`crate::session::Clock`]; 0 in production). The scripts compute every expiry
//! from the lifetimes passed to them and make every expired / valid / grace decision; the proxy's
//! wall clock is never consulted. Scores that mirror a key's TTL (the key index `k`, the user
//! index) use Redis `TIME` without the offset, as Redis expires keys on its own clock.
//!
//! `lookup_access.lua` answers `{'valid' | 'expired', sealed, expiry, user, device, now}`: the
//! access expiry and the expiry clock's now, so a caller (a local cache) can compute validity
//! from a measured local-vs-Redis offset.

use std::time::Duration;

use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, ToRedisArgs, Value};

pub use super::connection::{RedisConn, Target, Timeouts};
use crate::ratelimit::{Limited, SharedLimiter};
use crate::session::{
    AccessRecord, Issued, Lifetimes, NewSession, RETENTION_AFTER_EXPIRY, RefreshRecord,
    RotateResult, Rotation, SUPERSEDED_ACCESS_RETENTION, SessionId, SessionInfo, StoreError,
    TokenStore, UNLIMITED_IDLE_CAP,
};

const COMMON: &str = include_str!("lua/common.lua");

/// A Lua script: its text (sent with EVAL when a node does not have it yet) and SHA-1.
struct Lua {
    body: String,
    sha: String,
}

impl Lua {
    fn new(body: String) -> Self {
        let sha = redis::Script::new(&body).get_hash().to_owned();
        Lua { body, sha }
    }
}

/// A script: the constants of [`crate::session`] as Lua numbers (parsed once when the script is
/// loaded; passed as ARGV, each call paid a `tonumber`, a `strtod` of ~2,400 Redis
/// instructions), the helpers of `common.lua`, then `body`.
fn script(body: &str) -> Lua {
    Lua::new(format!(
        "local RETENTION_MS = {}\nlocal SUPERSEDED_RETENTION_MS = {}\nlocal IDLE_CAP_MS = {}\n{COMMON}\n{body}",
        ms(RETENTION_AFTER_EXPIRY),
        ms(SUPERSEDED_ACCESS_RETENTION),
        ms(UNLIMITED_IDLE_CAP),
    ))
}

/// One script call: KEYS and ARGV, run with EVALSHA and, on NOSCRIPT, with EVAL. EVAL loads
/// the script on the node that serves the first key only; redis-rs' `Script` would send
/// `SCRIPT LOAD` to every cluster primary and fail while any of them is down.
#[derive(Default)]
struct Call {
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call {
    fn key(mut self, k: impl ToRedisArgs) -> Self {
        k.write_redis_args(&mut self.keys);
        self
    }

    fn arg(mut self, a: impl ToRedisArgs) -> Self {
        a.write_redis_args(&mut self.args);
        self
    }

    fn cmd(&self, lua: &Lua, by_sha: bool) -> Cmd {
        // Sized once: grown argument by argument, the buffer was reallocated several times per
        // call (a refresh's sealed tokens are a few hundred bytes).
        let (name, script) = if by_sha {
            ("EVALSHA", &lua.sha)
        } else {
            ("EVAL", &lua.body)
        };
        let data = name.len()
            + script.len()
            + 20
            + self
                .keys
                .iter()
                .chain(&self.args)
                .map(Vec::len)
                .sum::<usize>();
        let mut c = Cmd::with_capacity(3 + self.keys.len() + self.args.len(), data);
        c.arg(name).arg(script);
        c.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        c
    }
}

/// Connection settings for [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub target: Target,
    pub timeouts: Timeouts,
    /// Replicas that must acknowledge a login's, refresh's or logout's write (`WAIT`) before
    /// it counts as done; 0 = none.
    pub min_replicas_acked: u32,
    /// `WAIT`'s timeout.
    pub replica_ack_timeout: Duration,
}

impl RedisSettings {
    /// From the validated `redis:` section; reads the CA bundle and password files it names.
    pub fn from_config(c: &crate::config::RedisConfig) -> Result<Self, StoreError> {
        use crate::config::RedisTopology;
        let password = |p: &Option<std::path::PathBuf>| {
            p.as_deref()
                .map(crate::config::read_password)
                .transpose()
                .map_err(StoreError)
        };
        let target =
            match &c.topology {
                RedisTopology::Single => Target::Url {
                    url: c.url.clone(),
                    ca_pem: match &c.ca_file {
                        None => None,
                        Some(ca) => Some(std::fs::read(ca).map_err(|e| {
                            StoreError(format!("cannot read {}: {e}", ca.display()))
                        })?),
                    },
                },
                RedisTopology::Sentinel(s) => Target::Sentinel {
                    master_name: s.master_name.clone(),
                    nodes: s.nodes.clone(),
                    password: password(&s.password_file)?,
                },
                RedisTopology::Cluster(cl) => Target::Cluster {
                    nodes: cl.nodes.clone(),
                    password: password(&cl.password_file)?,
                },
            };
        Ok(RedisSettings {
            target,
            timeouts: Timeouts {
                connect: c.connect_timeout,
                response: c.response_timeout,
            },
            min_replicas_acked: c.min_replicas_acked,
            replica_ack_timeout: c.replica_ack_timeout,
        })
    }
}

/// Where the invalidation subscriber connects, per deployment.
#[derive(Clone)]
pub(super) enum Subscriber {
    /// The one node (`redis.url`).
    Node(Box<redis::Client>),
    /// The current Sentinel master: the node the data connection writes to (so the subscriber
    /// hears the revocations and heartbeats written there, in order); it moves on a switch.
    Sentinel(std::sync::Arc<super::connection::SentinelConn>),
    /// Any cluster node, tried in turn: a classic PUBLISH reaches every node's subscribers
    /// over the cluster bus.
    AnyOf(Vec<redis::Client>),
}

struct Scripts {
    create: Lua,
    lookup_access: Lua,
    peek_refresh: Lua,
    rotate: Lua,
    purge: Lua,
    index_add: Lua,
    index_del: Lua,
    gcra: Lua,
    touch: Lua,
}

/// Session storage on Redis: one node, a Sentinel-managed master or a Cluster ([`RedisConn`]).
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    /// For the token cache's dedicated invalidation subscriber ([`super::invalidation`]):
    /// where it connects.
    subscriber: Subscriber,
    scripts: std::sync::Arc<Scripts>,
    /// `(replicas, timeout ms)` for `WAIT`, when writes must reach replicas.
    ack: Option<(u32, u64)>,
}

fn err(e: redis::RedisError) -> StoreError {
    // RedisError's text never contains arguments, so no token material can leak through it.
    StoreError(e.to_string())
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// An optional lifetime as script ARGV: ms, 0 = none.
fn ms_or_0(d: Option<Duration>) -> u64 {
    d.map(ms).unwrap_or(0)
}

struct Keys {
    prefix: String,
}

/// `parts` joined in one allocation of the exact size. Keys are built on every store call, and
/// `format!` (its formatting machinery and a growing buffer) was a visible part of a refresh's
/// CPU (issue 11).
fn concat(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

impl Keys {
    fn new(sid: SessionId) -> Self {
        Keys {
            prefix: concat(&["mrp:{", &sid.tag(), "}:"]),
        }
    }
    fn session(&self) -> String {
        concat(&[&self.prefix, "s"])
    }
    fn index(&self) -> String {
        concat(&[&self.prefix, "k"])
    }
    fn used(&self) -> String {
        concat(&[&self.prefix, "used"])
    }
    fn access(&self, id: &str) -> String {
        concat(&[&self.prefix, "a:", id])
    }
    fn refresh(&self, id: &str) -> String {
        concat(&[&self.prefix, "r:", id])
    }
}

/// The per-user index: a sorted set of session tags scored by expiry.
fn user_key(user_id: &str) -> String {
    concat(&["mrp:us:{", user_id, "}"])
}

/// Beside [`user_key`]: session tag → device id.
fn user_devices_key(user_id: &str) -> String {
    concat(&["mrp:ud:{", user_id, "}"])
}

/// The per-user index of earlier versions (hash tag → `device \n expiry`), read and emptied
/// until it expires; same hash tag, so the same slot, as [`user_key`].
fn legacy_user_key(user_id: &str) -> String {
    concat(&["mrp:u:{", user_id, "}"])
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
    let now = number(rest.next().ok_or_else(short)?)?;
    Ok(RefreshRecord::Grace {
        sealed_successor: sealed,
        access_expires_at: exp,
        now,
    })
}

/// `{now, access expiry, ttl}` of `create.lua` and `rotate.lua`.
/// `{now, access expiry, index ttl ms (0 = none)}` of create and rotate.
fn issued(mut rest: std::vec::IntoIter<Value>) -> Result<Issued, StoreError> {
    let now = number(rest.next().ok_or_else(short)?)?;
    let access_expires_at = number(rest.next().ok_or_else(short)?)?;
    let index_ttl = number(rest.next().ok_or_else(short)?)?;
    Ok(Issued {
        now,
        access_expires_at,
        index_ttl: (index_ttl > 0).then(|| Duration::from_millis(index_ttl)),
    })
}

fn short() -> StoreError {
    StoreError("short script reply".into())
}

impl RedisStore {
    /// Creates the store without connecting: the proxy starts (and serves anonymous traffic)
    /// while Redis is down, and connects on first use.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let conn = RedisConn::new(&settings.target, settings.timeouts).map_err(err)?;
        let subscriber = match (&settings.target, &conn) {
            (Target::Url { url, ca_pem }, _) => Subscriber::Node(Box::new(
                super::connection::url_client(url, ca_pem.as_deref()).map_err(err)?,
            )),
            (_, RedisConn::Sentinel(s)) => Subscriber::Sentinel(s.clone()),
            (Target::Cluster { nodes, password }, _) => Subscriber::AnyOf(
                nodes
                    .iter()
                    .map(|(h, p)| {
                        let mut info =
                            redis::IntoConnectionInfo::into_connection_info((h.as_str(), *p))?;
                        if let Some(pw) = password {
                            let redis = info.redis_settings().clone().set_password(pw);
                            info = info.set_redis_settings(redis);
                        }
                        redis::Client::open(info)
                    })
                    .collect::<Result<_, _>>()
                    .map_err(err)?,
            ),
            (Target::Sentinel { .. }, _) => unreachable!("a Sentinel target makes a Sentinel conn"),
        };
        Ok(RedisStore {
            conn,
            subscriber,
            scripts: std::sync::Arc::new(Scripts {
                create: script(include_str!("lua/create.lua")),
                lookup_access: script(include_str!("lua/lookup_access.lua")),
                peek_refresh: script(include_str!("lua/peek_refresh.lua")),
                rotate: script(include_str!("lua/rotate.lua")),
                purge: script(include_str!("lua/purge.lua")),
                index_add: script(include_str!("lua/index_add.lua")),
                index_del: Lua::new(include_str!("lua/index_del.lua").to_owned()),
                // Self-contained: no session helpers.
                gcra: Lua::new(include_str!("lua/gcra.lua").to_owned()),
                touch: Lua::new(include_str!("lua/touch.lua").to_owned()),
            }),
            ack: (settings.min_replicas_acked > 0).then(|| {
                (
                    settings.min_replicas_acked,
                    ms(settings.replica_ack_timeout).max(1),
                )
            }),
        })
    }

    /// Runs a script; with `ack`, also `WAIT`s (in the same pipeline, so on the same node and
    /// connection) for the configured replicas to hold everything written so far.
    async fn run(&self, lua: &Lua, call: Call, ack: bool) -> Result<Value, StoreError> {
        let mut c = self.conn.clone();
        let wait = self.ack.filter(|_| ack);
        for by_sha in [true, false] {
            let r: Result<Value, RedisError> = match wait {
                None => call.cmd(lua, by_sha).query_async(&mut c).await,
                Some((n, timeout)) => {
                    let mut p = redis::pipe();
                    p.add_command(call.cmd(lua, by_sha))
                        .cmd("WAIT")
                        .arg(n)
                        .arg(timeout);
                    match p.query_async::<(Value, i64)>(&mut c).await {
                        Ok((v, acked)) if acked >= i64::from(n) => Ok(v),
                        Ok((_, acked)) => {
                            return Err(StoreError(format!(
                                "write acknowledged by {acked} of {n} required replicas within {timeout} ms"
                            )));
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Err(e) if by_sha && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    continue;
                }
                r => return r.map_err(err),
            }
        }
        unreachable!("the EVAL round returns")
    }

    /// A live refresh token's record and its session's owner, or `None` for any other state
    /// (left to `peek_refresh.lua`). The two reads need not be atomic: `rotate.lua` checks
    /// everything again before it writes.
    async fn peek_live(&self, k: &Keys, id: &str) -> Result<Option<RefreshRecord>, StoreError> {
        let mut c = self.conn.clone();
        let mut p = redis::pipe();
        p.cmd("HMGET")
            .arg(k.session())
            .arg("u")
            .arg("d")
            .cmd("HMGET")
            .arg(k.refresh(id))
            .arg("st")
            .arg("ut");
        type Fields = (Option<String>, Option<String>);
        let ((user, device), (state, sealed)): (Fields, (Option<String>, Option<Vec<u8>>)) =
            p.query_async(&mut c).await.map_err(err)?;
        Ok(match (user, device, state.as_deref(), sealed) {
            (Some(user_id), Some(device_id), Some("live"), Some(sealed)) if !sealed.is_empty() => {
                Some(RefreshRecord::Live {
                    sealed_upstream: sealed,
                    info: SessionInfo { user_id, device_id },
                })
            }
            _ => None,
        })
    }

    /// Before answering with tokens a read found (a grace replay), makes sure they are on the
    /// replicas too: a no-op write on the session's node, then `WAIT` (which covers every
    /// earlier write on that node, the rotation that made the tokens included).
    async fn confirm(&self, k: &Keys) -> Result<(), StoreError> {
        if self.ack.is_some() {
            self.run(&self.scripts.touch, Call::default().key(k.session()), true)
                .await?;
        }
        Ok(())
    }
}

impl TokenStore for RedisStore {
    async fn create(&self, s: &NewSession, offset: i64) -> Result<Issued, StoreError> {
        let k = Keys::new(s.sid);
        let l: &Lifetimes = &s.lifetimes;
        let v: Value = self
            .run(
                &self.scripts.create,
                Call::default()
                    .key(k.session())
                    .key(k.access(&s.access.id))
                    .key(k.refresh(&s.refresh.id))
                    .arg(&s.info.user_id)
                    .arg(&s.info.device_id)
                    .arg(offset)
                    .arg(&s.access.sealed_upstream[..])
                    .arg(&s.refresh.sealed_upstream[..])
                    .arg(&s.access.id)
                    .arg(ms(l.access))
                    .arg(ms_or_0(l.refresh_idle))
                    .arg(ms_or_0(l.session))
                    .arg(s.upstream_escrow.as_deref().unwrap_or_default()),
                true,
            )
            .await?;
        let Value::Array(items) = v else {
            return Err(StoreError("unexpected script reply".into()));
        };
        issued(items.into_iter())
    }

    async fn lookup_access(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
    ) -> Result<AccessRecord, StoreError> {
        let k = Keys::new(sid);
        let v: Value = self
            .run(
                &self.scripts.lookup_access,
                Call::default()
                    .key(k.access(id))
                    .key(k.session())
                    .key(k.used())
                    .arg(offset)
                    .arg(&k.prefix)
                    .arg(id),
                false,
            )
            .await?;
        let (status, rest) = reply(v)?;
        let mut rest = rest.into_iter();
        Ok(match status.as_str() {
            "superseded" => AccessRecord::Superseded,
            // {status, sealed, expiry, user, device, now}: the decision is the script's.
            "valid" | "expired" => {
                let sealed = bytes(rest.next().ok_or_else(short)?)?;
                let exp = number(rest.next().ok_or_else(short)?)?;
                let info = info(
                    rest.next().ok_or_else(short)?,
                    rest.next().ok_or_else(short)?,
                )?;
                let now = number(rest.next().ok_or_else(short)?)?;
                AccessRecord::Found {
                    sealed_upstream: sealed,
                    valid: status == "valid",
                    expires_at: exp,
                    now,
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
        offset: i64,
        revoke_on_reuse: bool,
    ) -> Result<RefreshRecord, StoreError> {
        let k = Keys::new(sid);
        // The common case, a live refresh token of a live session, from two plain reads in one
        // pipeline (no script: a Lua call cost Redis more than both reads). Whether it has
        // expired is left to `rotate.lua`, which decides it on the Redis clock anyway (and
        // answers `expired` then); every other state (unknown, rotated, replayed) is the
        // script's, which may also write (a dangling record deleted, a reused session revoked).
        if let Some(live) = self.peek_live(&k, id).await? {
            return Ok(live);
        }
        let v: Value = self
            .run(
                &self.scripts.peek_refresh,
                Call::default()
                    .key(k.refresh(id))
                    .key(k.session())
                    .key(k.index())
                    .key(k.used())
                    .arg(offset)
                    .arg(id)
                    .arg(if revoke_on_reuse { "1" } else { "0" }),
                false,
            )
            .await?;
        let (status, rest) = reply(v)?;
        let mut rest = rest.into_iter();
        Ok(match status.as_str() {
            "live" => {
                let sealed = bytes(rest.next().ok_or_else(short)?)?;
                let info = info(
                    rest.next().ok_or_else(short)?,
                    rest.next().ok_or_else(short)?,
                )?;
                RefreshRecord::Live {
                    sealed_upstream: sealed,
                    info,
                }
            }
            "grace" => {
                let g = grace(rest)?;
                self.confirm(&k).await?;
                g
            }
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
        offset: i64,
    ) -> Result<RotateResult, StoreError> {
        let k = Keys::new(sid);
        let v: Value = self
            .run(
                &self.scripts.rotate,
                Call::default()
                    .key(k.refresh(old_id))
                    .key(k.session())
                    .key(k.used())
                    .key(k.access(&r.access.id))
                    .key(k.refresh(&r.refresh.id))
                    .arg(offset)
                    .arg(old_id)
                    .arg(&r.access.id)
                    .arg(&r.refresh.id)
                    .arg(&r.access.sealed_upstream[..])
                    .arg(&r.refresh.sealed_upstream[..])
                    .arg(&r.sealed_successor[..])
                    .arg(&k.prefix)
                    .arg(ms(r.lifetimes.access))
                    .arg(ms_or_0(r.lifetimes.refresh_idle)),
                true,
            )
            .await?;
        let (status, rest) = reply(v)?;
        Ok(match status.as_str() {
            "ok" => RotateResult::Committed(issued(rest.into_iter())?),
            "grace" => {
                let g = grace(rest.into_iter())?;
                self.confirm(&k).await?;
                RotateResult::Lost(g)
            }
            "expired" => RotateResult::Lost(RefreshRecord::Expired),
            _ => RotateResult::Lost(RefreshRecord::Unknown),
        })
    }

    async fn purge(&self, sid: SessionId) -> Result<Option<SessionInfo>, StoreError> {
        let k = Keys::new(sid);
        let v: Value = self
            .run(
                &self.scripts.purge,
                Call::default()
                    .key(k.session())
                    .key(k.index())
                    .key(k.used()),
                true,
            )
            .await?;
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
        // Entries of sessions gone by TTL may linger until the next login or refresh prunes
        // them; callers read or purge sessions, and a gone one is simply absent.
        // The device hash has the same entries as the index (both written and pruned together).
        let devices: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(user_devices_key(user_id))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let mut out: Vec<(SessionId, String)> = devices
            .into_iter()
            .filter_map(|(tag, device)| Some((SessionId::from_tag(&tag)?, device)))
            .collect();
        // Sessions made by earlier versions, until their old index expires.
        let legacy: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(legacy_user_key(user_id))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        for (tag, v) in legacy {
            let device = v.rsplit_once('\n').map(|(d, _)| d).unwrap_or(&v).to_owned();
            if let Some(sid) = SessionId::from_tag(&tag)
                && !out.iter().any(|(s, _)| *s == sid)
            {
                out.push((sid, device));
            }
        }
        Ok(out)
    }

    async fn index_session(
        &self,
        info: &SessionInfo,
        sid: SessionId,
        ttl: Duration,
        offset: i64,
    ) -> Result<(), StoreError> {
        let _: Value = self
            .run(
                &self.scripts.index_add,
                Call::default()
                    .key(user_key(&info.user_id))
                    .key(user_devices_key(&info.user_id))
                    .key(legacy_user_key(&info.user_id))
                    .arg(sid.tag())
                    .arg(&info.device_id)
                    .arg(ms(ttl))
                    .arg(offset),
                self.cluster(),
            )
            .await?;
        Ok(())
    }

    async fn unindex_session(&self, user_id: &str, sid: SessionId) -> Result<(), StoreError> {
        let _: Value = self
            .run(
                &self.scripts.index_del,
                Call::default()
                    .key(user_key(user_id))
                    .key(user_devices_key(user_id))
                    .key(legacy_user_key(user_id))
                    .arg(sid.tag()),
                false,
            )
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        match &mut c {
            // One node, not every primary: a cluster with a primary down still serves the
            // sessions of the other slots, so the replicas stay ready.
            RedisConn::Cluster(cc) => {
                let routing = redis::cluster_routing::RoutingInfo::SingleNode(
                    redis::cluster_routing::SingleNodeRoutingInfo::Random,
                );
                cc.route_command(redis::cmd("PING"), routing)
                    .await
                    .map_err(err)?;
            }
            _ => {
                let _: String = redis::cmd("PING").query_async(&mut c).await.map_err(err)?;
            }
        }
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
        let period_us = period.as_micros().clamp(1, u64::MAX as u128) as u64;
        let v = self
            .run(
                &self.scripts.gcra,
                Call::default().key(key).arg(period_us).arg(burst),
                false,
            )
            .await?;
        let (allowed, wait_us): (i64, i64) = redis::from_redis_value(v)
            .map_err(|e| StoreError(format!("unexpected rate limit reply: {e}")))?;
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
    pub(super) fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Where the token cache's invalidation subscriber opens its own pub/sub connection.
    pub(super) fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    /// Whether this is a Redis Cluster (keys of different slots live on different nodes).
    pub(super) fn cluster(&self) -> bool {
        matches!(self.conn, RedisConn::Cluster(_))
    }

    /// For Sentinel: a receiver notified with the new master's address on each switch (so a
    /// cache of session state can flush). `None` for other deployments.
    pub fn master_switch_events(&self) -> Option<tokio::sync::watch::Receiver<Option<String>>> {
        match &self.conn {
            RedisConn::Sentinel(s) => Some(s.subscribe_switches()),
            _ => None,
        }
    }
}
