//! A captured, capped stdout/stderr for a plugin: the host drains it after every call and
//! forwards the lines to the log. Bytes beyond the cap are dropped and counted, never
//! buffered, and never fail the plugin.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    dropped: u64,
}

/// One plugin's output stream. Clones share the buffer.
#[derive(Clone)]
pub struct CappedPipe {
    state: Arc<Mutex<State>>,
    cap: usize,
}

impl CappedPipe {
    /// A pipe that keeps at most `cap` bytes between two drains.
    pub fn new(cap: usize) -> Self {
        CappedPipe { state: Arc::default(), cap }
    }

    fn push(&self, bytes: &[u8]) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.cap.saturating_sub(s.buf.len());
        let take = room.min(bytes.len());
        s.buf.extend_from_slice(&bytes[..take]);
        s.dropped += (bytes.len() - take) as u64;
    }

    /// Take what was written since the last drain, and how many bytes were dropped.
    pub fn drain(&self) -> (Vec<u8>, u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut s.dropped);
        (std::mem::take(&mut s.buf), dropped)
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
