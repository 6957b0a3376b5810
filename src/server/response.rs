//! Building the proxy's own answers to clients: CORS, JSON, and the user a response acted for
//! (for the request log line).

use http::{HeaderMap, HeaderValue, Response, header};

use crate::body::{Body, full};

/// CORS headers on the proxy's own answers (spec "Web Browser Clients").
pub fn cors(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"),
    );
}

/// A JSON answer made by the proxy.
pub fn json_response(status: http::StatusCode, v: &serde_json::Value) -> Response<Body> {
    json_text_response(status, v.to_string())
}

/// [`json_response`] for a body already serialized.
pub fn json_text_response(status: http::StatusCode, text: String) -> Response<Body> {
    let mut res = Response::new(full(text));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    cors(res.headers_mut());
    res
}

/// The Matrix user a request acted for. Handlers that know it put it in the response's
/// extensions for the request log line; it never goes on the wire.
#[derive(Clone, Debug)]
pub struct UserId(pub String);

/// Sets the [`UserId`] of a response.
pub fn with_user(mut res: Response<Body>, user_id: Option<String>) -> Response<Body> {
    if let Some(u) = user_id {
        res.extensions_mut().insert(UserId(u));
    }
    res
}
