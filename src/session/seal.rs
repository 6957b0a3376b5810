//! Authenticated encryption of what Redis must hold but must not reveal: the upstream token and
//! the successor pair kept for the refresh grace window (DESIGN.md §3).
//!
//! The key is derived from the proxy token that points to the record
//! ([`ProxyToken::sealing_key`](super::token::ProxyToken::sealing_key)), so there is no key to
//! manage and a copy of Redis alone yields nothing. ChaCha20-Poly1305 (ring) with a random 96-bit nonce
//! prepended; the Redis key name is bound in as associated data so a ciphertext cannot be moved
//! to another record.

use rand::RngCore;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The ciphertext did not authenticate (wrong key, tampered, or truncated).
#[derive(Debug, thiserror::Error)]
#[error("sealed value failed to authenticate")]
pub struct OpenError;

/// ring's ChaCha20-Poly1305 (RFC 8439, the format of the RustCrypto crate used before: sealed
/// values in Redis stay readable, `tests::same_format_as_rustcrypto`): for these short values
/// the RustCrypto AVX2 Poly1305 set-up and finalisation cost 5 % of a refresh (perf, issue 11).
fn cipher(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"))
}

pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8], rng: &mut dyn RngCore) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = cipher(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("ChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    out.extend_from_slice(tag.as_ref());
    out
}

pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
    let mut buf = ct.to_vec();
    let n = cipher(key)
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| OpenError)?
        .len();
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn roundtrip_and_tamper() {
        let mut rng = StdRng::seed_from_u64(1);
        let key = [7u8; 32];
        let s = seal(&key, b"k1", b"syt_secret", &mut rng);
        assert!(!s.windows(10).any(|w| w == b"syt_secret"));
        assert_eq!(open(&key, b"k1", &s).unwrap(), b"syt_secret");
        assert!(open(&[8u8; 32], b"k1", &s).is_err());
        assert!(open(&key, b"k2", &s).is_err());
        let mut t = s.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(open(&key, b"k1", &t).is_err());
        assert!(open(&key, b"k1", &s[..5]).is_err());
        assert!(open(&key, b"k1", &s[..NONCE_LEN + TAG_LEN - 1]).is_err());
    }

    /// Values sealed by earlier versions (RustCrypto's chacha20poly1305) open, and the other
    /// way round: an upgrade keeps every session.
    #[test]
    fn same_format_as_rustcrypto() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
        let mut rng = StdRng::seed_from_u64(2);
        let key = [9u8; 32];
        let rc = ChaCha20Poly1305::new(Key::from_slice(&key));
        let nonce = [3u8; NONCE_LEN];
        let old = rc
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: b"syt_upstream",
                    aad: b"ut\0id",
                },
            )
            .unwrap();
        let sealed = [&nonce[..], &old[..]].concat();
        assert_eq!(open(&key, b"ut\0id", &sealed).unwrap(), b"syt_upstream");
        let new = seal(&key, b"ut\0id", b"syt_upstream", &mut rng);
        let (n, ct) = new.split_at(NONCE_LEN);
        let back = rc
            .decrypt(
                Nonce::from_slice(n),
                Payload {
                    msg: ct,
                    aad: b"ut\0id",
                },
            )
            .unwrap();
        assert_eq!(back, b"syt_upstream");
    }
}
