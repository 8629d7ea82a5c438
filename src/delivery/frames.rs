//! A frame meter under the WebSocket codec: counts every frame a client sends.
//!
//! tungstenite yields whole messages only, so a client that opens a fragmented message
//! and then sends empty continuation frames forever (or any other frame that never
//! completes a message) would never meet the per-message rate limit in the socket loop (`ws.rs`).
//! [`FrameMeter`] wraps the upgraded socket, parses just the frame headers out of the
//! bytes read (payloads are skipped, never copied) and feeds a token bucket of frames.
//! Once the bucket runs dry the next read fails with [`FrameFlood`], which the receive
//! loop turns into close 1008.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Frames allowed per second, per `limits.messages_per_sec`: generous, so a client that
/// fragments its messages or answers pings stays far away from it.
pub const FRAMES_PER_MESSAGE: f64 = 4.0;
/// The bucket holds this many seconds of frames (a burst)...
const BURST_SECS: f64 = 2.0;
/// ...but never fewer frames than this, whatever the configured rate.
const MIN_BURST: f64 = 64.0;

/// The error a read returns once the client sent frames faster than allowed.
#[derive(Debug, thiserror::Error)]
#[error("too many WebSocket frames")]
pub struct FrameFlood;

impl FrameFlood {
    /// Whether an I/O error is a frame flood reported by a [`FrameMeter`].
    pub fn is(err: &io::Error) -> bool {
        err.get_ref().is_some_and(|e| e.is::<FrameFlood>())
    }
}

/// Incremental parser of client frame headers: the 2-byte header, the 16- or 64-bit
/// extended length, the 4-byte mask; then the payload is skipped.
#[derive(Debug, Default)]
struct HeaderParser {
    head: [u8; 14],
    have: usize,
    skip: u64,
}

impl HeaderParser {
    /// Header bytes the current frame needs (2 until the second byte is known).
    fn need(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn payload_len(&self) -> u64 {
        let h = &self.head;
        match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        }
    }

    /// Consumes bytes read from the client; returns how many frame headers completed.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut frames = 0;
        loop {
            if self.skip > 0 {
                if bytes.is_empty() {
                    return frames;
                }
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                bytes = bytes.get(n..).unwrap_or_default();
                self.skip -= n as u64;
                continue;
            }
            let need = self.need();
            if self.have >= 2 && self.have == need {
                frames += 1;
                self.skip = self.payload_len();
                self.have = 0;
                continue;
            }
            if bytes.is_empty() {
                return frames;
            }
            let n = (need - self.have).min(bytes.len());
            let (take, rest) = bytes.split_at(n);
            if let Some(dst) = self.head.get_mut(self.have..self.have + n) {
                dst.copy_from_slice(take);
            }
            self.have += n;
            bytes = rest;
        }
    }
}

/// Token bucket of frames: refills at `per_sec`, holds at most `burst`.
#[derive(Debug)]
struct FrameBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl FrameBucket {
    fn new(messages_per_sec: u32, now: Instant) -> Self {
        let per_sec = f64::from(messages_per_sec) * FRAMES_PER_MESSAGE;
        let burst = (per_sec * BURST_SECS).max(MIN_BURST);
        Self {
            per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `frames` tokens; false once the bucket is overdrawn.
    fn take(&mut self, frames: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst) - frames as f64;
        self.tokens >= 0.0
    }
}

/// An upgraded socket whose reads are metered frame by frame (see the module docs).
#[derive(Debug)]
pub struct FrameMeter<S> {
    inner: S,
    parser: HeaderParser,
    bucket: FrameBucket,
    flooded: bool,
}

impl<S> FrameMeter<S> {
    /// Meters `inner` against `limits.messages_per_sec`.
    pub fn new(inner: S, messages_per_sec: u32) -> Self {
        Self {
            inner,
            parser: HeaderParser::default(),
            bucket: FrameBucket::new(messages_per_sec, Instant::now()),
            flooded: false,
        }
    }

    /// The raw socket, unmetered (for draining it after a close).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameMeter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The bytes that overdrew the bucket were still handed over, so the codec
        // answers the complete messages among them first (a message flood keeps its
        // `rate_limited` replies); the flood is reported by the read after them.
        if this.flooded {
            return Poll::Ready(Err(io::Error::other(FrameFlood)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let frames = this
            .parser
            .feed(buf.filled().get(before..).unwrap_or_default());
        // One clock read per socket read, not per frame.
        if frames > 0 && !this.bucket.take(frames, Instant::now()) {
            this.flooded = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameMeter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn frame(fin: bool, opcode: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            out.push(m | len as u8);
        } else if len <= 0xffff {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0xab, len));
        out
    }

    fn stream() -> Vec<u8> {
        [
            frame(false, 1, 0, true),
            frame(false, 0, 0, true),
            frame(true, 0, 5, true),
            frame(true, 9, 125, true),
            frame(true, 1, 126, true),
            frame(true, 2, 70_000, true),
            frame(true, 1, 3, false),
            frame(true, 8, 2, true),
        ]
        .concat()
    }

    #[test]
    fn counts_frames_in_one_read() {
        let mut p = HeaderParser::default();
        assert_eq!(p.feed(&stream()), 8);
        assert_eq!((p.have, p.skip), (0, 0));
    }

    #[test]
    fn counts_frames_split_at_every_byte() {
        let bytes = stream();
        for at in 0..bytes.len() {
            let (a, b) = bytes.split_at(at);
            let mut p = HeaderParser::default();
            assert_eq!(p.feed(a) + p.feed(b), 8, "split at {at}");
        }
        let mut p = HeaderParser::default();
        assert_eq!(bytes.chunks(1).map(|c| p.feed(c)).sum::<u64>(), 8);
    }

    #[test]
    fn a_header_completes_without_waiting_for_more_bytes() {
        let mut p = HeaderParser::default();
        assert_eq!(p.feed(&frame(false, 0, 0, true)), 1);
        // A huge declared payload is skipped as it comes, never buffered.
        assert_eq!(p.feed(&[0x82, 0xff, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4]), 1);
        assert_eq!(p.skip, 1 << 32);
        assert_eq!(p.feed(&[0; 4096]), 0);
    }

    #[test]
    fn the_bucket_allows_the_rate_and_trips_on_a_flood() {
        let t0 = Instant::now();
        let mut b = FrameBucket::new(50, t0);
        // A burst of two seconds' worth passes; one frame more does not.
        assert!(b.take(400, t0));
        assert!(!b.take(1, t0));
        // Four frames per allowed message, sustained, never trips.
        let mut b = FrameBucket::new(50, t0);
        for i in 0..100_000u64 {
            assert!(b.take(1, t0 + Duration::from_millis(i * 5)));
        }
        // A floor for tiny configured rates.
        let mut b = FrameBucket::new(1, t0);
        assert!(b.take(64, t0));
        assert!(!b.take(1, t0));
    }
}
