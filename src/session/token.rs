//! The proxy's own token format.
//!
//! `mrpat_` (access) or `mrprt_` (refresh), then 64 characters of unpadded base64url holding
//! 16 bytes of session id and 32 bytes of secret (both from the OS CSPRNG, DESIGN.md §3), then
//! 8 hex characters of CRC-32 over everything before it. The checksum lets us reject garbage and
//! typos without a Redis round trip; the prefixes make leaked tokens recognisable to secret
//! scanners and let the proxy tell its own tokens from the homeserver's.
//!
//! The session id is carried inside the token so that every Redis key of a session can share one
//! hash tag (`{sid}`) and live in one cluster slot, which is what lets each lifecycle step be a
//! single Lua script.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Which of the two token kinds a string is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Access,
    Refresh,
}

impl TokenKind {
    const fn prefix(self) -> &'static str {
        match self {
            TokenKind::Access => "mrpat_",
            TokenKind::Refresh => "mrprt_",
        }
    }
}

const PREFIX_LEN: usize = 6;
const BODY_LEN: usize = 64; // base64url of 48 bytes, no padding
const CHECKSUM_LEN: usize = 8;
/// Total length of every proxy token.
pub const TOKEN_LEN: usize = PREFIX_LEN + BODY_LEN + CHECKSUM_LEN;

/// The random identity of one session (one upstream token and its chain of AT/RT pairs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    pub fn generate(rng: &mut dyn RngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        SessionId(b)
    }

    /// The 22-character base64url form used as the Redis hash tag.
    pub fn tag(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The raw 16 random bytes (not secret on their own: they are in clear in every token).
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn from_tag(tag: &str) -> Option<Self> {
        let v = URL_SAFE_NO_PAD.decode(tag).ok()?;
        Some(SessionId(v.try_into().ok()?))
    }
}

impl fmt::Debug for SessionId {
    // The session id is half of a token's identity; keep it out of debug output anyway.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(..)")
    }
}

/// Why a string is not a valid proxy token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a token of this proxy")]
    Foreign,
    #[error("malformed proxy token")]
    Malformed,
}

/// A parsed proxy token. Holds the secret: never log it (its `Debug` is redacted).
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyToken {
    kind: TokenKind,
    text: String,
    sid: SessionId,
}

impl fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyToken({:?}, <redacted>)", self.kind)
    }
}

impl ProxyToken {
    /// A fresh token of `kind` for session `sid`, 256 secret bits from `rng`.
    pub fn generate(kind: TokenKind, sid: SessionId, rng: &mut dyn RngCore) -> Self {
        let mut raw = [0u8; 48];
        raw[..16].copy_from_slice(&sid.0);
        rng.fill_bytes(&mut raw[16..]);
        let mut text = String::with_capacity(TOKEN_LEN);
        text.push_str(kind.prefix());
        URL_SAFE_NO_PAD.encode_string(raw, &mut text);
        let crc = crc32fast::hash(text.as_bytes());
        // Eight lowercase hex digits, written in place (no formatting on the hot path).
        for shift in (0..8).rev() {
            let nibble = (crc >> (shift * 4)) & 0xf;
            text.push(char::from_digit(nibble, 16).expect("a nibble is a hex digit"));
        }
        ProxyToken { kind, text, sid }
    }

    /// Whether `s` claims to be a proxy token of any kind (by prefix alone).
    pub fn has_proxy_prefix(s: &str) -> bool {
        s.starts_with(TokenKind::Access.prefix()) || s.starts_with(TokenKind::Refresh.prefix())
    }

    /// Whether a proxy token's prefix appears anywhere in `s` (text that may hold a pasted token).
    pub fn contains_proxy_prefix(s: &str) -> bool {
        s.contains(TokenKind::Access.prefix()) || s.contains(TokenKind::Refresh.prefix())
    }

    /// Parses `s`, checking prefix, length, alphabet and checksum; no I/O.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let kind = if s.starts_with(TokenKind::Access.prefix()) {
            TokenKind::Access
        } else if s.starts_with(TokenKind::Refresh.prefix()) {
            TokenKind::Refresh
        } else {
            return Err(TokenError::Foreign);
        };
        if s.len() != TOKEN_LEN || !s.is_ascii() {
            return Err(TokenError::Malformed);
        }
        let (signed, checksum) = s.split_at(PREFIX_LEN + BODY_LEN);
        // Only the canonical spelling: lowercase hex digits (from_str_radix alone takes `+`).
        if !checksum
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(TokenError::Malformed);
        }
        let want = u32::from_str_radix(checksum, 16).map_err(|_| TokenError::Malformed)?;
        if crc32fast::hash(signed.as_bytes()) != want {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(&signed[PREFIX_LEN..])
            .map_err(|_| TokenError::Malformed)?;
        let sid = SessionId(raw[..16].try_into().map_err(|_| TokenError::Malformed)?);
        Ok(ProxyToken {
            kind,
            text: s.to_owned(),
            sid,
        })
    }

    /// Parses `s` and requires it to be of `kind`.
    pub fn parse_kind(s: &str, kind: TokenKind) -> Result<Self, TokenError> {
        let t = Self::parse(s)?;
        if t.kind != kind {
            return Err(TokenError::Malformed);
        }
        Ok(t)
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    pub fn session(&self) -> SessionId {
        self.sid
    }

    /// The token text, for the client. Never log it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The identifier stored in Redis: a domain-separated SHA-256 of the token, hex.
    /// Redis never sees the token itself (DESIGN.md §3).
    pub fn lookup_id(&self) -> String {
        hex(&Sha256::new()
            .chain_update(b"mrp/v1/lookup\0")
            .chain_update(self.text.as_bytes())
            .finalize())
    }

    /// The AEAD key for what this token protects (the upstream token, a successor pair).
    /// Derived with a different domain than `lookup_id`, so a Redis dump cannot produce it.
    pub fn sealing_key(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(b"mrp/v1/seal\0")
            .chain_update(self.text.as_bytes())
            .finalize()
            .into()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn roundtrip_both_kinds() {
        let mut r = rng();
        let sid = SessionId::generate(&mut r);
        for kind in [TokenKind::Access, TokenKind::Refresh] {
            let t = ProxyToken::generate(kind, sid, &mut r);
            assert_eq!(t.expose().len(), TOKEN_LEN);
            let p = ProxyToken::parse(t.expose()).unwrap();
            assert_eq!(p, t);
            assert_eq!(p.kind(), kind);
            assert_eq!(p.session(), sid);
        }
    }

    #[test]
    fn distinct_tokens_and_ids() {
        let mut r = rng();
        let sid = SessionId::generate(&mut r);
        let a = ProxyToken::generate(TokenKind::Access, sid, &mut r);
        let b = ProxyToken::generate(TokenKind::Access, sid, &mut r);
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.lookup_id(), b.lookup_id());
        assert_ne!(a.lookup_id().as_bytes(), &a.sealing_key()[..]);
        assert_eq!(a.lookup_id().len(), 64);
    }

    #[test]
    fn rejects_foreign_and_malformed() {
        let mut r = rng();
        let t = ProxyToken::generate(TokenKind::Access, SessionId::generate(&mut r), &mut r);
        let s = t.expose().to_owned();
        assert_eq!(ProxyToken::parse("syt_abc_def"), Err(TokenError::Foreign));
        assert_eq!(ProxyToken::parse(""), Err(TokenError::Foreign));
        assert_eq!(ProxyToken::parse("mrpat_short"), Err(TokenError::Malformed));
        // One flipped character anywhere breaks the checksum.
        for i in PREFIX_LEN..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let m = String::from_utf8(b).unwrap();
            assert_eq!(ProxyToken::parse(&m), Err(TokenError::Malformed), "pos {i}");
        }
        // Uppercase checksum is not the canonical spelling.
        let upper = format!(
            "{}{}",
            &s[..TOKEN_LEN - 8],
            s[TOKEN_LEN - 8..].to_uppercase()
        );
        if upper != s {
            assert_eq!(ProxyToken::parse(&upper), Err(TokenError::Malformed));
        }
        // Wrong kind.
        assert_eq!(
            ProxyToken::parse_kind(&s, TokenKind::Refresh),
            Err(TokenError::Malformed)
        );
        // Non-ASCII of the right byte length.
        let mut odd = s.clone();
        odd.replace_range(10..12, "é");
        assert_eq!(ProxyToken::parse(&odd), Err(TokenError::Malformed));
    }

    #[test]
    fn debug_is_redacted() {
        let mut r = rng();
        let t = ProxyToken::generate(TokenKind::Refresh, SessionId::generate(&mut r), &mut r);
        assert!(!format!("{t:?}").contains(&t.expose()[6..20]));
    }

    #[test]
    fn session_tag_roundtrip() {
        let mut r = rng();
        let sid = SessionId::generate(&mut r);
        assert_eq!(sid.tag().len(), 22);
        assert_eq!(SessionId::from_tag(&sid.tag()), Some(sid));
        assert_eq!(SessionId::from_tag("nope"), None);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    proptest! {
        /// parse(format(x)) == x for every generated token.
        #[test]
        fn generated_tokens_roundtrip(seed in any::<u64>(), refresh in any::<bool>()) {
            let mut r = StdRng::seed_from_u64(seed);
            let kind = if refresh { TokenKind::Refresh } else { TokenKind::Access };
            let sid = SessionId::generate(&mut r);
            let t = ProxyToken::generate(kind, sid, &mut r);
            let p = ProxyToken::parse(t.expose()).unwrap();
            prop_assert_eq!(p.expose(), t.expose());
            prop_assert_eq!(p.session(), sid);
            prop_assert_eq!(p.kind(), kind);
        }

        /// Arbitrary input never panics; whatever parses prints back to the same text.
        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            if let Ok(t) = ProxyToken::parse(&s) {
                prop_assert_eq!(t.expose(), s.as_str());
            }
        }

        /// Near-misses of the right shape are rejected (checksum or alphabet).
        #[test]
        fn shaped_garbage_is_rejected(body in "[A-Za-z0-9_-]{64}", crc in "[0-9a-f]{8}") {
            let s = format!("mrpat_{body}{crc}");
            if let Ok(t) = ProxyToken::parse(&s) {
                // Only possible when the random checksum happens to be right.
                prop_assert_eq!(crc32fast::hash(&s.as_bytes()[..70]), u32::from_str_radix(&crc, 16).unwrap());
                prop_assert_eq!(t.expose(), s.as_str());
            }
        }
    }
}
