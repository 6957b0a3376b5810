//! Every other request: swap the proxy access token for the upstream token, forward, and keep
//! sessions in step with logouts, device deletions and account changes (DESIGN.md §2).

use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::Value;

use super::routes::Route;
use super::{ApiError, App, Body, full, stream, with_user};
use crate::metrics::{PurgeCause, UpstreamCall};
use crate::proxy::credentials::{self, Presented};
use crate::proxy::{UpstreamError, read_limited, relay};
use crate::session::{Authenticated, ProxyToken, SessionAuth, TokenKind};

/// Upstream error bodies the proxy inspects (401s) are small.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub fn upstream_error(e: UpstreamError) -> ApiError {
    match e {
        UpstreamError::Timeout => ApiError::UpstreamTimeout,
        UpstreamError::Unreachable(why) => {
            tracing::warn!(error = %why, "homeserver unreachable");
            ApiError::UpstreamUnreachable
        }
    }
}

fn unknown(message: &'static str) -> ApiError {
    ApiError::UnknownToken {
        soft_logout: false,
        message,
    }
}

/// Why a route's purge happens, for metrics (every route is named: no wildcard).
fn purge_cause(route: &Route) -> Option<PurgeCause> {
    match route {
        Route::Logout => Some(PurgeCause::Logout),
        Route::LogoutAll => Some(PurgeCause::LogoutAll),
        Route::DeleteDevice(_) | Route::DeleteDevices => Some(PurgeCause::DeviceDelete),
        Route::ChangePassword => Some(PurgeCause::PasswordChange),
        Route::Deactivate => Some(PurgeCause::Deactivate),
        Route::Login | Route::Register | Route::Refresh | Route::Passthrough => None,
    }
}

/// What must be purged after the homeserver's 200, decided before forwarding.
enum Purge {
    None,
    ThisSession,
    AllOfUser,
    Devices(Vec<String>),
    AllButDevice(String),
}

pub async fn handle(
    app: &App,
    req: Request<super::body::ClientBody>,
    route: Route,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let presented = credentials::presented(&parts.headers, query.as_deref());
    let mut query_out = query.clone();
    let mut session: Option<SessionAuth> = None;

    match &presented {
        Presented::Conflicting
            if credentials::any_proxy_token(&parts.headers, query.as_deref()) =>
        {
            // As Synapse: never guess which of several tokens is meant (and never send both
            // forms upstream).
            return Err(ApiError::MissingToken(
                "Mixing Authorization headers and access_token query parameters, or repeating them, is not allowed",
            ));
        }
        Presented::Header(t) | Presented::Query(t) if ProxyToken::has_proxy_prefix(t) => {
            let at = ProxyToken::parse_kind(t, TokenKind::Access)
                .map_err(|_| unknown("Unrecognised access token"))?;
            let auth = match app.sessions.authenticate(&at).await {
                Err(e) => {
                    tracing::warn!(error = %e, "session store unavailable");
                    return Err(ApiError::StoreUnavailable);
                }
                Ok(Authenticated::Valid(a)) => a,
                // /logout with an expired token still logs the session out (DESIGN.md §2).
                Ok(Authenticated::Expired(a)) if route == Route::Logout => a,
                Ok(Authenticated::Expired(_) | Authenticated::Superseded) => {
                    return Err(ApiError::UnknownToken {
                        soft_logout: true,
                        message: "Access token has expired",
                    });
                }
                Ok(Authenticated::Rejected) => return Err(unknown("Unrecognised access token")),
            };
            // Upstream the token always travels in the header, also when the client used
            // `?access_token=`: long-lived upstream tokens must not land in URL logs (issue 9.6).
            if !credentials::set_bearer(&mut parts.headers, &auth.upstream_token) {
                return Err(ApiError::UpstreamInvalid);
            }
            if matches!(presented, Presented::Query(_)) {
                query_out = query
                    .as_deref()
                    .map(|q| credentials::rewrite_query(q, |_| None))
                    .filter(|q| !q.is_empty());
            }
            session = Some(auth);
        }
        // Foreign tokens (homeserver tokens, appservices) and anonymous requests: untouched.
        _ => {}
    }

    // Who the request acts for, when it ends sessions: from our session, or, for a token the
    // proxy did not issue, asked of the homeserver before the token may die.
    let needs_user = matches!(
        route,
        Route::LogoutAll
            | Route::DeleteDevice(_)
            | Route::DeleteDevices
            | Route::ChangePassword
            | Route::Deactivate
    );
    let (user, requester_device) = match (&session, presented.token()) {
        (Some(s), _) => (Some(s.info.user_id.clone()), Some(s.info.device_id.clone())),
        (None, Some(t)) if needs_user => match app
            .upstream
            .whoami(t, parts.headers.get(&super::request_id::HEADER))
            .await
        {
            Ok(Some((u, d))) => (Some(u), d),
            Ok(None) => (None, None),
            Err(e) => return Err(upstream_error(e)),
        },
        _ => (None, None),
    };

    // Bodies the proxy must read to know what gets purged (bounded); all others stream.
    let read_body = matches!(route, Route::DeleteDevices | Route::ChangePassword) && user.is_some();
    let (forward_body, purge) = match &route {
        Route::DeleteDevices | Route::ChangePassword if read_body => {
            let bytes = super::read_body(app, body).await?;
            let v: Option<Value> = serde_json::from_slice(&bytes).ok();
            let purge = if route == Route::DeleteDevices {
                let devices = v
                    .as_ref()
                    .and_then(|v| v.get("devices"))
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                Purge::Devices(devices)
            } else {
                // Spec "Password management": logout_devices defaults to true; the requester's
                // own session SHOULD NOT be revoked.
                let logout = v
                    .as_ref()
                    .and_then(|v| v.get("logout_devices"))
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                match (&requester_device, logout) {
                    (Some(d), true) => Purge::AllButDevice(d.clone()),
                    (None, true) => Purge::AllOfUser,
                    (_, false) => Purge::None,
                }
            };
            (full(bytes), purge)
        }
        _ => {
            let purge = match (&route, &user) {
                (Route::Logout, _) if session.is_some() => Purge::ThisSession,
                (Route::LogoutAll | Route::Deactivate, Some(_)) => Purge::AllOfUser,
                (Route::DeleteDevice(id), Some(_)) => Purge::Devices(vec![id.clone()]),
                _ => Purge::None,
            };
            (stream(body), purge)
        }
    };

    let res = app
        .upstream
        .forward(
            parts,
            forward_body,
            &path,
            query_out.as_deref(),
            peer.ip(),
            UpstreamCall::for_route(&route),
        )
        .await
        .map_err(upstream_error)?;

    if res.status() == StatusCode::UNAUTHORIZED
        && let Some(s) = &session
    {
        let out = upstream_rejected(app, s, res).await?;
        return Ok(with_user(out, user));
    }
    if res.status() == StatusCode::OK
        && let Some(cause) = purge_cause(&route)
    {
        // Purge only after the homeserver's 200: homeservers differ and have bugs (Conduit's
        // /logout/all answers 401 for normal users).
        apply_purge(app, purge, cause, session.as_ref(), user.as_deref()).await;
    }
    Ok(with_user(relay(res), user))
}

/// The homeserver rejected the upstream token behind a live proxy session. `M_UNKNOWN_TOKEN`
/// without `soft_logout: true` means it was revoked there: purge the proxy session too.
async fn upstream_rejected(
    app: &App,
    s: &SessionAuth,
    res: Response<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (mut parts, body) = res.into_parts();
    let bytes = read_limited(body, MAX_ERROR_BODY)
        .await
        .map_err(|_| ApiError::UpstreamInvalid)?
        .ok_or(ApiError::UpstreamInvalid)?;
    let v: Option<Value> = serde_json::from_slice(&bytes).ok();
    let revoked = v.as_ref().is_some_and(|v| {
        v.get("errcode").and_then(Value::as_str) == Some("M_UNKNOWN_TOKEN")
            && v.get("soft_logout").and_then(Value::as_bool) != Some(true)
    });
    if revoked {
        match app.sessions.revoke(s.sid).await {
            Ok(purged) => {
                if purged.is_some() {
                    app.metrics.sessions_purged(PurgeCause::UpstreamRevoked, 1);
                }
                tracing::info!(
                    user_id = %s.info.user_id,
                    device_id = %s.info.device_id,
                    "homeserver revoked the upstream token; proxy session purged"
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "could not purge a session the homeserver revoked")
            }
        }
    }
    crate::proxy::headers::remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Response::from_parts(parts, full(bytes)))
}

async fn apply_purge(
    app: &App,
    purge: Purge,
    cause: PurgeCause,
    session: Option<&SessionAuth>,
    user: Option<&str>,
) {
    let result = match (purge, user) {
        (Purge::None, _) => return,
        (Purge::ThisSession, _) => match session {
            Some(s) => app
                .sessions
                .revoke(s.sid)
                .await
                .map(|o| usize::from(o.is_some())),
            None => return,
        },
        (Purge::AllOfUser, Some(u)) => app.sessions.revoke_user(u, |_| true).await,
        (Purge::Devices(ds), Some(u)) => {
            app.sessions
                .revoke_user(u, |d| ds.iter().any(|x| x == d))
                .await
        }
        (Purge::AllButDevice(keep), Some(u)) => app.sessions.revoke_user(u, |d| d != keep).await,
        (_, None) => return,
    };
    match result {
        Ok(n) => {
            app.metrics.sessions_purged(cause, n);
            tracing::info!(
                purged = n,
                cause = cause.as_str(),
                "sessions ended after the homeserver's 200"
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "could not purge sessions after the homeserver's 200")
        }
    }
}
