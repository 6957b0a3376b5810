//! Building the proxy's own answers to clients: CORS, JSON, and the user an answer acted for
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

/// A handler's answer, and the Matrix user the request acted for when the handler knows it
/// (for the request log line; it never goes on the wire). Returned beside the response rather
/// than in its extensions, which cost a map allocation per request (issue 11).
pub struct Handled {
    pub res: Response<Body>,
    pub user: Option<String>,
}

impl From<Response<Body>> for Handled {
    fn from(res: Response<Body>) -> Self {
        Handled { res, user: None }
    }
}

/// An answer that acted for `user`.
pub fn with_user(res: Response<Body>, user: Option<String>) -> Handled {
    Handled { res, user }
}
