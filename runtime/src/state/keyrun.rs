//! A set's spilled keys: immutable *key runs* on disk, asked one key at a time.
//!
//! A set must answer at once whether a key is new, so unlike a table's runs (read only at
//! the end) its spilled keys are looked up while rows stream in. A key run holds keys
//! sorted by a stable 64-bit hash (then by their bytes) in blocks of [`BLOCK`] entries. In
//! memory stay the first hash of each block and a blocked Bloom filter of [`BLOOM_BITS`]
//! bits per key (about 1% false positives), so a key that is new (the common case) is answered
//! without touching the disk, and a key that may be held costs one read of one block.
//!
//! File: magic, entries (`hash u64, len u32, key`), the filter's words, the block index
//! (`first hash u64, offset u64` per block), a footer (`keys, filter words, blocks, end of
//! entries`, each u64) and the magic again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"WEIRKEY2";
/// Entries per block: one disk read answers a lookup.
const BLOCK: usize = 32;
/// Filter bits per key, and probes per lookup (about 1% false positives).
const BLOOM_BITS: u64 = 10;
const PROBES: u32 = 7;
const FOOTER: u64 = 4 * 8 + 8;

/// Key bytes folded eight at a time: the same on every run and machine (run files outlive
/// a process). A table's partition and a set's [`stable_hash`] both start from it.
pub(super) fn mix(key: &[u8]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15 ^ key.len() as u64;
    for chunk in key.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^= h >> 32;
    }
    h
}

/// A stable 64-bit hash of key bytes, every input bit reaching every output bit.
pub(super) fn stable_hash(key: &[u8]) -> u64 {
    let mut h = mix(key);
    // murmur3's finaliser
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

/// A blocked Bloom filter: the hash picks one 512-bit block (one cache line) and sets
/// [`PROBES`] bits inside it, so a lookup costs one cache miss per run, not one per probe.
fn bloom_positions(hash: u64, bits: u64) -> impl Iterator<Item = u64> {
    let blocks = (bits / 512).max(1);
    let base = ((hash as u128 * blocks as u128) >> 64) as u64 * 512;
    // double hashing inside the block, from bits the block choice hardly uses
    let (h1, h2) = (hash as u32 as u64, (hash >> 32) | 1);
    (0..PROBES as u64).map(move |i| base + h1.wrapping_add(i.wrapping_mul(h2)) % 512)
}

/// Writes a key run; keys must come sorted by `(hash, key)`.
pub(super) struct KeyRunWriter {
    w: BufWriter<File>,
    bloom: Vec<u64>,
    blocks: Vec<(u64, u64)>,
    offset: u64,
    count: u64,
}

impl KeyRunWriter {
    /// `expected`: how many keys will come (sizes the filter).
    pub(super) fn create(path: &Path, expected: u64) -> std::io::Result<KeyRunWriter> {
        // whole 512-bit blocks
        let words = (expected.max(1) * BLOOM_BITS).div_ceil(512) as usize * 8;
        let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
        w.write_all(MAGIC)?;
        Ok(KeyRunWriter { w, bloom: vec![0; words], blocks: Vec::new(), offset: MAGIC.len() as u64, count: 0 })
    }

    pub(super) fn push(&mut self, hash: u64, key: &[u8]) -> std::io::Result<()> {
        if self.count.is_multiple_of(BLOCK as u64) {
            self.blocks.push((hash, self.offset));
        }
        let bits = self.bloom.len() as u64 * 64;
        for p in bloom_positions(hash, bits) {
            self.bloom[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.w.write_all(&hash.to_le_bytes())?;
        self.w.write_all(&(key.len() as u32).to_le_bytes())?;
        self.w.write_all(key)?;
        self.offset += 12 + key.len() as u64;
        self.count += 1;
        Ok(())
    }

    /// Write the filter, index and footer, sync, and return the file's length.
    pub(super) fn finish(mut self) -> std::io::Result<u64> {
        let end = self.offset;
        for word in &self.bloom {
            self.w.write_all(&word.to_le_bytes())?;
        }
        for (hash, offset) in &self.blocks {
            self.w.write_all(&hash.to_le_bytes())?;
            self.w.write_all(&offset.to_le_bytes())?;
        }
        for n in [self.count, self.bloom.len() as u64, self.blocks.len() as u64, end] {
            self.w.write_all(&n.to_le_bytes())?;
        }
        self.w.write_all(MAGIC)?;
        let file = self.w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(end + self.bloom.len() as u64 * 8 + self.blocks.len() as u64 * 16 + FOOTER)
    }
}

/// A key run opened for lookups: its filter and block index in memory.
pub(super) struct KeyRun {
    pub(super) file_name: String,
    pub(super) len: u64,
    file: File,
    bloom: Vec<u64>,
    blocks: Vec<(u64, u64)>,
    end: u64,
    pub(super) count: u64,
}

impl KeyRun {
    pub(super) fn open(path: &Path, file_name: &str) -> Result<KeyRun, String> {
        let shown = path.display();
        let io = |e: std::io::Error| format!("{shown}: {e}");
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < MAGIC.len() as u64 + FOOTER {
            return Err(format!("{shown} is too short to be a key run"));
        }
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, 0).map_err(io)?;
        if &head != MAGIC {
            return Err(format!("{shown} does not start as a key run does"));
        }
        let mut footer = [0u8; FOOTER as usize];
        file.read_exact_at(&mut footer, len - FOOTER).map_err(io)?;
        if &footer[32..] != MAGIC {
            return Err(format!("{shown} does not end as a key run does"));
        }
        let n = |i: usize| u64::from_le_bytes(footer[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let (count, words, blocks, end) = (n(0), n(1), n(2), n(3));
        let tables = words.checked_mul(8).zip(blocks.checked_mul(16)).and_then(|(a, b)| a.checked_add(b));
        if tables.and_then(|t| t.checked_add(end)).and_then(|t| t.checked_add(FOOTER)) != Some(len)
            || words == 0
            || !words.is_multiple_of(8)
            || end < MAGIC.len() as u64
            || blocks != count.div_ceil(BLOCK as u64)
        {
            return Err(format!("{shown} has a damaged footer"));
        }
        file.seek(SeekFrom::Start(end)).map_err(io)?;
        let mut r = BufReader::new(&mut file);
        let mut word = [0u8; 8];
        let mut bloom = Vec::with_capacity(words as usize);
        for _ in 0..words {
            r.read_exact(&mut word).map_err(io)?;
            bloom.push(u64::from_le_bytes(word));
        }
        let mut index = Vec::with_capacity(blocks as usize);
        for _ in 0..blocks {
            r.read_exact(&mut word).map_err(io)?;
            let hash = u64::from_le_bytes(word);
            r.read_exact(&mut word).map_err(io)?;
            let offset = u64::from_le_bytes(word);
            index.push((hash, offset));
        }
        if index.windows(2).any(|w| w[0].1 >= w[1].1 || w[0].0 > w[1].0) || index.last().is_some_and(|b| b.1 >= end) {
            return Err(format!("{shown} has a damaged index"));
        }
        Ok(KeyRun { file_name: file_name.to_string(), len, file, bloom, blocks: index, end, count })
    }

    /// Bytes the run keeps in memory.
    pub(super) fn memory_bytes(&self) -> usize {
        self.bloom.len() * 8 + self.blocks.len() * 16
    }

    fn may_hold(&self, hash: u64) -> bool {
        let bits = self.bloom.len() as u64 * 64;
        bloom_positions(hash, bits).all(|p| self.bloom[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Whether the run holds `key` (whose [`stable_hash`] is `hash`). `buf` is scratch.
    pub(super) fn contains(&self, hash: u64, key: &[u8], buf: &mut Vec<u8>) -> Result<bool, String> {
        if self.blocks.is_empty() || !self.may_hold(hash) {
            return Ok(false);
        }
        // the last block starting below `hash`: equal hashes may begin in it
        let first = self.blocks.partition_point(|b| b.0 < hash).saturating_sub(1);
        for b in first..self.blocks.len() {
            if b > first && self.blocks[b].0 > hash {
                break;
            }
            let from = self.blocks[b].1;
            let to = self.blocks.get(b + 1).map_or(self.end, |n| n.1);
            buf.resize((to - from) as usize, 0);
            self.file.read_exact_at(buf, from).map_err(|e| format!("{}: {e}", self.file_name))?;
            let mut rest: &[u8] = buf;
            while !rest.is_empty() {
                let (h, k) =
                    next_entry(&mut rest).ok_or_else(|| format!("{}: an entry is cut short", self.file_name))?;
                if h > hash {
                    return Ok(false);
                }
                if h == hash && k == key {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// A reader of the run's entries in order.
    fn entries(&self) -> Result<Entries, String> {
        let mut file = self.file.try_clone().map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(MAGIC.len() as u64)).map_err(|e| e.to_string())?;
        let left = self.end - MAGIC.len() as u64;
        Ok(Entries { r: BufReader::with_capacity(1 << 16, file.take(left)) })
    }
}

fn next_entry<'a>(rest: &mut &'a [u8]) -> Option<(u64, &'a [u8])> {
    if rest.len() < 12 {
        return None;
    }
    let hash = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let n = u32::from_le_bytes(rest[8..12].try_into().ok()?) as usize;
    let key = rest.get(12..12 + n)?;
    *rest = &rest[12 + n..];
    Some((hash, key))
}

struct Entries {
    r: BufReader<std::io::Take<File>>,
}

impl Entries {
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>, String> {
        let mut head = [0u8; 12];
        match self.r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let n = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) as usize;
        // what is left of the run's entries bounds what an entry can claim
        let left = self.r.get_ref().limit() as usize + self.r.buffer().len();
        if n > left {
            return Err(format!("a key run's entry claims {n} bytes, {left} are left"));
        }
        let mut key = vec![0u8; n];
        self.r.read_exact(&mut key).map_err(|e| format!("a key run's entry is cut short: {e}"))?;
        Ok(Some((u64::from_le_bytes(head[..8].try_into().unwrap_or_default()), key)))
    }
}

/// Merge runs (whose keys are disjoint) into one run at `path`; returns its length.
pub(super) fn merge_runs(runs: &[KeyRun], path: &Path) -> Result<u64, String> {
    let shown = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut out = KeyRunWriter::create(path, runs.iter().map(|r| r.count).sum()).map_err(shown)?;
    let mut readers = runs.iter().map(KeyRun::entries).collect::<Result<Vec<_>, _>>()?;
    let mut heap = BinaryHeap::new();
    for (i, r) in readers.iter_mut().enumerate() {
        if let Some((h, k)) = r.next()? {
            heap.push(Reverse((h, k, i)));
        }
    }
    while let Some(Reverse((h, k, i))) = heap.pop() {
        out.push(h, &k).map_err(shown)?;
        if let Some((h, k)) = readers[i].next()? {
            heap.push(Reverse((h, k, i)));
        }
    }
    out.finish().map_err(shown)
}
