//! The client-facing server: the listener, one request's path through the proxy, the
//! handlers (the I/O around the rules in [`crate::matrix`]) and the one error-to-HTTP map.

pub mod error;
mod head_timer;
mod idle;
mod listener;
mod login;
mod passthrough;
mod refresh;
mod request;
pub mod response;

use bytes::Bytes;

use crate::app::App;
use crate::body::{BodyTimeout, ClientBody, read_limited};
pub use error::ApiError;
pub use listener::serve;
use response::{Handled, json_response, json_text_response, with_user};

/// Reads a JSON body the proxy handles itself: at most `http.max_json_body` bytes within
/// `http.body_read_timeout` in all.
pub async fn read_body(app: &App, body: ClientBody) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(
        app.http.body_read_timeout,
        read_limited(body, app.http.max_json_body),
    )
    .await
    {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(Some(b))) => Ok(b),
        Ok(Ok(None)) => Err(ApiError::TooLarge),
        Ok(Err(e)) if e.is::<BodyTimeout>() => Err(ApiError::BodyTimeout),
        Ok(Err(_)) => Err(ApiError::BadRequest("Could not read the request body")),
    }
}

/// Reads a homeserver answer the proxy rewrites or inspects, at most `limit` bytes; a longer or
/// broken one is a 502.
pub async fn read_upstream(
    res: crate::upstream::UpstreamResponse,
    limit: usize,
) -> Result<(http::response::Parts, Bytes), ApiError> {
    let (parts, body) = res.into_parts();
    match read_limited(body, limit).await {
        Ok(Some(bytes)) => Ok((parts, bytes)),
        Ok(None) | Err(_) => Err(ApiError::UpstreamInvalid),
    }
}
