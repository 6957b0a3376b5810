//! The upstream token sealed a second time, under a key the server holds (`admin.upstream_key_file`),
//! so that an operator can log a session out at the homeserver (`?logout_upstream=true`).
//!
//! Every other copy of the upstream token in Redis is sealed under a key derived from the
//! client's own proxy token ([`super::seal`]): a copy of Redis alone yields nothing, and neither
//! can the proxy read them without the client. That is the default, and it stays so: without
//! the key nothing more is written. With it, each new session (login, register, re-login)
//! also stores this *escrow* copy in its session record; a copy of Redis *and* of the key then
//! yields the upstream tokens of live sessions, which is the price of operator logout, paid only
//! by who configures it.
//!
//! Format: ChaCha20-Poly1305 ciphertext ‖ tag (16 bytes more than the token, nothing else:
//! per-session state is bounded, `tests/state_bounds.rs`). Each session's value is sealed once,
//! under its own key `SHA-256(domain ‖ server key ‖ session id)` with a fixed nonce: a key that
//! encrypts one message needs no random nonce, and the session id (128 random bits) binds the
//! value to its session, so it cannot be moved to another. The current key seals; the current
//! and the previous key open (key rotation, see README "Upstream logout").

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

use super::SessionId;

const KEY_ID_LEN: usize = 4;
/// Associated data: the format's name (the field name in Redis versions the layout).
const AAD: &[u8] = b"mrp/v1/escrow";

/// A 32-byte server key, as read from `admin.upstream_key_file`.
#[derive(Clone)]
pub struct UpstreamKey {
    /// Per-session keys derive from this (itself derived from the file's key).
    root: [u8; 32],
    /// Public fingerprint, for logs.
    id: [u8; KEY_ID_LEN],
}

impl std::fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamKey(id {})", self.id_hex())
    }
}

/// Why a key file's content is not a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "not a 32-byte key: give 32 random bytes (e.g. `head -c 32 /dev/urandom`), or them as \
         64 hex digits or 44 base64 characters"
    )]
    Malformed,
    #[error("all bytes equal: not a random key")]
    Weak,
}

impl UpstreamKey {
    /// Accepts exactly 32 raw bytes, or (surrounding whitespace ignored) 64 hex digits or the
    /// standard base64 of 32 bytes, as Secrets and credential stores often hold text.
    pub fn from_file_content(content: &[u8]) -> Result<Self, KeyError> {
        let raw: [u8; 32] = if content.len() == 32 {
            content.try_into().map_err(|_| KeyError::Malformed)?
        } else {
            let text = std::str::from_utf8(content)
                .map_err(|_| KeyError::Malformed)?
                .trim();
            decode_text(text).ok_or(KeyError::Malformed)?
        };
        if raw.iter().all(|&b| b == raw[0]) {
            return Err(KeyError::Weak);
        }
        Ok(Self::new(&raw))
    }

    fn new(raw: &[u8; 32]) -> Self {
        // Separate values for sealing and naming, both derived from the file's key.
        let root = Sha256::new()
            .chain_update(b"mrp/v1/escrow-key\0")
            .chain_update(raw)
            .finalize()
            .into();
        let full: [u8; 32] = Sha256::new()
            .chain_update(b"mrp/v1/escrow-key-id\0")
            .chain_update(raw)
            .finalize()
            .into();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&full[..KEY_ID_LEN]);
        UpstreamKey { root, id }
    }

    /// A short public name of the key (for logs: which key is configured).
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self, sid: SessionId) -> ChaCha20Poly1305 {
        let k: [u8; 32] = Sha256::new()
            .chain_update(b"mrp/v1/escrow-session\0")
            .chain_update(self.root)
            .chain_update(sid.tag().as_bytes())
            .finalize()
            .into();
        ChaCha20Poly1305::new(Key::from_slice(&k))
    }
}

/// The nonce of every escrow value: each per-session key seals exactly one value.
const NONCE: [u8; 12] = [0; 12];

fn decode_text(text: &str) -> Option<[u8; 32]> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        return Some(out);
    }
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?
        .try_into()
        .ok()
}

/// Why an escrow value could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EscrowError {
    /// Sealed under a key that is neither the current nor the previous one (a session made
    /// before a rotation that dropped its key), or damaged.
    #[error("opens under no configured key (sealed under a key since dropped, or damaged)")]
    NoKey,
}

/// The configured keys: `current` seals, both open.
#[derive(Clone, Debug)]
pub struct EscrowKeys {
    current: UpstreamKey,
    previous: Option<UpstreamKey>,
}

impl EscrowKeys {
    pub fn new(current: UpstreamKey, previous: Option<UpstreamKey>) -> Self {
        EscrowKeys { current, previous }
    }

    pub fn current(&self) -> &UpstreamKey {
        &self.current
    }

    pub fn previous(&self) -> Option<&UpstreamKey> {
        self.previous.as_ref()
    }

    /// Seals `upstream` for the new session `sid` under the current key (once per session).
    pub fn seal(&self, sid: SessionId, upstream: &str) -> Vec<u8> {
        self.current
            .cipher(sid)
            .encrypt(
                Nonce::from_slice(&NONCE),
                Payload {
                    msg: upstream.as_bytes(),
                    aad: AAD,
                },
            )
            .expect("ChaCha20-Poly1305 encryption cannot fail for in-memory buffers")
    }

    /// Opens a value [`seal`](Self::seal)ed for session `sid` by the current or previous key.
    pub fn open(&self, sid: SessionId, value: &[u8]) -> Result<String, EscrowError> {
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|k| {
                k.cipher(sid)
                    .decrypt(
                        Nonce::from_slice(&NONCE),
                        Payload {
                            msg: value,
                            aad: AAD,
                        },
                    )
                    .ok()
            })
            .and_then(|plain| String::from_utf8(plain).ok())
            .ok_or(EscrowError::NoKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn key(b: u8) -> UpstreamKey {
        let mut raw = [b; 32];
        raw[0] = 0;
        UpstreamKey::from_file_content(&raw).unwrap()
    }

    #[test]
    fn seal_open_and_rotation() {
        let mut rng = StdRng::seed_from_u64(3);
        let sid = SessionId::generate(&mut rng);
        let other = SessionId::generate(&mut rng);
        let old = EscrowKeys::new(key(1), None);
        let v = old.seal(sid, "syt_upstream_secret");
        assert!(!v.windows(8).any(|w| w == b"syt_upst"));
        assert_eq!(old.open(sid, &v).unwrap(), "syt_upstream_secret");
        // Bound to its session: another session's key does not open it.
        assert_eq!(old.open(other, &v), Err(EscrowError::NoKey));
        // Per-session keys: the same token in two sessions gives unrelated values.
        let v2 = old.seal(other, "syt_upstream_secret");
        assert_ne!(v, v2);
        assert!(v.iter().zip(&v2).filter(|(a, b)| a == b).count() < 8);
        // Rotated: the old key as previous still opens; the new one seals.
        let rotated = EscrowKeys::new(key(2), Some(key(1)));
        assert_eq!(rotated.open(sid, &v).unwrap(), "syt_upstream_secret");
        let w = rotated.seal(other, "syt_new");
        assert_eq!(rotated.open(other, &w).unwrap(), "syt_new");
        assert_eq!(old.open(other, &w), Err(EscrowError::NoKey));
        // The previous key dropped: what it sealed can no longer be opened.
        let dropped = EscrowKeys::new(key(2), None);
        assert_eq!(dropped.open(sid, &v), Err(EscrowError::NoKey));
        // Tampered or truncated.
        let mut t = v.clone();
        *t.last_mut().unwrap() ^= 1;
        assert_eq!(old.open(sid, &t), Err(EscrowError::NoKey));
        assert_eq!(old.open(sid, &v[..3]), Err(EscrowError::NoKey));
        // Size: the token + the 16-byte tag, nothing else.
        assert_eq!(v.len(), 16 + "syt_upstream_secret".len());
    }

    #[test]
    fn key_file_forms() {
        let raw: Vec<u8> = (0u8..32).collect();
        let a = UpstreamKey::from_file_content(&raw).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let b = UpstreamKey::from_file_content(format!("{hex}\n").as_bytes()).unwrap();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        let c = UpstreamKey::from_file_content(format!(" {b64}\n").as_bytes()).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.id, c.id);
        assert_eq!(a.root, c.root);
        for bad in [
            &b""[..],
            b"short",
            &[7u8; 31],
            &[7u8; 33],
            b"zz".repeat(32).as_slice(),
        ] {
            assert_eq!(
                UpstreamKey::from_file_content(bad).unwrap_err(),
                KeyError::Malformed
            );
        }
        assert_eq!(
            UpstreamKey::from_file_content(&[0u8; 32]).unwrap_err(),
            KeyError::Weak
        );
        // Never printed.
        assert!(!format!("{a:?}").contains(&hex[..8]));
    }
}
