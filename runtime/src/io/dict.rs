//! A dictionary encoder for the column chunks of flat 32/64-bit numbers and strings.
//!
//! The Parquet crate's writer looks every value up in its dictionary through a general
//! interner: a keyed hash over the value's bytes, then a byte comparison with the stored
//! value. On a filtered output with a few low-cardinality columns (country, category,
//! amount: W2 writes three million rows of each) that lookup was 15% of the step's CPU.
//! This encoder keeps the same file layout — a PLAIN dictionary page, RLE_DICTIONARY data
//! pages of at most `data_page_row_count_limit` rows, plain pages after the dictionary
//! outgrows `dictionary_page_size_limit`, chunk statistics, column and offset index — but
//! looks values up by a multiply-mix hash of the value itself in an open-addressed table.
//! The hash is keyed per process, so data cannot be shaped to collide.
//!
//! Only columns whose settings it writes the same way as the crate's writer get it (see
//! [`DictKind::for_column`]); every other column keeps the crate's writer.
//!
//! **Upgrading parquet.** This module is the only user of the crate's semver-exempt
//! `experimental` API (the `experimental` feature in runtime/Cargo.toml): `compression`
//! (`create_codec`, `Codec`) here and `encodings::rle::RleDecoder` in its tests. A new
//! parquet version may change them without notice, and may change what the crate's own
//! writer puts in a chunk (page cuts, statistics, histograms, page index) that this
//! encoder mirrors. After an upgrade: build, then run
//! `cargo test -p weir --release io::` — `randomized_schemas_and_settings_write_what_the_crate_writes`
//! (in io/encode.rs) writes generated schemas, null densities, value distributions,
//! dictionary overflows and page sizes with both writers and compares values, statistics
//! and page index; if it fails, fix this module or let [`DictKind::for_column`] hand the
//! affected columns back to the crate's writer.

use std::hash::BuildHasher;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_buffer::{BooleanBufferBuilder, NullBuffer};
use arrow_schema::{DataType, TimeUnit};
use bytes::Bytes;
use parquet::basic::{BoundaryOrder, Compression, Encoding, PageType, Type as PhysicalType};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::compression::{create_codec, Codec, CodecOptionsBuilder};
use parquet::data_type::ByteArray;
use parquet::errors::ParquetError;
use parquet::file::metadata::{
    ColumnChunkMetaData, ColumnIndexBuilder, LevelHistogram, OffsetIndexBuilder, PageEncodingStats,
};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::file::statistics::{Statistics, ValueStatistics};
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

type Result<T> = std::result::Result<T, ParquetError>;

/// Values looked up between checks of the page and dictionary limits (the crate's writer
/// checks them as often).
const MINI_BATCH: usize = 1024;
const EMPTY: u32 = u32::MAX;

/// The values a [`DictColumn`] takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DictKind {
    /// INT32: Int32, Date32.
    I32,
    /// INT64: Int64, timestamps of milli-, micro- or nanoseconds.
    I64,
    /// DOUBLE: Float64.
    F64,
    /// BYTE_ARRAY: Utf8.
    Str,
}

impl DictKind {
    /// The kind of a flat leaf column of `data_type` whose settings in `props` this encoder
    /// writes as the crate's writer would, or `None` (the crate's writer takes the column).
    pub(crate) fn for_column(data_type: &DataType, descr: &ColumnDescPtr, props: &WriterProperties) -> Option<Self> {
        let path = descr.path();
        let settings_match = props.dictionary_enabled(path)
            && props.encoding(path).is_none()
            && props.writer_version() == WriterVersion::PARQUET_1_0
            && props.statistics_enabled(path) == EnabledStatistics::Page
            && !props.offset_index_disabled()
            && props.bloom_filter_properties(path).is_none()
            && !props.write_page_header_statistics(path)
            && props.content_defined_chunking().is_none()
            && props.dictionary_page_encoding() == Encoding::PLAIN
            && props.dictionary_data_page_encoding() == Encoding::RLE_DICTIONARY
            && !props.write_row_group_number_distinct_values()
            && descr.max_rep_level() == 0
            && descr.max_def_level() <= 1;
        if !settings_match {
            return None;
        }
        let kind = match data_type {
            DataType::Int32 | DataType::Date32 => DictKind::I32,
            DataType::Int64 => DictKind::I64,
            // (seconds are written as milliseconds: not the values of the array)
            DataType::Timestamp(TimeUnit::Millisecond | TimeUnit::Microsecond | TimeUnit::Nanosecond, _) => {
                DictKind::I64
            }
            DataType::Float64 => DictKind::F64,
            DataType::Utf8 => DictKind::Str,
            _ => return None,
        };
        let physical = match kind {
            DictKind::I32 => PhysicalType::INT32,
            DictKind::I64 => PhysicalType::INT64,
            DictKind::F64 => PhysicalType::DOUBLE,
            DictKind::Str => PhysicalType::BYTE_ARRAY,
        };
        (descr.physical_type() == physical).then_some(kind)
    }

    /// Bytes of a number in PLAIN encoding.
    fn width(self) -> usize {
        match self {
            DictKind::I32 => 4,
            _ => 8,
        }
    }
}

/// Open-addressed table of dictionary positions, each slot with its entry's tag (a
/// number's bits, a string's hash), so a lookup that finds its value reads one cache line.
struct Table {
    slots: Vec<Slot>,
    mask: usize,
}

#[derive(Clone, Copy)]
struct Slot {
    tag: u64,
    /// Dictionary position, `EMPTY` for a free slot.
    key: u32,
    /// The last page that used the entry (pages count from 1).
    stamp: u32,
}

const FREE: Slot = Slot { tag: 0, key: EMPTY, stamp: 0 };

impl Table {
    /// A table that holds `entries` without growing (at least 1024 slots).
    fn new(entries: usize) -> Self {
        let size = (entries * 2).next_power_of_two().max(1024);
        Table { slots: vec![FREE; size], mask: size - 1 }
    }

    /// Note that `page` uses the entry in slot `i`.
    /// With `USED`, also list the entry among the page's (strings find a page's min and max
    /// from its entries; numbers keep theirs as they go).
    #[inline(always)]
    fn note<const USED: bool>(&mut self, i: usize, page: &mut Filling) {
        let slot = &mut self.slots[i];
        page.indices.push(slot.key);
        if USED && slot.stamp != page.page_no {
            slot.stamp = page.page_no;
            page.used.push(slot.key);
        }
    }

    /// Put the new entry `k` (tagged `tag`) in the free slot `i`, used by `page`; returns
    /// whether the table is now more than half full and must grow.
    #[inline(always)]
    fn place<const USED: bool>(&mut self, i: usize, tag: u64, k: u32, page: &mut Filling) -> bool {
        self.slots[i] = Slot { tag, key: k, stamp: page.page_no };
        page.indices.push(k);
        if USED {
            page.used.push(k);
        }
        (k as usize + 1) * 2 > self.slots.len()
    }

    /// Hint the slot for `hash` into the cache ahead of its lookup.
    #[inline(always)]
    fn prefetch(&self, hash: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.slots.as_ptr().wrapping_add(hash as usize & self.mask);
            // SAFETY: a prefetch is only a hint: it reads nothing and never faults, whatever
            // the address.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    /// Double the table, placing every entry again by the hash of its tag.
    fn grow(&mut self, tags: impl Iterator<Item = u64>, hash: impl Fn(u64) -> u64) {
        let size = self.slots.len() * 2;
        self.slots.clear();
        self.slots.resize(size, FREE);
        self.mask = size - 1;
        for (k, tag) in tags.enumerate() {
            let mut i = hash(tag) as usize & self.mask;
            while self.slots[i].key != EMPTY {
                i = (i + 1) & self.mask;
            }
            self.slots[i] = Slot { tag, key: k as u32, stamp: 0 };
        }
    }
}

/// A 64-bit finalizer over the value and the process's key.
#[inline(always)]
fn mix(x: u64, key: u64) -> u64 {
    let mut h = (x ^ key).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

#[inline(always)]
fn hash_bytes(b: &[u8], key: u64) -> u64 {
    let mut h = key ^ (b.len() as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        h = mix(u64::from_le_bytes(c.try_into().expect("8 bytes")), h);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        h = mix(tail_bits(rest), h);
    }
    mix(h, key)
}

/// The 1 to 7 bytes of `rest` as a little-endian number, read in at most two loads that
/// may overlap (a copy into a zeroed buffer is a call to `memcpy` for every short string:
/// a country code's lookup spent a third of its time there).
#[inline(always)]
fn tail_bits(rest: &[u8]) -> u64 {
    let n = rest.len();
    if n >= 4 {
        let lo = u64::from(u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")));
        let hi = u64::from(u32::from_le_bytes(rest[n - 4..].try_into().expect("4 bytes")));
        // the overlapping bytes are the same bytes, at the same places
        lo | hi << (8 * (n - 4))
    } else {
        let (a, b, c) = (u64::from(rest[0]), u64::from(rest[n / 2]), u64::from(rest[n - 1]));
        a | b << (8 * (n / 2)) | c << (8 * (n - 1))
    }
}

/// Whether two strings are equal, short ones (codes, ids) compared as numbers rather than
/// through a call to `memcmp`.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && if (1..8).contains(&a.len()) { tail_bits(a) == tail_bits(b) } else { a == b }
}

/// Append `n` as an unsigned LEB128 number (the run headers of the RLE / bit-packed hybrid).
fn uleb(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Dictionary positions of `width` bits in Parquet's RLE / bit-packed hybrid: a value
/// repeated at least eight times is one RLE run; the rest is bit-packed in groups of eight,
/// a group that starts eight equal values ending a bit-packed run (only the page's last
/// group is padded, with zeros). The crate's encoder also looks for runs that start inside
/// a group; this one does not, which costs a few bytes on pages of long runs and saves a
/// run check per value.
fn put_indices(width: u8, indices: &[u32], out: &mut Vec<u8>) {
    let w = usize::from(width);
    let n = indices.len();
    out.reserve(n.div_ceil(8) * w + 16);
    let starts_run = |i: usize| i + 8 <= n && indices[i + 1..i + 8].iter().all(|&x| x == indices[i]);
    let mut i = 0;
    while i < n {
        if starts_run(i) {
            let v = indices[i];
            let run = indices[i..].iter().take_while(|&&x| x == v).count();
            uleb(out, (run as u64) << 1);
            out.extend_from_slice(&v.to_le_bytes()[..w.div_ceil(8)]);
            i += run;
            continue;
        }
        let start = i;
        i += 8;
        while i < n && !starts_run(i) {
            i += 8;
        }
        let end = i.min(n);
        let groups = (end - start).div_ceil(8);
        uleb(out, ((groups as u64) << 1) | 1);
        pack_bits(&indices[start..end], w, groups * 8, out);
        i = end;
    }
}

/// `values` (each below 2^`w`), padded with zeros to `count`, packed `w` bits each from the
/// lowest bit up. `count * w` is a multiple of 8.
#[inline]
fn pack_bits(values: &[u32], w: usize, count: usize, out: &mut Vec<u8>) {
    let (mut acc, mut bits) = (0u64, 0usize);
    for k in 0..count {
        acc |= u64::from(values.get(k).copied().unwrap_or(0)) << bits;
        bits += w;
        if bits >= 32 {
            out.extend_from_slice(&(acc as u32).to_le_bytes());
            acc >>= 32;
            bits -= 32;
        }
    }
    out.extend_from_slice(&acc.to_le_bytes()[..bits / 8]);
}

/// Distinct numbers in order of first appearance, as bit patterns (an i32's u32 bits, an
/// i64's, an f64's: NaNs compare by bits, as in the crate's writer).
struct Numbers {
    values: Vec<u64>,
    table: Table,
}

impl Numbers {
    /// Look `v` (whose hash is `h`) up, adding it if new, and note it in `page`.
    #[inline(always)]
    fn intern(&mut self, v: u64, h: u64, key: u64, page: &mut Filling) {
        let mut i = h as usize & self.table.mask;
        loop {
            let s = self.table.slots[i];
            if s.key == EMPTY {
                self.values.push(v);
                if self.table.place::<false>(i, v, self.values.len() as u32 - 1, page) {
                    self.table.grow(self.values.iter().copied(), |v| mix(v, key));
                }
                return;
            }
            if s.tag == v {
                self.table.note::<false>(i, page);
                return;
            }
            i = (i + 1) & self.table.mask;
        }
    }
}

/// Distinct strings in order of first appearance: their bytes back to back, each one's
/// end and hash.
struct Strings {
    bytes: Vec<u8>,
    ends: Vec<u32>,
    hashes: Vec<u64>,
    table: Table,
}

impl Strings {
    fn get(&self, k: u32) -> &[u8] {
        let k = k as usize;
        let start = if k == 0 { 0 } else { self.ends[k - 1] as usize };
        &self.bytes[start..self.ends[k] as usize]
    }

    /// Look `v` up, adding it if new, and note it in `page`.
    #[inline(always)]
    fn intern(&mut self, v: &[u8], key: u64, page: &mut Filling) {
        let h = hash_bytes(v, key);
        let mut i = h as usize & self.table.mask;
        loop {
            let s = self.table.slots[i];
            if s.key == EMPTY {
                self.bytes.extend_from_slice(v);
                self.ends.push(self.bytes.len() as u32);
                self.hashes.push(h);
                if self.table.place::<true>(i, h, self.ends.len() as u32 - 1, page) {
                    self.table.grow(self.hashes.iter().copied(), |h| h);
                }
                return;
            }
            if s.tag == h && same_bytes(self.get(s.key), v) {
                self.table.note::<true>(i, page);
                return;
            }
            i = (i + 1) & self.table.mask;
        }
    }
}

enum Values {
    Num(Numbers),
    Str(Strings),
}

/// Min and max of a page's numbers as statistics order them, kept value by value: numbers
/// by value (doubles by `total_cmp`, through an integer key that sorts the same way), NaNs
/// apart, bounding a page only when it holds nothing else. (Finding them afterwards from
/// the dictionary entries a page used read one cache line per entry: with amount's 100K
/// entries, misses that took 60% of the time spent finishing pages.)
#[derive(Clone, Copy)]
struct NumRange {
    /// Order keys; `lo > hi` while no number came.
    lo: i64,
    hi: i64,
    nan: Option<(u64, u64)>,
}

impl Default for NumRange {
    fn default() -> Self {
        NumRange { lo: i64::MAX, hi: i64::MIN, nan: None }
    }
}

impl NumRange {
    /// Take `v` (a number's bits); returns whether it is a NaN.
    #[inline(always)]
    fn add(&mut self, kind: DictKind, v: u64) -> bool {
        if is_nan(kind, v) {
            self.nan = Some(widen(kind, self.nan, v));
            return true;
        }
        let k = order_key(kind, v);
        self.lo = self.lo.min(k);
        self.hi = self.hi.max(k);
        false
    }

    /// The range as bits, and a fresh one for the next page.
    fn take(&mut self, kind: DictKind) -> Option<(u64, u64)> {
        let range =
            if self.lo <= self.hi { Some((from_key(kind, self.lo), from_key(kind, self.hi))) } else { self.nan };
        *self = NumRange::default();
        range
    }
}

/// A number's bits as an integer in statistics order: `i32` and `i64` by value, `f64` as
/// `total_cmp` orders it (the sign bit set flips the other 63).
#[inline(always)]
fn order_key(kind: DictKind, v: u64) -> i64 {
    match kind {
        DictKind::I32 => i64::from(v as u32 as i32),
        DictKind::F64 => {
            let x = v as i64;
            x ^ (((x >> 63) as u64) >> 1) as i64
        }
        _ => v as i64,
    }
}

/// The bits of the number whose order key is `k` (the inverse of [`order_key`]).
#[inline(always)]
fn from_key(kind: DictKind, k: i64) -> u64 {
    match kind {
        DictKind::I32 => u64::from(k as i32 as u32),
        // the flip is its own inverse
        DictKind::F64 => order_key(kind, k as u64) as u64,
        _ => k as u64,
    }
}

/// The data page being filled.
#[derive(Default)]
struct Filling {
    /// Dictionary positions of its non-null values (dictionary pages).
    indices: Vec<u32>,
    /// PLAIN bytes of its non-null values (plain pages).
    plain: Vec<u8>,
    /// Validity of its rows (nullable columns): their definition levels, bit by bit.
    levels: Option<BooleanBufferBuilder>,
    rows: usize,
    nulls: u64,
    nans: u64,
    /// Bytes of its strings.
    string_bytes: i64,
    /// Entries a page of strings uses (dictionary pages, a few twice after the table grew),
    /// to find its min and max.
    used: Vec<u32>,
    /// Pages count from 1.
    page_no: u32,
    /// Hashes of a mini-batch of numbers, looked up a few behind their prefetches.
    hashes: Vec<u64>,
    /// Min and max of a page of numbers so far.
    num_range: NumRange,
    /// Min and max of a plain page of strings so far.
    str_range: Option<(Vec<u8>, Vec<u8>)>,
}

/// A finished data page, compressed, waiting for the dictionary page to go first.
struct DataPage {
    page: CompressedPage,
    rows: usize,
    /// Whether the page has a min and max (not a page of nulls only). Not the same as
    /// `min` being empty: the empty string is a string page's smallest value.
    ranged: bool,
    /// Min and max as PLAIN bytes (empty when not `ranged`), nulls, NaNs.
    min: Vec<u8>,
    max: Vec<u8>,
    nulls: u64,
    nans: u64,
    string_bytes: i64,
}

/// The dictionary-encoded column chunk of one row group, fed slice by slice.
pub(crate) struct DictColumn {
    descr: ColumnDescPtr,
    kind: DictKind,
    nullable: bool,
    compression: Compression,
    codec: Option<Box<dyn Codec>>,
    page_rows_limit: usize,
    page_bytes_limit: usize,
    dict_bytes_limit: usize,
    index_truncate: Option<usize>,
    stats_truncate: Option<usize>,
    key: u64,
    values: Values,
    /// Once the dictionary outgrew its limit the chunk goes on in PLAIN pages.
    plain: bool,
    page: Filling,
    /// The codec's output, reused page after page.
    scratch: Vec<u8>,
    pages: Vec<DataPage>,
    total_rows: u64,
    total_nans: u64,
}

impl DictColumn {
    /// An encoder for one chunk of the column `descr`, expecting about `entries` distinct
    /// values (the previous row group's count: the table is sized once, not grown).
    pub(crate) fn new(descr: ColumnDescPtr, kind: DictKind, props: &WriterProperties, entries: usize) -> Result<Self> {
        let compression = props.compression(descr.path());
        let codec = create_codec(compression, &CodecOptionsBuilder::default().build())?;
        let key = std::collections::hash_map::RandomState::new().hash_one(0x5745_4952u64);
        Ok(DictColumn {
            nullable: descr.max_def_level() == 1,
            descr,
            kind,
            compression,
            codec,
            page_rows_limit: props.data_page_row_count_limit().max(1),
            page_bytes_limit: props.data_page_size_limit().max(1),
            dict_bytes_limit: props.dictionary_page_size_limit(),
            index_truncate: props.column_index_truncate_length(),
            stats_truncate: props.statistics_truncate_length(),
            key,
            values: match kind {
                DictKind::Str => Values::Str(Strings {
                    bytes: Vec::new(),
                    ends: Vec::new(),
                    hashes: Vec::new(),
                    table: Table::new(entries),
                }),
                _ => Values::Num(Numbers { values: Vec::with_capacity(entries), table: Table::new(entries) }),
            },
            plain: false,
            page: Filling { page_no: 1, ..Default::default() },
            scratch: Vec::new(),
            pages: Vec::new(),
            total_rows: 0,
            total_nans: 0,
        })
    }

    /// The dictionary grew past its limit in this chunk: later row groups should go plain.
    pub(crate) fn overflowed(&self) -> bool {
        self.plain
    }

    /// Distinct values so far.
    pub(crate) fn entries(&self) -> usize {
        match &self.values {
            Values::Num(n) => n.values.len(),
            Values::Str(s) => s.ends.len(),
        }
    }

    /// Bytes of the dictionary page, uncompressed.
    fn dict_bytes(&self) -> usize {
        match &self.values {
            Values::Num(n) => n.values.len() * self.kind.width(),
            Values::Str(s) => s.bytes.len() + 4 * s.ends.len(),
        }
    }

    fn bit_width(&self) -> u8 {
        let n = self.entries().saturating_sub(1) as u64;
        (64 - n.leading_zeros()) as u8
    }

    /// Append the rows of `array` (of this column's Arrow type).
    pub(crate) fn write(&mut self, array: &ArrayRef) -> Result<()> {
        let expected = match self.kind {
            DictKind::Str => array.as_string_opt::<i32>().is_some(),
            k => array.data_type().is_primitive() && array.data_type().primitive_width() == Some(k.width()),
        };
        if !expected {
            return Err(ParquetError::General(format!(
                "column {}: a {} array for a {:?} column",
                self.descr.path(),
                array.data_type(),
                self.kind
            )));
        }
        if !self.nullable && array.null_count() > 0 {
            return Err(ParquetError::General(format!(
                "column {}: {} nulls in a column that does not allow them",
                self.descr.path(),
                array.null_count()
            )));
        }
        let data = array.to_data();
        let nulls = array.logical_nulls().filter(|n| n.null_count() > 0);
        let nulls = nulls.as_ref();
        let mut start = 0;
        while start < array.len() {
            let n = (array.len() - start).min(MINI_BATCH).min(self.page_rows_limit - self.page.rows);
            let rows = start..start + n;
            let part = nulls.map(|v| v.slice(start, n));
            let part_nulls = part.as_ref().map_or(0, |v| v.null_count());
            self.page.nulls += part_nulls as u64;
            if self.nullable {
                let levels = self.page.levels.get_or_insert_with(|| BooleanBufferBuilder::new(self.page_rows_limit));
                match &part {
                    Some(v) => levels.append_buffer(v.inner()),
                    None => levels.append_n(n, true),
                }
            }
            match self.kind {
                // (a slice of nulls only, as in a column a step blanked out: no values)
                _ if part_nulls == n => {}
                DictKind::Str => self.put_strings(array, rows, nulls),
                k => {
                    let w = k.width();
                    let raw = &data.buffers()[0].as_slice()[(data.offset() + start) * w..][..n * w];
                    match (self.plain, w) {
                        (false, 4) => self.put_numbers::<4>(raw, start, nulls),
                        (false, _) => self.put_numbers::<8>(raw, start, nulls),
                        (true, 4) => self.put_plain_numbers::<4>(raw, start, nulls),
                        (true, _) => self.put_plain_numbers::<8>(raw, start, nulls),
                    }
                }
            }
            self.page.rows += n;
            start += n;
            if !self.plain && self.dict_bytes() > self.dict_bytes_limit {
                self.finish_page()?;
                self.plain = true;
            } else if self.page.rows >= self.page_rows_limit || self.page_bytes() >= self.page_bytes_limit {
                self.finish_page()?;
            }
        }
        Ok(())
    }

    fn page_bytes(&self) -> usize {
        if self.plain {
            self.page.plain.len()
        } else {
            self.page.indices.len() * usize::from(self.bit_width()) / 8
        }
    }

    /// The value of a number's PLAIN bytes, as bits (W is 4 or 8).
    #[inline(always)]
    fn bits<const W: usize>(c: &[u8]) -> u64 {
        if W == 4 {
            u64::from(u32::from_le_bytes(c[..4].try_into().expect("4 bytes")))
        } else {
            u64::from_le_bytes(c[..8].try_into().expect("8 bytes"))
        }
    }

    fn put_numbers<const W: usize>(&mut self, raw: &[u8], start: usize, nulls: Option<&NullBuffer>) {
        let kind = self.kind;
        let key = self.key;
        let Values::Num(dict) = &mut self.values else { unreachable!("numbers have a number dictionary") };
        let page = &mut self.page;
        // A dictionary of many values (prices, amounts) outgrows the core's cache: hashing a
        // mini-batch first lets each slot be fetched while earlier values are looked up.
        let mut hashes = std::mem::take(&mut page.hashes);
        hashes.clear();
        hashes.extend(raw.chunks_exact(W).map(|c| mix(Self::bits::<W>(c), key)));
        const AHEAD: usize = 32;
        for h in hashes.iter().take(AHEAD) {
            dict.table.prefetch(*h);
        }
        for (i, c) in raw.chunks_exact(W).enumerate() {
            if let Some(h) = hashes.get(i + AHEAD) {
                dict.table.prefetch(*h);
            }
            if nulls.is_some_and(|n| n.is_null(start + i)) {
                continue;
            }
            let v = Self::bits::<W>(c);
            page.nans += u64::from(page.num_range.add(kind, v));
            dict.intern(v, hashes[i], key, page);
        }
        page.hashes = hashes;
    }

    fn put_plain_numbers<const W: usize>(&mut self, raw: &[u8], start: usize, nulls: Option<&NullBuffer>) {
        let kind = self.kind;
        let page = &mut self.page;
        for (i, c) in raw.chunks_exact(W).enumerate() {
            if nulls.is_some_and(|n| n.is_null(start + i)) {
                continue;
            }
            page.plain.extend_from_slice(c);
            page.nans += u64::from(page.num_range.add(kind, Self::bits::<W>(c)));
        }
    }

    fn put_strings(&mut self, array: &ArrayRef, rows: std::ops::Range<usize>, nulls: Option<&NullBuffer>) {
        let a = array.as_string::<i32>();
        let key = self.key;
        let page = &mut self.page;
        match &mut self.values {
            Values::Str(dict) if !self.plain => {
                for i in rows {
                    if nulls.is_some_and(|n| n.is_null(i)) {
                        continue;
                    }
                    let v = a.value(i).as_bytes();
                    page.string_bytes += v.len() as i64;
                    dict.intern(v, key, page);
                }
            }
            _ => {
                for i in rows {
                    if nulls.is_some_and(|n| n.is_null(i)) {
                        continue;
                    }
                    let v = a.value(i).as_bytes();
                    page.string_bytes += v.len() as i64;
                    page.plain.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    page.plain.extend_from_slice(v);
                    match &mut page.str_range {
                        None => page.str_range = Some((v.to_vec(), v.to_vec())),
                        Some((lo, hi)) => {
                            if v < lo.as_slice() {
                                lo.clear();
                                lo.extend_from_slice(v);
                            }
                            if v > hi.as_slice() {
                                hi.clear();
                                hi.extend_from_slice(v);
                            }
                        }
                    }
                }
            }
        }
    }

    /// PLAIN bytes of a number's bits.
    fn plain_bytes(&self, v: u64) -> Vec<u8> {
        v.to_le_bytes()[..self.kind.width()].to_vec()
    }

    /// Min and max (PLAIN bytes) of the page being finished, NaNs left out.
    fn page_range(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let kind = self.kind;
        let page = &mut self.page;
        match &self.values {
            Values::Str(_) if self.plain => page.str_range.take(),
            Values::Num(_) => page.num_range.take(kind).map(|(lo, hi)| (self.plain_bytes(lo), self.plain_bytes(hi))),
            Values::Str(dict) => {
                let mut range: Option<(&[u8], &[u8])> = None;
                for &k in &page.used {
                    let v = dict.get(k);
                    range = Some(match range {
                        None => (v, v),
                        Some((lo, hi)) => (lo.min(v), hi.max(v)),
                    });
                }
                range.map(|(lo, hi)| (lo.to_vec(), hi.to_vec()))
            }
        }
    }

    /// Encode, compress and keep the page being filled.
    fn finish_page(&mut self) -> Result<()> {
        if self.page.rows == 0 {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(self.page.plain.len() + self.page.indices.len() * 3 + 64);
        if self.nullable {
            // Definition levels are one bit each, in the RLE / bit-packed hybrid: one run
            // when every row is null or none is, else one bit-packed run, whose bytes are the
            // validity bits themselves (eight rows a byte, first row in the lowest bit).
            let rows = self.page.rows;
            let mut levels = Vec::with_capacity(rows / 8 + 16);
            if self.page.nulls == 0 || self.page.nulls == rows as u64 {
                uleb(&mut levels, (rows as u64) << 1);
                levels.push(u8::from(self.page.nulls == 0));
            } else {
                let groups = rows.div_ceil(8);
                uleb(&mut levels, ((groups as u64) << 1) | 1);
                let bits = self.page.levels.as_ref().expect("a nullable column keeps levels");
                levels.extend_from_slice(&bits.as_slice()[..groups]);
                if !rows.is_multiple_of(8) {
                    // (the padding past the last row is zeros)
                    *levels.last_mut().expect("a group") &= (1u8 << (rows % 8)) - 1;
                }
            }
            buf.extend_from_slice(&(levels.len() as u32).to_le_bytes());
            buf.extend_from_slice(&levels);
        }
        let range = self.page_range();
        let encoding = if self.plain {
            buf.extend_from_slice(&self.page.plain);
            Encoding::PLAIN
        } else {
            let width = self.bit_width();
            buf.push(width);
            put_indices(width, &self.page.indices, &mut buf);
            Encoding::RLE_DICTIONARY
        };
        let uncompressed = buf.len();
        let buf = self.compress(buf)?;
        let ranged = range.is_some();
        let (min, max) = range.unwrap_or_default();
        let p = &mut self.page;
        let page = Page::DataPage {
            buf,
            num_values: p.rows as u32,
            encoding,
            def_level_encoding: Encoding::RLE,
            rep_level_encoding: Encoding::RLE,
            statistics: None,
        };
        self.pages.push(DataPage {
            page: CompressedPage::new(page, uncompressed),
            rows: p.rows,
            ranged,
            min,
            max,
            nulls: p.nulls,
            nans: p.nans,
            string_bytes: p.string_bytes,
        });
        self.total_rows += p.rows as u64;
        self.total_nans += p.nans;
        p.indices.clear();
        p.plain.clear();
        if let Some(l) = p.levels.as_mut() {
            l.truncate(0);
        }
        p.used.clear();
        p.page_no += 1;
        (p.rows, p.nulls, p.nans, p.string_bytes) = (0, 0, 0, 0);
        Ok(())
    }

    /// The page's bytes compressed, in an allocation of their size: a chunk's pages wait
    /// in memory until its dictionary page is written, and a codec's output buffer is
    /// reserved at the input's size (W2: 40 MB more peak memory when pages kept them).
    fn compress(&mut self, buf: Vec<u8>) -> Result<Bytes> {
        Ok(match &mut self.codec {
            Some(c) => {
                self.scratch.clear();
                c.compress(&buf, &mut self.scratch)?;
                Bytes::copy_from_slice(&self.scratch)
            }
            None => Bytes::copy_from_slice(&buf),
        })
    }

    /// The chunk's bytes (from offset 0) and what the row group needs to splice them in.
    pub(crate) fn close(mut self) -> Result<(Bytes, ColumnCloseResult)> {
        self.finish_page()?;
        let dict = match &self.values {
            Values::Num(n) => {
                let w = self.kind.width();
                let mut out = Vec::with_capacity(n.values.len() * w);
                for x in &n.values {
                    out.extend_from_slice(&x.to_le_bytes()[..w]);
                }
                out
            }
            Values::Str(s) => {
                let mut out = Vec::with_capacity(s.bytes.len() + 4 * s.ends.len());
                let mut start = 0usize;
                for &end in &s.ends {
                    out.extend_from_slice(&(end - start as u32).to_le_bytes());
                    out.extend_from_slice(&s.bytes[start..end as usize]);
                    start = end as usize;
                }
                out
            }
        };
        let entries = self.entries() as u32;
        let dict_len = dict.len();
        let dict_page = Page::DictionaryPage {
            buf: self.compress(dict)?,
            num_values: entries,
            encoding: Encoding::PLAIN,
            is_sorted: false,
        };
        let mut sink = TrackedWrite::new(Vec::new());
        let mut offsets = OffsetIndexBuilder::new();
        let mut index = ColumnIndexBuilder::new(self.descr.physical_type());
        let mut uncompressed = 0u64;
        let mut stats =
            vec![PageEncodingStats { page_type: PageType::DICTIONARY_PAGE, encoding: Encoding::PLAIN, count: 1 }];
        let mut data_offset = None;
        let (mut lo, mut hi): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
        let mut nulls = 0u64;
        let is_float = self.kind == DictKind::F64;
        let strings = self.kind == DictKind::Str;
        let mut string_bytes = 0i64;
        // definition levels of a nullable column: [nulls, values], per page and chunk
        let mut levels = if self.nullable { LevelHistogram::try_new(1) } else { None };
        // whether the pages' bounds only rise (or only fall), for readers that search them
        let (mut ascending, mut descending) = (true, true);
        let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
        {
            let mut writer = SerializedPageWriter::new(&mut sink);
            uncompressed += writer.write_page(CompressedPage::new(dict_page, dict_len))?.uncompressed_size as u64;
            for p in std::mem::take(&mut self.pages) {
                let encoding = p.page.encoding();
                let spec = writer.write_page(p.page)?;
                data_offset.get_or_insert(spec.offset as i64);
                uncompressed += spec.uncompressed_size as u64;
                offsets.append_offset_and_size(spec.offset as i64, spec.compressed_size as i32);
                offsets.append_row_count(p.rows as i64);
                if strings {
                    offsets.append_unencoded_byte_array_data_bytes(Some(p.string_bytes));
                    string_bytes += p.string_bytes;
                }
                match stats.last_mut() {
                    Some(s) if s.page_type == PageType::DATA_PAGE && s.encoding == encoding => s.count += 1,
                    _ => stats.push(PageEncodingStats { page_type: PageType::DATA_PAGE, encoding, count: 1 }),
                }
                nulls += p.nulls;
                let null_page = p.nulls == p.rows as u64;
                if p.ranged {
                    if let Some((last_min, last_max)) = &last {
                        ascending &= !(less(self.kind, &p.min, last_min) || less(self.kind, &p.max, last_max));
                        descending &= !(less(self.kind, last_min, &p.min) || less(self.kind, last_max, &p.max));
                    }
                    last = Some((p.min.clone(), p.max.clone()));
                    if lo.as_ref().is_none_or(|l| replaces(self.kind, l, &p.min, false)) {
                        lo = Some(p.min.clone());
                    }
                    if hi.as_ref().is_none_or(|h| replaces(self.kind, h, &p.max, true)) {
                        hi = Some(p.max.clone());
                    }
                }
                let (min, max) = match self.kind {
                    DictKind::Str => {
                        (truncate_min(&p.min, self.index_truncate).0, truncate_max(&p.max, self.index_truncate).0)
                    }
                    _ => (p.min, p.max),
                };
                index.append(null_page, min, max, p.nulls as i64, is_float.then_some(p.nans as i64));
                let page_levels = levels.as_ref().map(|_| {
                    let mut h = LevelHistogram::try_new(1).expect("one level");
                    h.increment_by(0, p.nulls as i64);
                    h.increment_by(1, p.rows as i64 - p.nulls as i64);
                    h
                });
                if let (Some(chunk), Some(page)) = (levels.as_mut(), page_levels.as_ref()) {
                    chunk.add(page);
                }
                index.append_histograms(&None, &page_levels);
            }
            writer.close()?;
        }
        let bytes = Bytes::from(sink.into_inner()?);
        let mut encodings = vec![Encoding::PLAIN, Encoding::RLE];
        if stats.iter().any(|s| s.encoding == Encoding::RLE_DICTIONARY) {
            encodings.push(Encoding::RLE_DICTIONARY);
        }
        let statistics = self.statistics(lo, hi, nulls);
        index.set_boundary_order(match (ascending, descending) {
            (true, _) => BoundaryOrder::ASCENDING,
            (false, true) => BoundaryOrder::DESCENDING,
            (false, false) => BoundaryOrder::UNORDERED,
        });
        let metadata = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(self.compression)
            .set_encodings(encodings)
            .set_page_encoding_stats(stats)
            .set_total_compressed_size(bytes.len() as i64)
            .set_total_uncompressed_size(uncompressed as i64)
            .set_num_values(self.total_rows as i64)
            .set_dictionary_page_offset(Some(0))
            .set_data_page_offset(data_offset.unwrap_or(0))
            .set_statistics(statistics)
            .set_unencoded_byte_array_data_bytes(strings.then_some(string_bytes))
            .set_definition_level_histogram(levels)
            .build()?;
        let column_index = if index.valid() { Some(index.build()?) } else { None };
        let close = ColumnCloseResult {
            bytes_written: bytes.len() as u64,
            rows_written: self.total_rows,
            metadata,
            bloom_filter: None,
            column_index,
            offset_index: Some(offsets.build()),
        };
        Ok((bytes, close))
    }

    fn statistics(&self, lo: Option<Vec<u8>>, hi: Option<Vec<u8>>, nulls: u64) -> Statistics {
        let (lo, hi) = match (lo, hi) {
            (Some(l), Some(h)) => (Some(l), Some(h)),
            _ => (None, None),
        };
        let num = |b: &Option<Vec<u8>>| b.as_ref().map(|b| le8(b));
        // (the deprecated min and max fields are written for signed orders only)
        let signed = self.descr.sort_order().is_signed();
        match self.kind {
            DictKind::I32 => Statistics::Int32(
                ValueStatistics::new(
                    lo.as_ref().map(|b| i32::from_le_bytes(b[..4].try_into().expect("4 bytes"))),
                    hi.as_ref().map(|b| i32::from_le_bytes(b[..4].try_into().expect("4 bytes"))),
                    None,
                    Some(nulls),
                    false,
                )
                .with_backwards_compatible_min_max(signed),
            ),
            DictKind::I64 => Statistics::Int64(
                ValueStatistics::new(num(&lo).map(|x| x as i64), num(&hi).map(|x| x as i64), None, Some(nulls), false)
                    .with_backwards_compatible_min_max(signed),
            ),
            DictKind::F64 => Statistics::Double(
                ValueStatistics::new(
                    num(&lo).map(f64::from_bits),
                    num(&hi).map(f64::from_bits),
                    None,
                    Some(nulls),
                    false,
                )
                .with_nan_count(Some(self.total_nans))
                .with_backwards_compatible_min_max(signed),
            ),
            DictKind::Str => {
                let (min, min_exact) = match &lo {
                    Some(l) => {
                        let (v, exact) = truncate_min(l, self.stats_truncate);
                        (Some(ByteArray::from(v)), exact)
                    }
                    None => (None, false),
                };
                let (max, max_exact) = match &hi {
                    Some(h) => {
                        let (v, exact) = truncate_max(h, self.stats_truncate);
                        (Some(ByteArray::from(v)), exact)
                    }
                    None => (None, false),
                };
                Statistics::ByteArray(
                    ValueStatistics::new(min, max, None, Some(nulls), signed)
                        .with_min_is_exact(min_exact)
                        .with_max_is_exact(max_exact),
                )
            }
        }
    }
}

fn le8(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// `a < b` for bit patterns of numbers of `kind`. Floats are in IEEE 754 total order
/// (-0.0 before +0.0), as Parquet's column order for them says.
#[inline(always)]
fn num_less(kind: DictKind, a: u64, b: u64) -> bool {
    match kind {
        DictKind::I32 => (a as u32 as i32) < (b as u32 as i32),
        DictKind::F64 => f64::from_bits(a).total_cmp(&f64::from_bits(b)).is_lt(),
        _ => (a as i64) < (b as i64),
    }
}

fn is_nan(kind: DictKind, v: u64) -> bool {
    kind == DictKind::F64 && f64::from_bits(v).is_nan()
}

/// Whether `new` takes the place of `cur` as the minimum (or the maximum, with `max`). A
/// NaN bounds a range only until a number comes (a page of NaNs only has NaN bounds).
#[inline(always)]
fn num_replaces(kind: DictKind, cur: u64, new: u64, max: bool) -> bool {
    match (is_nan(kind, cur), is_nan(kind, new)) {
        (true, false) => true,
        (false, true) => false,
        _ if max => num_less(kind, cur, new),
        _ => num_less(kind, new, cur),
    }
}

/// The range `range` widened to take `v`.
#[inline(always)]
fn widen(kind: DictKind, range: Option<(u64, u64)>, v: u64) -> (u64, u64) {
    match range {
        None => (v, v),
        Some((lo, hi)) => (
            if num_replaces(kind, lo, v, false) { v } else { lo },
            if num_replaces(kind, hi, v, true) { v } else { hi },
        ),
    }
}

/// The bits of a number's PLAIN bytes.
fn bits_of(kind: DictKind, b: &[u8]) -> u64 {
    match kind {
        DictKind::I32 => u64::from(u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))),
        _ => le8(b),
    }
}

/// `a < b` for PLAIN bytes of `kind`.
fn less(kind: DictKind, a: &[u8], b: &[u8]) -> bool {
    match kind {
        DictKind::Str => a < b,
        k => num_less(k, bits_of(k, a), bits_of(k, b)),
    }
}

/// [`num_replaces`] for PLAIN bytes of `kind`.
fn replaces(kind: DictKind, cur: &[u8], new: &[u8], max: bool) -> bool {
    match kind {
        DictKind::Str if max => cur < new,
        DictKind::Str => new < cur,
        k => num_replaces(k, bits_of(k, cur), bits_of(k, new), max),
    }
}

/// A lower bound of `v` at most `limit` bytes long (a prefix ending on a character
/// boundary), and whether it is `v` itself.
fn truncate_min(v: &[u8], limit: Option<usize>) -> (Vec<u8>, bool) {
    match limit {
        Some(n) if v.len() > n && n > 0 => {
            let mut cut = n;
            while cut > 0 && std::str::from_utf8(&v[..cut]).is_err() {
                cut -= 1;
            }
            if cut == 0 {
                (v.to_vec(), true)
            } else {
                (v[..cut].to_vec(), false)
            }
        }
        _ => (v.to_vec(), true),
    }
}

/// An upper bound of `v` at most `limit` bytes long: a prefix whose last character is
/// replaced by the next one of the same encoded length (dropping characters from the end
/// until one can be), or `v` itself when none can be; and whether it is `v`.
fn truncate_max(v: &[u8], limit: Option<usize>) -> (Vec<u8>, bool) {
    let Some(n) = limit.filter(|n| v.len() > *n && *n > 0) else { return (v.to_vec(), true) };
    let Ok(s) = std::str::from_utf8(v) else { return (v.to_vec(), true) };
    let mut cut = n;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    for (at, c) in s[..cut].char_indices().rev() {
        if let Some(next) = char::from_u32(c as u32 + 1).filter(|d| d.len_utf8() == c.len_utf8()) {
            let mut out = s.as_bytes()[..at].to_vec();
            out.extend_from_slice(next.encode_utf8(&mut [0; 4]).as_bytes());
            return (out, false);
        }
    }
    (v.to_vec(), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::encodings::rle::RleDecoder;

    #[test]
    fn a_short_tail_reads_as_its_bytes_zero_padded() {
        let bytes = [0x11u8, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77];
        for n in 1..=7 {
            let mut padded = [0u8; 8];
            padded[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(tail_bits(&bytes[..n]), u64::from_le_bytes(padded), "{n} bytes");
        }
        for (a, b, same) in [("", "", true), ("C001", "C001", true), ("C001", "C002", false), ("ab", "abc", false)] {
            assert_eq!(same_bytes(a.as_bytes(), b.as_bytes()), same, "{a:?} {b:?}");
        }
        let long = "a string longer than eight bytes";
        assert!(same_bytes(long.as_bytes(), long.to_string().as_bytes()));
        assert!(!same_bytes(long.as_bytes(), long.replace('r', "R").as_bytes()));
    }

    #[test]
    fn order_keys_sort_as_statistics_do_and_map_back() {
        let floats = [
            f64::NEG_INFINITY,
            -1e300,
            -1.5,
            -f64::MIN_POSITIVE,
            -5e-324,
            -0.0,
            0.0,
            5e-324,
            1.0,
            2.5,
            1e300,
            f64::INFINITY,
        ];
        let bits: Vec<u64> = floats.iter().map(|f| f.to_bits()).collect();
        for w in bits.windows(2) {
            assert!(order_key(DictKind::F64, w[0]) < order_key(DictKind::F64, w[1]), "{w:?}");
        }
        for b in bits.iter().copied().chain([f64::NAN.to_bits(), (-f64::NAN).to_bits()]) {
            assert_eq!(from_key(DictKind::F64, order_key(DictKind::F64, b)), b);
        }
        let ints = [i32::MIN, -7, -1, 0, 1, i32::MAX];
        for w in ints.windows(2) {
            let k = |v: i32| order_key(DictKind::I32, u64::from(v as u32));
            assert!(k(w[0]) < k(w[1]));
            assert_eq!(from_key(DictKind::I32, k(w[0])), u64::from(w[0] as u32));
        }
        for v in [i64::MIN, -1, 0, i64::MAX] {
            assert_eq!(from_key(DictKind::I64, order_key(DictKind::I64, v as u64)), v as u64);
        }
        // a page of NaNs only is bounded by NaNs; one number pushes them out
        let mut r = NumRange::default();
        assert!(r.add(DictKind::F64, f64::NAN.to_bits()));
        assert_eq!(r.take(DictKind::F64), Some((f64::NAN.to_bits(), f64::NAN.to_bits())));
        assert!(r.take(DictKind::F64).is_none(), "taken ranges start again empty");
        r.add(DictKind::F64, f64::NAN.to_bits());
        assert!(!r.add(DictKind::F64, (-0.0f64).to_bits()));
        r.add(DictKind::F64, 3.0f64.to_bits());
        assert_eq!(r.take(DictKind::F64), Some(((-0.0f64).to_bits(), 3.0f64.to_bits())));
    }

    /// What the crate's decoder reads back from our runs.
    fn decoded(width: u8, encoded: &[u8], n: usize) -> Vec<u32> {
        let mut d = RleDecoder::new(width);
        d.set_data(Bytes::copy_from_slice(encoded)).unwrap();
        let mut out = vec![0u32; n];
        assert_eq!(d.get_batch(&mut out).unwrap(), n);
        out
    }

    #[test]
    fn indices_read_back_through_the_crates_decoder() {
        let mut next = super::super::xorshift(0x2545_F491_4F6C_DD1D);
        for width in 0u8..=20 {
            let max = if width == 0 { 1 } else { 1u64 << width };
            for n in [1usize, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 20_000] {
                // random values, runs starting anywhere (inside a group too), and a mix
                let random: Vec<u32> = (0..n).map(|_| (next() % max) as u32).collect();
                let mut runs = Vec::with_capacity(n);
                while runs.len() < n {
                    let v = (next() % max) as u32;
                    let len = (next() % 40) as usize + 1;
                    runs.extend(std::iter::repeat_n(v, len.min(n - runs.len())));
                }
                let mixed: Vec<u32> = random.iter().zip(&runs).map(|(r, s)| if r % 3 == 0 { *r } else { *s }).collect();
                for values in [random, runs, mixed] {
                    let mut out = Vec::new();
                    put_indices(width, &values, &mut out);
                    assert_eq!(decoded(width, &out, n), values, "width {width}, {n} values");
                }
            }
        }
    }

    #[test]
    fn long_runs_take_a_few_bytes() {
        let mut values = vec![5u32; 10_000];
        values.extend(std::iter::repeat_n(9u32, 10_000));
        let mut out = Vec::new();
        put_indices(4, &values, &mut out);
        assert!(out.len() <= 8, "two RLE runs, {} bytes", out.len());
        assert_eq!(decoded(4, &out, values.len()), values);
    }
}
