//! `syncra-transport-ws`: the WebSocket transport (tokio-tungstenite on rustls), both the relay's
//! accepting side and the client's connecting side.
//!
//! It must never offer plaintext WebSocket on a non-loopback address unless the operator says a
//! TLS-terminating proxy is in front, and never enables permessage-deflate.
//!
//! Status: not built yet; the relay issue fills this crate.
