//! Errors the proxy answers itself, and their one mapping to HTTP.
//!
//! Classified by source: client input → 4xx, upstream → 502/504, store → 503. Every answer is a
//! Matrix error `{"errcode","error"}` (spec "Standard error response"), except a store failure
//! on `/refresh` (DESIGN.md §2: SDKs wipe the session on any JSON error from /refresh).

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::body::{Body, full};
use crate::matrix::login::FlagNotBoolean;
use crate::matrix::refresh::RefreshBodyError;
use crate::upstream::UpstreamError;

/// Seconds clients are asked to wait when the proxy itself is degraded.
const RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("Content not JSON.")]
    NotJson,
    #[error("{0}")]
    BadJson(&'static str),
    #[error("Missing parameter: {0}")]
    MissingParam(&'static str),
    #[error("{0}")]
    InvalidParam(&'static str),
    #[error("Request body too large")]
    TooLarge,
    /// The request body stalled past `http.body_read_timeout`; the connection is closed.
    #[error("Timed out reading the request body")]
    BodyTimeout,
    /// `M_UNKNOWN_TOKEN`; `soft_logout` per spec "Soft logout".
    #[error("{message}")]
    UnknownToken {
        soft_logout: bool,
        message: &'static str,
    },
    #[error("{0}")]
    MissingToken(&'static str),
    /// Refresh token past its idle expiry or session end (as Synapse: 403).
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("Unsupported method")]
    MethodNotAllowed,
    /// No such resource (admin API: unknown session, unknown path).
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    BadRequest(&'static str),
    /// The session store is down, on any route but /refresh.
    #[error("Session store temporarily unavailable")]
    StoreUnavailable,
    /// The session store is down, on /refresh: non-JSON body.
    #[error("Session store temporarily unavailable, try again")]
    RefreshStoreUnavailable,
    #[error("Homeserver unreachable")]
    UpstreamUnreachable,
    #[error("Homeserver timed out")]
    UpstreamTimeout,
    /// Every homeserver connection the proxy may open is busy (`upstream.max_connections`).
    #[error("Too many requests to the homeserver in flight, try again")]
    UpstreamSaturated,
    #[error("Homeserver sent an invalid response")]
    UpstreamInvalid,
    /// A proxy rate limit (spec "Rate limiting"): `retry_after_ms` in the body, `Retry-After`
    /// in whole seconds, rounded up.
    #[error("Too many requests")]
    LimitExceeded { retry_after_ms: u64 },
}

impl From<crate::ratelimit::Limited> for ApiError {
    fn from(l: crate::ratelimit::Limited) -> Self {
        ApiError::LimitExceeded {
            retry_after_ms: l.retry_after_ms(),
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout => ApiError::UpstreamTimeout,
            UpstreamError::Saturated => ApiError::UpstreamSaturated,
            UpstreamError::Unreachable(why) => {
                tracing::warn!(error = %why, "homeserver unreachable");
                ApiError::UpstreamUnreachable
            }
        }
    }
}

impl From<FlagNotBoolean> for ApiError {
    fn from(_: FlagNotBoolean) -> Self {
        ApiError::InvalidParam("refresh_token must be a boolean")
    }
}

impl From<RefreshBodyError> for ApiError {
    fn from(e: RefreshBodyError) -> Self {
        match e {
            RefreshBodyError::NotJson => ApiError::NotJson,
            RefreshBodyError::NotObject => ApiError::BadJson("Request body must be a JSON object"),
            RefreshBodyError::Missing => ApiError::MissingParam("refresh_token"),
            RefreshBodyError::NotString => ApiError::InvalidParam("refresh_token must be a string"),
        }
    }
}

impl ApiError {
    /// `M_UNKNOWN_TOKEN` without `soft_logout`: the client must log in again.
    pub fn unknown_token(message: &'static str) -> Self {
        ApiError::UnknownToken {
            soft_logout: false,
            message,
        }
    }

    /// The one mapping (no wildcard arm, so a new variant must be placed here).
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotJson => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            ApiError::BadJson(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            ApiError::MissingParam(_) => (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"),
            ApiError::InvalidParam(_) => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            ApiError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "M_UNKNOWN"),
            ApiError::UnknownToken { .. } => (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
            ApiError::MissingToken(_) => (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            ApiError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN"),
            ApiError::RefreshStoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN"),
            ApiError::UpstreamUnreachable => (StatusCode::BAD_GATEWAY, "M_UNKNOWN"),
            ApiError::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN"),
            ApiError::UpstreamSaturated => (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN"),
            ApiError::UpstreamInvalid => (StatusCode::BAD_GATEWAY, "M_UNKNOWN"),
            ApiError::LimitExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
        }
    }

    /// The `Retry-After` header, in seconds (exhaustive too: a new variant must decide).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::StoreUnavailable
            | ApiError::RefreshStoreUnavailable
            | ApiError::UpstreamSaturated => Some(RETRY_AFTER_SECS),
            ApiError::LimitExceeded { retry_after_ms } => Some(retry_after_ms.div_ceil(1000)),
            ApiError::NotJson
            | ApiError::BadJson(_)
            | ApiError::MissingParam(_)
            | ApiError::InvalidParam(_)
            | ApiError::TooLarge
            | ApiError::BodyTimeout
            | ApiError::UnknownToken { .. }
            | ApiError::MissingToken(_)
            | ApiError::Forbidden(_)
            | ApiError::MethodNotAllowed
            | ApiError::NotFound(_)
            | ApiError::BadRequest(_)
            | ApiError::UpstreamUnreachable
            | ApiError::UpstreamTimeout
            | ApiError::UpstreamInvalid => None,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (status, errcode) = self.status_and_code();
        let message = self.to_string();
        let retry_after_secs = self.retry_after_secs();
        let (body, content_type) = match &self {
            ApiError::RefreshStoreUnavailable => {
                (format!("{message}\n"), "text/plain; charset=utf-8")
            }
            ApiError::UnknownToken { soft_logout, .. } => (
                json!({"errcode": errcode, "error": message, "soft_logout": soft_logout})
                    .to_string(),
                "application/json",
            ),
            ApiError::LimitExceeded { retry_after_ms } => (
                json!({"errcode": errcode, "error": message, "retry_after_ms": retry_after_ms})
                    .to_string(),
                "application/json",
            ),
            _ => (
                json!({"errcode": errcode, "error": message}).to_string(),
                "application/json",
            ),
        };
        let mut res = Response::new(full(body));
        *res.status_mut() = status;
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(secs) = retry_after_secs {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self == ApiError::BodyTimeout {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        super::response::cors(res.headers_mut());
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(e: ApiError) -> (StatusCode, http::HeaderMap, String) {
        let r = e.into_response();
        let (p, b) = r.into_parts();
        let bytes = b.collect().await.unwrap().to_bytes();
        (
            p.status,
            p.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    async fn json_row(e: ApiError, status: u16, code: &str) -> serde_json::Value {
        let (s, h, b) = body(e).await;
        assert_eq!(s.as_u16(), status);
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(h["access-control-allow-origin"], "*");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["errcode"], code);
        assert!(v["error"].is_string());
        v
    }

    #[tokio::test]
    async fn every_row() {
        json_row(ApiError::NotJson, 400, "M_NOT_JSON").await;
        json_row(ApiError::BadJson("x"), 400, "M_BAD_JSON").await;
        json_row(
            ApiError::MissingParam("refresh_token"),
            400,
            "M_MISSING_PARAM",
        )
        .await;
        json_row(ApiError::InvalidParam("x"), 400, "M_INVALID_PARAM").await;
        json_row(ApiError::TooLarge, 413, "M_TOO_LARGE").await;
        let (_, h, _) = body(ApiError::BodyTimeout).await;
        assert_eq!(h[header::CONNECTION], "close");
        json_row(ApiError::BodyTimeout, 408, "M_UNKNOWN").await;
        let v = json_row(
            ApiError::UnknownToken {
                soft_logout: true,
                message: "x",
            },
            401,
            "M_UNKNOWN_TOKEN",
        )
        .await;
        assert_eq!(v["soft_logout"], true);
        let v = json_row(
            ApiError::UnknownToken {
                soft_logout: false,
                message: "x",
            },
            401,
            "M_UNKNOWN_TOKEN",
        )
        .await;
        assert_eq!(v["soft_logout"], false);
        json_row(ApiError::MissingToken("x"), 401, "M_MISSING_TOKEN").await;
        json_row(ApiError::Forbidden("x"), 403, "M_FORBIDDEN").await;
        json_row(ApiError::MethodNotAllowed, 405, "M_UNRECOGNIZED").await;
        json_row(ApiError::NotFound("x"), 404, "M_NOT_FOUND").await;
        json_row(ApiError::BadRequest("x"), 400, "M_UNKNOWN").await;
        json_row(ApiError::UpstreamUnreachable, 502, "M_UNKNOWN").await;
        json_row(ApiError::UpstreamTimeout, 504, "M_UNKNOWN").await;
        json_row(ApiError::UpstreamInvalid, 502, "M_UNKNOWN").await;
        // Every homeserver connection busy: retry shortly.
        let (_, h, _) = body(ApiError::UpstreamSaturated).await;
        assert_eq!(h[header::RETRY_AFTER], "2");
        json_row(ApiError::UpstreamSaturated, 503, "M_UNKNOWN").await;

        // Rate limited: retry_after_ms in the body, Retry-After in seconds rounded up.
        for (ms, secs) in [(1, "1"), (1000, "1"), (1001, "2"), (20_500, "21")] {
            let e = ApiError::LimitExceeded { retry_after_ms: ms };
            let (_, h, _) = body(e.clone()).await;
            assert_eq!(h[header::RETRY_AFTER], secs, "{ms} ms");
            let v = json_row(e, 429, "M_LIMIT_EXCEEDED").await;
            assert_eq!(v["retry_after_ms"], ms);
        }
        let limited = ApiError::from(crate::ratelimit::Limited {
            retry_after: std::time::Duration::from_micros(1500),
        });
        assert_eq!(limited, ApiError::LimitExceeded { retry_after_ms: 2 });

        let (s, h, b) = body(ApiError::StoreUnavailable).await;
        assert_eq!(s, 503);
        assert_eq!(h[header::RETRY_AFTER], "2");
        assert!(b.contains("M_UNKNOWN"));

        // The one non-JSON answer.
        let (s, h, b) = body(ApiError::RefreshStoreUnavailable).await;
        assert_eq!(s, 503);
        assert_eq!(h[header::RETRY_AFTER], "2");
        assert!(
            h[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        assert!(serde_json::from_str::<serde_json::Value>(&b).is_err());
    }
}
