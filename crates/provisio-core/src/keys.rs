//! Symmetric keys: validation, generation and group-key derivation.

use aws_lc_rs::{hmac, rand::SecureRandom};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};

use crate::CoreError;

/// Length of keys Provisio generates (DPS generates 64-byte keys).
pub const GENERATED_KEY_LEN: usize = 64;

/// Decodes a symmetric key and checks that it is base64 of 16 to 64 bytes.
///
/// # Errors
/// If it is not valid base64 or has the wrong length.
pub fn decode_key(key_b64: &str) -> Result<Vec<u8>, CoreError> {
    let bytes = B64.decode(key_b64.trim()).map_err(|_| CoreError::InvalidKey("not valid base64"))?;
    if !(16..=64).contains(&bytes.len()) {
        return Err(CoreError::InvalidKey("must be base64 of 16 to 64 bytes"));
    }
    Ok(bytes)
}

/// A fresh random key, base64-encoded.
///
/// # Panics
/// Only if the system random generator fails, which aws-lc treats as fatal anyway.
#[must_use]
pub fn generate_key() -> String {
    let mut buf = [0u8; GENERATED_KEY_LEN];
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::SystemRandom::new().fill(&mut buf).expect("system random generator failed");
    B64.encode(buf)
}

/// HMAC-SHA256 of `msg` under `key`.
#[must_use]
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The device key of a device in a symmetric-key enrollment group:
/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))`.
///
/// Derived over the exact registration id the device uses (no case folding), as the
/// DPS docs and SDK samples do.
///
/// # Errors
/// If the group key is not a valid key.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, CoreError> {
    let key = decode_key(group_key_b64)?;
    Ok(B64.encode(hmac_sha256(&key, registration_id.as_bytes())))
}

/// Raw bytes of the derived device key (for verification without a base64 round trip).
pub(crate) fn derive_device_key_bytes(group_key: &[u8], registration_id: &str) -> [u8; 32] {
    hmac_sha256(group_key, registration_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's worked example (concepts-symmetric-key-attestation).
    #[test]
    fn derives_microsoft_example() {
        let k = derive_device_key(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        assert_eq!(k, "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=");
    }

    #[test]
    fn key_rules() {
        assert!(decode_key("not base64!").is_err());
        assert!(decode_key(&B64.encode([0u8; 15])).is_err());
        assert!(decode_key(&B64.encode([0u8; 65])).is_err());
        assert_eq!(decode_key(&B64.encode([7u8; 16])).unwrap().len(), 16);
        let g = generate_key();
        assert_eq!(decode_key(&g).unwrap().len(), 64);
        assert_ne!(g, generate_key());
    }
}
