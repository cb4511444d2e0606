//! Sets and maps of int64 keys for stateful plugins (dedup, group-by), built for the guest:
//! no SipHash (which costs more than the rest of a dedup loop in Wasm), one cache line per
//! probe, and — for keys that come in dense ranges, as ids usually do — a bitmap that holds
//! tens of millions of keys in a few megabytes.
//!
//! ```
//! use weir_sdk::intset::{IntMap, IntSet};
//!
//! let mut seen = IntSet::new();
//! assert!(seen.insert(42));
//! assert!(!seen.insert(42));
//!
//! let mut groups = IntMap::new();
//! assert_eq!(groups.get_or_insert(7, 0), (0, true));
//! assert_eq!(groups.get_or_insert(7, 1), (0, false));
//! ```
//!
//! The keys come from the data a pipeline reads. A skewed distribution can only cost the
//! plugin its own time, under the host's deadline.

const EMPTY: u32 = u32::MAX;

#[inline]
fn slot_of(key: i64, mask: usize) -> usize {
    // Fibonacci hashing: consecutive ids spread over the table
    ((key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask
}

/// A map from int64 keys to `u32` values (group numbers), open addressing with linear
/// probing, key and value side by side. `u32::MAX` cannot be stored as a value.
#[derive(Debug, Clone)]
pub struct IntMap {
    slots: Vec<(i64, u32)>,
    len: usize,
    /// Where [`IntMap::get_or_insert_all`] leaves what its look-ahead loads read, so they
    /// are not optimised away.
    touched: u32,
}

impl Default for IntMap {
    fn default() -> Self {
        Self::new()
    }
}

impl IntMap {
    pub fn new() -> IntMap {
        IntMap { slots: vec![(0, EMPTY); 16], len: 0, touched: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`.
    pub fn get(&self, key: i64) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = slot_of(key, mask);
        loop {
            let (k, v) = self.slots[i];
            if v == EMPTY {
                return None;
            }
            if k == key {
                return Some(v);
            }
            i = (i + 1) & mask;
        }
    }

    /// The value of `key`, inserting `value` if the key is new; `true` when it was new.
    #[inline]
    pub fn get_or_insert(&mut self, key: i64, value: u32) -> (u32, bool) {
        debug_assert!(value != EMPTY);
        let mask = self.slots.len() - 1;
        let mut i = slot_of(key, mask);
        loop {
            let (k, v) = self.slots[i];
            if v == EMPTY {
                self.slots[i] = (key, value);
                self.len += 1;
                if self.len * 2 > self.slots.len() {
                    self.grow();
                }
                return (value, true);
            }
            if k == key {
                return (v, false);
            }
            i = (i + 1) & mask;
        }
    }

    /// [`IntMap::get_or_insert`] for every key in order: the value of each key goes to `out`;
    /// a new key gets `next` (then `next + 1`, ...) and is passed to `on_new`. Returns the
    /// next unused value.
    ///
    /// Keys are taken 16 at a time: first each key's home slot is loaded, 16 independent
    /// loads whose cache misses overlap, then the keys are probed in order from warm cache
    /// lines. Large tables miss the cache on almost every key; this is what a prefetch would
    /// do, and Wasm has no prefetch instruction.
    pub fn get_or_insert_all(
        &mut self,
        keys: &[i64],
        mut next: u32,
        out: &mut Vec<u32>,
        mut on_new: impl FnMut(i64),
    ) -> u32 {
        const AHEAD: usize = 32;
        out.reserve(keys.len());
        for chunk in keys.chunks(AHEAD) {
            while (self.len + chunk.len()) * 2 > self.slots.len() {
                self.grow();
            }
            let mask = self.slots.len() - 1;
            let mut touched = 0u32;
            for &key in chunk {
                touched ^= self.slots[slot_of(key, mask)].1;
            }
            self.touched ^= touched;
            for &key in chunk {
                let mut i = slot_of(key, mask);
                let value = loop {
                    let (k, v) = self.slots[i];
                    if v == EMPTY {
                        debug_assert!(next != EMPTY);
                        self.slots[i] = (key, next);
                        self.len += 1;
                        next += 1;
                        on_new(key);
                        break next - 1;
                    }
                    if k == key {
                        break v;
                    }
                    i = (i + 1) & mask;
                };
                out.push(value);
            }
        }
        next
    }

    fn grow(&mut self) {
        let doubled = vec![(0, EMPTY); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        let mask = self.slots.len() - 1;
        for (k, v) in old.into_iter().filter(|(_, v)| *v != EMPTY) {
            let mut i = slot_of(k, mask);
            while self.slots[i].1 != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = (k, v);
        }
    }

    /// Every (key, value), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, u32)> + '_ {
        self.slots.iter().copied().filter(|(_, v)| *v != EMPTY)
    }
}

const PAGE_BITS: u32 = 16;
const PAGE_WORDS: usize = (1 << PAGE_BITS) / 64;

/// A set of int64 keys. It starts as a hash set; when the keys seen so far lie in a range
/// whose bitmap would be no bigger than the hash table, it becomes a bitmap of 8 KiB pages
/// (allocated as keys reach them), and it goes back to hashing if pages end up costing
/// four times what a hash table of the same keys would.
#[derive(Debug, Clone, Default)]
pub struct IntSet {
    len: usize,
    min: i64,
    max: i64,
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    Hash(IntMap),
    Bitmap(Pages),
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Hash(IntMap::new())
    }
}

/// A bitmap of the key space, in pages of 2^16 keys allocated on first use.
#[derive(Debug, Clone, Default)]
struct Pages {
    /// page number (key >> 16) -> index into `pages`
    index: IntMap,
    pages: Vec<Box<[u64; PAGE_WORDS]>>,
    /// the last page used: runs of nearby keys skip the index
    last: Option<(i64, usize)>,
}

impl Pages {
    /// Set `key`'s bit: (whether it was clear, whether a page was allocated for it).
    #[inline]
    fn set(&mut self, key: i64) -> (bool, bool) {
        let page = key >> PAGE_BITS;
        let (p, allocated) = match self.last {
            Some((last, p)) if last == page => (p, false),
            _ => {
                let (p, fresh) = self.index.get_or_insert(page, self.pages.len() as u32);
                if fresh {
                    self.pages.push(Box::new([0u64; PAGE_WORDS]));
                }
                self.last = Some((page, p as usize));
                (p as usize, fresh)
            }
        };
        let bit = (key & ((1 << PAGE_BITS) - 1)) as usize;
        let word = &mut self.pages[p][bit / 64];
        let mask = 1u64 << (bit % 64);
        let new = *word & mask == 0;
        *word |= mask;
        (new, allocated)
    }

    fn contains(&self, key: i64) -> bool {
        self.index.get(key >> PAGE_BITS).is_some_and(|p| {
            let bit = (key & ((1 << PAGE_BITS) - 1)) as usize;
            self.pages[p as usize][bit / 64] & (1 << (bit % 64)) != 0
        })
    }

    fn bytes(&self) -> usize {
        self.pages.len() * PAGE_WORDS * 8
    }

    fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.index.iter().flat_map(move |(page, p)| {
            self.pages[p as usize].iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = bits.trailing_zeros() as i64;
                    bits &= bits - 1;
                    Some((page << PAGE_BITS) | (w as i64 * 64 + b))
                })
            })
        })
    }
}

impl IntSet {
    pub fn new() -> IntSet {
        IntSet::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes the set holds on the heap (its table or its bitmap pages and their index).
    pub fn heap_bytes(&self) -> usize {
        match &self.mode {
            Mode::Hash(m) => m.slots.capacity() * std::mem::size_of::<(i64, u32)>(),
            Mode::Bitmap(pages) => pages.bytes() + pages.index.slots.capacity() * std::mem::size_of::<(i64, u32)>(),
        }
    }

    /// Whether the set is in bitmap mode (for tests and diagnostics).
    pub fn is_bitmap(&self) -> bool {
        matches!(self.mode, Mode::Bitmap(_))
    }

    pub fn contains(&self, key: i64) -> bool {
        match &self.mode {
            Mode::Hash(m) => m.get(key).is_some(),
            Mode::Bitmap(pages) => pages.contains(key),
        }
    }

    /// Add `key`; `true` if it was not in the set.
    #[inline]
    pub fn insert(&mut self, key: i64) -> bool {
        // `grew`: memory was allocated, so the representation is reconsidered
        let (new, grew) = match &mut self.mode {
            Mode::Hash(m) => {
                let before = m.slots.len();
                let (_, new) = m.get_or_insert(key, 0);
                (new, m.slots.len() != before)
            }
            Mode::Bitmap(pages) => pages.set(key),
        };
        if new {
            if self.len == 0 {
                (self.min, self.max) = (key, key);
            } else {
                self.min = self.min.min(key);
                self.max = self.max.max(key);
            }
            self.len += 1;
        }
        if grew {
            self.reconsider();
        }
        new
    }

    /// After an allocation: a hash table whose key range fits a bitmap no bigger than the
    /// table becomes pages; pages that cost four times a hash table of the same keys go
    /// back to hashing.
    fn reconsider(&mut self) {
        match &self.mode {
            Mode::Hash(m) => {
                let range = (self.max as i128 - self.min as i128 + 1) as u128;
                let bitmap_bytes = range / 8 + 2 * (PAGE_WORDS as u128 * 8);
                if bitmap_bytes <= (m.slots.len() * 16) as u128 {
                    let mut pages = Pages::default();
                    for (k, _) in m.iter() {
                        pages.set(k);
                    }
                    self.mode = Mode::Bitmap(pages);
                }
            }
            Mode::Bitmap(pages) => {
                if pages.bytes() > 4 * 16 * self.len + (64 << 10) {
                    let mut m = IntMap::new();
                    for k in pages.iter() {
                        m.get_or_insert(k, 0);
                    }
                    self.mode = Mode::Hash(m);
                }
            }
        }
    }

    /// Every key, in no particular order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = i64> + '_> {
        match &self.mode {
            Mode::Hash(m) => Box::new(m.iter().map(|(k, _)| k)),
            Mode::Bitmap(pages) => Box::new(pages.iter()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_or_insert_all_numbers_keys_in_first_seen_order_like_one_at_a_time() {
        let keys: Vec<i64> = (0..5000).map(|i| (i * 7919 % 1201) - 600).chain([i64::MIN, i64::MAX, 0]).collect();
        let mut one = IntMap::new();
        let mut next = 0;
        let expected: Vec<u32> = keys
            .iter()
            .map(|&k| {
                let (v, new) = one.get_or_insert(k, next);
                next += new as u32;
                v
            })
            .collect();
        let (mut all, mut out, mut new_keys) = (IntMap::new(), Vec::new(), Vec::new());
        // in uneven pieces, as batches come
        let mut next_all = 0;
        for piece in keys.chunks(333) {
            next_all = all.get_or_insert_all(piece, next_all, &mut out, |k| new_keys.push(k));
        }
        assert_eq!(out, expected);
        assert_eq!(next_all, next);
        assert_eq!(all.len(), one.len());
        let mut firsts = Vec::new();
        for &k in &keys {
            if !firsts.contains(&k) {
                firsts.push(k);
            }
        }
        assert_eq!(new_keys, firsts);
    }
    use std::collections::HashSet;

    fn check_against_std(keys: impl IntoIterator<Item = i64>) -> IntSet {
        let mut ours = IntSet::new();
        let mut std = HashSet::new();
        for k in keys {
            assert_eq!(ours.insert(k), std.insert(k), "insert {k}");
        }
        assert_eq!(ours.len(), std.len());
        let mut a: Vec<i64> = ours.iter().collect();
        let mut b: Vec<i64> = std.iter().copied().collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        for k in b.iter().take(1000) {
            assert!(ours.contains(*k));
        }
        ours
    }

    #[test]
    fn dense_ids_become_a_bitmap() {
        // ids counting up with some repeats, the way event ids arrive
        let keys = (0..300_000i64).map(|i| if i % 10 == 3 { i / 2 } else { i });
        let set = check_against_std(keys);
        assert!(set.is_bitmap());
        assert!(!set.contains(-1) && !set.contains(300_000));
    }

    #[test]
    fn scattered_keys_stay_hashed_and_extremes_work() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let keys: Vec<i64> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as i64
            })
            .chain([i64::MIN, i64::MAX, 0, -1, i64::MIN])
            .collect();
        let set = check_against_std(keys);
        assert!(!set.is_bitmap());
    }

    #[test]
    fn a_bitmap_that_turns_sparse_goes_back_to_hashing() {
        // dense first, then keys a page apart
        let keys = (0..100_000i64).chain((0..200_000i64).map(|i| 1_000_000_000 + i * 70_000));
        let set = check_against_std(keys);
        assert!(!set.is_bitmap());
    }

    #[test]
    fn int_map_values() {
        let mut m = IntMap::new();
        for k in 0..10_000i64 {
            assert_eq!(m.get_or_insert(k * 7 - 5000, k as u32), (k as u32, true));
        }
        for k in 0..10_000i64 {
            assert_eq!(m.get(k * 7 - 5000), Some(k as u32));
            assert_eq!(m.get_or_insert(k * 7 - 5000, 0), (k as u32, false));
        }
        assert_eq!(m.get(3), None);
        assert_eq!(m.len(), 10_000);
    }
}
