//! Plain WebSocket connections (`ws://` only) with an optional source address.
//!
//! The load generator opens its own connections instead of going through the client transport
//! so that it can bind a loopback source address before connecting: one source address has
//! about 28 000 ephemeral ports, so tens of thousands of idle connections need several
//! (`127.0.0.2`, `127.0.0.3`, …). It also keeps the client side identical for the relay and for
//! nats-server: both are measured through this one WebSocket stack.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a TCP connect plus WebSocket handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The socket address behind a `ws://host:port/...` URL. Only literal loopback addresses and
/// `localhost` are accepted: this tool generates load against this machine only.
pub fn target(url: &str) -> anyhow::Result<SocketAddr> {
    let request = url
        .into_client_request()
        .with_context(|| format!("{url:?} is not a WebSocket URL"))?;
    let uri = request.uri();
    if uri.scheme_str() != Some("ws") {
        bail!("{url:?}: only ws:// URLs are supported (the load generator speaks no TLS)");
    }
    let host = uri.host().context("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if host == "localhost" {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse()
            .with_context(|| format!("{host:?} is not an IP address; use 127.0.0.1"))?
    };
    if !ip.is_loopback() {
        bail!("{url:?}: load is only ever generated against loopback addresses");
    }
    let port = uri.port_u16().context("the URL needs an explicit port")?;
    Ok(SocketAddr::new(ip, port))
}

/// Connects to `url`, binding `source` first when given.
pub async fn connect(url: &str, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let addr = target(url)?;
    let fut = async {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding source address {ip}"))?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(16 * 1024 * 1024));
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
            .await
            .with_context(|| format!("WebSocket handshake with {url}"))?;
        anyhow::Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .with_context(|| format!("connecting to {url} took longer than {CONNECT_TIMEOUT:?}"))?
}
