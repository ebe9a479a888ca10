//! Prometheus metrics of one daemon (`imagefs mount ... --metrics ADDR`): the registry, the
//! one-line hooks the FUSE adapter, substitution and the agent client call, and a small HTTP
//! server of `GET /metrics` (text exposition format 0.0.4) on a loopback TCP address or a Unix
//! socket. README.md "Metrics" documents each metric.
//! Invariants: without --metrics every hook returns at its first load (nothing is counted); the
//! read path takes no lock: each session thread keeps the counters of the handles it served
//! (by fh, never reused), so a read is a thread-local lookup and a few atomic adds; the remote
//! tier's counters are read from the store at scrape time, not kept twice; one thread serves
//! scrapes, one connection at a time, each within SCRAPE_DEADLINE, so a slow client holds
//! nothing but that thread, and only for that long.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use imagefs_store::Store;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::mount::model::{Handle, Node};

/// How long one scrape may take, from accept to the last byte of the answer.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read (a scrape's is a few hundred bytes).
const MAX_REQUEST: usize = 8 << 10;
/// Handles a session thread remembers before it forgets them all (fhs are never reused, so
/// released ones would otherwise pile up).
const CACHED_HANDLES: usize = 256;

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

/// Read latency buckets, seconds: 20 us (a cached block) to ~10 s (a remote's deadline).
fn read_buckets() -> Vec<f64> {
    vec![
        20e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
        250e-3, 500e-3, 1.0, 2.5, 10.0,
    ]
}

/// Step and round-trip buckets, seconds: 100 us to 30 s.
fn step_buckets() -> Vec<f64> {
    vec![
        100e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
        5.0, 15.0, 30.0,
    ]
}

/// A file of the mount, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `instances/ID.raw`.
    Instance,
    /// `versions/ID.raw` or `images/NAME/TAG.raw`.
    Version,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Instance => "instance",
            Kind::Version => "version",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `kind` and `file` labels of an open file: the instance's name; a version as the mount
/// shows it (NAME:TAG through images/, its id through versions/).
pub fn file_label(node: Option<Node>, h: &Handle) -> (Kind, String) {
    match (node, h) {
        (Some(Node::Tagged(name, tag, _)), _) => (Kind::Version, format!("{name}:{tag}")),
        (Some(Node::Instance(id)), _) => (Kind::Instance, id.to_string()),
        (_, Handle::Instance(i)) => (Kind::Instance, i.id().to_string()),
        (_, Handle::Version(v)) => (Kind::Version, v.id().to_hex()),
    }
}

/// The daemon's metrics.
struct Metrics {
    registry: Registry,
    reads: IntCounterVec,
    read_bytes: IntCounterVec,
    writes: IntCounterVec,
    written_bytes: IntCounterVec,
    /// Per kind.
    read_errors: [IntCounter; 2],
    read_seconds: [Histogram; 2],
    /// Opens served by the daemon, opens passed through to a flat copy.
    opens: [IntCounter; 2],
    integrity_errors: IntCounter,
    substitutions: IntCounter,
    substitution_conflicts: IntCounter,
    substitution_steps: HistogramVec,
    agent_round_trips: HistogramVec,
    agent_failures: IntCounterVec,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The metrics, once the daemon serves them.
fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    fn new(store: Option<Arc<Store>>) -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let file = &["kind", "file"];
        let read_errors = counter_vec(
            &r,
            "imagefs_read_errors_total",
            "Reads of mount files answered with an error.",
            &["kind"],
        )?;
        let read_seconds = histogram_vec(
            &r,
            "imagefs_read_duration_seconds",
            "Time the daemon took to answer a read of a mount file.",
            &["kind"],
            read_buckets(),
        )?;
        let opens = counter_vec(
            &r,
            "imagefs_opens_total",
            "Opens of mount files: mode cached (read through the daemon, counted here) or \
             passthrough (the kernel reads a flat copy; the daemon sees no reads).",
            &["mode"],
        )?;
        let per_kind_err = |k: Kind| read_errors.with_label_values(&[k.label()]);
        let per_kind_hist = |k: Kind| read_seconds.with_label_values(&[k.label()]);
        let m = Metrics {
            reads: counter_vec(
                &r,
                "imagefs_reads_total",
                "Reads the daemon answered, per file.",
                file,
            )?,
            read_bytes: counter_vec(
                &r,
                "imagefs_read_bytes_total",
                "Bytes the daemon returned to reads, per file.",
                file,
            )?,
            writes: counter_vec(
                &r,
                "imagefs_writes_total",
                "Writes the daemon answered, per file.",
                file,
            )?,
            written_bytes: counter_vec(
                &r,
                "imagefs_written_bytes_total",
                "Bytes written, per file.",
                file,
            )?,
            read_errors: [per_kind_err(Kind::Instance), per_kind_err(Kind::Version)],
            read_seconds: [per_kind_hist(Kind::Instance), per_kind_hist(Kind::Version)],
            opens: [
                opens.with_label_values(&["cached"]),
                opens.with_label_values(&["passthrough"]),
            ],
            integrity_errors: counter(
                &r,
                "imagefs_integrity_errors_total",
                "Local data that failed its hash when the mount read it (answered EIO).",
            )?,
            substitutions: counter(
                &r,
                "imagefs_substitutions_total",
                "Substitutions done by this daemon (dry runs not counted).",
            )?,
            substitution_conflicts: counter(
                &r,
                "imagefs_substitution_conflicts_total",
                "Substitutions refused for conflicting guest writes.",
            )?,
            substitution_steps: histogram_vec(
                &r,
                "imagefs_substitution_step_seconds",
                "Time of each step of a substitution.",
                &["step"],
                step_buckets(),
            )?,
            agent_round_trips: histogram_vec(
                &r,
                "imagefs_agent_round_trip_seconds",
                "Round trips to guest agents that were answered, per operation.",
                &["op"],
                step_buckets(),
            )?,
            agent_failures: counter_vec(
                &r,
                "imagefs_agent_failures_total",
                "Agent calls that got no answer (timeout, error), per operation.",
                &["op"],
            )?,
            registry: r,
        };
        if let Some(store) = store {
            m.registry
                .register(Box::new(RemoteCollector::new(store)?))?;
        }
        Ok(m)
    }

    fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

/// The remote tier's fetch counters (`imagefs remote stats`), read from the store at scrape
/// time: they are kept (and persisted) there already.
struct RemoteCollector {
    store: Arc<Store>,
    descs: Vec<Desc>,
}

/// (name, help) of each remote counter, in `collect`'s order.
const REMOTE: [(&str, &str); 5] = [
    (
        "imagefs_remote_requests_total",
        "Ranged reads of remote packs that arrived (lazy reads, substitutions, pulls).",
    ),
    (
        "imagefs_remote_fetched_bytes_total",
        "Bytes of blocks fetched from the remote.",
    ),
    (
        "imagefs_remote_fetched_blocks_total",
        "Blocks fetched from the remote, verified and stored.",
    ),
    (
        "imagefs_cache_hits_total",
        "Blocks a read of a lazy version wanted that were already local (no fetch).",
    ),
    (
        "imagefs_remote_integrity_errors_total",
        "Blocks or maps from the remote that failed their hash (nothing of them stored).",
    ),
];

impl RemoteCollector {
    fn new(store: Arc<Store>) -> prometheus::Result<RemoteCollector> {
        let descs = REMOTE
            .iter()
            .map(|(n, h)| {
                Desc::new(
                    n.to_string(),
                    h.to_string(),
                    vec!["remote".into()],
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<Desc>>>()?;
        Ok(RemoteCollector { store, descs })
    }
}

impl Collector for RemoteCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = self.store.remote_stats();
        let mut out = Vec::new();
        for (i, (name, help)) in REMOTE.iter().enumerate() {
            let Ok(vec) = IntCounterVec::new(Opts::new(*name, *help), &["remote"]) else {
                continue;
            };
            for (remote, c) in &stats.remotes {
                let t = &c.total;
                let v = [
                    t.requests,
                    t.bytes_fetched,
                    t.blocks_fetched,
                    t.cache_hits,
                    t.integrity_errors,
                ][i];
                vec.with_label_values(&[remote.as_str()]).inc_by(v);
            }
            out.extend(vec.collect());
        }
        out
    }
}

/// One open file's counters, as a session thread keeps them.
struct FileCounters {
    kind: Kind,
    reads: IntCounter,
    read_bytes: IntCounter,
    writes: IntCounter,
    written_bytes: IntCounter,
}

thread_local! {
    /// fh -> counters of that open file, per session thread (no lock on the read path).
    static FILES: RefCell<HashMap<u64, FileCounters>> = RefCell::new(HashMap::new());
}

/// Runs `f` on the counters of open file `fh`, made from `label` on this thread's first use.
fn with_file(
    m: &Metrics,
    fh: u64,
    label: impl FnOnce() -> (Kind, String),
    f: impl FnOnce(&FileCounters),
) {
    FILES.with_borrow_mut(|files| {
        if !files.contains_key(&fh) {
            if files.len() >= CACHED_HANDLES {
                files.clear();
            }
            let (kind, file) = label();
            let l = [kind.label(), file.as_str()];
            files.insert(
                fh,
                FileCounters {
                    kind,
                    reads: m.reads.with_label_values(&l),
                    read_bytes: m.read_bytes.with_label_values(&l),
                    writes: m.writes.with_label_values(&l),
                    written_bytes: m.written_bytes.with_label_values(&l),
                },
            );
        }
        if let Some(c) = files.get(&fh) {
            f(c);
        }
    });
}

/// When a read or write starts: `None` (and nothing measured) without --metrics.
pub fn start() -> Option<Instant> {
    get().map(|_| Instant::now())
}

/// A read of open file `fh` answered with `bytes` (None: an error), started at `t`.
pub fn read(
    t: Option<Instant>,
    fh: u64,
    label: impl FnOnce() -> (Kind, String),
    bytes: Option<usize>,
) {
    let (Some(m), Some(t)) = (get(), t) else {
        return;
    };
    let d = t.elapsed();
    with_file(m, fh, label, |c| {
        m.read_seconds[c.kind.index()].observe(d.as_secs_f64());
        match bytes {
            Some(n) => {
                c.reads.inc();
                c.read_bytes.inc_by(n as u64);
            }
            None => m.read_errors[c.kind.index()].inc(),
        }
    });
}

/// A write of open file `fh` of `bytes` (None: an error; not counted).
pub fn write(fh: u64, label: impl FnOnce() -> (Kind, String), bytes: Option<usize>) {
    let (Some(m), Some(n)) = (get(), bytes) else {
        return;
    };
    with_file(m, fh, label, |c| {
        c.writes.inc();
        c.written_bytes.inc_by(n as u64);
    });
}

/// A mount file opened, served by the daemon or passed through to a flat copy.
pub fn opened(passthrough: bool) {
    if let Some(m) = get() {
        m.opens[usize::from(passthrough)].inc();
    }
}

/// Local data failed its hash on a read of the mount.
pub fn integrity_error() {
    if let Some(m) = get() {
        m.integrity_errors.inc();
    }
}

/// A substitution done, with its steps' times in microseconds (step name, us).
pub fn substitution(steps: &[(&str, u64)]) {
    let Some(m) = get() else { return };
    m.substitutions.inc();
    for (step, us) in steps {
        m.substitution_steps
            .with_label_values(&[*step])
            .observe(*us as f64 / 1e6);
    }
}

/// A substitution refused for conflicts.
pub fn substitution_conflict() {
    if let Some(m) = get() {
        m.substitution_conflicts.inc();
    }
}

/// An answered round trip to a guest agent (`op`: notice, ping, exec, ...) that took `d`.
pub fn agent_round_trip(op: &str, d: Duration) {
    if let Some(m) = get() {
        m.agent_round_trips
            .with_label_values(&[op])
            .observe(d.as_secs_f64());
    }
}

/// An agent call of `op` that got no answer.
pub fn agent_failure(op: &str) {
    if let Some(m) = get() {
        m.agent_failures.with_label_values(&[op]).inc();
    }
}

/// Turns the metrics on and serves scrapes on `listener` from one thread.
pub fn serve(listener: Listener, store: Arc<Store>) -> Result<(), MetricsError> {
    let m = Metrics::new(Some(store))?;
    // One daemon per process: a second call keeps the first registry.
    let _ = METRICS.set(m);
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
        Route::Metrics { head } => match get().map(Metrics::render) {
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

    #[test]
    fn the_registry_renders_every_metric_family_in_text_format() {
        let m = Metrics::new(None).unwrap();
        m.reads.with_label_values(&["instance", "vm1"]).inc_by(3);
        m.read_seconds[Kind::Version.index()].observe(0.001);
        m.substitution_steps
            .with_label_values(&["total"])
            .observe(0.5);
        let text = String::from_utf8(m.render().unwrap()).unwrap();
        assert!(
            text.contains("imagefs_reads_total{file=\"vm1\",kind=\"instance\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("imagefs_read_duration_seconds_count{kind=\"version\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("imagefs_substitution_step_seconds_count{step=\"total\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE imagefs_integrity_errors_total counter"),
            "{text}"
        );
    }
}
