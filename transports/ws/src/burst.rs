//! A read buffer that exists only while bytes are waiting.
//!
//! tungstenite keeps its read buffer for the life of a connection, so its size is paid by every
//! idle connection; but a small one costs a `read` system call per few frames on a busy
//! connection. [`BurstReader`] sits under tungstenite and takes both sides: tungstenite reads
//! small chunks ([`crate`]'s `READ_BUFFER`) from it, and it reads from the socket in bursts of
//! up to [`BURST`] bytes into a buffer that is allocated when the socket has data and freed as
//! soon as the socket has none (a read that would block). An idle connection holds no burst
//! buffer at all; a busy one makes one system call per [`BURST`] bytes. The price is one copy of
//! each received byte and one allocation per burst. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes read from the socket at once.
pub const BURST: usize = 16 * 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct BurstReader<S> {
    inner: S,
    /// Bytes read from the socket and not yet handed on; no capacity while idle.
    buf: BytesMut,
}

impl<S> BurstReader<S> {
    /// Wraps a stream.
    pub fn new(inner: S) -> Self {
        BurstReader {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// The capacity held now (0 while idle), for tests.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BurstReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            // A caller asking for a burst's worth or more gets it directly.
            if out.remaining() >= BURST {
                this.buf = BytesMut::new();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.capacity() < BURST {
                this.buf = BytesMut::with_capacity(BURST);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing waiting: give the memory back until the socket has data again.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                // 0 bytes is the end of the stream: hand on nothing, which says the same.
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BurstReader<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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

    #[tokio::test]
    async fn bytes_pass_in_order_and_an_idle_reader_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let mut reader = BurstReader::new(rx);
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        while got.len() < data.len() {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        // Drained: the next read waits, and while it waits no burst buffer is held.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read(&mut chunk),
        )
        .await;
        assert!(
            waiting.is_err(),
            "nothing was written, so the read must wait"
        );
        assert_eq!(reader.held(), 0);
        // Large reads and end of stream.
        tx.write_all(&data[..100]).await.unwrap();
        drop(tx);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, data[..100]);
    }
}
