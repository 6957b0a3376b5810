//! The operator session API on the admin listener (issue 13), never on the client port:
//!
//! | call | answer |
//! |---|---|
//! | `GET /admin/v1/users/{user_id}/sessions` | `{"sessions": [{session_id, device_id, created_at, last_refresh_at, access_expires_at, refresh_expires_at}]}` |
//! | `DELETE /admin/v1/users/{user_id}/sessions` | `{"ended": n}` |
//! | `DELETE /admin/v1/sessions/{session_id}` | `{"ended": 1}`, or 404 `M_NOT_FOUND` |
//! | `GET /admin/v1/stats` | `{"sessions_alive", "logins_last_minute", "refreshes_last_minute"}` |
//!
//! Timestamps are ms since the epoch (`null` when not recorded). Never a token, never an
//! upstream token. Authentication: `Authorization: Bearer <secret of admin.token_file>`, compared
//! in constant time; every caller IP has a small budget, and a failed attempt costs five times
//! a good one. One audit log line per call (target `mrp::audit`).
//!
//! `?logout_upstream=true` on both `DELETE`s also logs the ended sessions out at the homeserver
//! (`POST /_matrix/client/v3/logout` with their upstream tokens), and the answer gains
//! `"upstream_logout": {"done", "failed", "not_possible"}`. The sessions end first, whatever the
//! homeserver does. Every other copy of an upstream token is sealed under a key derived from the
//! client's own token, which the proxy does not keep; so this needs `admin.upstream_key_file`,
//! under which new sessions keep a second, escrow copy ([`crate::session::escrow`]). Without it
//! the call is refused (400 `M_INVALID_PARAM`, saying how to enable it) and nothing changes.
//! Sessions made before the key was set have no escrow copy: `not_possible`. At most
//! [`UPSTREAM_LOGOUT_CONCURRENCY`] homeserver calls run at once, each bounded by
//! [`UPSTREAM_LOGOUT_TIMEOUT`], all by [`UPSTREAM_LOGOUT_DEADLINE`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{Quota, RateLimiter};
use http::{HeaderMap, Method, Response, header};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::body::Body;
use crate::matrix::purge::PurgeCause;
use crate::server::ApiError;
use crate::server::response::json_response;
use crate::session::{SessionId, TokenStore};

/// Calls per second per caller IP, sustained.
const CALLS_PER_SECOND: u32 = 5;
/// Burst of calls per caller IP.
const BURST: u32 = 20;
/// What a failed authentication costs, in calls (so about one guess per second).
const FAILURE_COST: u32 = 5;
/// Above this many tracked caller IPs the limiter forgets the idle ones.
const MAX_TRACKED_IPS: usize = 4096;
/// Longest user id the Matrix spec allows (bytes).
const MAX_USER_ID: usize = 255;
/// Upstream logouts in flight at once for one admin call (a user may have many sessions).
pub const UPSTREAM_LOGOUT_CONCURRENCY: usize = 4;
/// Each upstream logout gives up after this long (counted `failed`).
pub const UPSTREAM_LOGOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// No upstream logout starts this long after the call began (the rest are counted `failed`).
pub const UPSTREAM_LOGOUT_DEADLINE: Duration = Duration::from_secs(60);
/// The answer to `logout_upstream=true` without `admin.upstream_key_file`.
const NO_UPSTREAM_KEY: &str = "logout_upstream=true needs admin.upstream_key_file (a file of 32 \
     random bytes, e.g. head -c 32 /dev/urandom; see README \"Upstream logout\"): without it the \
     proxy cannot read upstream tokens, which are sealed under the clients' own tokens. Sessions \
     made after it is set can be logged out upstream. Nothing was changed.";

type Limiter = RateLimiter<
    IpAddr,
    governor::state::keyed::DashMapStateStore<IpAddr>,
    governor::clock::DefaultClock,
>;

/// The API's state: the secret's digest and the per-IP budget.
pub struct AdminApi {
    secret_digest: [u8; 32],
    limiter: Limiter,
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Why the admin secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("admin.token_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("admin.token_file {0}: empty (put a long random secret in it)")]
    Empty(String),
}

impl AdminApi {
    /// Reads the secret from `path` (surrounding whitespace, such as a final newline, ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(SecretError::Empty(path.display().to_string()));
        }
        Ok(Self::new(secret))
    }

    pub fn new(secret: &str) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(CALLS_PER_SECOND).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN));
        AdminApi {
            secret_digest: digest(secret.as_bytes()),
            limiter: RateLimiter::dashmap(quota),
        }
    }

    /// The caller's budget; `Err` with the wait when it is spent.
    fn admit(&self, ip: IpAddr, cost: u32) -> Result<(), ApiError> {
        if self.limiter.len() > MAX_TRACKED_IPS {
            self.limiter.retain_recent();
        }
        let n = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(&ip, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Err(ApiError::LimitExceeded {
                    retry_after_ms: (wait.as_millis() as u64).max(1),
                })
            }
            // More than the burst: cannot happen with the constants above.
            Err(_) => Err(ApiError::LimitExceeded {
                retry_after_ms: 1000,
            }),
        }
    }

    /// Constant-time check of the bearer secret (digests compared, so lengths do not leak).
    fn authenticate(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(v) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::MissingToken("Missing admin token"));
        };
        let given = v
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .ok_or(ApiError::MissingToken("Authorization must be Bearer"))?;
        if bool::from(digest(given).ct_eq(&self.secret_digest)) {
            Ok(())
        } else {
            Err(ApiError::UnknownToken {
                soft_logout: false,
                message: "Wrong admin token",
            })
        }
    }
}

/// One admin API route.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    ListUser(String),
    RevokeUser(String),
    RevokeSession(SessionId),
    Stats,
}

impl Call {
    fn action(&self) -> &'static str {
        match self {
            Call::ListUser(_) => "list_sessions",
            Call::RevokeUser(_) => "revoke_user_sessions",
            Call::RevokeSession(_) => "revoke_session",
            Call::Stats => "stats",
        }
    }
}

/// A user id as the spec's grammar has it, loosely: `@localpart:server`, at most 255 bytes,
/// printable ASCII without spaces (historical localparts allow more than the strict grammar).
fn user_id(raw: &str) -> Result<String, ApiError> {
    let bad = ApiError::InvalidParam("Malformed user id (want @localpart:server.name)");
    let s = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad.clone())?;
    let ok = s.len() <= MAX_USER_ID
        && s.bytes().all(|b| b.is_ascii_graphic())
        && s.strip_prefix('@')
            .and_then(|r| r.split_once(':'))
            .is_some_and(|(local, server)| !local.is_empty() && !server.is_empty());
    if ok { Ok(s.into_owned()) } else { Err(bad) }
}

fn route(method: &Method, path: &str) -> Result<Call, ApiError> {
    let rest = path
        .strip_prefix("/admin/v1/")
        .ok_or(ApiError::NotFound("Unknown admin API path"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let call = match parts.as_slice() {
        ["stats"] => Some(Call::Stats).filter(|_| method == Method::GET),
        ["users", user, "sessions"] => {
            let user = user_id(user)?;
            match *method {
                Method::GET => Some(Call::ListUser(user)),
                Method::DELETE => Some(Call::RevokeUser(user)),
                _ => None,
            }
        }
        ["sessions", sid] => {
            let sid = percent_encoding::percent_decode_str(sid)
                .decode_utf8()
                .ok()
                .and_then(|t| SessionId::from_tag(&t))
                .ok_or(ApiError::InvalidParam("Malformed session id"))?;
            Some(Call::RevokeSession(sid)).filter(|_| method == Method::DELETE)
        }
        _ => return Err(ApiError::NotFound("Unknown admin API path")),
    };
    call.ok_or(ApiError::MethodNotAllowed)
}

/// `logout_upstream` in the query: `true`/`1`, `false`/`0`, absent = false; anything else is an
/// error (a typo must not silently skip the upstream logout).
fn wants_upstream_logout(query: Option<&str>) -> Result<bool, ApiError> {
    let mut want = false;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k == "logout_upstream" {
            want = match &*v {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(ApiError::InvalidParam(
                        "logout_upstream must be true or false",
                    ));
                }
            };
        }
    }
    Ok(want)
}

/// What the upstream logouts of one call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct UpstreamLogouts {
    /// The homeserver answered 2xx, or 401 (the token was already dead there).
    done: u64,
    /// Unreachable, timed out, past the deadline, or another status.
    failed: u64,
    /// No escrow copy under a configured key (a session made before the key was set, or
    /// sealed under a key since dropped).
    not_possible: u64,
}

impl UpstreamLogouts {
    fn json(&self) -> serde_json::Value {
        json!({"done": self.done, "failed": self.failed, "not_possible": self.not_possible})
    }
}

/// What an answered call did, for the audit line.
struct Outcome {
    user: Option<String>,
    count: Option<usize>,
    upstream: Option<UpstreamLogouts>,
    res: Response<Body>,
}

/// Ends each of `sids` (sessions of `user`) and returns how many ended, with the upstream
/// tokens of those that did, read before the session record is deleted. A session gone
/// meanwhile (its client logged out) is not counted and not logged out again.
async fn revoke_reading_escrow(
    app: &App,
    user: &str,
    sids: &[SessionId],
    keys: &crate::session::escrow::EscrowKeys,
) -> Result<(usize, Vec<Option<String>>), crate::session::StoreError> {
    let escrows = app.redis.session_escrows(sids).await?;
    let mut ended = 0;
    let mut tokens = Vec::new();
    for (sid, escrow) in sids.iter().zip(escrows) {
        match app.sessions.revoke(*sid).await? {
            Some(info) => {
                ended += 1;
                let token = match escrow {
                    Some((owner, Some(value))) if owner == info.user_id => {
                        match keys.open(*sid, &value) {
                            Ok(t) => Some(t),
                            Err(e) => {
                                tracing::warn!(error = %e, "admin API: escrow copy not usable; no upstream logout for this session");
                                None
                            }
                        }
                    }
                    _ => None,
                };
                tokens.push(token);
            }
            // Stale index entry: tidy it as `revoke_user` does.
            None => app.sessions.store().unindex_session(user, *sid).await?,
        }
    }
    Ok((ended, tokens))
}

/// Logs `tokens` out at the homeserver, a few at a time, each bounded; `None` = not possible.
async fn logout_upstream(app: &App, tokens: Vec<Option<String>>) -> UpstreamLogouts {
    use futures_util::StreamExt;
    #[derive(Clone, Copy)]
    enum One {
        Done,
        Failed,
        NotPossible,
    }
    let started = tokio::time::Instant::now();
    let results: Vec<One> = futures_util::stream::iter(tokens)
        .map(|token| async move {
            let Some(token) = token else {
                return One::NotPossible;
            };
            if started.elapsed() >= UPSTREAM_LOGOUT_DEADLINE {
                return One::Failed;
            }
            let call = app.upstream.logout_as(
                &token,
                None,
                crate::telemetry::metrics::UpstreamCall::AdminLogout,
            );
            match tokio::time::timeout(UPSTREAM_LOGOUT_TIMEOUT, call).await {
                Ok(Ok(Some(s))) if s.is_success() => One::Done,
                // The homeserver no longer knows the token: it is logged out already.
                Ok(Ok(Some(http::StatusCode::UNAUTHORIZED))) => One::Done,
                Ok(Ok(Some(s))) => {
                    tracing::warn!(status = s.as_u16(), "admin API: upstream logout refused");
                    One::Failed
                }
                Ok(Ok(None)) => One::NotPossible,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "admin API: upstream logout failed");
                    One::Failed
                }
                Err(_) => {
                    tracing::warn!("admin API: upstream logout timed out");
                    One::Failed
                }
            }
        })
        .buffer_unordered(UPSTREAM_LOGOUT_CONCURRENCY)
        .collect()
        .await;
    let mut n = UpstreamLogouts::default();
    for r in results {
        match r {
            One::Done => n.done += 1,
            One::Failed => n.failed += 1,
            One::NotPossible => n.not_possible += 1,
        }
    }
    app.metrics
        .admin_upstream_logouts(n.done, n.failed, n.not_possible);
    n
}

/// The ids of a user's sessions, from the per-user index.
async fn user_sids(app: &App, user: &str) -> Result<Vec<SessionId>, crate::session::StoreError> {
    let index = app.sessions.store().user_sessions(user).await?;
    Ok(index.into_iter().map(|(sid, _)| sid).collect())
}

async fn execute(app: &App, call: &Call, upstream_logout: bool) -> Result<Outcome, ApiError> {
    let store_down = |e: crate::session::StoreError| {
        tracing::warn!(error = %e, "admin API: session store failed");
        ApiError::StoreUnavailable
    };
    let escrow = match call {
        Call::RevokeUser(_) | Call::RevokeSession(_) if upstream_logout => Some(
            app.sessions
                .escrow()
                .ok_or(ApiError::InvalidParam(NO_UPSTREAM_KEY))?,
        ),
        _ => None,
    };
    let ended = |user: String, n: usize, upstream: Option<UpstreamLogouts>| {
        app.metrics.sessions_purged(PurgeCause::Admin, n);
        let mut body = json!({ "ended": n });
        if let Some(u) = &upstream {
            body["upstream_logout"] = u.json();
        }
        Outcome {
            user: Some(user),
            count: Some(n),
            upstream,
            res: json_response(http::StatusCode::OK, &body),
        }
    };
    match call {
        Call::ListUser(user) => {
            let sids = user_sids(app, user).await.map_err(store_down)?;
            let mut views = app.redis.session_views(&sids).await.map_err(store_down)?;
            // Another user's session can never be shown, whatever the index says.
            views.retain(|v| &v.user_id == user);
            views.sort_by_key(|v| (v.created_at, v.sid.tag()));
            let sessions: Vec<_> = views
                .iter()
                .map(|v| {
                    json!({
                        "session_id": v.sid.tag(),
                        "device_id": v.device_id,
                        "created_at": v.created_at,
                        "last_refresh_at": v.last_refresh_at,
                        "access_expires_at": v.access_expires_at,
                        "refresh_expires_at": v.refresh_expires_at,
                    })
                })
                .collect();
            Ok(Outcome {
                user: Some(user.clone()),
                count: Some(sessions.len()),
                upstream: None,
                res: json_response(http::StatusCode::OK, &json!({ "sessions": sessions })),
            })
        }
        Call::RevokeUser(user) => match escrow {
            None => {
                let n = app
                    .sessions
                    .revoke_user(user, |_| true)
                    .await
                    .map_err(store_down)?;
                Ok(ended(user.clone(), n, None))
            }
            Some(keys) => {
                let sids = user_sids(app, user).await.map_err(store_down)?;
                let (n, tokens) = revoke_reading_escrow(app, user, &sids, keys)
                    .await
                    .map_err(store_down)?;
                let up = logout_upstream(app, tokens).await;
                Ok(ended(user.clone(), n, Some(up)))
            }
        },
        Call::RevokeSession(sid) => match escrow {
            None => match app.sessions.revoke(*sid).await.map_err(store_down)? {
                Some(info) => Ok(ended(info.user_id, 1, None)),
                None => Err(ApiError::NotFound("No such session")),
            },
            Some(keys) => {
                let owner = app
                    .redis
                    .session_escrows(&[*sid])
                    .await
                    .map_err(store_down)?
                    .into_iter()
                    .next()
                    .flatten()
                    .map(|(u, _)| u)
                    .ok_or(ApiError::NotFound("No such session"))?;
                let (n, tokens) = revoke_reading_escrow(app, &owner, &[*sid], keys)
                    .await
                    .map_err(store_down)?;
                if n == 0 {
                    return Err(ApiError::NotFound("No such session"));
                }
                let up = logout_upstream(app, tokens).await;
                Ok(ended(owner, n, Some(up)))
            }
        },
        Call::Stats => {
            // A fresh count (the call is authenticated and rate-limited); the gauge follows.
            let alive = app.redis.count_sessions().await.map_err(store_down)?;
            app.metrics.set_sessions_alive(alive);
            let (logins, refreshes) = app.metrics.last_minute();
            Ok(Outcome {
                user: None,
                count: None,
                upstream: None,
                res: json_response(
                    http::StatusCode::OK,
                    &json!({
                        "sessions_alive": alive,
                        "logins_last_minute": logins,
                        "refreshes_last_minute": refreshes,
                    }),
                ),
            })
        }
    }
}

/// The audit line; `upstream_*` are -1 unless `logout_upstream=true` was done.
fn audit(
    ip: IpAddr,
    action: &str,
    user: Option<&str>,
    count: Option<usize>,
    upstream: Option<UpstreamLogouts>,
    status: http::StatusCode,
) {
    let up = |f: fn(&UpstreamLogouts) -> u64| upstream.as_ref().map(|u| f(u) as i64).unwrap_or(-1);
    tracing::info!(
        target: "mrp::audit",
        caller = %ip,
        action,
        user = user.unwrap_or("-"),
        count = count.map(|n| n as i64).unwrap_or(-1),
        upstream_done = up(|u| u.done),
        upstream_failed = up(|u| u.failed),
        upstream_not_possible = up(|u| u.not_possible),
        status = status.as_u16(),
        "admin call"
    );
}

fn no_store(mut res: Response<Body>) -> Response<Body> {
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

/// Answers a request under `/admin/`. `api` is `None` without `admin.token_file`: 404.
pub async fn handle(
    app: &App,
    api: Option<&AdminApi>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    ip: IpAddr,
) -> Response<Body> {
    let Some(api) = api else {
        return ApiError::NotFound("The admin API is off (no admin.token_file)").into_response();
    };
    let answer = async {
        api.admit(ip, 1).map_err(|e| ("rate_limited", e))?;
        if let Err(e) = api.authenticate(headers) {
            // Failures drain the caller's budget faster; the answer stays 401.
            let _ = api.admit(ip, FAILURE_COST - 1);
            return Err(("auth_failed", e));
        }
        let call = route(method, path).map_err(|e| ("bad_request", e))?;
        let action = call.action();
        let upstream = wants_upstream_logout(query).map_err(|e| (action, e))?;
        match execute(app, &call, upstream).await {
            Ok(o) => Ok((action, o)),
            Err(e) => Err((action, e)),
        }
    }
    .await;
    let (action, user, count, upstream, res) = match answer {
        Ok((action, o)) => (action, o.user, o.count, o.upstream, o.res),
        Err((action, e)) => (action, None, None, None, e.into_response()),
    };
    audit(ip, action, user.as_deref(), count, upstream, res.status());
    app.metrics.admin_call(action, res.status().as_u16());
    no_store(res)
}

/// Keeps `mrp_sessions_alive` sampled: one paced `SCAN` pass (a step of 1,000 keys every
/// `pace`) starting every `every`, or as soon as the previous pass ends when it took longer
/// (never per scrape).
pub async fn sample_sessions_alive(app: std::sync::Arc<App>, every: Duration, pace: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match app.redis.count_sessions_paced(Some(pace)).await {
            Ok(n) => app.metrics.set_sessions_alive(n),
            Err(e) => tracing::debug!(error = %e, "sessions_alive sample failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let sid = SessionId::generate(&mut rand::thread_rng());
        let tag = sid.tag();
        assert_eq!(
            route(&Method::GET, "/admin/v1/users/@a:b.org/sessions"),
            Ok(Call::ListUser("@a:b.org".into()))
        );
        assert_eq!(
            route(&Method::DELETE, "/admin/v1/users/%40a%3Ab.org/sessions"),
            Ok(Call::RevokeUser("@a:b.org".into()))
        );
        assert_eq!(
            route(&Method::DELETE, &format!("/admin/v1/sessions/{tag}")),
            Ok(Call::RevokeSession(sid))
        );
        // Percent-encoded (as the CLI sends it), `-` and `_` included.
        let encoded =
            percent_encoding::utf8_percent_encode(&tag, percent_encoding::NON_ALPHANUMERIC);
        assert_eq!(
            route(&Method::DELETE, &format!("/admin/v1/sessions/{encoded}")),
            Ok(Call::RevokeSession(sid))
        );
        assert_eq!(route(&Method::GET, "/admin/v1/stats"), Ok(Call::Stats));
        assert_eq!(
            route(&Method::POST, "/admin/v1/stats"),
            Err(ApiError::MethodNotAllowed)
        );
        for bad in ["alice", "@alice", "@:x", "@a b:c", "@a:"] {
            let p = format!("/admin/v1/users/{bad}/sessions");
            assert!(
                matches!(route(&Method::GET, &p), Err(ApiError::InvalidParam(_))),
                "{bad}"
            );
        }
        let long = format!("/admin/v1/users/@{}:x/sessions", "a".repeat(300));
        assert!(matches!(
            route(&Method::GET, &long),
            Err(ApiError::InvalidParam(_))
        ));
        assert!(matches!(
            route(&Method::DELETE, "/admin/v1/sessions/nope!"),
            Err(ApiError::InvalidParam(_))
        ));
        assert!(matches!(
            route(&Method::GET, "/admin/v1/other"),
            Err(ApiError::NotFound(_))
        ));
    }

    #[test]
    fn secret_compare() {
        let api = AdminApi::new("s3cret");
        let mut h = HeaderMap::new();
        assert!(matches!(
            api.authenticate(&h),
            Err(ApiError::MissingToken(_))
        ));
        h.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(matches!(
            api.authenticate(&h),
            Err(ApiError::UnknownToken { .. })
        ));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(api.authenticate(&h).is_ok());
        h.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(api.authenticate(&h).is_err());
    }

    #[test]
    fn upstream_logout_flag() {
        assert_eq!(
            wants_upstream_logout(Some("logout_upstream=true")),
            Ok(true)
        );
        assert_eq!(
            wants_upstream_logout(Some("a=b&logout_upstream=1")),
            Ok(true)
        );
        assert_eq!(
            wants_upstream_logout(Some("logout_upstream=false")),
            Ok(false)
        );
        assert_eq!(wants_upstream_logout(Some("other=true")), Ok(false));
        assert_eq!(wants_upstream_logout(None), Ok(false));
        assert!(matches!(
            wants_upstream_logout(Some("logout_upstream=yes")),
            Err(ApiError::InvalidParam(_))
        ));
    }
}
