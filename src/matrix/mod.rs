//! The Matrix rules the proxy applies, as plain functions on paths and JSON: which requests it
//! intercepts ([`routes`]), how `/login` and `/register` are rewritten ([`login`]), what a
//! `/refresh` body must hold ([`refresh`]), and which sessions end after a homeserver's 200
//! ([`purge`]). No `http`, `hyper` or Redis here (a test in `tests/layers.rs` keeps it so): the
//! handlers in `server/` do the I/O around these rules.

pub mod login;
pub mod purge;
pub mod refresh;
pub mod routes;

use serde_json::{Map, Value};

/// A string member of a JSON object, owned.
fn string(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Puts a proxy token pair into a JSON object, as `/refresh` answers it and as a wrapped login
/// answer carries it (spec "Refreshing access tokens").
pub fn insert_pair(
    obj: &mut Map<String, Value>,
    access_token: &str,
    refresh_token: &str,
    expires_in_ms: u64,
) {
    obj.insert("access_token".into(), access_token.into());
    obj.insert("refresh_token".into(), refresh_token.into());
    obj.insert("expires_in_ms".into(), expires_in_ms.into());
}
