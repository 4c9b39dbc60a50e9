//! Fuzzes the WebSocket transport's framing (`syncra_transport_ws::frames::Decoder`), which reads
//! every byte a peer sends after the opening handshake: it must never panic, never hand on a
//! message over its limit or a control payload over 125 bytes, and decode the same input to the
//! same frames (and the same error) whether it arrives in one piece or in small ones.
//!
//! Input: the first byte picks the role (bit 0: server reads masked frames, client unmasked),
//! the limit (bits 1–4: 16 to 256 bytes, so that `TooLarge` is reachable) and the size of the
//! pieces (bits 5–7: 1 to 8 bytes); the rest is what the peer sent.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use syncra_transport_ws::frames::{Decoder, FrameError, Parsed, Role};

fn run(role: Role, max: usize, input: &[u8], piece: usize) -> (Vec<Parsed>, Option<FrameError>) {
    let mut decoder = Decoder::new(role, max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in input.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(parsed)) => {
                    match &parsed {
                        Parsed::Binary(b) => assert!(b.len() <= max, "a message over the limit"),
                        Parsed::Ping(p) => assert!(p.len() <= 125, "a ping over 125 bytes"),
                        _ => {}
                    }
                    out.push(parsed);
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let role = if control & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let max = 16 * (1 + usize::from((control >> 1) & 0x0F));
    let piece = 1 + usize::from(control >> 5);
    let whole = run(role, max, input, input.len().max(1));
    let pieces = run(role, max, input, piece);
    assert_eq!(whole, pieces, "pieces decode differently from the whole");
});
