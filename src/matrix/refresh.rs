//! `POST /refresh` (spec "Refreshing access tokens"): what its body must hold, and its answer.

use serde_json::Value;

/// Why a `/refresh` body was refused (each becomes its own Matrix error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshBodyError {
    /// Not JSON at all (`M_NOT_JSON`).
    NotJson,
    /// JSON, but not an object (`M_BAD_JSON`).
    NotObject,
    /// No `refresh_token` (`M_MISSING_PARAM`).
    Missing,
    /// A `refresh_token` that is not a string (`M_INVALID_PARAM`).
    NotString,
}

/// The `refresh_token` of a `/refresh` body. No credential is needed and any other member is
/// ignored.
pub fn parse(body: &[u8]) -> Result<String, RefreshBodyError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| RefreshBodyError::NotJson)?;
    let Value::Object(mut obj) = v else {
        return Err(RefreshBodyError::NotObject);
    };
    match obj.remove("refresh_token") {
        None => Err(RefreshBodyError::Missing),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(RefreshBodyError::NotString),
    }
}

/// The answer to a successful refresh: `{access_token, refresh_token, expires_in_ms}`, as JSON
/// text. Serialized from a typed struct rather than a built `Value` map (issue 11: building and
/// printing the map was 3.7 % of the proxy's time per refresh); the members are the ones
/// `insert_pair` gives the login answer.
pub fn answer(access_token: &str, refresh_token: &str, expires_in_ms: u64) -> String {
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        access_token: &'a str,
        refresh_token: &'a str,
        expires_in_ms: u64,
    }
    serde_json::to_string(&Answer {
        access_token,
        refresh_token,
        expires_in_ms,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies() {
        assert_eq!(
            parse(br#"{"refresh_token": "mrprt_x"}"#).unwrap(),
            "mrprt_x"
        );
        assert_eq!(
            parse(br#"{"refresh_token": "t", "other": 1}"#).unwrap(),
            "t"
        );
        assert_eq!(parse(b"nope"), Err(RefreshBodyError::NotJson));
        assert_eq!(parse(b""), Err(RefreshBodyError::NotJson));
        assert_eq!(parse(b"[1]"), Err(RefreshBodyError::NotObject));
        assert_eq!(parse(b"\"t\""), Err(RefreshBodyError::NotObject));
        assert_eq!(parse(b"{}"), Err(RefreshBodyError::Missing));
        assert_eq!(
            parse(br#"{"refresh_token": 1}"#),
            Err(RefreshBodyError::NotString)
        );
        assert_eq!(
            parse(br#"{"refresh_token": null}"#),
            Err(RefreshBodyError::NotString)
        );
    }

    #[test]
    fn answer_has_the_three_members() {
        let v: Value = serde_json::from_str(&answer("a", "r", 300_000)).unwrap();
        assert_eq!(
            v,
            json!({"access_token": "a", "refresh_token": "r", "expires_in_ms": 300_000})
        );
        // Token text is escaped like any JSON string.
        let v: Value = serde_json::from_str(&answer("a\"b", "r", 1)).unwrap();
        assert_eq!(v["access_token"], "a\"b");
    }
}
