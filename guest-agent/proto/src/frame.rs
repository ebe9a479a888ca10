//! Framing of the agent channel: a fixed 24-byte header (magic, version, kind, id, length,
//! payload checksum, header checksum) and a payload of at most `MAX_PAYLOAD` bytes.
//! Invariant: `parse` is pure and total (never panics, never allocates more than one frame), and
//! after any malformed input the `Decoder` resynchronises on the next valid header.

use thiserror::Error;

/// First bytes of every frame; the reader resynchronises on them after garbage.
pub const MAGIC: [u8; 4] = *b"IFAG";
/// Protocol version this build speaks. The header layout is the same for every version.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Hard limit on a frame's payload: every byte on a 16550 port costs exits.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// One well-formed frame: a message kind, the request id it belongs to, and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub id: u32,
    pub payload: Vec<u8>,
}

/// Why bytes on the channel were not a frame. Each is one cause; the doc comment is the message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// bytes that are not a frame header
    #[error("{skipped} bytes of garbage before a frame header")]
    Garbage { skipped: usize },
    /// a header whose checksum does not match (corrupt or not a header)
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// a frame from a protocol version this side does not speak
    #[error("unsupported protocol version {got} (this side speaks {VERSION}) in frame {id}")]
    Version { got: u8, id: u32 },
    /// reserved header bits set
    #[error("reserved header bits set in frame {id}")]
    Reserved { id: u32 },
    /// a payload larger than the hard limit
    #[error("frame {id} announces {len} payload bytes, the limit is {MAX_PAYLOAD}")]
    Oversized { len: u64, id: u32 },
    /// payload bytes that do not match the header's checksum
    #[error("payload checksum mismatch in frame {id}")]
    PayloadChecksum { id: u32 },
    /// the stream ended inside a frame
    #[error("stream ended inside a frame ({have} bytes buffered, {need} more needed)")]
    Truncated { have: usize, need: usize },
}

impl FrameError {
    /// The request id the error can be attributed to (0 when the header was unreadable).
    pub fn id(&self) -> u32 {
        match self {
            FrameError::Version { id, .. }
            | FrameError::Reserved { id }
            | FrameError::Oversized { id, .. }
            | FrameError::PayloadChecksum { id } => *id,
            FrameError::Garbage { .. }
            | FrameError::HeaderChecksum
            | FrameError::Truncated { .. } => 0,
        }
    }
}

/// Outcome of parsing the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A frame, and how many bytes of the buffer it used.
    Frame { frame: Frame, consumed: usize },
    /// Not enough bytes yet: at least `need` more are required.
    Incomplete { need: usize },
    /// The front of the buffer is not a frame: drop `consumed` bytes and report `error`.
    Invalid { error: FrameError, consumed: usize },
}

/// FNV-1a, 32 bit: detects corruption and lets a reader tell a header from garbage; not a MAC.
pub fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Encodes one frame. Fails only when the payload is over the limit.
pub fn encode(kind: u8, id: u32, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_PAYLOAD)
        .ok_or(FrameError::Oversized {
            len: payload.len() as u64,
            id,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    let header_sum = checksum(&out);
    out.extend_from_slice(&header_sum.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

fn le_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

/// Where the magic starts in `buf`, counting a magic prefix cut off at the end of the buffer.
fn find_magic(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find(|&i| {
        let tail = buf.get(i..).unwrap_or_default();
        let n = tail.len().min(MAGIC.len());
        tail.get(..n) == MAGIC.get(..n)
    })
}

/// Parses the frame at the front of `buf`. Pure: the caller drops `consumed` bytes.
pub fn parse(buf: &[u8]) -> Parsed {
    match find_magic(buf) {
        Some(0) => {}
        Some(skipped) => {
            return Parsed::Invalid {
                error: FrameError::Garbage { skipped },
                consumed: skipped,
            }
        }
        None if buf.is_empty() => return Parsed::Incomplete { need: HEADER_LEN },
        None => {
            return Parsed::Invalid {
                error: FrameError::Garbage { skipped: buf.len() },
                consumed: buf.len(),
            }
        }
    }
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Parsed::Incomplete {
            need: HEADER_LEN - buf.len(),
        };
    };
    if checksum(header.get(..20).unwrap_or_default()) != le_u32(header, 20) {
        // Skip the magic only: a real header may start inside what looked like one.
        return Parsed::Invalid {
            error: FrameError::HeaderChecksum,
            consumed: MAGIC.len(),
        };
    }
    let version = header.get(4).copied().unwrap_or_default();
    let kind = header.get(5).copied().unwrap_or_default();
    let reserved = [header.get(6), header.get(7)];
    let id = le_u32(header, 8);
    let len = le_u32(header, 12);
    let invalid = |error| Parsed::Invalid {
        error,
        consumed: HEADER_LEN,
    };
    if version != VERSION {
        return invalid(FrameError::Version { got: version, id });
    }
    if reserved != [Some(&0), Some(&0)] {
        return invalid(FrameError::Reserved { id });
    }
    let len_usize = len as usize;
    if len_usize > MAX_PAYLOAD {
        return invalid(FrameError::Oversized {
            len: u64::from(len),
            id,
        });
    }
    let Some(total) = HEADER_LEN.checked_add(len_usize) else {
        return invalid(FrameError::Oversized {
            len: u64::from(len),
            id,
        });
    };
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Parsed::Incomplete {
            need: total - buf.len(),
        };
    };
    if checksum(payload) != le_u32(header, 16) {
        return Parsed::Invalid {
            error: FrameError::PayloadChecksum { id },
            consumed: total,
        };
    }
    Parsed::Frame {
        frame: Frame {
            kind,
            id,
            payload: payload.to_vec(),
        },
        consumed: total,
    }
}

/// A streaming reader over `parse`: buffers partial frames and reports one error per run of bad
/// input (the bytes skipped while resynchronising after an error are not reported again).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    resyncing: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next frame or error, or None when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            match parse(&self.buf) {
                Parsed::Incomplete { .. } => return None,
                Parsed::Frame { frame, consumed } => {
                    self.buf.drain(..consumed.min(self.buf.len()));
                    self.resyncing = false;
                    return Some(Ok(frame));
                }
                Parsed::Invalid { error, consumed } => {
                    self.buf.drain(..consumed.min(self.buf.len()));
                    let quiet = self.resyncing && matches!(error, FrameError::Garbage { .. });
                    self.resyncing = true;
                    if !quiet {
                        return Some(Err(error));
                    }
                }
            }
        }
    }

    /// Bytes buffered but not yet returned.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Gives up on a partial frame that stopped arriving: reports it as truncated and skips its
    /// magic, so the bytes after it (perhaps whole frames) are searched for the next header.
    pub fn stall(&mut self) -> Option<FrameError> {
        let e = self.finish()?;
        self.buf.drain(..MAGIC.len().min(self.buf.len()));
        self.resyncing = true;
        Some(e)
    }

    /// At end of stream: a `Truncated` error if a frame was cut off.
    pub fn finish(&self) -> Option<FrameError> {
        match parse(&self.buf) {
            Parsed::Incomplete { need } if !self.buf.is_empty() => Some(FrameError::Truncated {
                have: self.buf.len(),
                need,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        encode(kind, id, payload).unwrap()
    }

    fn drain(d: &mut Decoder) -> Vec<Result<Frame, FrameError>> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn round_trip() {
        let bytes = frame(3, 42, b"hello");
        match parse(&bytes) {
            Parsed::Frame { frame, consumed } => {
                assert_eq!(consumed, bytes.len());
                assert_eq!(
                    (frame.kind, frame.id, frame.payload.as_slice()),
                    (3, 42, &b"hello"[..])
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_is_incomplete_then_truncated_at_eof() {
        let bytes = frame(1, 7, b"payload");
        for cut in 0..bytes.len() {
            let mut d = Decoder::new();
            d.push(&bytes[..cut]);
            assert!(d.next_frame().is_none(), "cut at {cut}");
            if cut > 0 {
                assert!(matches!(d.finish(), Some(FrameError::Truncated { .. })));
            }
        }
    }

    #[test]
    fn stalled_partial_frame_gives_up_and_finds_the_frame_inside() {
        let mut big = frame(1, 3, &[7; 5000]);
        big.truncate(100);
        big.extend(frame(1, 4, b"ping"));
        let mut d = Decoder::new();
        d.push(&big);
        assert!(d.next_frame().is_none(), "waits for the announced payload");
        assert!(matches!(d.stall(), Some(FrameError::Truncated { .. })));
        let out = drain(&mut d);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].as_ref().unwrap().id, 4);
    }

    #[test]
    fn garbage_then_frame_resyncs_with_one_error() {
        let mut d = Decoder::new();
        d.push(b"\x00\xffnot a frame IFA at all");
        d.push(&frame(1, 9, b"{}"));
        let out = drain(&mut d);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], Err(FrameError::Garbage { .. })));
        assert_eq!(out[1].as_ref().unwrap().id, 9);
    }

    #[test]
    fn oversized_header_is_reported_and_next_frame_still_read() {
        let mut bad = frame(1, 5, b"");
        bad[12..16].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let sum = checksum(&bad[..20]);
        bad[20..24].copy_from_slice(&sum.to_le_bytes());
        let mut d = Decoder::new();
        d.push(&bad);
        d.push(&[0x55; 1000]);
        d.push(&frame(1, 6, b"x"));
        let out = drain(&mut d);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], Err(FrameError::Oversized { id: 5, .. })));
        assert_eq!(out[1].as_ref().unwrap().id, 6);
        assert!(encode(1, 1, &vec![0; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn corrupt_payload_and_version_are_typed() {
        let mut bytes = frame(1, 11, b"abc");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            parse(&bytes),
            Parsed::Invalid {
                error: FrameError::PayloadChecksum { id: 11 },
                ..
            }
        ));
        let mut v2 = frame(1, 12, b"");
        v2[4] = 2;
        let sum = checksum(&v2[..20]);
        v2[20..24].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(
            parse(&v2),
            Parsed::Invalid {
                error: FrameError::Version { got: 2, id: 12 },
                ..
            }
        ));
        let mut hdr = frame(1, 13, b"");
        hdr[9] ^= 0x40;
        assert!(matches!(
            parse(&hdr),
            Parsed::Invalid {
                error: FrameError::HeaderChecksum,
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_consumes_progress(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            match parse(&bytes) {
                Parsed::Frame { consumed, .. } | Parsed::Invalid { consumed, .. } => {
                    prop_assert!(consumed > 0 && consumed <= bytes.len());
                }
                Parsed::Incomplete { need } => prop_assert!(need > 0),
            }
        }

        #[test]
        fn frames_survive_surrounding_garbage(
            junk in proptest::collection::vec(any::<u8>(), 0..200),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            id in 1u32..,
            split in 0usize..600,
        ) {
            let mut stream = junk.clone();
            stream.extend(frame(2, id, &payload));
            let mut d = Decoder::new();
            let split = split.min(stream.len());
            d.push(&stream[..split]);
            let mut out = drain(&mut d);
            d.push(&stream[split..]);
            out.extend(drain(&mut d));
            let frames: Vec<_> = out.into_iter().filter_map(Result::ok).collect();
            prop_assert_eq!(frames.last().map(|f| (f.id, f.payload.clone())), Some((id, payload)));
            prop_assert_eq!(d.pending(), 0);
        }
    }
}
