//! `X-Request-Id`: the client's (or an ingress's) id when it is sane, else one the proxy makes.
//! It is forwarded to the homeserver, returned to the client and logged, so one id follows a
//! request through every log.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::session::ProxyToken;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id accepted from a client: ids end up in every log line of the request.
const MAX_LEN: usize = 128;

/// A request id: 1 to 128 visible ASCII characters, so it is safe to log and to send on. Held as
/// the header value itself: it is put on the forwarded request and on the answer by reference
/// count, not copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        // Visible ASCII only, by construction.
        self.0.to_str().unwrap_or("invalid")
    }

    /// 128 random bits as 32 lowercase hex digits.
    pub fn generate() -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut n = rand::random::<u128>();
        let mut hex = [0u8; 32];
        for d in hex.iter_mut().rev() {
            *d = DIGITS[(n & 15) as usize];
            n >>= 4;
        }
        let v = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&hex))
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        RequestId(v)
    }

    /// Accepts a client-supplied id if it is 1–128 visible ASCII characters (no spaces or
    /// control characters: no log injection) and holds nothing that looks like a proxy token,
    /// anywhere in it (a client pasting one there, whole or after a prefix, must not get it
    /// logged).
    pub fn parse(v: &HeaderValue) -> Option<Self> {
        let b = v.as_bytes();
        let sane =
            !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| (0x21..=0x7e).contains(c));
        let s = std::str::from_utf8(b).ok()?;
        (sane && !ProxyToken::contains_proxy_prefix(s)).then(|| RequestId(v.clone()))
    }

    /// The id of a request: its first `X-Request-Id` when sane, else a new one. The headers
    /// are left with exactly that one value, ready to be forwarded.
    pub fn take_or_generate(headers: &mut HeaderMap) -> Self {
        let id = headers
            .get(&HEADER)
            .and_then(Self::parse)
            .unwrap_or_else(Self::generate);
        headers.insert(HEADER, id.header_value());
        id
    }

    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn is_generated(id: &RequestId) -> bool {
        id.as_str().len() == 32 && id.as_str().bytes().all(|c| c.is_ascii_hexdigit())
    }

    #[test]
    fn keeps_a_sane_client_id() {
        let mut h = with(&[b"abc-123_XYZ.{trace}"]);
        let id = RequestId::take_or_generate(&mut h);
        assert_eq!(id.as_str(), "abc-123_XYZ.{trace}");
        assert_eq!(h.get_all(HEADER).iter().count(), 1);
        assert_eq!(h[HEADER], "abc-123_XYZ.{trace}");
        let max = "a".repeat(128);
        assert_eq!(
            RequestId::take_or_generate(&mut with(&[max.as_bytes()])).as_str(),
            max
        );
    }

    #[test]
    fn replaces_missing_or_insane_ids() {
        let too_long = "a".repeat(129);
        let cases: &[&[&[u8]]] = &[
            &[],
            &[b""],
            &[b"has space"],
            &[b"tab\there"],
            &[b"caf\xc3\xa9"],
            &[too_long.as_bytes()],
            &[b"mrpat_looks_like_a_token"],
            &[b"mrprt_looks_like_a_token"],
            &[b"req-mrpat_looks_like_a_token"],
            &[b"Bearer:mrprt_looks_like_a_token"],
        ];
        for values in cases {
            let mut h = with(values);
            let id = RequestId::take_or_generate(&mut h);
            assert!(is_generated(&id), "{values:?} gave {id:?}");
            assert_eq!(h.get_all(HEADER).iter().count(), 1);
            assert_eq!(h[HEADER], id.as_str());
        }
        // Duplicates collapse to the first (sane) one.
        let mut h = with(&[b"first", b"second"]);
        assert_eq!(RequestId::take_or_generate(&mut h).as_str(), "first");
        assert_eq!(h.get_all(HEADER).iter().count(), 1);
    }

    #[test]
    fn generated_ids_differ() {
        assert_ne!(RequestId::generate(), RequestId::generate());
    }
}
