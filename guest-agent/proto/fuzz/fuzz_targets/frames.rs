//! Fuzz target: arbitrary bytes on the agent channel, fed to the decoder in arbitrary chunks, must
//! never panic; every frame it yields decodes (or fails typed) as a request and as a response.
//! Mostly-valid inputs come from seeding with encoded requests; the fuzzer then mutates them.
#![no_main]

use agent_proto::{Decoder, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (chunk, bytes) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut d = Decoder::new();
    for part in bytes.chunks(chunk) {
        d.push(part);
        while let Some(next) = d.next_frame() {
            if let Ok(frame) = next {
                assert!(frame.payload.len() <= agent_proto::MAX_PAYLOAD);
                let _ = Request::from_frame(&frame);
                let _ = Response::from_frame(&frame);
            }
        }
    }
    let _ = d.stall();
    while d.next_frame().is_some() {}
});
