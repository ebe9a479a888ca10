//! The agent channel loop: read frames from the serial port, answer each, reap children.
//! Invariant: every frame or run of bad bytes gets exactly one reply (an error for anything
//! malformed, unknown or oversized) and the loop keeps serving; only Shutdown ends it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// How long a partial frame may stall before the agent gives up on it.
const STALL: Duration = Duration::from_millis(1000);

use agent_proto::{Decoder, ErrorCode, Frame, FrameError, MessageError, Request, Response};

use crate::config::Config;
use crate::{log, notice, ops, sys};

/// What the loop does after answering a request.
enum Next {
    Continue,
    Shutdown,
}

/// Opens the channel in raw mode.
pub fn open_channel(path: &str) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    sys::make_raw(&f)?;
    Ok(f)
}

/// The reply to a frame error.
fn frame_error(e: &FrameError) -> Response {
    let code = match e {
        FrameError::Oversized { .. } => ErrorCode::Oversized,
        _ => ErrorCode::Malformed,
    };
    Response::error(code, e.to_string())
}

/// Answers one well-formed frame.
fn answer(cfg: &Config, init_mode: bool, frame: &Frame) -> (Response, Next) {
    let req = match Request::from_frame(frame) {
        Ok(r) => r,
        Err(MessageError::UnknownType(k)) => {
            return (
                Response::error(
                    ErrorCode::UnknownType,
                    format!("unknown message type {k:#04x}"),
                ),
                Next::Continue,
            )
        }
        Err(e) => {
            let msg = match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            };
            return (Response::error(ErrorCode::BadRequest, msg), Next::Continue);
        }
    };
    match req {
        Request::Ping => (ops::ping(init_mode), Next::Continue),
        Request::Hash { path } => (ops::hash(&path), Next::Continue),
        Request::Exec(e) => (ops::exec(&e), Next::Continue),
        Request::Notice(n) => (notice::handle(cfg, &n), Next::Continue),
        Request::Shutdown => (Response::ShutdownAck, Next::Shutdown),
    }
}

fn send(ch: &mut File, id: u32, resp: &Response) -> std::io::Result<()> {
    let bytes = resp.to_frame(id).or_else(|e| {
        Response::error(ErrorCode::Internal, format!("reply not encodable: {e}")).to_frame(id)
    });
    match bytes {
        Ok(b) => ch.write_all(&b),
        Err(e) => {
            log(&format!("cannot encode an error reply: {e}"));
            Ok(())
        }
    }
}

/// Serves the channel until a Shutdown request; returns then (the caller powers off).
pub fn serve(cfg: &Config, init_mode: bool) -> std::io::Result<()> {
    let mut ch = open_channel(&cfg.device)?;
    log(&format!("ready on {}", cfg.device));
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_rx = Instant::now();
    loop {
        sys::reap_children(None);
        if sys::poll_readable(ch.as_raw_fd(), 250) {
            match ch.read(&mut buf) {
                Ok(0) => std::thread::sleep(Duration::from_millis(50)),
                Ok(n) => {
                    decoder.push(buf.get(..n).unwrap_or_default());
                    last_rx = Instant::now();
                }
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
                Err(e) => return Err(e),
            }
        } else if decoder.pending() > 0 && last_rx.elapsed() >= STALL {
            // A frame that stopped arriving must not swallow the requests sent after it.
            if let Some(e) = decoder.stall() {
                send(&mut ch, 0, &frame_error(&e))?;
            }
        }
        while let Some(next) = decoder.next_frame() {
            let (id, resp, then) = match next {
                Ok(frame) => {
                    let (resp, then) = answer(cfg, init_mode, &frame);
                    (frame.id, resp, then)
                }
                Err(e) => (e.id(), frame_error(&e), Next::Continue),
            };
            send(&mut ch, id, &resp)?;
            if let Next::Shutdown = then {
                sys::drain(&ch);
                return Ok(());
            }
        }
    }
}
