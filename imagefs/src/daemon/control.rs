//! The control socket: a CLI run while a daemon holds the store sends its command here and the
//! daemon runs it on its own store, in the wire format of wire.rs. Invariants: only the
//! daemon's own uid (or root) is served (SO_PEERCRED); the socket is mode 0600; a request line
//! is bounded (wire::MAX_REQUEST) and parsed before use.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::wire::{self, Answer, Handler, Request};

/// Connections being served; the daemon waits for them to answer before it exits (`umount`
/// answers only once the daemon has stopped).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Waits until no connection is being served, or `timeout` passes.
pub fn drain(timeout: std::time::Duration) {
    let start = std::time::Instant::now();
    while ACTIVE.load(Ordering::SeqCst) > 0 && start.elapsed() < timeout {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The control socket of the store in `store_dir`.
pub fn socket_path(store_dir: &Path) -> PathBuf {
    store_dir.join("control.sock")
}

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Socket I/O failed
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another daemon already serves this store
    #[error("a daemon already serves this store (control socket {0})")]
    InUse(PathBuf),
    /// The daemon's answer does not parse
    #[error("control socket: malformed answer from the daemon")]
    BadAnswer,
    /// The daemon closed the connection before giving an exit code
    #[error("control socket: the daemon hung up before finishing the command")]
    HungUp,
}

/// Connects to the daemon of `store_dir`, if one is running.
pub fn connect(store_dir: &Path) -> Option<UnixStream> {
    UnixStream::connect(socket_path(store_dir)).ok()
}

/// Sends `argv` to the daemon, copies its output to ours, and returns its exit code.
pub fn forward(
    stream: UnixStream,
    argv: Vec<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, ControlError> {
    let io_err = |source| ControlError::Io {
        path: PathBuf::from("control.sock"),
        source,
    };
    let mut line =
        serde_json::to_vec(&Request { argv, upload: 0 }).map_err(|_| ControlError::BadAnswer)?;
    line.push(b'\n');
    let mut w = &stream;
    w.write_all(&line).map_err(io_err)?;
    let reader = BufReader::new(&stream);
    for line in reader.lines() {
        let line = line.map_err(io_err)?;
        match serde_json::from_str::<Answer>(&line).map_err(|_| ControlError::BadAnswer)? {
            Answer::Out(s) => {
                out.write_all(s.as_bytes()).map_err(io_err)?;
                out.flush().map_err(io_err)?;
            }
            Answer::Err(s) => {
                err.write_all(s.as_bytes()).map_err(io_err)?;
            }
            Answer::Exit(code) => return Ok(code),
        }
    }
    Err(ControlError::HungUp)
}

/// Binds the control socket of `store_dir` (mode 0600), replacing a stale one.
pub fn bind(store_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = socket_path(store_dir);
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse(path));
        }
        // Left behind by a daemon that died: nobody listens on it.
        std::fs::remove_file(&path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(io_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    peer_cred(stream).map(|c| c.uid)
}

/// The pid of the process at the other end of `stream`.
pub fn peer_pid(stream: &UnixStream) -> io::Result<i32> {
    peer_cred(stream).map(|c| c.pid)
}

fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Serves connections on `listener` until it fails; each connection on its own thread.
pub fn serve(listener: UnixListener, handler: Handler) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        match peer_uid(&stream) {
            Ok(uid) if uid == me || uid == 0 => {}
            other => {
                tracing::warn!(?other, "control socket: refusing a peer of another uid");
                continue;
            }
        }
        let handler = handler.clone();
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                serve_one(stream, handler);
                ACTIVE.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "control socket: cannot start a thread");
        }
    }
}

fn serve_one(stream: UnixStream, handler: Handler) {
    // Uploads are the fleet transport's alone (daemon/tls.rs).
    let req = wire::read_request(&mut BufReader::new(&stream)).filter(|r| r.upload == 0);
    wire::answer(stream, &handler, req);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_command_round_trips_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let handler: Handler = Arc::new(|argv, out, err| {
            let _ = writeln!(out, "got {}", argv.join(" "));
            let _ = writeln!(err, "warn");
            7
        });
        std::thread::spawn(move || serve(listener, handler));
        let stream = connect(dir.path()).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = forward(stream, vec!["a".into(), "b".into()], &mut out, &mut err).unwrap();
        assert_eq!(code, 7);
        assert_eq!(out, b"got a b\n");
        assert_eq!(err, b"warn\n");
        // A second daemon on the same store is refused while the first listens.
        assert!(matches!(bind(dir.path()), Err(ControlError::InUse(_))));
    }
}
