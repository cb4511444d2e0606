//! A small binary encoding for plugin checkpoint state ([`crate::Transform::snapshot`]).
//!
//! ```
//! use weir_sdk::state::{Reader, Writer};
//! let mut w = Writer::default();
//! w.u64(3);
//! w.bytes(b"key");
//! let bytes = w.finish();
//! let mut r = Reader::new(&bytes);
//! assert_eq!(r.u64().unwrap(), 3);
//! assert_eq!(r.bytes().unwrap(), b"key");
//! r.end().unwrap();
//! ```

use crate::error::{Error, Result};
use crate::keys::Scalar;

/// Appends values.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    pub fn scalar(&mut self, s: &Scalar) {
        match s {
            Scalar::Null => self.buf.push(0),
            Scalar::Bool(b) => self.buf.extend_from_slice(&[1, *b as u8]),
            Scalar::Int(i) => {
                self.buf.push(2);
                self.i64(*i);
            }
            Scalar::Float(f) => {
                self.buf.push(3);
                self.f64(*f);
            }
            Scalar::Str(v) => {
                self.buf.push(4);
                self.bytes(v.as_bytes());
            }
        }
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads values back; running out or a bad tag is an error, never a panic.
pub struct Reader<'a> {
    buf: &'a [u8],
}

fn short() -> Error {
    Error::internal("checkpoint state is truncated or not from this plugin")
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(short());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| short())?))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()?;
        if n > self.buf.len() as u64 {
            return Err(short());
        }
        self.take(n as usize)
    }
    pub fn scalar(&mut self) -> Result<Scalar> {
        Ok(match self.take(1)?[0] {
            0 => Scalar::Null,
            1 => Scalar::Bool(self.take(1)?[0] != 0),
            2 => Scalar::Int(self.i64()?),
            3 => Scalar::Float(self.f64()?),
            4 => Scalar::Str(String::from_utf8(self.bytes()?.to_vec()).map_err(|_| short())?),
            _ => return Err(short()),
        })
    }
    /// Check everything was read.
    pub fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(short())
        }
    }
}
