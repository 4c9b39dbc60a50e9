//! Hands tungstenite the opening handshake and nothing after it.
//!
//! tungstenite reads the HTTP head of the handshake in chunks, and bytes that came in the same
//! read after the head (a client's first frame, or the relay's challenge right behind its
//! `101`) would stay in tungstenite's buffer, lost to the framing of [`crate::frames`] that
//! takes over. [`HeadReader`] sits under tungstenite for the handshake only: it reads from the
//! socket into its own buffer and hands on bytes up to the end of the head (the first empty
//! line), keeping the rest for [`HeadReader::into_parts`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much is read from the socket at once during the handshake (a request or response head
/// is a few hundred bytes; a longer one takes more reads).
const CHUNK: usize = 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct HeadReader<S> {
    inner: S,
    /// Read from the socket, not handed on yet.
    buf: BytesMut,
    /// How many bytes of `\r\n\r\n` the bytes handed on so far end with.
    matched: usize,
    /// The whole head was handed on.
    done: bool,
}

impl<S> HeadReader<S> {
    /// Wraps a stream for its handshake.
    pub fn new(inner: S) -> Self {
        HeadReader {
            inner,
            buf: BytesMut::new(),
            matched: 0,
            done: false,
        }
    }

    /// The stream, and what was read after the head.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.inner, self.buf)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.done {
            // The handshake asked for more than its head: say the stream ended rather than
            // hand it a frame.
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_empty() {
            this.buf.reserve(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let mut n = 0;
        for &b in this.buf.iter().take(out.remaining()) {
            n += 1;
            this.matched = match (this.matched, b) {
                (0 | 2, b'\r') => this.matched + 1,
                (1 | 3, b'\n') => this.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if this.matched == 4 {
                this.done = true;
                break;
            }
        }
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadReader<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Everything the reader hands on, read `chunk` bytes at a time, until it says the end.
    async fn head_of<S: AsyncRead + Unpin>(reader: &mut HeadReader<S>, chunk: usize) -> Vec<u8> {
        let mut head = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                return head;
            }
            head.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn the_head_is_handed_on_and_what_follows_is_kept() {
        let (mut tx, rx) = tokio::io::duplex(4096);
        // The head split across a boundary in its final empty line, and a frame behind it in
        // the same write.
        tx.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x82\x01A")
            .await
            .unwrap();
        let mut reader = HeadReader::new(rx);
        let head = head_of(&mut reader, 7).await;
        assert_eq!(head, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let (_, rest) = reader.into_parts();
        assert_eq!(&rest[..], b"\x82\x01A");
    }

    #[tokio::test]
    async fn a_head_arriving_byte_by_byte_ends_at_its_empty_line() {
        let (mut tx, rx) = tokio::io::duplex(4096);
        let mut reader = HeadReader::new(rx);
        let writer = tokio::spawn(async move {
            for b in b"HTTP/1.1 101 OK\r\nA: \r\r\n\r\nrest" {
                tx.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            tx
        });
        let head = head_of(&mut reader, 64).await;
        assert_eq!(head, b"HTTP/1.1 101 OK\r\nA: \r\r\n\r\n");
        let mut tx = writer.await.unwrap();
        tx.shutdown().await.unwrap();
        let (mut rx, kept) = reader.into_parts();
        let mut rest = kept.to_vec();
        rx.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"rest");
    }
}
