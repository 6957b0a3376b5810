//! Authenticated encryption of what Redis must hold but must not reveal: the upstream token and
//! the successor pair kept for the refresh grace window (DESIGN.md §3).
//!
//! The key is derived from the proxy token that points to the record
//! ([`ProxyToken::sealing_key`](super::token::ProxyToken::sealing_key)), so there is no key to
//! manage and a copy of Redis alone yields nothing. ChaCha20-Poly1305 with a random 96-bit nonce
//! prepended; the Redis key name is bound in as associated data so a ciphertext cannot be moved
//! to another record.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

const NONCE_LEN: usize = 12;

/// The ciphertext did not authenticate (wrong key, tampered, or truncated).
#[derive(Debug, thiserror::Error)]
#[error("sealed value failed to authenticate")]
pub struct OpenError;

pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8], rng: &mut dyn RngCore) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("ChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < NONCE_LEN {
        return Err(OpenError);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| OpenError)
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
    }
}
