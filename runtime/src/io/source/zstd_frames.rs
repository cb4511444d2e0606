//! zstd files of several frames (as parallel compressors, log shippers and appending
//! writers make them) decompressed frame by frame on worker threads, the text coming out in
//! the file's order. The frames are found from their headers and block headers, without
//! decompressing anything; a file of one frame, of frames too large to hold, or that is not
//! a clean sequence of frames is streamed by the usual decoder instead (which reports what
//! is wrong with it).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::files::{pump, Chunk, Decompressed, ReadAhead, TextCodec};

/// A run of whole frames in the file, decompressed by one worker: consecutive frames are
/// taken together up to `UNIT_BYTES` (a file of tiny frames, a frame per line, costs a
/// hand-off per megabyte, not per frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Frame {
    offset: u64,
    len: u64,
}

/// Frames larger than this (compressed) are not held in memory: such a file streams.
const FRAME_MAX: u64 = 16 << 20;
/// Compressed bytes of consecutive frames one worker takes at a time.
const UNIT_BYTES: u64 = 1 << 20;
/// Workers decompressing frames (each run's text waits in at most `ReadAhead::AHEAD`
/// chunks of `ReadAhead::CHUNK` until the reader reaches it).
const WORKERS: usize = 2;
/// Threads decoding the text ([`super::files::decode_workers`]) from which frames are
/// decompressed in parallel: below, one decompressing thread keeps ahead of them.
pub(super) const MIN_DECODERS: usize = 4;

const MAGIC: u32 = 0xFD2F_B528;

/// The frames of a zstd file, in runs of about `UNIT_BYTES`, when it is well-formed frames
/// each under `FRAME_MAX` (skippable frames between them allowed) making two runs or more;
/// `None` otherwise, found as soon as a frame passes `FRAME_MAX`. The file is read from
/// its start; where it is left is unspecified.
pub(super) fn frames(file: &mut File) -> std::io::Result<Option<Vec<Frame>>> {
    let size = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut r = BufReader::with_capacity(64 << 10, file);
    let mut frames: Vec<Frame> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(magic) = read_le(&mut r, 4)? else { return Ok(None) };
        pos += 4;
        if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            let Some(len) = read_le(&mut r, 4)? else { return Ok(None) };
            pos += 4 + len;
            r.seek_relative(len as i64)?;
            continue;
        }
        if magic != MAGIC as u64 {
            return Ok(None);
        }
        let start = pos - 4;
        let Some(fhd) = read_le(&mut r, 1)? else { return Ok(None) };
        if fhd & 0x08 != 0 {
            return Ok(None); // a reserved bit
        }
        let single_segment = fhd & 0x20 != 0;
        let window = u64::from(!single_segment);
        let dictionary = [0, 1, 2, 4][(fhd & 3) as usize];
        let content_size = match fhd >> 6 {
            0 => u64::from(single_segment),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let header = window + dictionary + content_size;
        r.seek_relative(header as i64)?;
        pos += 1 + header;
        loop {
            let Some(block) = read_le(&mut r, 3)? else { return Ok(None) };
            let (last, kind, len) = (block & 1 == 1, (block >> 1) & 3, block >> 3);
            let payload = match kind {
                0 | 2 => len,
                1 => 1,
                _ => return Ok(None), // reserved block type
            };
            r.seek_relative(payload as i64)?;
            pos += 3 + payload;
            if pos > size {
                return Ok(None); // cut short: the streaming decoder says so
            }
            if pos - start > FRAME_MAX {
                return Ok(None); // too large to hold: streamed
            }
            if last {
                break;
            }
        }
        if fhd & 0x04 != 0 {
            r.seek_relative(4)?;
            pos += 4; // the content checksum
        }
        match frames.last_mut() {
            // the run so far and this frame (and any skippable frames between) together
            Some(run) if pos - run.offset <= UNIT_BYTES => run.len = pos - run.offset,
            _ => frames.push(Frame { offset: start, len: pos - start }),
        }
    }
    Ok((pos == size && frames.len() > 1).then_some(frames))
}

/// `n` bytes, little-endian; `None` at the end of the input.
fn read_le(r: &mut impl Read, n: usize) -> std::io::Result<Option<u64>> {
    let mut b = [0u8; 8];
    match r.read_exact(&mut b[..n]) {
        Ok(()) => Ok(Some(u64::from_le_bytes(b))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The frames in order, then the end: a reader that sees the feeder stop without `End`
/// knows something went wrong.
enum Next {
    Frame(Receiver<Chunk>),
    End,
    Failed(std::io::Error),
}

/// The text of a file's frames, decompressed on worker threads, in the file's order.
pub(super) struct ParallelFrames {
    frames: Receiver<Next>,
    frame: Option<Receiver<Chunk>>,
    current: Vec<u8>,
    at: usize,
    done: bool,
}

impl ParallelFrames {
    /// Decompress `frames` of `file`: a feeder thread reads each frame's bytes in turn and
    /// hands it to a worker, whose text waits (at most `ReadAhead::AHEAD` chunks) until the reader
    /// reaches its frame.
    pub(super) fn spawn(mut file: File, frames: Vec<Frame>) -> std::io::Result<Self> {
        let (work_tx, work_rx) = sync_channel::<(Vec<u8>, SyncSender<Chunk>)>(1);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (next_tx, next_rx) = sync_channel(WORKERS + 1);
        for n in 0..WORKERS {
            let work_rx = work_rx.clone();
            std::thread::Builder::new().name(format!("weir-zstd {n}")).spawn(move || loop {
                let next = match work_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((bytes, out)) = next else { return };
                decompress(bytes, &out);
            })?;
        }
        std::thread::Builder::new().name("weir-zstd-feed".into()).spawn(move || {
            for frame in frames {
                let mut bytes = vec![0u8; frame.len as usize];
                let read = file.seek(SeekFrom::Start(frame.offset)).and_then(|_| file.read_exact(&mut bytes));
                if let Err(e) = read {
                    let _ = next_tx.send(Next::Failed(e));
                    return;
                }
                let (out, text) = sync_channel(ReadAhead::AHEAD);
                // a send fails only when the reader is gone: then so is the work
                if next_tx.send(Next::Frame(text)).is_err() || work_tx.send((bytes, out)).is_err() {
                    return;
                }
            }
            let _ = next_tx.send(Next::End);
        })?;
        Ok(ParallelFrames { frames: next_rx, frame: None, current: Vec::new(), at: 0, done: false })
    }
}

/// A run of frames' text to `out`, in chunks, then its end or its failure (a decoder's
/// complaint tagged as corrupt input, never retried).
fn decompress(bytes: Vec<u8>, out: &SyncSender<Chunk>) {
    // every frame of the run (and any skippable frame between them)
    match zstd::stream::read::Decoder::with_buffer(std::io::Cursor::new(bytes)) {
        Ok(decoder) => pump(Decompressed::new(decoder, TextCodec::Zstd), out),
        Err(e) => {
            let _ = out.send(Chunk::Failed(e));
        }
    }
}

impl Read for ParallelFrames {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            if self.done {
                return Ok(0);
            }
            let failed = |this: &mut Self, e| {
                this.done = true;
                Err(e)
            };
            let Some(frame) = &self.frame else {
                match self.frames.recv() {
                    Ok(Next::Frame(f)) => self.frame = Some(f),
                    Ok(Next::End) => self.done = true,
                    Ok(Next::Failed(e)) => return failed(self, e),
                    // the feeder ended without saying how: never read that as the end
                    Err(_) => return failed(self, stopped()),
                }
                continue;
            };
            match frame.recv() {
                Ok(Chunk::Data(text)) => {
                    self.current = text;
                    self.at = 0;
                }
                Ok(Chunk::End) => self.frame = None,
                Ok(Chunk::Failed(e)) => return failed(self, e),
                Err(_) => return failed(self, stopped()),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn stopped() -> std::io::Error {
    std::io::Error::other("the decompression threads stopped unexpectedly")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `text` as zstd frames cut at `cuts` (with a checksum on every other frame), with a
    /// skippable frame after the first.
    fn framed(text: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = 0;
        for (i, &to) in cuts.iter().chain(std::iter::once(&text.len())).enumerate() {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            enc.include_checksum(i % 2 == 0).unwrap();
            enc.write_all(&text[from..to]).unwrap();
            out.extend(enc.finish().unwrap());
            if i == 0 {
                out.extend(0x184D_2A53u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend(b"skip!");
            }
            from = to;
        }
        out
    }

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    use super::super::files::tests::read_to_end_or_error as read_all;

    #[test]
    fn frames_decompress_in_order_as_the_streaming_decoder_reads_them() {
        let mut next = crate::io::xorshift(0x2545_F491_4F6C_DD1D);
        let text: Vec<u8> = (0..8_000_000).map(|_| b"abcdefghij\n"[(next() % 11) as usize]).collect();
        // frames cut anywhere, some larger than a chunk, some of a few bytes, one empty
        let cuts = [1, 5, 5, 1000, 400_000, 1_600_000, 7_999_999];
        let bytes = framed(&text, &cuts);
        let (_keep, mut file) = file_of(&bytes);
        let found = frames(&mut file).unwrap().expect("several frames");
        // the small frames run together: fewer runs than frames, each of whole frames
        assert!(found.len() >= 2 && found.len() < cuts.len() + 1, "{found:?}");
        let (got, err) = read_all(ParallelFrames::spawn(file, found).unwrap());
        assert!(err.is_none());
        assert!(got == text, "{} of {} bytes", got.len(), text.len());
        // the streaming decoder, the reference, reads the same
        let (streamed, _) = read_all(zstd::stream::read::Decoder::new(&bytes[..]).unwrap());
        assert!(streamed == text);
    }

    #[test]
    fn files_that_are_not_clean_frames_are_left_to_the_streaming_decoder() {
        let mut next = crate::io::xorshift(0xD1B5_4A32_D192_ED03);
        let text: Vec<u8> = (0..6_000_000).map(|_| b"abcdefghij\n"[(next() % 11) as usize]).collect();
        let one = framed(&text, &[]);
        let (_a, mut f) = file_of(&one);
        assert_eq!(frames(&mut f).unwrap(), None, "one frame streams");
        // two frames of over a megabyte: two runs; cut short or followed by other bytes: none
        let two = framed(&text, &[3_000_000]);
        let (_b, mut f) = file_of(&two);
        assert_eq!(frames(&mut f).unwrap().map(|f| f.len()), Some(2));
        for cut in [two.len() - 1, two.len() - 7, two.len() / 2, two.len() - 5000] {
            let (_b, mut f) = file_of(&two[..cut]);
            assert_eq!(frames(&mut f).unwrap(), None, "cut at {cut}");
        }
        let mut trailing = two.clone();
        trailing.extend(b"garbage");
        let (_c, mut f) = file_of(&trailing);
        assert_eq!(frames(&mut f).unwrap(), None);
    }

    #[test]
    fn a_corrupt_frame_fails_after_the_text_before_it() {
        let mut next = crate::io::xorshift(0x9E37_79B9_7F4A_7C15);
        // frames of over a megabyte each: a run apiece
        let text: Vec<u8> = (0..12_000_000).map(|_| b"abcdefghij\n"[(next() % 11) as usize]).collect();
        let mut bytes = framed(&text, &[4_000_000, 8_000_000]);
        let (_a, mut f) = file_of(&bytes);
        let found = frames(&mut f).unwrap().unwrap();
        assert_eq!(found.len(), 3);
        // damage the third frame's first block (past the frame's and the block's headers,
        // at most 18 + 3 bytes): the headers stay well-formed, its checksum no longer holds
        let at = (found[2].offset + 40) as usize;
        assert!(found[2].len > 1000);
        bytes[at..at + 8].iter_mut().for_each(|b| *b = !*b);
        let (_b, mut f) = file_of(&bytes);
        let found = frames(&mut f).unwrap().expect("headers intact");
        let (got, err) = read_all(ParallelFrames::spawn(f, found).unwrap());
        let err = err.expect("the damage is an error");
        assert!(super::super::corrupt_input(&err).is_some_and(|m| m.contains("not a valid zstd stream")), "{err}");
        // the frames before it whole (of the damaged one, what decoded before the check)
        assert!(
            got.len() >= 8_000_000 && got[..8_000_000] == text[..8_000_000],
            "{} bytes before the error",
            got.len()
        );
    }
}
