//! Column hashing as the host does it (native code, SHA extensions where the CPU has them).
//! The host's `hash-strings` import and the native test harness both call this.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Hash each value `data[offsets[i]..offsets[i+1]]`: HMAC-SHA256 with `key`, or plain
/// SHA-256 without. Returns the lowercase hex digests concatenated (64 bytes a value).
/// Offsets that run backwards or past `data` are an error, never a panic.
pub fn hash_strings(key: Option<&[u8]>, offsets: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
    let n = offsets.len().saturating_sub(1);
    let mut out = vec![0u8; n * 64];
    let keyed = match key {
        Some(k) => Some(Hmac::<Sha256>::new_from_slice(k).map_err(|e| e.to_string())?),
        None => None,
    };
    for (i, hex) in out.chunks_exact_mut(64).enumerate() {
        let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
        if start > end || end > data.len() {
            return Err(format!("offsets {start}..{end} of value {i} are outside the {} data bytes", data.len()));
        }
        let value = &data[start..end];
        let digest: [u8; 32] = match &keyed {
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(value);
                mac.finalize().into_bytes().into()
            }
            None => Sha256::digest(value).into(),
        };
        for (pair, b) in hex.chunks_exact_mut(2).zip(digest) {
            pair[0] = HEX[(b >> 4) as usize];
            pair[1] = HEX[(b & 15) as usize];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        // sha256("abc") and HMAC-SHA256(key="key", "The quick brown fox jumps over the lazy dog")
        let data = b"abcThe quick brown fox jumps over the lazy dog";
        let plain = hash_strings(None, &[0, 3], data).unwrap();
        assert_eq!(
            std::str::from_utf8(&plain).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let keyed = hash_strings(Some(b"key"), &[3, data.len() as u32], data).unwrap();
        assert_eq!(
            std::str::from_utf8(&keyed).unwrap(),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn bad_offsets_are_errors() {
        assert!(hash_strings(None, &[0, 10], b"abc").is_err());
        assert!(hash_strings(None, &[2, 1], b"abc").is_err());
        assert_eq!(hash_strings(None, &[], b"").unwrap(), b"");
    }
}
