//! The wire format of a command forwarded to a daemon, shared by both transports: the control
//! socket (daemon/control.rs) and the fleet's TLS listener (daemon/tls.rs, and its client
//! fleet/client.rs). One JSON object per line: the client sends `{"argv": [...]}` (on the fleet
//! transport with `"upload": N` and then N bytes of a file); the daemon answers `{"out": TEXT}` /
//! `{"err": TEXT}` lines, then exactly one `{"exit": CODE}`. Invariant: a request line is bounded
//! (MAX_REQUEST, MAX_ARGS) and parsed before use. Knows no daemon, mount or fleet: both sides
//! import it, neither imports the other for it.

use std::io::{self, BufRead, Read, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Largest request line accepted.
pub const MAX_REQUEST: u64 = 1 << 20;
/// Largest argv accepted.
const MAX_ARGS: usize = 4096;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The command line after the global options, paths already absolute.
    pub argv: Vec<String>,
    /// Bytes of a file that follow the request line (the fleet transport's upload frame: a
    /// bundle for `apply @upload`); 0 on the control socket, which takes none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub upload: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One answer line from the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Text for the client's stdout.
    Out(String),
    /// Text for the client's stderr.
    Err(String),
    /// The command finished with this exit code (last line).
    Exit(i32),
}

/// Parses one request line (untrusted bytes) with limits.
pub fn parse_request(line: &[u8]) -> Option<Request> {
    if line.len() as u64 > MAX_REQUEST {
        return None;
    }
    let req: Request = serde_json::from_slice(line).ok()?;
    if req.argv.len() > MAX_ARGS {
        return None;
    }
    Some(req)
}

/// A `Write` that sends each write as one answer line, on whichever transport the request came
/// (the Unix socket, or the fleet's TLS connection: daemon/tls.rs).
struct AnswerWriter<'a, W: Write> {
    stream: &'a Mutex<W>,
    to_err: bool,
}

impl<W: Write> Write for AnswerWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf).into_owned();
        let a = if self.to_err {
            Answer::Err(text)
        } else {
            Answer::Out(text)
        };
        send(self.stream, &a)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn send<W: Write>(stream: &Mutex<W>, a: &Answer) -> io::Result<()> {
    let mut line = serde_json::to_vec(a).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut w = stream.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(&line)?;
    w.flush()
}

/// Runs one command: argv, stdout, stderr; returns the exit code.
pub type Handler = Arc<dyn Fn(Vec<String>, &mut dyn Write, &mut dyn Write) -> i32 + Send + Sync>;

/// Reads one request line (at most MAX_REQUEST bytes) and parses it; `None` if it is malformed,
/// too long or the peer went away. Bytes after the line stay in `reader` (an upload's).
pub fn read_request(reader: &mut dyn BufRead) -> Option<Request> {
    let mut line = Vec::new();
    reader
        .take(MAX_REQUEST + 1)
        .read_until(b'\n', &mut line)
        .ok()?;
    parse_request(line.strip_suffix(b"\n").unwrap_or(&line))
}

/// Runs `req` with `handler`, streaming its output to `stream` as answer lines and ending with
/// its exit code; a malformed request (`None`) is exit 2 and runs nothing.
pub fn answer<W: Write>(stream: W, handler: &Handler, req: Option<Request>) {
    let stream = Mutex::new(stream);
    match req {
        None => {
            let _ = send(
                &stream,
                &Answer::Err("error: malformed control request\n".into()),
            );
            let _ = send(&stream, &Answer::Exit(2));
        }
        Some(req) => {
            // Line-buffered: one answer per line of output, not one per formatting fragment.
            let mut out = io::LineWriter::new(AnswerWriter {
                stream: &stream,
                to_err: false,
            });
            let mut err = io::LineWriter::new(AnswerWriter {
                stream: &stream,
                to_err: true,
            });
            let code = handler(req.argv, &mut out, &mut err);
            let _ = out.flush();
            let _ = err.flush();
            drop((out, err));
            let _ = send(&stream, &Answer::Exit(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Untrusted request lines: any bytes parse or are refused, never a panic; whatever
        // parses is within the limits and survives a round trip; a valid request with noise
        // appended is refused rather than half-read.
        #[test]
        fn any_request_line_parses_within_limits_or_is_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            argv in proptest::collection::vec("[ -~]{0,40}", 0..20),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16),
        ) {
            if let Some(r) = parse_request(&bytes) {
                proptest::prop_assert!(r.argv.len() <= MAX_ARGS);
            }
            let line = serde_json::to_vec(&Request { argv: argv.clone(), upload: 0 }).unwrap_or_default();
            let parsed = parse_request(&line).map(|r| r.argv);
            proptest::prop_assert_eq!(parsed, Some(argv));
            let mut noisy = line.clone();
            noisy.extend(noise.iter().map(|b| if b.is_ascii_whitespace() { b'x' } else { *b }));
            proptest::prop_assert!(parse_request(&noisy).is_none());
        }
    }

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        let ok = parse_request(br#"{"argv":["ls","--json"]}"#).unwrap();
        assert_eq!(ok.argv, vec!["ls", "--json"]);
        assert!(parse_request(b"not json").is_none());
        assert!(parse_request(br#"{"argv":"ls"}"#).is_none());
        let many = serde_json::to_vec(&Request {
            argv: vec!["x".into(); MAX_ARGS + 1],
            upload: 0,
        })
        .unwrap();
        assert!(parse_request(&many).is_none());
    }
}
