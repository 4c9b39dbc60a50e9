//! WebSocket data framing (RFC 6455 §5), both ends, after the opening handshake.
//!
//! tungstenite does the opening handshake (HTTP upgrade); from then on frames are read and
//! written here, so that a connection holds no buffer while it is idle and a frame's bytes are
//! copied once on the way in (out of the socket's burst, unmasked in place) and once on the way
//! out (into the batch written with one system call). `docs/BENCHMARKS.md` ("Our own framing")
//! has what that saved.
//!
//! Everything read here comes from a peer and is hostile: [`Decoder::decode`] checks each rule
//! of RFC 6455 §5 that a receiver must enforce (reserved bits, known opcodes, masking by the
//! client and only by the client, control frames short and unfragmented, fragments in order,
//! close codes and UTF-8 reasons) and refuses a frame or message larger than the limit from its
//! header, before any of its payload is buffered. The fuzz target `ws_frames` runs it on
//! arbitrary bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Which end of the connection this is: a server reads masked frames and writes unmasked ones,
/// a client the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The accepting side (the relay).
    Server,
    /// The connecting side.
    Client,
}

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// A continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text message (not part of Syncra's protocol; refused).
    pub const TEXT: u8 = 0x1;
    /// A binary message: one protocol frame.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// A whole message or control frame taken from the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A binary message.
    Binary(Bytes),
    /// A text message (its content is not kept: the protocol has no use for it).
    Text,
    /// A ping, with the payload the pong must echo.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame, with its status code and reason if it had them.
    Close(Option<(u16, String)>),
}

/// Why input was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A frame or message larger than the limit (`size` as its header announced, counting the
    /// fragments before it).
    TooLarge {
        /// Bytes announced.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// A broken rule of RFC 6455 §5.
    Protocol(&'static str),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { size, max } => {
                write!(f, "message of {size} bytes exceeds the {max}-byte limit")
            }
            FrameError::Protocol(why) => write!(f, "websocket protocol error: {why}"),
        }
    }
}

/// A fragmented message being put together.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: BytesMut,
}

/// Reads frames from a byte buffer, putting fragmented messages together.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max: usize,
    partial: Option<Partial>,
}

impl Decoder {
    /// A decoder for `role`'s end, refusing messages longer than `max` bytes.
    pub fn new(role: Role, max: usize) -> Self {
        Decoder {
            role,
            max,
            partial: None,
        }
    }

    /// Takes the next whole message or control frame from the front of `buf`. `Ok(None)`: more
    /// bytes are needed (what is in `buf` stays there, and the fragments already taken stay
    /// in the decoder). After an error the connection cannot be read any further.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Parsed>, FrameError> {
        loop {
            let Some(header) = self.header(buf)? else {
                return Ok(None);
            };
            let total = header.at + header.len;
            if buf.len() < total {
                // Room for the rest of the frame, so that it arrives in as few reads as it can.
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            let payload = header.at..total;
            if let Some(mask) = header.mask {
                apply_mask(&mut buf[payload.clone()], mask);
            }
            let parsed = self.take(&header, &buf[payload]);
            buf.advance(total);
            if let Some(parsed) = parsed? {
                return Ok(Some(parsed));
            }
        }
    }

    /// What one frame's (unmasked) payload adds: a whole message or control frame, or `None`
    /// when it was a fragment of a message not finished yet.
    fn take(&mut self, header: &Header, payload: &[u8]) -> Result<Option<Parsed>, FrameError> {
        match header.opcode {
            opcode::PING => Ok(Some(Parsed::Ping(Bytes::copy_from_slice(payload)))),
            opcode::PONG => Ok(Some(Parsed::Pong)),
            opcode::CLOSE => close_frame(payload).map(|c| Some(Parsed::Close(c))),
            opcode::CONTINUATION => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(FrameError::Protocol("a continuation frame with no message"));
                };
                partial.data.extend_from_slice(payload);
                if !header.fin {
                    return Ok(None);
                }
                let Partial { text, data } = self.partial.take().expect("checked above");
                Ok(Some(message(text, data.freeze())))
            }
            op => {
                if self.partial.is_some() {
                    return Err(FrameError::Protocol(
                        "a new message began before the fragmented one ended",
                    ));
                }
                let text = op == opcode::TEXT;
                if header.fin {
                    // Copied out of the read buffer, so that a frame kept somewhere (a mailbox,
                    // a queue) does not keep the whole burst it came in alive.
                    return Ok(Some(message(text, Bytes::copy_from_slice(payload))));
                }
                self.partial = Some(Partial {
                    text,
                    data: BytesMut::from(payload),
                });
                Ok(None)
            }
        }
    }

    /// Reads and checks the header at the front of `buf`, if it is all there.
    fn header(&self, buf: &[u8]) -> Result<Option<Header>, FrameError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(FrameError::Protocol(
                "reserved bits set, but no extension was agreed",
            ));
        }
        let fin = b0 & 0x80 != 0;
        let op = b0 & 0x0F;
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => {
                return Err(FrameError::Protocol("a client's frame was not masked"));
            }
            (Role::Client, true) => {
                return Err(FrameError::Protocol("a server's frame was masked"));
            }
            _ => {}
        }
        if !matches!(
            op,
            opcode::CONTINUATION
                | opcode::TEXT
                | opcode::BINARY
                | opcode::CLOSE
                | opcode::PING
                | opcode::PONG
        ) {
            return Err(FrameError::Protocol("unknown opcode"));
        }
        let (len, mut at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                    if len >> 63 != 0 {
                        return Err(FrameError::Protocol(
                            "a payload length with its top bit set",
                        ));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if op & 0x08 != 0 {
            if !fin {
                return Err(FrameError::Protocol("a fragmented control frame"));
            }
            if len > 125 {
                return Err(FrameError::Protocol(
                    "a control frame longer than 125 bytes",
                ));
            }
        } else {
            let before = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
            let size = before.saturating_add(len);
            if size > self.max as u64 {
                return Err(FrameError::TooLarge {
                    size,
                    max: self.max,
                });
            }
        }
        let mask = if masked {
            match buf.get(at..at + 4) {
                Some(m) => {
                    at += 4;
                    Some([m[0], m[1], m[2], m[3]])
                }
                None => return Ok(None),
            }
        } else {
            None
        };
        Ok(Some(Header {
            fin,
            opcode: op,
            mask,
            at,
            // At most `max` (data) or 125 (control): fits a usize.
            len: len as usize,
        }))
    }
}

/// A frame header, read.
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Where the payload starts.
    at: usize,
    len: usize,
}

fn message(text: bool, data: Bytes) -> Parsed {
    if text {
        Parsed::Text
    } else {
        Parsed::Binary(data)
    }
}

/// A close frame's payload: nothing, or a status code and a UTF-8 reason (RFC 6455 §5.5.1,
/// §7.4).
fn close_frame(payload: &[u8]) -> Result<Option<(u16, String)>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol(
            "a close frame with a one-byte payload",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // Codes an endpoint may send (RFC 6455 §7.4.1 and IANA's registry: 1012–1014
            // were added there); 1004–1006 and 1015 are reserved for reporting, not for the
            // wire.
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(FrameError::Protocol(
                    "a close frame with an invalid status code",
                ));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| FrameError::Protocol("a close reason that is not UTF-8"))?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// XORs `data` with the 4-byte `mask`, starting at the mask's first byte (RFC 6455 §5.3).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let wide = u64::from(word) | (u64::from(word) << 32);
    let (chunks, rest) = data.as_chunks_mut::<8>();
    for chunk in chunks {
        *chunk = (u64::from_ne_bytes(*chunk) ^ wide).to_ne_bytes();
    }
    // The chunks covered a multiple of 8 bytes, so the rest starts at the mask's first byte.
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// The bytes a frame with a `len`-byte payload takes, header included.
pub fn encoded_len(len: usize, masked: bool) -> usize {
    let extended = match len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + extended + if masked { 4 } else { 0 } + len
}

/// Appends one final frame to `out`: unmasked with `mask` `None` (a server), masked with the
/// given key otherwise (a client; the key must be fresh and unpredictable per frame).
pub fn encode(out: &mut BytesMut, op: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(encoded_len(payload.len(), mask.is_some()));
    out.put_u8(0x80 | op);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.put_u8(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
    }
}

/// A close frame's payload: the status code, then the reason cut to fit the 125 bytes a
/// control frame may carry (at a character boundary).
pub fn close_payload(code: u16, reason: &str) -> BytesMut {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = BytesMut::with_capacity(2 + end);
    payload.put_u16(code);
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    fn client_frame(fin: bool, op: u8, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode(&mut out, op, payload, Some(MASK));
        if !fin {
            out[0] &= 0x7F;
        }
        out
    }

    fn decode_all(role: Role, max: usize, input: &[u8]) -> Result<Vec<Parsed>, FrameError> {
        let mut decoder = Decoder::new(role, max);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(p) = decoder.decode(&mut buf)? {
            out.push(p);
        }
        Ok(out)
    }

    #[test]
    fn the_examples_of_rfc_6455_section_5_7_decode() {
        // A single-frame masked text message, and an unmasked one as a client reads it.
        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decode_all(Role::Server, 100, &masked),
            Ok(vec![Parsed::Text])
        );
        // An unmasked ping, read by a client, echoing "Hello".
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(
            decode_all(Role::Client, 100, &ping),
            Ok(vec![Parsed::Ping(Bytes::from_static(b"Hello"))])
        );
        // 256 bytes of binary data in a single unmasked message: a 16-bit length.
        let mut big = vec![0x82, 0x7E, 0x01, 0x00];
        big.extend(std::iter::repeat_n(7u8, 256));
        assert_eq!(
            decode_all(Role::Client, 1000, &big),
            Ok(vec![Parsed::Binary(Bytes::from(vec![7u8; 256]))])
        );
    }

    #[test]
    fn frames_round_trip_at_every_length_class_and_split_point() {
        for len in [
            0usize, 1, 7, 8, 9, 125, 126, 127, 300, 65_535, 65_536, 70_000,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for role in [Role::Server, Role::Client] {
                let mut wire = BytesMut::new();
                let mask = (role == Role::Server).then_some(MASK);
                encode(&mut wire, opcode::BINARY, &payload, mask);
                assert_eq!(wire.len(), encoded_len(len, mask.is_some()));
                // Delivered in two pieces, split anywhere near the header or in the payload.
                for split in [0, 1, 2, 3, 5, 9, 13, wire.len() / 2, wire.len()] {
                    let split = split.min(wire.len());
                    let mut decoder = Decoder::new(role, 100_000);
                    let mut buf = BytesMut::from(&wire[..split]);
                    let first = decoder.decode(&mut buf).unwrap();
                    let got = match first {
                        Some(p) => p,
                        None => {
                            buf.extend_from_slice(&wire[split..]);
                            decoder.decode(&mut buf).unwrap().expect("whole frame")
                        }
                    };
                    assert_eq!(got, Parsed::Binary(Bytes::from(payload.clone())));
                    assert!(buf.is_empty() || split < wire.len());
                }
            }
        }
    }

    #[test]
    fn fragments_are_put_together_around_control_frames() {
        let mut input = client_frame(false, opcode::BINARY, b"hel");
        input.extend(client_frame(true, opcode::PING, b"p"));
        input.extend(client_frame(false, opcode::CONTINUATION, b"lo "));
        input.extend(client_frame(true, opcode::CONTINUATION, b"world"));
        assert_eq!(
            decode_all(Role::Server, 100, &input),
            Ok(vec![
                Parsed::Ping(Bytes::from_static(b"p")),
                Parsed::Binary(Bytes::from_static(b"hello world")),
            ])
        );
    }

    #[test]
    fn each_broken_rule_is_refused_by_name() {
        let refused = |input: &[u8], role: Role| decode_all(role, 100, input).unwrap_err();
        let mut rsv = client_frame(true, opcode::BINARY, b"x");
        rsv[0] |= 0x40;
        assert_eq!(
            refused(&rsv, Role::Server),
            FrameError::Protocol("reserved bits set, but no extension was agreed")
        );
        let mut unmasked = BytesMut::new();
        encode(&mut unmasked, opcode::BINARY, b"x", None);
        assert_eq!(
            refused(&unmasked, Role::Server),
            FrameError::Protocol("a client's frame was not masked")
        );
        assert_eq!(
            refused(&client_frame(true, opcode::BINARY, b"x"), Role::Client),
            FrameError::Protocol("a server's frame was masked")
        );
        assert_eq!(
            refused(&client_frame(true, 0x3, b"x"), Role::Server),
            FrameError::Protocol("unknown opcode")
        );
        assert_eq!(
            refused(&client_frame(false, opcode::PING, b"x"), Role::Server),
            FrameError::Protocol("a fragmented control frame")
        );
        assert_eq!(
            refused(&client_frame(true, opcode::PING, &[0; 126]), Role::Server),
            FrameError::Protocol("a control frame longer than 125 bytes")
        );
        assert_eq!(
            refused(
                &client_frame(true, opcode::CONTINUATION, b"x"),
                Role::Server
            ),
            FrameError::Protocol("a continuation frame with no message")
        );
        let mut interleaved = client_frame(false, opcode::BINARY, b"x");
        interleaved.extend(client_frame(true, opcode::BINARY, b"y"));
        assert_eq!(
            refused(&interleaved, Role::Server),
            FrameError::Protocol("a new message began before the fragmented one ended")
        );
        assert_eq!(
            refused(&client_frame(true, opcode::CLOSE, b"x"), Role::Server),
            FrameError::Protocol("a close frame with a one-byte payload")
        );
        assert_eq!(
            refused(
                &client_frame(true, opcode::CLOSE, &[0x03, 0xED]),
                Role::Server
            ),
            FrameError::Protocol("a close frame with an invalid status code")
        );
        assert_eq!(
            refused(
                &client_frame(true, opcode::CLOSE, &[0x03, 0xE8, 0xFF]),
                Role::Server
            ),
            FrameError::Protocol("a close reason that is not UTF-8")
        );
        let top_bit = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
        assert_eq!(
            refused(&top_bit, Role::Server),
            FrameError::Protocol("a payload length with its top bit set")
        );
    }

    #[test]
    fn an_oversized_frame_or_message_is_refused_from_its_header_alone() {
        // Only the header of a 1 GiB frame: refused before any payload arrives.
        let header = [0x82, 0xFF, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            decode_all(Role::Server, 100, &header),
            Err(FrameError::TooLarge {
                size: 1 << 30,
                max: 100
            })
        );
        // Fragments that each fit but together do not.
        let mut input = client_frame(false, opcode::BINARY, &[1; 60]);
        input.extend(client_frame(true, opcode::CONTINUATION, &[2; 60]));
        assert_eq!(
            decode_all(Role::Server, 100, &input),
            Err(FrameError::TooLarge {
                size: 120,
                max: 100
            })
        );
        // Exactly the limit passes.
        let exact = client_frame(true, opcode::BINARY, &[3; 100]);
        assert_eq!(
            decode_all(Role::Server, 100, &exact),
            Ok(vec![Parsed::Binary(Bytes::from(vec![3u8; 100]))])
        );
    }

    #[test]
    fn close_frames_carry_their_code_and_reason() {
        let input = client_frame(true, opcode::CLOSE, &close_payload(4005, "bye"));
        assert_eq!(
            decode_all(Role::Server, 100, &input),
            Ok(vec![Parsed::Close(Some((4005, "bye".into())))])
        );
        assert_eq!(
            decode_all(Role::Server, 100, &client_frame(true, opcode::CLOSE, b"")),
            Ok(vec![Parsed::Close(None)])
        );
        // A long reason is cut at a character boundary to fit a control frame.
        let long = "é".repeat(100);
        let payload = close_payload(1000, &long);
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn masking_matches_the_byte_by_byte_definition() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, MASK);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
