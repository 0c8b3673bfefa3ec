//! Executor tokens: random secrets shown once at registration, kept and compared
//! only as SHA-256 hashes (in memory and in SQL), in constant time.

use rand::Rng;
use sha2::{Digest, Sha256};

/// An executor's token, hashed (once per request, before any lock is taken):
/// what the tables compare.
pub struct TokenHash(pub(super) [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(hash_token(token))
    }
}

pub(super) fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    encode_hash(&bytes)
}

pub(super) fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub(super) fn encode_hash(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares without an early exit, so the time taken does not tell how many
/// leading bytes matched.
pub(super) fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_roundtrip_and_compare() {
        let token = new_token();
        assert_eq!(token.len(), 64);
        let hash = hash_token(&token);
        assert_eq!(decode_hash(&encode_hash(&hash)), Some(hash));
        assert!(constant_time_eq(&hash, &hash_token(&token)));
        assert!(!constant_time_eq(&hash, &hash_token("other")));
        assert_eq!(decode_hash("zz"), None);
        assert_eq!(decode_hash(&"g".repeat(64)), None);
    }
}
