//! Every other request: swap the proxy access token for the upstream token, forward, and keep
//! sessions in step with logouts, device deletions and account changes (DESIGN.md §2; the rules
//! are [`crate::matrix::purge`]).

use http::request::Parts;
use http::{Request, Response, StatusCode};

use super::{ApiError, App, Handled, read_body, read_upstream, with_user};
use crate::body::{Body, ClientBody, full, stream};
use crate::matrix::purge::{self, Purge, PurgeCause, Requester};
use crate::matrix::routes::Route;
use crate::session::{Authenticated, ProxyToken, SessionAuth, TokenKind};
use crate::telemetry::metrics::UpstreamCall;
use crate::upstream::credentials::{self, Presented};
use crate::upstream::{ClientConn, rebuilt, relay};

/// Upstream error bodies the proxy inspects (401s) are small.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub async fn handle(
    app: &App,
    req: Request<ClientBody>,
    route: Route,
    conn: &ClientConn,
) -> Result<Handled, ApiError> {
    let (mut parts, body) = req.into_parts();
    let query = parts.uri.query().map(str::to_owned);
    let presented = credentials::presented(&parts.headers, query.as_deref());
    let (session, query_out) =
        swap_token(app, &mut parts, &presented, &route, query.as_deref()).await?;

    // Who the request acts for, when it ends sessions: from our session, or, for a token the
    // proxy did not issue, asked of the homeserver before the token may die.
    let asked;
    let (user, device) = match (&session, presented.token()) {
        (Some(s), _) => (
            Some(s.info.user_id.as_str()),
            Some(s.info.device_id.as_str()),
        ),
        // The futures of the rarer steps (whoami, reading a body, a 401, a purge) are boxed:
        // inline, their room would be moved with this future on every request.
        (None, Some(t)) if purge::needs_user(&route) => {
            asked = Box::pin(app.upstream.whoami(
                t,
                query.as_deref(),
                parts.headers.get(&crate::telemetry::request_id::HEADER),
            ))
            .await?;
            asked
                .as_ref()
                .map_or((None, None), |(u, d)| (Some(u.as_str()), d.as_deref()))
        }
        _ => (None, None),
    };
    let who = Requester {
        has_session: session.is_some(),
        user,
        device,
    };
    // Bodies the proxy must read to know what gets purged (bounded); all others stream.
    let (forward_body, purge) = if purge::reads_body(&route) && user.is_some() {
        let bytes = Box::pin(read_body(app, body)).await?;
        let purge = purge::plan(&route, who, Some(&bytes));
        (full(bytes), purge)
    } else {
        (stream(body), purge::plan(&route, who, None))
    };

    let call = UpstreamCall::for_route(&route);
    let res = app
        .upstream
        .forward(parts, forward_body, query_out.as_deref(), conn, call)
        .await?;
    let logged_user = user.map(str::to_owned);
    if res.status() == StatusCode::UNAUTHORIZED
        && let Some(s) = &session
    {
        let out = Box::pin(upstream_rejected(app, s, res)).await?;
        return Ok(with_user(out, logged_user));
    }
    if res.status() == StatusCode::OK
        && let Some(cause) = PurgeCause::of(&route)
    {
        // Purge only after the homeserver's 200: homeservers differ and have bugs (Conduit's
        // /logout/all answers 401 for normal users).
        Box::pin(apply_purge(app, purge, cause, session.as_ref(), user)).await;
    }
    Ok(with_user(relay(res), logged_user))
}

/// A proxy access token is exchanged for its session's upstream token (in the header, also
/// when the client used `?access_token=`: long-lived upstream tokens must not land in URL logs,
/// issue 9.6). Returns the session, and the query to forward. Foreign tokens (homeserver tokens,
/// appservices) and anonymous requests pass untouched.
async fn swap_token(
    app: &App,
    parts: &mut Parts,
    presented: &Presented,
    route: &Route,
    query: Option<&str>,
) -> Result<(Option<SessionAuth>, Option<String>), ApiError> {
    let t = match presented {
        Presented::Conflicting if credentials::any_proxy_token(&parts.headers, query) => {
            // As Synapse: never guess which of several tokens is meant (and never send both
            // forms upstream).
            return Err(ApiError::MissingToken(
                "Mixing Authorization headers and access_token query parameters, or repeating them, is not allowed",
            ));
        }
        Presented::Header(t) | Presented::Query(t) if ProxyToken::has_proxy_prefix(t) => t,
        _ => return Ok((None, query.map(str::to_owned))),
    };
    let rejected = || ApiError::unknown_token("Unrecognised access token");
    let at = ProxyToken::parse_kind(t, TokenKind::Access).map_err(|_| rejected())?;
    let auth = match app.sessions.authenticate(&at).await {
        Err(e) => {
            tracing::warn!(error = %e, "session store unavailable");
            return Err(ApiError::StoreUnavailable);
        }
        Ok(Authenticated::Valid(a)) => a,
        // /logout with an expired token still logs the session out (DESIGN.md §2).
        Ok(Authenticated::Expired(a)) if *route == Route::Logout => a,
        Ok(Authenticated::Expired(_) | Authenticated::Superseded) => {
            return Err(ApiError::UnknownToken {
                soft_logout: true,
                message: "Access token has expired",
            });
        }
        Ok(Authenticated::Rejected) => return Err(rejected()),
    };
    if !credentials::set_bearer(&mut parts.headers, &auth.upstream_token) {
        return Err(ApiError::UpstreamInvalid);
    }
    let query_out = match presented {
        Presented::Query(_) => query
            .map(|q| credentials::rewrite_query(q, |_| None))
            .filter(|q| !q.is_empty()),
        _ => query.map(str::to_owned),
    };
    Ok((Some(auth), query_out))
}

/// The homeserver rejected the upstream token behind a live proxy session. When it was revoked
/// there ([`purge::upstream_revoked`]), the proxy session goes too.
async fn upstream_rejected(
    app: &App,
    s: &SessionAuth,
    res: crate::upstream::UpstreamResponse,
) -> Result<Response<Body>, ApiError> {
    let (parts, bytes) = read_upstream(res, MAX_ERROR_BODY).await?;
    if purge::upstream_revoked(&bytes) {
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
    Ok(rebuilt(parts, bytes))
}

async fn apply_purge(
    app: &App,
    purge: Purge,
    cause: PurgeCause,
    session: Option<&SessionAuth>,
    user: Option<&str>,
) {
    let result = match (&purge, session, user) {
        (Purge::None, _, _) => return,
        (Purge::ThisSession, Some(s), _) => app
            .sessions
            .revoke(s.sid)
            .await
            .map(|o| usize::from(o.is_some())),
        (Purge::ThisSession, None, _) | (_, _, None) => return,
        (_, _, Some(u)) => app.sessions.revoke_user(u, |d| purge.ends_device(d)).await,
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
