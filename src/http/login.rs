//! `/login` and `/register`: strip the refresh flag, forward, and wrap the homeserver's final
//! 200 into a proxy access/refresh pair (spec "Login", "Account registration", "Refreshing
//! access tokens"; DESIGN.md §2).

use std::net::SocketAddr;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Map, Value};

use super::routes::Route;
use super::{ApiError, App, Body, full, stream, with_user};
use crate::metrics::{PurgeCause, UpstreamCall};
use crate::proxy::{credentials, read_limited, relay, with_json_body};
use crate::session::SessionInfo;

const STABLE_FLAG: &str = "refresh_token";
const UNSTABLE_FLAG: &str = "org.matrix.msc2918.refresh_token";
/// Login and registration answers are small; anything larger is not a Matrix login response.
const MAX_RESPONSE: usize = 1024 * 1024;

/// What the request asked for.
#[derive(Default)]
struct Ask {
    refresh: bool,
    /// A `device_id` named by the client: its earlier sessions end on success (spec
    /// "Relationship between access tokens and devices").
    device_id: Option<String>,
}

/// Reads and strips the refresh flags. A flag that is not a boolean is a client error and
/// nothing is forwarded. Stable wins over unstable when both are present.
pub fn take_flags(obj: &mut Map<String, Value>) -> Result<(bool, bool), ApiError> {
    let mut present = false;
    let mut want = None;
    for key in [STABLE_FLAG, UNSTABLE_FLAG] {
        match obj.remove(key) {
            None => {}
            Some(Value::Bool(b)) => {
                present = true;
                want.get_or_insert(b);
            }
            Some(_) => return Err(ApiError::InvalidParam("refresh_token must be a boolean")),
        }
    }
    Ok((present, want.unwrap_or(false)))
}

fn is_guest(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "kind" && v == "guest")
    })
}

pub async fn handle(
    app: &App,
    req: Request<super::body::ClientBody>,
    route: Route,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    // A stale proxy token on /login or /register is dropped: some homeservers reject any unknown
    // token even here (DESIGN.md §2). Foreign tokens (appservice logins) stay.
    let query = credentials::strip_proxy_tokens(&mut parts.headers, parts.uri.query());
    let call = UpstreamCall::for_route(&route);

    if parts.method != Method::POST {
        let res = app
            .upstream
            .forward(
                parts,
                stream(body),
                &path,
                query.as_deref(),
                peer.ip(),
                call,
            )
            .await
            .map_err(super::forward::upstream_error)?;
        return Ok(relay(res));
    }

    let guest = route == Route::Register && is_guest(query.as_deref());
    let bytes = super::read_body(app, body).await?;

    let mut ask = Ask::default();
    let mut forward_bytes = bytes.clone();
    // Not JSON, or not an object: not ours to judge, the homeserver answers.
    if let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&bytes) {
        let (present, want) = take_flags(&mut obj)?;
        let inhibit = obj.get("inhibit_login") == Some(&Value::Bool(true));
        // Guests and inhibit_login never get a refresh token (the flag is still ours to strip).
        ask.refresh = want && !inhibit && !guest;
        ask.device_id = obj
            .get("device_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if present {
            forward_bytes = serde_json::to_vec(&obj).unwrap_or_default().into();
        }
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(forward_bytes.len()),
    );

    let request_id = parts.headers.get(&super::request_id::HEADER).cloned();
    let res = app
        .upstream
        .forward(
            parts,
            full(forward_bytes),
            &path,
            query.as_deref(),
            peer.ip(),
            call,
        )
        .await
        .map_err(super::forward::upstream_error)?;

    // Only the final 200 is ours to touch: UIA 401s, 403s, 429s pass as they are.
    if res.status() != StatusCode::OK || (!ask.refresh && ask.device_id.is_none()) {
        return Ok(relay(res));
    }
    let (res_parts, res_body) = res.into_parts();
    let res_bytes = read_limited(res_body, MAX_RESPONSE)
        .await
        .map_err(|_| ApiError::UpstreamInvalid)?
        .ok_or(ApiError::UpstreamInvalid)?;
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&res_bytes) else {
        return Ok(with_json_body(res_parts, res_bytes.to_vec()));
    };
    let user_id = obj
        .get("user_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // For the request log line only.
    let logged_user = user_id.clone();
    let device_id = obj
        .get("device_id")
        .and_then(Value::as_str)
        .map(str::to_owned);

    // Re-login on an existing device: its earlier proxy sessions end. The homeserver handles its
    // own tokens; no upstream /logout (DESIGN.md §2).
    if let (Some(asked), Some(user)) = (&ask.device_id, &user_id) {
        let asked = asked.clone();
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
    }

    let upstream_token = obj
        .get("access_token")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let has_own_refresh = obj.contains_key("refresh_token");
    let res = match (
        ask.refresh && !has_own_refresh,
        upstream_token,
        user_id,
        device_id,
    ) {
        (true, Some(ut), Some(user_id), Some(device_id)) => {
            let pair = match app
                .sessions
                .mint(&ut, SessionInfo { user_id, device_id })
                .await
            {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::error!(error = %e, "could not store a new session");
                    // The client gets a 503 and never sees this token: end the device upstream
                    // rather than leave it behind, logged in, with a token nobody holds.
                    logout_orphan(app, &ut, request_id.as_ref()).await;
                    return Err(ApiError::StoreUnavailable);
                }
            };
            app.metrics.session_minted(&route);
            obj.insert("access_token".into(), pair.access.expose().into());
            obj.insert("refresh_token".into(), pair.refresh.expose().into());
            obj.insert("expires_in_ms".into(), pair.expires_in_ms.into());
            let mut out = with_json_body(res_parts, serde_json::to_vec(&obj).unwrap_or_default());
            out.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(out)
        }
        (true, Some(_), _, _) => {
            tracing::warn!(
                "login response without user_id/device_id; passing the homeserver's token through"
            );
            Ok(with_json_body(res_parts, res_bytes.to_vec()))
        }
        _ => Ok(with_json_body(res_parts, res_bytes.to_vec())),
    };
    res.map(|r| with_user(r, logged_user))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(v: Value) -> Result<(bool, bool, Value), ApiError> {
        let Value::Object(mut m) = v else {
            unreachable!()
        };
        let (p, w) = take_flags(&mut m)?;
        Ok((p, w, Value::Object(m)))
    }

    #[test]
    fn flag_rules() {
        use serde_json::json;
        assert_eq!(
            flags(json!({"a": 1})).unwrap(),
            (false, false, json!({"a": 1}))
        );
        assert_eq!(
            flags(json!({"refresh_token": true, "a": 1})).unwrap(),
            (true, true, json!({"a": 1}))
        );
        assert_eq!(
            flags(json!({UNSTABLE_FLAG: true})).unwrap(),
            (true, true, json!({}))
        );
        // Stable wins.
        assert_eq!(
            flags(json!({"refresh_token": false, UNSTABLE_FLAG: true})).unwrap(),
            (true, false, json!({}))
        );
        assert_eq!(
            flags(json!({"refresh_token": true, UNSTABLE_FLAG: false})).unwrap(),
            (true, true, json!({}))
        );
        assert!(flags(json!({"refresh_token": "yes"})).is_err());
        assert!(flags(json!({UNSTABLE_FLAG: 1})).is_err());
        assert!(flags(json!({"refresh_token": null})).is_err());
    }

    #[test]
    fn guest_detection() {
        assert!(is_guest(Some("kind=guest")));
        assert!(is_guest(Some("a=b&kind=guest")));
        assert!(!is_guest(Some("kind=user")));
        assert!(!is_guest(None));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,10}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just(STABLE_FLAG.to_owned()),
                        Just(UNSTABLE_FLAG.to_owned()),
                        ".{0,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Interception never panics, removes exactly the two flags, and keeps the rest.
        #[test]
        fn flags_are_stripped_and_nothing_else_changes(v in json()) {
            let Value::Object(original) = v else { return Ok(()) };
            let mut obj = original.clone();
            match take_flags(&mut obj) {
                Ok((present, _)) => {
                    prop_assert!(!obj.contains_key(STABLE_FLAG) && !obj.contains_key(UNSTABLE_FLAG));
                    prop_assert_eq!(present, original.contains_key(STABLE_FLAG) || original.contains_key(UNSTABLE_FLAG));
                    let mut rest = original.clone();
                    rest.remove(STABLE_FLAG);
                    rest.remove(UNSTABLE_FLAG);
                    prop_assert_eq!(obj, rest);
                }
                Err(_) => {
                    let bad = |k: &str| original.get(k).is_some_and(|v| !v.is_boolean());
                    prop_assert!(bad(STABLE_FLAG) || bad(UNSTABLE_FLAG));
                }
            }
        }
    }
}
