//! A TCP relay on loopback that holds back what a server sends to its client by a fixed delay,
//! so that a test can put one client "far" from a real server (a node whose broker is across a
//! slow link) and check an ordering guarantee that must not depend on who is nearer. Bytes are
//! never changed, dropped or reordered; only the server-to-client direction is delayed.
//!
//! It runs on plain threads (three per connection), so that it works the same under any tokio
//! runtime a test uses, and stops accepting when dropped (connections it relays end when
//! either side closes).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A loopback port whose connections are relayed to a server with the server's answers held
/// back by `delay`.
#[derive(Debug)]
pub struct DelayedLink {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl DelayedLink {
    /// Starts relaying connections to `127.0.0.1:target`, with what the target sends delayed
    /// by `delay`.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub fn start(target: u16, delay: Duration) -> DelayedLink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind a port for the delayed link: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the delayed link's port: {e}"))
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let target: SocketAddr = ([127, 0, 0, 1], target).into();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    // The server is away: the client sees the connection close, as it would.
                    continue;
                };
                relay(client, server, delay);
            }
        });
        DelayedLink { port, stop }
    }

    /// The port clients connect to instead of the server's.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for DelayedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accepting thread so that it sees the flag and ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Relays one connection: client to server at once, server to client `delay` later.
fn relay(client: TcpStream, server: TcpStream, delay: Duration) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || copy(client_in, server_out));
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut server_in = server;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_in.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if chunks
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut client_out = client;
    std::thread::spawn(move || {
        for (at, chunk) in due {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if client_out.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(Shutdown::Both);
    });
}

/// Copies `from` to `to` until either ends, then closes both.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_back_unchanged_and_late() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let target = echo.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = echo.accept() {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
            }
        });
        let delay = Duration::from_millis(150);
        let link = DelayedLink::start(target, delay);
        let mut c =
            TcpStream::connect(("127.0.0.1", link.port())).unwrap_or_else(|e| panic!("{e}"));
        let sent = Instant::now();
        c.write_all(b"hello").unwrap_or_else(|e| panic!("{e}"));
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&back, b"hello");
        // Held back at least the delay (never asserted as an upper bound: no timing tests).
        assert!(sent.elapsed() >= delay);
    }
}
