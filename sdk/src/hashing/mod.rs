//! Column hashing as the host does it (native code, SHA extensions where the CPU has them).
//! The host's `hash-strings` import and the native test harness both call this.

use sha2::digest::generic_array::GenericArray;

#[cfg(target_arch = "x86_64")]
mod x86;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The SHA-256 starting state (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// SHA-256, or HMAC-SHA256 with the key's inner and outer blocks absorbed once, so that each
/// value costs only its own compressions: one for a value under 56 bytes, plus one for the
/// outer hash of an HMAC. (A cloned `hmac::Hmac` per value also copies and re-pads its block
/// buffers; this works on the 32-byte state alone.)
#[derive(Clone, Debug)]
pub struct Hasher {
    /// State after the inner key block (HMAC), or the IV (plain SHA-256).
    inner: [u32; 8],
    /// State after the outer key block (HMAC only).
    outer: Option<[u32; 8]>,
}

impl Hasher {
    /// Plain SHA-256.
    pub fn sha256() -> Hasher {
        Hasher { inner: IV, outer: None }
    }

    /// HMAC-SHA256 with `key` (RFC 2104: a key longer than a block is hashed first).
    pub fn hmac(key: &[u8]) -> Hasher {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&Hasher::sha256().digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let keyed = |pad: u8| {
            let mut state = IV;
            let padded: [u8; 64] = std::array::from_fn(|i| block[i] ^ pad);
            compress(&mut state, &padded);
            state
        };
        Hasher { inner: keyed(0x36), outer: Some(keyed(0x5c)) }
    }

    /// The 32-byte digest of `value`.
    pub fn digest(&self, value: &[u8]) -> [u8; 32] {
        let mut digest = [0u8; 32];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(self.state_of(value)) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }

    /// The digest of `value` as 64 lowercase hex characters, written to `out`.
    pub fn hex_into(&self, value: &[u8], out: &mut [u8; 64]) {
        for (pair, b) in out.chunks_exact_mut(2).zip(self.digest(value)) {
            pair.copy_from_slice(&HEX_PAIRS[b as usize]);
        }
    }

    /// Bytes of key block that precede the value in the inner hash.
    fn prefix(&self) -> u64 {
        if self.outer.is_some() {
            64
        } else {
            0
        }
    }

    /// The final state (the digest as big-endian words) of `value`.
    fn state_of(&self, value: &[u8]) -> [u32; 8] {
        let inner = finish(self.inner, self.prefix(), value);
        match self.outer {
            Some(outer) => finish(outer, 64, &words_to_bytes(&inner)),
            None => inner,
        }
    }

    /// The hex digests of `N` values at once (into `out`, 64 bytes each), when they have as
    /// many blocks; false (and nothing written) otherwise.
    ///
    /// # Safety
    /// The CPU must have what [`x86::available`] checks for.
    #[cfg(target_arch = "x86_64")]
    unsafe fn hex_lanes<const N: usize>(&self, values: [&[u8]; N], out: &mut [u8]) -> bool {
        let prefix = self.prefix();
        let tails: [([u8; 128], usize); N] = std::array::from_fn(|l| padded(prefix, values[l]));
        let whole = values[0].len() / 64;
        if values.iter().zip(&tails).any(|(v, t)| v.len() / 64 != whole || t.1 != tails[0].1) {
            return false;
        }
        let mut states = [self.inner; N];
        for b in 0..whole {
            x86::compress_lanes(&mut states, std::array::from_fn(|l| block(&values[l][64 * b..])));
        }
        for k in 0..tails[0].1 {
            x86::compress_lanes(&mut states, std::array::from_fn(|l| block(&tails[l].0[64 * k..])));
        }
        if let Some(outer) = self.outer {
            let digests: [[u8; 128]; N] = std::array::from_fn(|l| padded(64, &words_to_bytes(&states[l])).0);
            states = [outer; N];
            x86::compress_lanes(&mut states, std::array::from_fn(|l| block(&digests[l])));
        }
        for (state, out) in states.iter().zip(out.chunks_exact_mut(64)) {
            x86::hex(state, out.try_into().expect("64-byte digest"));
        }
        true
    }
}

/// Lowercase hex of every byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let mut pairs = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [HEX[b >> 4], HEX[b & 15]];
        b += 1;
    }
    pairs
};

fn block(bytes: &[u8]) -> &[u8; 64] {
    bytes[..64].try_into().expect("64-byte block")
}

fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

fn words_to_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for (b, word) in bytes.chunks_exact_mut(4).zip(state) {
        b.copy_from_slice(&word.to_be_bytes());
    }
    bytes
}

/// The last block or two of a message (FIPS 180-4, 5.1.1): what is left of `value` after
/// its whole blocks, the 0x80 marker and the bit length of `prefix` bytes plus `value`.
fn padded(prefix: u64, value: &[u8]) -> ([u8; 128], usize) {
    let tail = &value[value.len() - value.len() % 64..];
    let bits = (prefix + value.len() as u64).wrapping_mul(8);
    let mut last = [0u8; 128];
    last[..tail.len()].copy_from_slice(tail);
    last[tail.len()] = 0x80;
    let end = if tail.len() < 56 { 64 } else { 128 };
    last[end - 8..end].copy_from_slice(&bits.to_be_bytes());
    (last, end / 64)
}

/// Absorb `value` after `prefix` bytes already in `state`, pad and return the final state.
fn finish(mut state: [u32; 8], prefix: u64, value: &[u8]) -> [u32; 8] {
    for b in value.chunks_exact(64) {
        compress(&mut state, block(b));
    }
    let (last, blocks) = padded(prefix, value);
    for b in last[..64 * blocks].chunks_exact(64) {
        compress(&mut state, block(b));
    }
    state
}

/// Hash each value `data[offsets[i]..offsets[i+1]]`: HMAC-SHA256 with `key`, or plain
/// SHA-256 without. Returns the lowercase hex digests concatenated (64 bytes a value).
/// Offsets that run backwards or past `data` are an error, never a panic.
pub fn hash_strings(key: Option<&[u8]>, offsets: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
    hash_strings_with(&key.map_or_else(Hasher::sha256, Hasher::hmac), offsets, data)
}

/// [`hash_strings`] with a hasher prepared once (the host keeps one per granted secret).
pub fn hash_strings_with(hasher: &Hasher, offsets: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
    let n = offsets.len().saturating_sub(1);
    let value = |i: usize| {
        let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
        if start > end || end > data.len() {
            return Err(format!("offsets {start}..{end} of value {i} are outside the {} data bytes", data.len()));
        }
        Ok(&data[start..end])
    };
    let mut out = vec![0u8; n * 64];
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // four values at a time; a group whose lengths differ in block count goes two at a
        // time, then one at a time
        let mut i = 0;
        for group in out.chunks_mut(256) {
            let m = group.len() / 64;
            // SAFETY (hex_lanes): `available` said the CPU has the instructions.
            if m == 4 {
                let values = [value(i)?, value(i + 1)?, value(i + 2)?, value(i + 3)?];
                if unsafe { hasher.hex_lanes(values, group) } {
                    i += 4;
                    continue;
                }
            }
            for pair in group.chunks_mut(128) {
                if pair.len() == 128 && unsafe { hasher.hex_lanes([value(i)?, value(i + 1)?], pair) } {
                    i += 2;
                    continue;
                }
                for hex in pair.chunks_exact_mut(64) {
                    hasher.hex_into(value(i)?, hex.try_into().expect("64-byte chunk"));
                    i += 1;
                }
            }
        }
        return Ok(out);
    }
    for (i, hex) in out.chunks_exact_mut(64).enumerate() {
        hasher.hex_into(value(i)?, hex.try_into().expect("64-byte chunk"));
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

    /// Every value length around the block and padding boundaries, keys shorter than, equal
    /// to and longer than a block: the same digests as the `sha2` and `hmac` crates.
    #[test]
    fn same_digests_as_the_reference_crates() {
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};
        let bytes: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for key_len in [0, 1, 31, 63, 64, 65, 100, 200] {
            let key = &bytes[..key_len];
            let hasher = Hasher::hmac(key);
            for len in (0..=140).chain([191, 192, 255, 256, 300]) {
                let value = &bytes[bytes.len() - len..];
                let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
                mac.update(value);
                let want: [u8; 32] = mac.finalize().into_bytes().into();
                assert_eq!(hasher.digest(value), want, "hmac key {key_len} bytes, value {len} bytes");
                if key_len == 0 {
                    let want: [u8; 32] = Sha256::digest(value).into();
                    assert_eq!(Hasher::sha256().digest(value), want, "sha256 of {len} bytes");
                }
            }
        }
    }

    /// A column of values hashed together (four or two at a time where the CPU can) gives each value
    /// the reference crates' digest: neighbours of equal and different block counts, an odd
    /// count, empty values.
    #[test]
    fn a_column_hashes_each_value_as_the_reference_crates_do() {
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};
        let bytes: Vec<u8> = (0..400u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        let lens: Vec<usize> = (0..=140).chain((0..=140).rev()).chain([55, 56, 119, 120, 300, 3, 300, 0, 7]).collect();
        let mut offsets = vec![0u32];
        let mut data = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            data.extend_from_slice(&bytes[i % 50..i % 50 + len]);
            offsets.push(data.len() as u32);
        }
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        for key in [None, Some(&b"a key"[..]), Some(&bytes[..100])] {
            let got = hash_strings(key, &offsets, &data).unwrap();
            assert_eq!(got.len(), lens.len() * 64);
            for (i, w) in offsets.windows(2).enumerate() {
                let value = &data[w[0] as usize..w[1] as usize];
                let want = match key {
                    None => hex(&Sha256::digest(value)),
                    Some(k) => {
                        let mut mac = Hmac::<Sha256>::new_from_slice(k).unwrap();
                        mac.update(value);
                        hex(&mac.finalize().into_bytes())
                    }
                };
                assert_eq!(
                    std::str::from_utf8(&got[64 * i..64 * (i + 1)]).unwrap(),
                    want,
                    "value {i} ({} bytes)",
                    value.len()
                );
            }
        }
    }

    #[test]
    fn bad_offsets_are_errors() {
        assert!(hash_strings(None, &[0, 10], b"abc").is_err());
        assert!(hash_strings(None, &[2, 1], b"abc").is_err());
        assert_eq!(hash_strings(None, &[], b"").unwrap(), b"");
    }
}
