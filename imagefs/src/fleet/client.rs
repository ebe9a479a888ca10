//! The operator's side of the fleet transport: runs one command on one host's daemon over
//! mutual TLS (the wire format of wire.rs). The host must present a certificate of the
//! fleet CA for the NAME it was added under (ServerName = NAME, never the address, which may be
//! an IP); the operator presents STORE/fleet/operator.pem. Every step is bounded: at most
//! CONNECT_TIMEOUT to connect, and the whole call by the caller's deadline.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::certs::{self, CertError};
use super::inventory::Host;
use crate::wire::{Answer, Request};

/// Most time spent connecting to one host.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer accepted from a host (all its lines together).
const MAX_ANSWER: u64 = 64 << 20;

/// Errors reaching a host or running a command there.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The operator's certificate or the CA could not be loaded
    #[error(transparent)]
    Files(#[from] CertError),
    /// rustls refused the client configuration
    #[error("TLS setup: {0}")]
    Config(String),
    /// Name resolution or TCP connect failed
    #[error("connect {addr}: {source}")]
    Connect {
        /// HOST:PORT.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The deadline passed
    #[error("no answer within the deadline ({0})")]
    Timeout(&'static str),
    /// The handshake failed: the host's certificate is not of this fleet or not for its name,
    /// or the host refused ours
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection broke
    #[error("connection: {0}")]
    Io(io::Error),
    /// The host answered something that is not the protocol
    #[error("malformed answer from the host")]
    BadAnswer,
    /// The host hung up before giving an exit code
    #[error("the host hung up before finishing the command")]
    HungUp,
    /// The operator's file to upload could not be read
    #[error("upload {0}: {1}")]
    Upload(String, #[source] io::Error),
}

impl ClientError {
    /// Whether the host may simply be out of reach (a partition, a restart): no answer came,
    /// so nothing can be said of the command, as opposed to a setup error on the operator's
    /// side.
    pub fn is_unreachable(&self) -> bool {
        !matches!(
            self,
            ClientError::Files(_) | ClientError::Config(_) | ClientError::Upload(..)
        )
    }
}

/// What a command printed on the host, and its exit code.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    /// Its stdout.
    pub out: String,
    /// Its stderr.
    pub err: String,
    /// Its exit code.
    pub exit: i32,
}

/// The operator's TLS identity, loaded once from STORE/fleet/.
#[derive(Debug, Clone)]
pub struct Operator {
    config: Arc<ClientConfig>,
}

impl Operator {
    /// Loads STORE/fleet/{ca.pem, operator.pem, operator.key}.
    pub fn load(store: &Path) -> Result<Operator, ClientError> {
        let dir = certs::fleet_dir(store);
        if !dir.join(certs::OPERATOR_KEY).exists() {
            return Err(CertError::NoCa(store.to_path_buf()).into());
        }
        Operator::from_files(
            &dir.join(certs::CA_CERT),
            &dir.join(certs::OPERATOR_CERT),
            &dir.join(certs::OPERATOR_KEY),
        )
    }

    /// An identity from explicit files (CA to trust, our certificate and key).
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Operator, ClientError> {
        let roots = certs::roots(ca)?;
        let chain = certs::load_certs(cert)?;
        let key = certs::load_key(key)?;
        let config = ClientConfig::builder_with_provider(certs::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Operator {
            config: Arc::new(config),
        })
    }

    /// Runs `argv` (without the program name) on `host`, finishing by `deadline`.
    pub fn call(
        &self,
        host: &Host,
        argv: &[&str],
        deadline: Instant,
    ) -> Result<Reply, ClientError> {
        self.exchange(host, argv, None, deadline)
    }

    /// Like `call`, sending the bytes of the operator's `file` as the request's upload frame;
    /// the host puts the path of its spooled copy in place of the `@upload` word of `argv`.
    pub fn call_with_upload(
        &self,
        host: &Host,
        argv: &[&str],
        file: &Path,
        deadline: Instant,
    ) -> Result<Reply, ClientError> {
        self.exchange(host, argv, Some(file), deadline)
    }

    fn exchange(
        &self,
        host: &Host,
        argv: &[&str],
        upload: Option<&Path>,
        deadline: Instant,
    ) -> Result<Reply, ClientError> {
        let mut file = match upload {
            Some(p) => {
                let f = std::fs::File::open(p)
                    .map_err(|e| ClientError::Upload(p.display().to_string(), e))?;
                let len = f
                    .metadata()
                    .map_err(|e| ClientError::Upload(p.display().to_string(), e))?
                    .len();
                Some((f, len))
            }
            None => None,
        };
        let name = ServerName::try_from(host.name.clone())
            .map_err(|_| ClientError::Tls(format!("{:?} is not a host name", host.name)))?;
        let sock = connect(&host.address, deadline)?;
        let conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut tls = StreamOwned::new(conn, Bounded { sock, deadline });
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| classify(e, "handshake"))?;
        }
        let mut full = vec!["imagefs".to_string()];
        full.extend(argv.iter().map(|s| s.to_string()));
        let req = Request {
            argv: full,
            upload: file.as_ref().map_or(0, |(_, len)| *len),
        };
        let mut line = serde_json::to_vec(&req).map_err(|_| ClientError::BadAnswer)?;
        line.push(b'\n');
        tls.write_all(&line).map_err(|e| classify(e, "request"))?;
        if let Some((f, len)) = file.as_mut() {
            let sent = io::copy(&mut f.take(*len), &mut tls).map_err(|e| classify(e, "upload"))?;
            if sent != *len {
                return Err(ClientError::Upload(
                    format!("{:?}", upload),
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
        tls.flush().map_err(|e| classify(e, "request"))?;
        let mut reply = Reply::default();
        let reader = BufReader::new((&mut tls).take(MAX_ANSWER));
        for l in reader.lines() {
            let l = l.map_err(|e| classify(e, "answer"))?;
            match serde_json::from_str::<Answer>(&l).map_err(|_| ClientError::BadAnswer)? {
                Answer::Out(s) => reply.out.push_str(&s),
                Answer::Err(s) => reply.err.push_str(&s),
                Answer::Exit(code) => {
                    reply.exit = code;
                    return Ok(reply);
                }
            }
        }
        Err(ClientError::HungUp)
    }
}

/// A TLS failure (rustls reports it as InvalidData carrying its error) or a timeout, said as
/// such; anything else as a broken connection.
fn classify(e: io::Error, during: &'static str) -> ClientError {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ClientError::Timeout(during),
        io::ErrorKind::InvalidData => ClientError::Tls(e.to_string()),
        _ => ClientError::Io(e),
    }
}

fn connect(addr: &str, deadline: Instant) -> Result<TcpStream, ClientError> {
    let err = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addr.to_socket_addrs().map_err(err)? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout("connect"));
        }
        match TcpStream::connect_timeout(&a, left.min(CONNECT_TIMEOUT)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// A socket whose every read and write ends by the deadline.
struct Bounded {
    sock: TcpStream,
    deadline: Instant,
}

impl Bounded {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf)
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.sock.set_write_timeout(Some(left))?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}
