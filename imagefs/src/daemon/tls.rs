//! The fleet transport: the daemon's commands over TCP with mutual TLS (rustls, ring provider),
//! for an operator driving many hosts (`imagefs fleet ...`). Wire format as on the control
//! socket (wire.rs: one JSON request line, answer lines, one exit); the same handler runs
//! the command, told it came over the fleet transport, so only the commands allowed there run.
//! Invariants: a client certificate must chain to the fleet CA (--tls-dir/ca.pem) and carry
//! clientAuth, else the handshake fails and nothing is read from the connection; at most
//! MAX_CONNECTIONS are served at once; a connection must finish its handshake and request
//! within IDLE, and each answer write must go through within IDLE.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::fleet::certs::{self, CertError};
use crate::wire;

/// Connections served at once; more are closed at once (each holds a thread).
pub const MAX_CONNECTIONS: usize = 32;
/// Deadline for the handshake plus the request line, and for each answer write.
pub const IDLE: Duration = Duration::from_secs(60);
/// Largest upload frame (a bundle) accepted.
pub const MAX_UPLOAD: u64 = 64 << 30;
/// Where uploads are spooled, under the store: the only files `apply` may read when it came
/// over the fleet transport.
pub const SPOOL_DIR: &str = "fleet-uploads";
/// The argv word an upload's spooled path replaces.
pub const UPLOAD_TOKEN: &str = "@upload";

/// Whether `file` is an upload this daemon spooled (so a fleet `apply` may read it).
pub fn is_spooled(store_dir: &Path, file: &Path) -> bool {
    file.parent() == Some(store_dir.join(SPOOL_DIR).as_path())
        && file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("upload-"))
}

/// `imagefs mount ... --listen ADDR:PORT --tls-dir DIR`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListenArgs {
    /// Also serve this daemon's commands over TCP at ADDR:PORT, with mutual TLS, to the
    /// fleet's operator (imagefs fleet); only the commands fleet status and rollouts need run
    /// there. Needs --tls-dir.
    #[arg(long, value_name = "ADDR:PORT", requires = "tls_dir")]
    pub listen: Option<SocketAddr>,
    /// The host's TLS files, as `imagefs fleet cert NAME --out DIR` writes them: ca.pem (the
    /// fleet CA, which client certificates must chain to), cert.pem, key.pem.
    #[arg(long, value_name = "DIR", requires = "listen", value_parser = tls_dir)]
    pub tls_dir: Option<PathBuf>,
}

/// A directory holding the three files (checked when the command line is parsed: exit 2).
fn tls_dir(s: &str) -> Result<PathBuf, String> {
    let dir = std::path::absolute(s).map_err(|e| format!("{s}: {e}"))?;
    for f in certs::HOST_FILES {
        if !dir.join(f).is_file() {
            return Err(format!(
                "{} has no {f} (imagefs fleet cert NAME --out DIR writes it)",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// Errors setting up the listener.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The TLS files
    #[error("--tls-dir: {0}")]
    Files(#[from] CertError),
    /// rustls refused the configuration (e.g. the key does not match the certificate)
    #[error("--tls-dir: {0}")]
    Config(String),
    /// Binding the address
    #[error("--listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// A listener ready to serve: bound socket and TLS configuration.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    config: Arc<ServerConfig>,
    spool: PathBuf,
}

/// Loads the TLS files and binds the address (before the daemon answers that it is up, so a
/// wrong file or a taken port fails `mount`); uploads go to STORE/fleet-uploads.
pub fn prepare(args: &ListenArgs, store_dir: &Path) -> Result<Option<Listener>, TlsError> {
    let (Some(addr), Some(dir)) = (args.listen, args.tls_dir.as_ref()) else {
        return Ok(None);
    };
    let provider = certs::provider();
    let roots = Arc::new(certs::roots(&dir.join("ca.pem"))?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let chain = certs::load_certs(&dir.join("cert.pem"))?;
    let key_path = dir.join("key.pem");
    if let Ok(m) = std::fs::metadata(&key_path) {
        use std::os::unix::fs::PermissionsExt;
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %key_path.display(), "fleet: the host key is readable by others than its owner (chmod 600 it)");
        }
    }
    let key = certs::load_key(&key_path)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let spool = store_dir.join(SPOOL_DIR);
    std::fs::create_dir_all(&spool)
        .map_err(|e| TlsError::Config(format!("{}: {e}", spool.display())))?;
    // Uploads left by a daemon that died mid-command are of no use to anyone.
    if let Ok(entries) = std::fs::read_dir(&spool) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let tcp = TcpListener::bind(addr).map_err(|source| TlsError::Bind { addr, source })?;
    Ok(Some(Listener {
        tcp,
        config: Arc::new(config),
        spool,
    }))
}

impl Listener {
    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Connections being served now.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Set once the daemon is closing its store: new commands are refused.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Refuses every command not yet started (the daemon is closing the store).
pub fn stop() {
    STOPPING.store(true, Ordering::SeqCst);
}

/// Serves connections until the listener fails; each on its own thread.
pub fn serve(listener: Listener, handler: wire::Handler) {
    for conn in listener.tcp.incoming() {
        let Ok(tcp) = conn else { continue };
        if STOPPING.load(Ordering::SeqCst) {
            continue;
        }
        let peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if OPEN.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            OPEN.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "fleet: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        }
        let (config, handler) = (listener.config.clone(), handler.clone());
        let spool = listener.spool.clone();
        let spawned = std::thread::Builder::new()
            .name("fleet-conn".into())
            .spawn(move || {
                serve_one(tcp, config, &handler, &peer, &spool);
                OPEN.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            OPEN.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "fleet: cannot start a thread");
        }
    }
}

/// A socket whose reads fail once `until` has passed (each read waits at most until then), so
/// a peer trickling bytes cannot hold a connection past the deadline.
struct Deadline {
    sock: TcpStream,
    until: Option<Instant>,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.sock.set_read_timeout(Some(left))?;
        }
        self.sock.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

fn serve_one(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    handler: &wire::Handler,
    peer: &str,
    spool: &Path,
) {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = tcp.set_write_timeout(Some(IDLE)) {
        tracing::warn!(%peer, error = %e, "fleet: socket setup failed");
        return;
    }
    let sock = Deadline {
        sock: tcp,
        until: Some(Instant::now() + IDLE),
    };
    let conn = match ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%peer, error = %e, "fleet: TLS setup failed");
            return;
        }
    };
    let mut tls = StreamOwned::new(conn, sock);
    // The whole handshake first: a client certificate that does not chain to the fleet CA or
    // lacks clientAuth ends the connection here, before a byte of request is read.
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            tracing::warn!(%peer, error = %e, "fleet: refused a connection in the TLS handshake");
            let _ = tls.sock.sock.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    let mut reader = BufReader::new(&mut tls);
    let mut req = wire::read_request(&mut reader);
    // An upload frame follows its request line: spool it, then name it in argv.
    let mut spooled = None;
    let mut refusal = None;
    if let Some(r) = req.as_mut().filter(|r| r.upload > 0) {
        match receive_upload(&mut reader, r, spool) {
            Ok(path) => spooled = Some(path),
            Err(e) => refusal = Some(e),
        }
    }
    drop(reader);
    // The request is in: the command may take as long as it takes.
    tls.sock.until = None;
    let _ = tls.sock.sock.set_read_timeout(None);
    if let Some(why) = refusal {
        tracing::warn!(%peer, "fleet: upload refused: {why}");
        let refused: wire::Handler = Arc::new(move |_, _, err| {
            let _ = writeln!(err, "imagefs: error: upload: {why}");
            2
        });
        wire::answer(&mut tls, &refused, req);
    } else if STOPPING.load(Ordering::SeqCst) {
        let stopping: wire::Handler = Arc::new(|_, _, err| {
            let _ = writeln!(err, "imagefs: error: the daemon is stopping");
            1
        });
        wire::answer(&mut tls, &stopping, req);
    } else {
        if let Some(r) = &req {
            tracing::info!(%peer, argv = ?r.argv, upload = r.upload, "fleet: command");
        }
        // The upload is gone before the exit code is sent: nothing outlives its command.
        let (inner, upload) = (handler.clone(), spooled.clone());
        let then_unspool: wire::Handler = Arc::new(move |argv, out, err| {
            let code = inner(argv, out, err);
            if let Some(p) = &upload {
                let _ = std::fs::remove_file(p);
            }
            code
        });
        wire::answer(&mut tls, &then_unspool, req);
    }
    if let Some(p) = spooled {
        let _ = std::fs::remove_file(p);
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// Names of spooled uploads, unique within the daemon.
static UPLOADS: AtomicU64 = AtomicU64::new(0);

/// Copies the `req.upload` bytes that follow the request line into a new file under `spool`
/// (each read must make progress within IDLE) and puts its path in place of the one
/// UPLOAD_TOKEN word of argv. Refused: a size past MAX_UPLOAD or past what the filesystem can
/// take while keeping a tenth of it free, or an argv without exactly one token.
fn receive_upload(
    reader: &mut BufReader<&mut StreamOwned<ServerConnection, Deadline>>,
    req: &mut wire::Request,
    spool: &Path,
) -> Result<PathBuf, String> {
    let n = req.upload;
    if req.argv.iter().filter(|a| *a == UPLOAD_TOKEN).count() != 1 {
        return Err(format!(
            "an upload needs exactly one {UPLOAD_TOKEN} argument"
        ));
    }
    if n > MAX_UPLOAD {
        return Err(format!("{n} bytes is more than the {MAX_UPLOAD} accepted"));
    }
    let (free, total) = imagefs_store::space::fs_space(spool).map_err(|e| e.to_string())?;
    if free < n.saturating_add(total / 10) {
        return Err(format!(
            "{n} bytes would leave less than a tenth of the host's filesystem free ({free} free)"
        ));
    }
    let path = spool.join(format!(
        "upload-{}-{}.bundle",
        std::process::id(),
        UPLOADS.fetch_add(1, Ordering::SeqCst)
    ));
    let copied = (|| -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut left = n;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            reader.get_mut().sock.until = Some(Instant::now() + IDLE);
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let got = reader.read(&mut buf[..want])?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            f.write_all(&buf[..got])?;
            left -= got as u64;
        }
        f.sync_all()
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&path);
        return Err(format!("receiving {n} bytes: {e}"));
    }
    for a in req.argv.iter_mut().filter(|a| *a == UPLOAD_TOKEN) {
        *a = path.display().to_string();
    }
    Ok(path)
}
