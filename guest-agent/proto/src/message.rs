//! The messages carried in frames: a kind byte in the header picks the type, the payload is its
//! JSON body. Invariant: every decoded message has passed `validate` (bounded counts and lengths,
//! absolute NUL-free paths, ranges whose end does not overflow), on whichever side decodes it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{self, Frame, FrameError};

/// Kind bytes. Requests have the high bit clear, responses set.
pub mod kind {
    pub const PING: u8 = 0x01;
    pub const HASH: u8 = 0x02;
    pub const EXEC: u8 = 0x03;
    pub const NOTICE: u8 = 0x04;
    pub const SHUTDOWN: u8 = 0x05;
    pub const PONG: u8 = 0x81;
    pub const HASH_REPLY: u8 = 0x82;
    pub const EXEC_REPLY: u8 = 0x83;
    pub const NOTICE_ACK: u8 = 0x84;
    pub const SHUTDOWN_ACK: u8 = 0x85;
    pub const ERROR: u8 = 0xff;
}

/// Cap on exec stdout and stderr, each (the rest is dropped and flagged).
pub const MAX_OUTPUT: usize = 32 * 1024;
/// Cap on the files named in a notice: past it the guest drops its whole page cache.
pub const MAX_NOTICE_FILES: usize = 256;
/// Cap on the merged ranges of a notice.
pub const MAX_NOTICE_RANGES: usize = 4096;
/// Longest path accepted in any message.
pub const MAX_PATH: usize = 4096;
/// Longest exec timeout the agent accepts.
pub const MAX_EXEC_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Most argv entries in an exec request.
pub const MAX_ARGV: usize = 256;

#[derive(Debug, Error)]
pub enum MessageError {
    /// a kind byte no message has
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// a payload that is not valid JSON for its type
    #[error("bad payload for message type {kind:#04x}")]
    Payload {
        kind: u8,
        #[source]
        source: serde_json::Error,
    },
    /// a message whose fields break a limit or rule
    #[error("invalid message: {0}")]
    Invalid(String),
    /// a message too large for one frame
    #[error("message does not fit a frame")]
    Frame(#[from] FrameError),
}

/// A byte range of the block device that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// Sorts and merges ranges that overlap or touch: what a compact notice carries.
pub fn merge_ranges(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.retain(|r| r.len > 0);
    ranges.sort_by_key(|r| r.offset);
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.offset <= last.offset.saturating_add(last.len) => {
                let end = last
                    .offset
                    .saturating_add(last.len)
                    .max(r.offset.saturating_add(r.len));
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

/// What to run: an argv, or a shell command line (`/bin/sh -c`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Argv(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Command,
    pub timeout_ms: u64,
}

/// The host tells the guest that blocks of `device` changed under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubstitutionNotice {
    /// The guest's block device, e.g. /dev/vda.
    pub device: String,
    pub ranges: Vec<Range>,
    /// Guest paths of the changed files, where known (capped).
    pub files: Vec<String>,
    /// True when more files changed than `files` lists (the guest drops its whole cache).
    pub files_truncated: bool,
    /// True when inodes or directories changed (the guest drops dentries and inodes too).
    pub metadata_changed: bool,
}

impl SubstitutionNotice {
    /// A compact notice: ranges merged, the file list capped and flagged when cut.
    pub fn new(device: &str, ranges: Vec<Range>, mut files: Vec<String>, metadata: bool) -> Self {
        let files_truncated = files.len() > MAX_NOTICE_FILES;
        files.truncate(MAX_NOTICE_FILES);
        Self {
            device: device.to_string(),
            ranges: merge_ranges(ranges),
            files,
            files_truncated,
            metadata_changed: metadata,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Ping,
    Hash { path: String },
    Exec(ExecRequest),
    Notice(SubstitutionNotice),
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub device: String,
    pub mountpoint: String,
    pub fstype: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// Agent version (crate version) and protocol version.
    pub agent_version: String,
    pub protocol: u8,
    /// Kernel release (uname -r).
    pub kernel: String,
    pub uptime_ms: u64,
    /// True when the agent runs as /init.
    pub init_mode: bool,
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashReply {
    pub path: String,
    pub size: u64,
    /// blake3 of the file's bytes as the guest reads them, 64 lowercase hex digits.
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReply {
    /// Exit code, None when killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The output when it is UTF-8; otherwise empty, and the bytes come in `stdout_hex` /
    /// `stderr_hex` (hex keeps the frame under its cap: lossy text plus hex would not).
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_hex: Option<String>,
}

impl ExecReply {
    /// A stream's fields: its text when it is UTF-8, else its hex.
    pub fn encode_output(bytes: &[u8]) -> (String, Option<String>) {
        match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_string(), None),
            Err(_) => (String::new(), Some(hex(bytes))),
        }
    }

    /// Stdout's exact bytes (call `validate` on the reply first: bad hex falls back to the text).
    pub fn stdout_bytes(&self) -> Vec<u8> {
        exact(&self.stdout, self.stdout_hex.as_deref())
    }

    /// Stderr's exact bytes, as `stdout_bytes`.
    pub fn stderr_bytes(&self) -> Vec<u8> {
        exact(&self.stderr, self.stderr_hex.as_deref())
    }
}

fn exact(text: &str, hex: Option<&str>) -> Vec<u8> {
    hex.and_then(unhex)
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// One step the agent took for a notice, and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub micros: u64,
    pub detail: String,
}

/// A guest process that holds a changed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessHit {
    pub pid: u32,
    pub comm: String,
    pub file: String,
    /// How: "exe", "maps" or "fd".
    pub how: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    pub path: String,
    pub command: String,
    pub exit_code: Option<i32>,
    pub micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeAck {
    pub steps: Vec<Step>,
    pub processes: Vec<ProcessHit>,
    pub hooks: Vec<HookRun>,
    /// Changed files with pages still cached after the drop: mapped by running processes, which
    /// keep seeing (and serving reads of) the old bytes until they are restarted.
    #[serde(default)]
    pub stale_files: Vec<String>,
    pub total_micros: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bytes were not a frame (garbage, checksum, truncated).
    Malformed,
    Oversized,
    UnknownType,
    /// A well-formed frame whose body is not a valid request.
    BadRequest,
    /// The agent will not do it (e.g. a notice for a filesystem mounted read-write).
    Refused,
    NotFound,
    Io,
    Internal,
    /// A code from a newer agent.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Pong(Pong),
    Hash(HashReply),
    Exec(ExecReply),
    NoticeAck(NoticeAck),
    ShutdownAck,
    Error(ErrorReply),
}

fn body<T: serde::de::DeserializeOwned>(kind: u8, payload: &[u8]) -> Result<T, MessageError> {
    serde_json::from_slice(payload).map_err(|source| MessageError::Payload { kind, source })
}

fn json<T: Serialize>(kind: u8, v: &T) -> Result<Vec<u8>, MessageError> {
    serde_json::to_vec(v).map_err(|source| MessageError::Payload { kind, source })
}

fn check_path(p: &str) -> Result<(), MessageError> {
    if !p.starts_with('/') || p.len() > MAX_PATH || p.contains('\0') {
        return Err(MessageError::Invalid(format!(
            "path must be absolute, NUL-free, at most {MAX_PATH} bytes"
        )));
    }
    Ok(())
}

fn ensure(ok: bool, what: &str) -> Result<(), MessageError> {
    if ok {
        Ok(())
    } else {
        Err(MessageError::Invalid(what.to_string()))
    }
}

impl Request {
    pub fn kind(&self) -> u8 {
        match self {
            Request::Ping => kind::PING,
            Request::Hash { .. } => kind::HASH,
            Request::Exec(_) => kind::EXEC,
            Request::Notice(_) => kind::NOTICE,
            Request::Shutdown => kind::SHUTDOWN,
        }
    }

    /// The kind of response that answers this request (besides an error).
    pub fn reply_kind(&self) -> u8 {
        self.kind() | 0x80
    }

    /// Checks limits a well-formed request must keep.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            Request::Ping | Request::Shutdown => Ok(()),
            Request::Hash { path } => check_path(path),
            Request::Exec(e) => {
                ensure(e.timeout_ms <= MAX_EXEC_TIMEOUT_MS, "exec timeout too long")?;
                match &e.command {
                    Command::Argv(argv) => {
                        ensure(!argv.is_empty() && argv.len() <= MAX_ARGV, "argv size")?;
                        ensure(!argv.iter().any(|a| a.contains('\0')), "NUL in argv")
                    }
                    Command::Shell(cmd) => ensure(!cmd.contains('\0'), "NUL in command"),
                }
            }
            Request::Notice(n) => {
                check_path(&n.device)?;
                ensure(n.ranges.len() <= MAX_NOTICE_RANGES, "too many ranges")?;
                ensure(n.files.len() <= MAX_NOTICE_FILES, "too many files")?;
                ensure(
                    n.ranges
                        .iter()
                        .all(|r| r.offset.checked_add(r.len).is_some()),
                    "range end overflows",
                )?;
                n.files.iter().try_for_each(|f| check_path(f))
            }
        }
    }

    /// Encodes as one frame with request id `id`.
    pub fn to_frame(&self, id: u32) -> Result<Vec<u8>, MessageError> {
        let k = self.kind();
        let payload = match self {
            Request::Ping | Request::Shutdown => b"{}".to_vec(),
            Request::Hash { path } => json(k, &serde_json::json!({ "path": path }))?,
            Request::Exec(e) => json(k, e)?,
            Request::Notice(n) => json(k, n)?,
        };
        Ok(frame::encode(k, id, &payload)?)
    }

    /// Decodes and validates a request frame.
    pub fn from_frame(f: &Frame) -> Result<Self, MessageError> {
        #[derive(Deserialize)]
        struct HashBody {
            path: String,
        }
        let req = match f.kind {
            kind::PING => Request::Ping,
            kind::SHUTDOWN => Request::Shutdown,
            kind::HASH => Request::Hash {
                path: body::<HashBody>(f.kind, &f.payload)?.path,
            },
            kind::EXEC => Request::Exec(body(f.kind, &f.payload)?),
            kind::NOTICE => Request::Notice(body(f.kind, &f.payload)?),
            other => return Err(MessageError::UnknownType(other)),
        };
        req.validate()?;
        Ok(req)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Response {
    pub fn kind(&self) -> u8 {
        match self {
            Response::Pong(_) => kind::PONG,
            Response::Hash(_) => kind::HASH_REPLY,
            Response::Exec(_) => kind::EXEC_REPLY,
            Response::NoticeAck(_) => kind::NOTICE_ACK,
            Response::ShutdownAck => kind::SHUTDOWN_ACK,
            Response::Error(_) => kind::ERROR,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }

    /// Checks what the host must not trust blindly in a guest's reply.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            Response::Hash(h) => ensure(is_hex64(&h.blake3), "hash is not 64 hex digits"),
            Response::Exec(e) => {
                ensure(
                    e.stdout.len() <= MAX_OUTPUT * 4 && e.stderr.len() <= MAX_OUTPUT * 4,
                    "exec output over the cap",
                )?;
                for h in [&e.stdout_hex, &e.stderr_hex].into_iter().flatten() {
                    ensure(h.len() <= MAX_OUTPUT * 2, "exec output over the cap")?;
                    ensure(unhex(h).is_some(), "exec output hex is not lowercase hex")?;
                }
                Ok(())
            }
            Response::NoticeAck(a) => ensure(
                a.processes.len() <= 4096
                    && a.hooks.len() <= 4096
                    && a.steps.len() <= 64
                    && a.stale_files.len() <= MAX_NOTICE_FILES,
                "notice ack lists too much",
            ),
            Response::Pong(p) => ensure(p.mounts.len() <= 1024, "too many mounts"),
            Response::ShutdownAck | Response::Error(_) => Ok(()),
        }
    }

    pub fn to_frame(&self, id: u32) -> Result<Vec<u8>, MessageError> {
        let k = self.kind();
        let payload = match self {
            Response::Pong(p) => json(k, p)?,
            Response::Hash(h) => json(k, h)?,
            Response::Exec(e) => json(k, e)?,
            Response::NoticeAck(a) => json(k, a)?,
            Response::ShutdownAck => b"{}".to_vec(),
            Response::Error(e) => json(k, e)?,
        };
        Ok(frame::encode(k, id, &payload)?)
    }

    pub fn from_frame(f: &Frame) -> Result<Self, MessageError> {
        let r = match f.kind {
            kind::PONG => Response::Pong(body(f.kind, &f.payload)?),
            kind::HASH_REPLY => Response::Hash(body(f.kind, &f.payload)?),
            kind::EXEC_REPLY => Response::Exec(body(f.kind, &f.payload)?),
            kind::NOTICE_ACK => Response::NoticeAck(body(f.kind, &f.payload)?),
            kind::SHUTDOWN_ACK => Response::ShutdownAck,
            kind::ERROR => Response::Error(body(f.kind, &f.payload)?),
            other => return Err(MessageError::UnknownType(other)),
        };
        r.validate()?;
        Ok(r)
    }
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
