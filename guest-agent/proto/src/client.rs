//! Host side of the agent channel: one Unix-socket connection per call, a deadline on every call,
//! and every reply from the guest parsed and validated before use.
//! Invariant: a call returns only the reply carrying its own request id, or an error; frames from
//! earlier calls, echoes and unsolicited errors are skipped, never mistaken for the answer.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::frame::{Decoder, Frame};
use crate::message::{
    kind, ErrorCode, ExecReply, ExecRequest, HashReply, MessageError, NoticeAck, Pong, Request,
    Response, SubstitutionNotice,
};

/// Connects without blocking: a listener whose queue is full (a wedged VM) answers "would
/// block" at once instead of holding the caller past its deadline.
fn connect_now(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes for the duration of the call.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[derive(Debug, Error)]
pub enum ClientError {
    /// the agent socket could not be connected before the deadline
    #[error("cannot connect to agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// no reply before the deadline
    #[error("agent did not answer {op} within {waited:?}")]
    Timeout { op: &'static str, waited: Duration },
    /// the socket failed mid-call
    #[error("agent socket I/O failed")]
    Io(#[from] std::io::Error),
    /// the request could not be encoded (too large or invalid)
    #[error("request rejected before sending")]
    Request(#[source] MessageError),
    /// the guest sent a reply that failed validation
    #[error("invalid reply from the agent")]
    InvalidReply(#[source] MessageError),
    /// the agent answered with an error
    #[error("agent could not {op}: {code:?}: {message}")]
    Agent {
        op: &'static str,
        code: ErrorCode,
        message: String,
    },
    /// the agent answered with a reply of the wrong type
    #[error("agent answered {op} with message type {kind:#04x}")]
    UnexpectedReply { op: &'static str, kind: u8 },
}

/// How a received frame relates to the call waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMatch {
    /// The reply to this call.
    Mine,
    /// An error the agent sent about bytes it could not attribute (id 0).
    Unsolicited,
    /// A request frame (an echo from a tty not yet in raw mode).
    Echo,
    /// A reply to an earlier call (lower id): out of order, skipped.
    Stale,
    /// An id this client never sent.
    UnknownId,
}

/// Classifies a frame against the id the call is waiting for. Pure.
pub fn match_reply(expected: u32, frame: &Frame) -> ReplyMatch {
    if frame.kind & 0x80 == 0 {
        ReplyMatch::Echo
    } else if frame.id == expected {
        ReplyMatch::Mine
    } else if frame.id == 0 {
        ReplyMatch::Unsolicited
    } else if frame.id < expected {
        ReplyMatch::Stale
    } else {
        ReplyMatch::UnknownId
    }
}

/// What rollouts and the CLI need from an agent; `AgentClient` is the real one.
pub trait AgentLink: Send + Sync {
    fn ping(&self) -> Result<Pong, ClientError>;
    fn hash(&self, path: &str) -> Result<HashReply, ClientError>;
    fn exec(&self, req: ExecRequest) -> Result<ExecReply, ClientError>;
    fn notice(&self, notice: &SubstitutionNotice) -> Result<NoticeAck, ClientError>;
}

/// A client for one VM's agent socket.
#[derive(Debug)]
pub struct AgentClient {
    path: PathBuf,
    timeout: Duration,
    next_id: AtomicU32,
}

impl AgentClient {
    /// A client with a 5 s default deadline per call (connect, write and read together).
    pub fn new(path: impl AsRef<Path>) -> Self {
        // Start ids far from other clients' so replies left over from them read as unknown.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        let start = (seed ^ (std::process::id() << 12)) & 0x3fff_ffff;
        Self {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(5),
            next_id: AtomicU32::new(start.max(1)),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.path
    }

    fn connect(&self, deadline: Instant) -> Result<UnixStream, ClientError> {
        loop {
            match connect_now(&self.path) {
                Ok(s) => return Ok(s),
                // The VM may not have created its socket yet, or another client holds the port.
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            ErrorKind::NotFound
                                | ErrorKind::ConnectionRefused
                                | ErrorKind::WouldBlock
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Sends one request and waits up to `timeout` for its reply: one deadline for connecting,
    /// writing and reading.
    pub fn call(&self, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
        let op = op_name(req);
        let start = Instant::now();
        let deadline = start + timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let bytes = req.to_frame(id).map_err(ClientError::Request)?;
        let mut stream = self.connect(deadline)?;
        let left = deadline.saturating_duration_since(Instant::now());
        stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
        stream.write_all(&bytes).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout {
                op,
                waited: start.elapsed(),
            },
            _ => e.into(),
        })?;
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(next) = decoder.next_frame() {
                let Ok(frame) = next else { continue };
                if match_reply(id, &frame) != ReplyMatch::Mine {
                    continue;
                }
                let resp = Response::from_frame(&frame).map_err(ClientError::InvalidReply)?;
                return match resp {
                    Response::Error(e) => Err(ClientError::Agent {
                        op,
                        code: e.code,
                        message: e.message,
                    }),
                    r if r.kind() == req.reply_kind() => Ok(r),
                    r => Err(ClientError::UnexpectedReply { op, kind: r.kind() }),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    op,
                    waited: start.elapsed(),
                });
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf) {
                Ok(0) => {
                    return Err(ClientError::Io(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "agent socket closed before the reply",
                    )))
                }
                Ok(n) => decoder.push(buf.get(..n).unwrap_or_default()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Shuts the guest down (ack, then poweroff).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call(&Request::Shutdown, self.timeout).map(|_| ())
    }
}

fn op_name(req: &Request) -> &'static str {
    match req.kind() {
        kind::PING => "ping",
        kind::HASH => "hash",
        kind::EXEC => "exec",
        kind::NOTICE => "notice",
        _ => "shutdown",
    }
}

fn unexpected(op: &'static str, r: &Response) -> ClientError {
    ClientError::UnexpectedReply { op, kind: r.kind() }
}

impl AgentLink for AgentClient {
    fn ping(&self) -> Result<Pong, ClientError> {
        match self.call(&Request::Ping, self.timeout)? {
            Response::Pong(p) => Ok(p),
            r => Err(unexpected("ping", &r)),
        }
    }

    fn hash(&self, path: &str) -> Result<HashReply, ClientError> {
        let req = Request::Hash {
            path: path.to_string(),
        };
        match self.call(&req, self.timeout)? {
            Response::Hash(h) => Ok(h),
            r => Err(unexpected("hash", &r)),
        }
    }

    /// The deadline is the command's own timeout plus the client's.
    fn exec(&self, req: ExecRequest) -> Result<ExecReply, ClientError> {
        let timeout = self.timeout + Duration::from_millis(req.timeout_ms);
        match self.call(&Request::Exec(req), timeout)? {
            Response::Exec(e) => Ok(e),
            r => Err(unexpected("exec", &r)),
        }
    }

    fn notice(&self, notice: &SubstitutionNotice) -> Result<NoticeAck, ClientError> {
        match self.call(&Request::Notice(notice.clone()), self.timeout)? {
            Response::NoticeAck(a) => Ok(a),
            r => Err(unexpected("notice", &r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::HashReply;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_listener_that_never_accepts_costs_a_call_its_deadline_not_forever() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("wedged.sock");
        let _listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        // Fill its queue, as callers of a wedged vmm bridge do.
        let mut queued = Vec::new();
        while let Ok(s) = connect_now(&path) {
            queued.push(s);
            assert!(queued.len() < 10_000, "the queue never fills");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let r = AgentClient::new(&p)
                .with_timeout(Duration::from_millis(300))
                .ping();
            let _ = tx.send(r.is_err());
        });
        // A blocking connect would never come back: fail, do not hang.
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(failed) => assert!(failed, "a ping of a wedged socket succeeded"),
            Err(_) => panic!("the call outlived its 300 ms deadline by seconds"),
        }
    }

    fn reply_frame(kind: u8, id: u32) -> Frame {
        Frame {
            kind,
            id,
            payload: vec![],
        }
    }

    #[test]
    fn reply_matching_is_typed() {
        assert_eq!(
            match_reply(10, &reply_frame(kind::PONG, 10)),
            ReplyMatch::Mine
        );
        assert_eq!(
            match_reply(10, &reply_frame(kind::PONG, 9)),
            ReplyMatch::Stale
        );
        assert_eq!(
            match_reply(10, &reply_frame(kind::PONG, 11)),
            ReplyMatch::UnknownId
        );
        assert_eq!(
            match_reply(10, &reply_frame(kind::ERROR, 0)),
            ReplyMatch::Unsolicited
        );
        assert_eq!(
            match_reply(10, &reply_frame(kind::PING, 10)),
            ReplyMatch::Echo
        );
    }

    /// A one-shot peer on a real Unix socket: reads one request, writes what `answer` returns.
    fn peer(
        answer: impl FnOnce(Frame) -> Vec<u8> + Send + 'static,
    ) -> (tempfile_dir::Dir, PathBuf) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut d = Decoder::new();
            let mut buf = [0u8; 4096];
            let frame = loop {
                let n = s.read(&mut buf).unwrap();
                d.push(&buf[..n]);
                if let Some(Ok(f)) = d.next_frame() {
                    break f;
                }
            };
            let _ = s.write_all(&answer(frame));
            std::thread::sleep(Duration::from_millis(300));
        });
        (dir, path)
    }

    /// Minimal temp dir (the proto crate has no tempfile dependency).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("agent-proto-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn skips_stale_and_garbage_then_takes_its_own_reply() {
        let (_d, path) = peer(|req| {
            let good = Response::Hash(HashReply {
                path: "/a".into(),
                size: 1,
                blake3: "ab".repeat(32),
            });
            let mut out = b"line noise".to_vec();
            out.extend(Response::ShutdownAck.to_frame(req.id - 1).unwrap());
            out.extend(
                Response::error(ErrorCode::Malformed, "x")
                    .to_frame(0)
                    .unwrap(),
            );
            out.extend(good.to_frame(req.id).unwrap());
            out
        });
        let c = AgentClient::new(&path).with_timeout(Duration::from_secs(5));
        assert_eq!(c.hash("/a").unwrap().size, 1);
    }

    #[test]
    fn untrusted_reply_and_silence_are_errors() {
        let (_d, path) = peer(|req| {
            let bad = Response::Hash(HashReply {
                path: "/a".into(),
                size: 1,
                blake3: "nope".into(),
            });
            bad.to_frame(req.id).unwrap()
        });
        let c = AgentClient::new(&path).with_timeout(Duration::from_secs(5));
        assert!(matches!(c.hash("/a"), Err(ClientError::InvalidReply(_))));

        let (_d2, path2) = peer(|_| Vec::new());
        let c = AgentClient::new(&path2).with_timeout(Duration::from_millis(200));
        assert!(matches!(c.ping(), Err(ClientError::Timeout { .. })));
    }
}
