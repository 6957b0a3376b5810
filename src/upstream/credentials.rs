//! Finding and rewriting the client's access token (spec "Using access tokens"): the
//! `Authorization: Bearer` header, or the legacy `access_token` query parameter.

use http::HeaderMap;
use http::header::{self, HeaderValue};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Characters kept as they are in a rewritten query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The token a request presents, and where.
#[derive(Clone, PartialEq, Eq)]
pub enum Presented {
    None,
    Header(String),
    Query(String),
    /// Both forms at once, or several headers or parameters: ambiguous.
    Conflicting,
}

impl std::fmt::Debug for Presented {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Presented::None => "None",
            Presented::Header(_) => "Header(<redacted>)",
            Presented::Query(_) => "Query(<redacted>)",
            Presented::Conflicting => "Conflicting",
        })
    }
}

impl Presented {
    pub fn token(&self) -> Option<&str> {
        match self {
            Presented::Header(t) | Presented::Query(t) => Some(t),
            _ => None,
        }
    }
}

/// The Bearer token of one `Authorization` value, if it is of that scheme.
fn bearer(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let (scheme, rest) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = rest.trim_matches(' ');
    (!t.is_empty()).then_some(t)
}

/// Decoded `access_token` values of a query string.
fn query_tokens(query: Option<&str>) -> Vec<String> {
    query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What token a request carries. Non-Bearer `Authorization` schemes are not ours to judge and
/// count as no token. (Called on every request: no allocation but the token's own copy.)
pub fn presented(headers: &HeaderMap, query: Option<&str>) -> Presented {
    let mut auth = headers.get_all(header::AUTHORIZATION).iter();
    let first = auth.next();
    // Several Authorization headers: ambiguous, whatever they hold.
    if auth.next().is_some() {
        return Presented::Conflicting;
    }
    let token = first.and_then(bearer);
    // A proxy token under another scheme (or in bytes that are not text) must neither be
    // guessed at nor reach the homeserver.
    if let Some(v) = first
        && token.is_none()
        && has_proxy_prefix_bytes(v.as_bytes())
    {
        return Presented::Conflicting;
    }
    let mut q = query_tokens(query);
    match (first.is_some(), token, q.len()) {
        (false, _, 0) => Presented::None,
        (false, _, 1) => Presented::Query(q.pop().unwrap_or_default()),
        (true, Some(t), 0) => Presented::Header(t.to_owned()),
        (true, None, 0) => Presented::None,
        (true, None, 1) => Presented::Query(q.pop().unwrap_or_default()),
        _ => Presented::Conflicting,
    }
}

fn has_proxy_prefix_bytes(b: &[u8]) -> bool {
    b.windows(6).any(|w| w == b"mrpat_" || w == b"mrprt_")
}

/// Whether any presented form (header or query) holds something with a proxy token prefix.
pub fn any_proxy_token(headers: &HeaderMap, query: Option<&str>) -> bool {
    use crate::session::ProxyToken;
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| has_proxy_prefix_bytes(v.as_bytes()))
        || query_tokens(query)
            .iter()
            .any(|t| ProxyToken::has_proxy_prefix(t))
}

/// Replaces the Bearer token (keeping one header).
pub fn set_bearer(headers: &mut HeaderMap, token: &str) -> bool {
    // Visible ASCII and tab only (as `HeaderValue::from_str`), built in place: no second copy.
    if !token
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        return false;
    }
    let mut v = bytes::BytesMut::with_capacity(7 + token.len());
    v.extend_from_slice(b"Bearer ");
    v.extend_from_slice(token.as_bytes());
    match HeaderValue::from_maybe_shared(v.freeze()) {
        Ok(mut v) => {
            v.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, v);
            true
        }
        Err(_) => false,
    }
}

/// Rewrites a query string, mapping each `access_token` value through `f` (`None` drops the
/// parameter). Every other parameter keeps its exact spelling.
pub fn rewrite_query(query: &str, f: impl Fn(&str) -> Option<String>) -> String {
    query
        .split('&')
        .filter_map(|piece| {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let key: String = url::form_urlencoded::parse(format!("{k}=").as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if key != "access_token" {
                return Some(piece.to_owned());
            }
            let value: String = url::form_urlencoded::parse(format!("x={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            f(&value).map(|new| format!("access_token={}", utf8_percent_encode(&new, QUERY_VALUE)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// An application service's identity assertion in a query (spec "Application Service API",
/// "Identity assertion": `user_id`), exactly as spelled: the homeserver acts for that user, so
/// the proxy's whoami for the same token must ask about the same user. `None` when absent.
pub fn identity_assertion(query: Option<&str>) -> Option<&str> {
    query?.split('&').find(|piece| {
        let k = piece.split_once('=').map_or(*piece, |(k, _)| k);
        url::form_urlencoded::parse(format!("{k}=").as_bytes())
            .next()
            .is_some_and(|(k, _)| k == "user_id")
    })
}

/// Removes proxy tokens (any `mrpat_`/`mrprt_` value) from the header and the query. Used on
/// /login and /register, where js-sdk sends its stale token and some homeservers reject any
/// unknown token (DESIGN.md §2). Foreign tokens (appservice logins) stay.
pub fn strip_proxy_tokens(headers: &mut HeaderMap, query: Option<&str>) -> Option<String> {
    use crate::session::ProxyToken;
    let keep: Vec<HeaderValue> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| !has_proxy_prefix_bytes(v.as_bytes()))
        .cloned()
        .collect();
    headers.remove(header::AUTHORIZATION);
    for v in keep {
        headers.append(header::AUTHORIZATION, v);
    }
    query.map(|q| {
        rewrite_query(q, |t| {
            if ProxyToken::has_proxy_prefix(t) {
                None
            } else {
                Some(t.to_owned())
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec "Application Service API", "Identity assertion": the `user_id` parameter, as spelled.
    #[test]
    fn identity_assertion_is_the_user_id_parameter() {
        let q = Some("access_token=as_tok&user_id=%40alice%3Ahs&ts=1");
        assert_eq!(identity_assertion(q), Some("user_id=%40alice%3Ahs"));
        assert_eq!(
            identity_assertion(Some("user%5Fid=%40bob%3Ahs")),
            Some("user%5Fid=%40bob%3Ahs")
        );
        assert_eq!(identity_assertion(Some("user_idx=1&xuser_id=2")), None);
        assert_eq!(identity_assertion(Some("")), None);
        assert_eq!(identity_assertion(None), None);
    }

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn finds_tokens() {
        assert_eq!(presented(&h(&[]), None), Presented::None);
        assert_eq!(
            presented(&h(&["Bearer abc"]), None),
            Presented::Header("abc".into())
        );
        assert_eq!(
            presented(&h(&["bearer  abc "]), None),
            Presented::Header("abc".into())
        );
        assert_eq!(presented(&h(&["Basic abc"]), None), Presented::None);
        assert_eq!(presented(&h(&["Bearer"]), None), Presented::None);
        assert_eq!(
            presented(&h(&[]), Some("a=1&access_token=x%2By&b=2")),
            Presented::Query("x+y".into())
        );
        assert_eq!(
            presented(&h(&["Bearer a"]), Some("access_token=b")),
            Presented::Conflicting
        );
        assert_eq!(
            presented(&h(&["Bearer a", "Bearer b"]), None),
            Presented::Conflicting
        );
        assert_eq!(
            presented(&h(&[]), Some("access_token=a&access_token=b")),
            Presented::Conflicting
        );
        assert_eq!(
            presented(&h(&["Basic x"]), Some("access_token=b")),
            Presented::Query("b".into())
        );
    }

    #[test]
    fn rewrites_query_in_place() {
        let q = "since=s1%2F2&access_token=mrpat_x&timeout=30000";
        assert_eq!(
            rewrite_query(q, |_| Some("syt_a/b+c".into())),
            "since=s1%2F2&access_token=syt%5Fa%2Fb%2Bc&timeout=30000".replace("%5F", "_")
        );
        assert_eq!(rewrite_query(q, |_| None), "since=s1%2F2&timeout=30000");
        assert_eq!(rewrite_query("a&b=", |_| None), "a&b=");
    }

    #[test]
    fn strips_only_proxy_tokens() {
        let mut m = h(&["Bearer mrpat_whatever"]);
        let q = strip_proxy_tokens(&mut m, Some("access_token=mrprt_x&user_id=%40a%3Ab"));
        assert!(m.get(header::AUTHORIZATION).is_none());
        assert_eq!(q.as_deref(), Some("user_id=%40a%3Ab"));
        let mut m = h(&["Bearer as_token_123"]);
        let q = strip_proxy_tokens(&mut m, Some("access_token=as_token_123"));
        assert_eq!(m[header::AUTHORIZATION], "Bearer as_token_123");
        assert_eq!(q.as_deref(), Some("access_token=as_token_123"));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Rewriting never panics and leaves every other parameter's spelling alone.
        #[test]
        fn rewrite_keeps_other_parameters(q in "[a-z_=&%0-9A-F+]{0,60}", t in "[ -~]{0,20}") {
            let out = rewrite_query(&q, |_| Some(t.clone()));
            let others = |s: &str| s.split('&').filter(|p| !p.starts_with("access_token=") && *p != "access_token").map(str::to_owned).collect::<Vec<_>>();
            prop_assert_eq!(others(&out), others(&q));
            // The new value decodes back to the token.
            for (k, v) in url::form_urlencoded::parse(out.as_bytes()) {
                if k == "access_token" {
                    prop_assert_eq!(v.as_ref(), t.as_str());
                }
            }
        }

        #[test]
        fn presented_never_panics(q in any::<String>(), a in "[ -~]{0,40}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&a) {
                h.insert(header::AUTHORIZATION, v);
            }
            let _ = presented(&h, Some(&q));
            let _ = strip_proxy_tokens(&mut h, Some(&q));
        }
    }
}
