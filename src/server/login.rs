//! `/login` and `/register`: the I/O around [`crate::matrix::login`]: strip stale proxy tokens,
//! read the body (bounded), forward without the refresh flag, and wrap the homeserver's final
//! 200 into a proxy access/refresh pair.

use http::{HeaderValue, Method, Request, StatusCode, header};

use super::{ApiError, App, Handled, read_body, read_upstream, with_user};
use crate::body::{ClientBody, full, stream};
use crate::matrix::login::{LoginAnswer, LoginAsk, Wrap, is_guest, read_request};
use crate::matrix::purge::PurgeCause;
use crate::matrix::routes::Route;
use crate::session::{IssuedPair, SessionInfo};
use crate::telemetry::metrics::UpstreamCall;
use crate::upstream::{ClientConn, credentials, headers, relay, with_json_body};

/// Login and registration answers are small; anything larger is not a Matrix login response.
const MAX_RESPONSE: usize = 1024 * 1024;

pub async fn handle(
    app: &App,
    req: Request<ClientBody>,
    route: Route,
    conn: &ClientConn,
) -> Result<Handled, ApiError> {
    let (mut parts, body) = req.into_parts();
    // A stale proxy token on /login or /register is dropped: some homeservers reject any unknown
    // token even here (DESIGN.md §2). Foreign tokens (appservice logins) stay.
    let query = credentials::strip_proxy_tokens(&mut parts.headers, parts.uri.query());
    let call = UpstreamCall::for_route(&route);
    if parts.method != Method::POST {
        let res = app
            .upstream
            .forward(parts, stream(body), query.as_deref(), conn, call)
            .await?;
        return Ok(relay(res).into());
    }

    let guest = route == Route::Register && is_guest(query.as_deref());
    let bytes = read_body(app, body).await?;
    let (ask, rewritten) = read_request(&bytes, guest)?;
    let forward_bytes = rewritten.map_or(bytes, Into::into);
    headers::set_content_length(&mut parts.headers, forward_bytes.len());
    let request_id = parts
        .headers
        .get(&crate::telemetry::request_id::HEADER)
        .cloned();
    let res = app
        .upstream
        .forward(parts, full(forward_bytes), query.as_deref(), conn, call)
        .await?;

    // Only the final 200 is ours to touch: UIA 401s, 403s, 429s pass as they are.
    if res.status() != StatusCode::OK || !ask.needs_answer() {
        return Ok(relay(res).into());
    }
    let (res_parts, res_bytes) = read_upstream(res, MAX_RESPONSE).await?;
    let Some(answer) = LoginAnswer::parse(&res_bytes) else {
        return Ok(with_json_body(res_parts, res_bytes).into());
    };
    // For the request log line only.
    let logged_user = answer.user_id.clone();
    end_earlier_sessions(app, &ask, &answer).await?;
    let out = match answer.wrap(&ask) {
        Wrap::Mint {
            upstream_token,
            user_id,
            device_id,
        } => {
            let info = SessionInfo { user_id, device_id };
            let pair = mint(app, &upstream_token, info, request_id.as_ref()).await?;
            app.metrics.session_minted(&route);
            let wrapped = answer.with_pair(
                pair.access.expose(),
                pair.refresh.expose(),
                pair.expires_in_ms,
            );
            let mut out = with_json_body(res_parts, wrapped.into());
            out.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            out
        }
        Wrap::MissingIds => {
            tracing::warn!(
                "login response without user_id/device_id; passing the homeserver's token through"
            );
            with_json_body(res_parts, res_bytes)
        }
        Wrap::Untouched => with_json_body(res_parts, res_bytes),
    };
    Ok(with_user(out, logged_user))
}

/// A new proxy session for the homeserver's token. When it cannot be stored the client gets a
/// 503 and never sees this token: the device is ended upstream rather than left behind, logged
/// in, with a token nobody holds.
async fn mint(
    app: &App,
    upstream_token: &str,
    info: SessionInfo,
    request_id: Option<&HeaderValue>,
) -> Result<IssuedPair, ApiError> {
    match app.sessions.mint(upstream_token, info).await {
        Ok(pair) => Ok(pair),
        Err(e) => {
            tracing::error!(error = %e, "could not store a new session");
            logout_orphan(app, upstream_token, request_id).await;
            Err(ApiError::StoreUnavailable)
        }
    }
}

/// Re-login on an existing device: its earlier proxy sessions end. A store failure fails the
/// login only when it was to get a refresh token (a new session could not be stored either).
async fn end_earlier_sessions(
    app: &App,
    ask: &LoginAsk,
    answer: &LoginAnswer,
) -> Result<(), ApiError> {
    let Some((user, asked)) = answer.relogin(ask) else {
        return Ok(());
    };
    match app.sessions.revoke_user(user, |d| d == asked).await {
        Ok(n) if n > 0 => {
            app.metrics.sessions_purged(PurgeCause::Relogin, n);
            tracing::info!(user_id = %user, revoked = n, "re-login on a device ended its earlier sessions")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "could not end the earlier sessions of a re-used device");
            if ask.refresh {
                return Err(ApiError::StoreUnavailable);
            }
        }
    }
    Ok(())
}

/// Logs out upstream a device whose login the proxy could not store (best effort, logged).
async fn logout_orphan(app: &App, upstream_token: &str, request_id: Option<&HeaderValue>) {
    match app.upstream.logout(upstream_token, request_id).await {
        Ok(true) => tracing::info!("logged out upstream the device of a login that was not stored"),
        Ok(false) => tracing::warn!(
            "the homeserver refused to log out the device of a login that was not stored"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "could not log out upstream the device of a login that was not stored"
        ),
    }
}
