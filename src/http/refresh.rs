//! `POST /refresh`, served by the proxy itself (spec "Refreshing access tokens"; never
//! forwarded: the homeserver has no refresh tokens).

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use super::{ApiError, App, Body, json_response, with_user};
use crate::metrics::{PurgeCause, RefreshOutcome};
use crate::session::Refreshed;

pub async fn handle(
    app: &App,
    req: Request<super::body::ClientBody>,
) -> Result<Response<Body>, ApiError> {
    match *req.method() {
        // CORS preflight (spec "Web Browser Clients").
        Method::OPTIONS => return Ok(json_response(StatusCode::OK, &json!({}))),
        Method::POST => {}
        _ => return Err(ApiError::MethodNotAllowed),
    }
    // No credential is needed and any given is ignored; Content-Type is not required.
    let bytes = super::read_body(app, req.into_body()).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|_| ApiError::NotJson)?;
    let obj = body
        .as_object()
        .ok_or(ApiError::BadJson("Request body must be a JSON object"))?;
    let rt = match obj.get("refresh_token") {
        None => return Err(ApiError::MissingParam("refresh_token")),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::InvalidParam("refresh_token must be a string")),
    };
    // Per session, charged only once the store has shown the token genuine and before anything
    // is written: a limited refresh consumes or rotates nothing, and a made-up token carrying
    // someone else's session id (in clear in every token) cannot spend that session's budget.
    let limits = app.limits.load_full();
    let gate = |sid| async move { limits.check_refresh_session(sid).await };
    let outcome = app
        .sessions
        .refresh_gated(rt, gate)
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
            let mut res = json_response(
                StatusCode::OK,
                &json!({
                    "access_token": pair.access.expose(),
                    "refresh_token": pair.refresh.expose(),
                    "expires_in_ms": pair.expires_in_ms,
                }),
            );
            // Tokens must not be cached by intermediaries (RFC 6749 §5.1).
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(with_user(res, owner.map(|o| o.user_id)))
        }
        Refreshed::Unknown => {
            app.metrics.refresh(RefreshOutcome::Unknown);
            Err(ApiError::UnknownToken {
                soft_logout: false,
                message: "Unknown refresh token",
            })
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
            Err(ApiError::UnknownToken {
                soft_logout: false,
                message: "Refresh token already used",
            })
        }
        // As Synapse: 403, which every SDK handles as a clean logout (DESIGN.md §2).
        Refreshed::Expired => {
            app.metrics.refresh(RefreshOutcome::Expired);
            Err(ApiError::Forbidden("The refresh token has expired"))
        }
    }
}
