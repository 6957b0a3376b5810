//! `POST /refresh`, served by the proxy itself (spec "Refreshing access tokens"; never
//! forwarded: the homeserver has no refresh tokens). The body rules are
//! [`crate::matrix::refresh`]; this is the rate limit, the store and the answer.

use http::{HeaderValue, Method, Request, StatusCode, header};
use serde_json::json;

use super::{ApiError, App, Handled, json_response, json_text_response, read_body, with_user};
use crate::body::ClientBody;
use crate::matrix::purge::PurgeCause;
use crate::session::Refreshed;
use crate::telemetry::metrics::RefreshOutcome;

pub async fn handle(app: &App, req: Request<ClientBody>) -> Result<Handled, ApiError> {
    match *req.method() {
        // CORS preflight (spec "Web Browser Clients").
        Method::OPTIONS => return Ok(json_response(StatusCode::OK, &json!({})).into()),
        Method::POST => {}
        _ => return Err(ApiError::MethodNotAllowed),
    }
    // No credential is needed and any given is ignored; Content-Type is not required.
    let bytes = read_body(app, req.into_body()).await?;
    let rt = crate::matrix::refresh::parse(&bytes)?;
    // Per session, charged only once the store has shown the token genuine and before anything
    // is written: a limited refresh consumes or rotates nothing, and a made-up token carrying
    // someone else's session id (in clear in every token) cannot spend that session's budget.
    let limits = app.limits.load_full();
    let gate = |sid| async move { limits.check_refresh_session(sid).await };
    let outcome = app
        .sessions
        .refresh_gated(&rt, gate)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "refresh: session store unavailable");
            app.metrics.refresh(RefreshOutcome::StoreError);
            ApiError::RefreshStoreUnavailable
        })?
        .map_err(|l| {
            tracing::debug!(
                limiter = "refresh_session",
                retry_after_ms = l.retry_after_ms(),
                "rate limited"
            );
            ApiError::from(l)
        })?;
    respond(app, outcome)
}

/// The answer to a refresh the store decided, and its metrics and security log.
fn respond(app: &App, outcome: Refreshed) -> Result<Handled, ApiError> {
    match outcome {
        Refreshed::Issued {
            pair,
            replay,
            owner,
        } => {
            if replay {
                tracing::debug!("refresh replayed inside the grace window");
                app.metrics.refresh(RefreshOutcome::GraceReplay);
            } else {
                app.metrics.refresh(RefreshOutcome::Ok);
            }
            let answer = crate::matrix::refresh::answer(
                pair.access.expose(),
                pair.refresh.expose(),
                pair.expires_in_ms,
            );
            let mut res = json_text_response(StatusCode::OK, answer);
            // Tokens must not be cached by intermediaries (RFC 6749 §5.1).
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(with_user(res, owner.map(|o| o.user_id)))
        }
        Refreshed::Unknown => {
            app.metrics.refresh(RefreshOutcome::Unknown);
            Err(ApiError::unknown_token("Unknown refresh token"))
        }
        Refreshed::Reused { info, revoked } => {
            app.metrics.refresh(RefreshOutcome::ReuseDetected);
            if revoked {
                app.metrics.sessions_purged(PurgeCause::Reuse, 1);
            }
            // RFC 9700 §4.14.2: a rotated refresh token used again means two parties hold it.
            tracing::warn!(
                security_event = "refresh_token_reuse",
                user_id = %info.user_id,
                device_id = %info.device_id,
                session_revoked = revoked,
                "refresh token reused after its grace window"
            );
            Err(ApiError::unknown_token("Refresh token already used"))
        }
        // As Synapse: 403, which every SDK handles as a clean logout (DESIGN.md §2).
        Refreshed::Expired => {
            app.metrics.refresh(RefreshOutcome::Expired);
            Err(ApiError::Forbidden("The refresh token has expired"))
        }
    }
}
