//! The daemon's metrics endpoint (`imagefs mount ... --metrics ADDR`): a small HTTP server of
//! `GET /metrics` (text exposition format 0.0.4) on a loopback TCP address or a Unix socket,
//! answering what the registry (metrics.rs) renders. README.md "Metrics" documents each metric.
//! Invariants: one thread serves scrapes, one connection at a time, each within
//! SCRAPE_DEADLINE, so a slow client holds nothing but that thread, and only for that long.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imagefs_store::Store;

/// How long one scrape may take, from accept to the last byte of the answer.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 << 10;

/// Where `--metrics` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A loopback IP:PORT.
    Tcp(SocketAddr),
    /// A Unix socket path (absolute).
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Parses `--metrics ADDR` (clap's value parser: a refusal is exit 2): a path (it holds a
/// '/') is a Unix socket; anything else must be a loopback IP:PORT, as the metrics name
/// instances and versions and are served without authentication to any local user.
pub fn parse_addr(s: &str) -> Result<Addr, String> {
    if s.contains('/') {
        let p = std::path::absolute(s).map_err(|e| format!("{s}: {e}"))?;
        return Ok(Addr::Unix(p));
    }
    let a: SocketAddr = s.parse().map_err(|_| {
        format!("{s} is neither IP:PORT nor a Unix socket path (a path holds a '/')")
    })?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: metrics are served without authentication, to \
             local users only (use 127.0.0.1:PORT, [::1]:PORT or a Unix socket path)",
            a.ip()
        ));
    }
    Ok(Addr::Tcp(a))
}

/// Errors setting up the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Binding the address (a taken port, a bad directory)
    #[error("--metrics {addr}: {source}")]
    Bind {
        /// The address.
        addr: Addr,
        /// The OS error.
        source: io::Error,
    },
    /// A daemon already serves on the socket path
    #[error("--metrics {0}: another process serves on this socket")]
    InUse(PathBuf),
    /// Something that is not a socket is at the path (never removed)
    #[error("--metrics {0}: exists and is not a socket")]
    NotSocket(PathBuf),
    /// Starting the serving thread
    #[error("--metrics: starting its thread: {0}")]
    Thread(#[source] io::Error),
    /// The registry refused a metric (a bug: names are constants)
    #[error("metrics registry: {0}")]
    Registry(#[from] prometheus::Error),
}

/// A bound endpoint, not yet served.
#[derive(Debug)]
pub enum Listener {
    /// TCP on loopback.
    Tcp(TcpListener),
    /// A Unix socket.
    Unix(UnixListener),
}

impl Listener {
    /// The TCP address bound (for logs; None on a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }
}

/// Binds `addr` before the daemon reports it is up, so a taken port fails `mount`. A Unix
/// socket gets the store's access: owner (and the store's group) may connect, no one else.
pub fn bind(addr: &Addr, store_dir: &Path) -> Result<Listener, MetricsError> {
    let io = |source| MetricsError::Bind {
        addr: addr.clone(),
        source,
    };
    match addr {
        Addr::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp).map_err(io),
        Addr::Unix(p) => {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if !m.file_type().is_socket() {
                    return Err(MetricsError::NotSocket(p.clone()));
                }
                if UnixStream::connect(p).is_ok() {
                    return Err(MetricsError::InUse(p.clone()));
                }
                // Left behind by a daemon that died: nobody listens on it.
                std::fs::remove_file(p).map_err(io)?;
            }
            let access = imagefs_store::access::Access::of(store_dir)
                .map_err(|e| io(io::Error::other(e.to_string())))?;
            let l = UnixListener::bind(p).map_err(io)?;
            // Connecting needs write permission on the socket.
            let mode = match access.group {
                Some(gid) => {
                    std::os::unix::fs::chown(p, None, Some(gid)).map_err(io)?;
                    0o660
                }
                None => 0o600,
            };
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io)?;
            Ok(Listener::Unix(l))
        }
    }
}

/// Turns the metrics on and serves scrapes on `listener` from one thread.
pub fn serve(listener: Listener, store: Arc<Store>) -> Result<(), MetricsError> {
    crate::metrics::enable(store)?;
    let spawn = |f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(f)
            .map(drop)
            .map_err(MetricsError::Thread)
    };
    match listener {
        Listener::Tcp(l) => spawn(Box::new(move || {
            for s in l.incoming().flatten() {
                let deadline = Instant::now() + SCRAPE_DEADLINE;
                let mut conn = Conn::Tcp(s);
                if let Err(e) = answer(&mut conn, deadline) {
                    tracing::debug!(error = %e, "metrics: scrape failed");
                }
            }
        })),
        Listener::Unix(l) => spawn(Box::new(move || {
            for s in l.incoming().flatten() {
                let deadline = Instant::now() + SCRAPE_DEADLINE;
                let mut conn = Conn::Unix(s);
                if let Err(e) = answer(&mut conn, deadline) {
                    tracing::debug!(error = %e, "metrics: scrape failed");
                }
            }
        })),
    }
}

/// A scrape's connection.
enum Conn {
    Tcp(std::net::TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Bounds the next read or write by what is left until `deadline`.
    fn bound(&self, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "scrape deadline"));
        }
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(left))?;
                s.set_write_timeout(Some(left))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(left))?;
                s.set_write_timeout(Some(left))
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// GET (or HEAD) /metrics.
    Metrics { head: bool },
    /// Another path.
    NotFound,
    /// Another method.
    NotAllowed,
    /// Not an HTTP request head, or too large.
    Bad,
}

/// Routes a complete request head, `None` while it is incomplete.
fn route(head: &[u8]) -> Option<Route> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Route::Bad),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            Some(match (req.method, path) {
                (Some("GET"), "/metrics") => Route::Metrics { head: false },
                (Some("HEAD"), "/metrics") => Route::Metrics { head: true },
                (Some("GET" | "HEAD"), _) => Route::NotFound,
                _ => Route::NotAllowed,
            })
        }
    }
}

/// Reads one request head and answers it (then the connection closes).
fn answer(conn: &mut Conn, deadline: Instant) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let route = loop {
        if let Some(r) = route(&buf[..len]) {
            break r;
        }
        if len == buf.len() {
            break Route::Bad;
        }
        conn.bound(deadline)?;
        let n = conn.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    };
    let (status, body, head) = match route {
        Route::Metrics { head } => match crate::metrics::render() {
            Some(Ok(b)) => ("200 OK", b, head),
            Some(Err(e)) => (
                "500 Internal Server Error",
                format!("{e}\n").into_bytes(),
                head,
            ),
            None => (
                "503 Service Unavailable",
                b"metrics are off\n".to_vec(),
                head,
            ),
        },
        Route::NotFound => ("404 Not Found", b"try /metrics\n".to_vec(), false),
        Route::NotAllowed => ("405 Method Not Allowed", b"GET /metrics\n".to_vec(), false),
        Route::Bad => ("400 Bad Request", b"bad request\n".to_vec(), false),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        prometheus::TEXT_FORMAT,
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(&body);
    }
    let mut at = 0;
    while at < out.len() {
        conn.bound(deadline)?;
        match conn.write(&out[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_and_paths_are_taken() {
        assert_eq!(
            parse_addr("127.0.0.1:9464"),
            Ok(Addr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert!(matches!(parse_addr("[::1]:9464"), Ok(Addr::Tcp(_))));
        assert!(matches!(parse_addr("127.0.0.2:1"), Ok(Addr::Tcp(_))));
        for bad in [
            "0.0.0.0:9464",
            "[::]:9464",
            "192.0.2.10:9464",
            "localhost:9464",
            "9464",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad} was taken");
        }
        assert!(matches!(
            parse_addr("/run/imagefs/metrics.sock"),
            Ok(Addr::Unix(_))
        ));
        assert!(matches!(parse_addr("./m.sock"), Ok(Addr::Unix(p)) if p.is_absolute()));
    }

    #[test]
    fn requests_are_routed_once_their_head_is_complete() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Route::Metrics { head: false })
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Route::Metrics { head: true })
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::NotAllowed)
        );
        assert_eq!(route(b"\x16\x03\x01\x02\x00\x01\r\n\r\n"), Some(Route::Bad));
    }
}
