//! Fleet certificates, made with rcgen: one CA per fleet, kept with the operator's client
//! certificate in STORE/fleet/ (directory 0700, files 0600). A host certificate names its host
//! as its one DNS name and is for servers only (serverAuth); the operator's is for clients only
//! (clientAuth). So a host's key cannot command another host, and the operator's key cannot
//! pose as a host: rustls checks both usages on every handshake.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The fleet CA's certificate, in STORE/fleet/.
pub const CA_CERT: &str = "ca.pem";
/// The fleet CA's key: whoever holds it can make hosts and operators.
pub const CA_KEY: &str = "ca.key";
/// The operator's client certificate.
pub const OPERATOR_CERT: &str = "operator.pem";
/// The operator's client key.
pub const OPERATOR_KEY: &str = "operator.key";
/// What `fleet cert` writes for a host (and `mount --tls-dir` reads).
pub const HOST_FILES: [&str; 3] = ["ca.pem", "cert.pem", "key.pem"];

/// How long certificates are valid: a fleet CA for 20 years, the others for 5.
const CA_YEARS: i64 = 20;
const LEAF_YEARS: i64 = 5;

/// Errors making, storing or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or the key
    #[error("certificate: {0}")]
    Make(#[from] rcgen::Error),
    /// A file could not be read or written
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The store has no fleet CA yet
    #[error("no fleet CA in {0} (imagefs fleet ca init)")]
    NoCa(PathBuf),
    /// `ca init` on a store that has one
    #[error("{0} already holds a fleet CA (its hosts trust it; remove it by hand to start over)")]
    CaExists(PathBuf),
    /// The --out directory is not new or empty
    #[error("{0} is not empty (choose a new --out directory)")]
    Exists(PathBuf),
    /// Not a name a certificate and a client can both use
    #[error("{0:?} is not a host name (a DNS name such as host-1 or web.example; not an address)")]
    BadName(String),
}

impl CertError {
    /// The CLI exit code: 2 bad input, 3 not found, 4 conflict, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CertError::BadName(_) => 2,
            CertError::NoCa(_) => 3,
            CertError::CaExists(_) | CertError::Exists(_) => 4,
            CertError::Pem { .. } => 2,
            CertError::Make(_) | CertError::Io { .. } => 1,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// STORE/fleet.
pub fn fleet_dir(store: &Path) -> PathBuf {
    store.join("fleet")
}

/// Makes `dir` (and parents) and sets it to 0700.
pub fn private_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_at(dir))
}

/// Writes `data` to `path` with `mode`, whole or not at all (a temporary file, fsynced, renamed).
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    // A leftover temporary file keeps its old mode: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_at(&tmp))?;
    f.write_all(data).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_at(path))?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_at(parent))?;
    }
    Ok(())
}

/// Whether `name` can be a host's certificate name and a client's ServerName: a DNS name, and
/// not an address (the client checks the name, never the address, so the address may change).
pub fn check_host_name(name: &str) -> Result<(), CertError> {
    let bad = || CertError::BadName(name.to_string());
    if name.parse::<std::net::IpAddr>().is_ok() || name.ends_with('.') || name.len() > 253 {
        return Err(bad());
    }
    rustls::pki_types::DnsName::try_from(name).map_err(|_| bad())?;
    Ok(())
}

fn validity(params: &mut CertificateParams, years: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: a host whose clock is a little behind still accepts a fresh certificate.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365 * years);
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A new fleet CA (it may sign end-entity certificates only: path length 0).
pub fn new_ca() -> Result<Issued, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // Named after its key, so two fleets' CAs differ by name too (errors say which is which).
    let id = blake3::hash(key.public_key_raw()).to_hex();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("imagefs fleet CA {}", &id.as_str()[..12]),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_YEARS);
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A host daemon: serverAuth only, DNS name = its name.
    Host,
    /// The operator's CLI: clientAuth only.
    Operator,
}

/// A certificate for `name` in `role`, signed by the CA given as PEM.
pub fn issue(ca: &Issued, role: Role, name: &str) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = match role {
        Role::Host => {
            check_host_name(name)?;
            CertificateParams::new(vec![name.to_string()])?
        }
        Role::Operator => CertificateParams::default(),
    };
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Host => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Operator => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_YEARS);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn read_text(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io_at(path))
}

/// `fleet ca init`: a CA and the operator's certificate in STORE/fleet/.
pub fn init_ca(store: &Path) -> Result<PathBuf, CertError> {
    let dir = fleet_dir(store);
    if dir.join(CA_KEY).exists() {
        return Err(CertError::CaExists(dir));
    }
    private_dir(&dir)?;
    let ca = new_ca()?;
    let operator = issue(&ca, Role::Operator, "imagefs fleet operator")?;
    // The key last: its presence is what says the CA exists.
    write_file(&dir.join(CA_CERT), ca.cert_pem.as_bytes(), 0o600)?;
    write_file(
        &dir.join(OPERATOR_CERT),
        operator.cert_pem.as_bytes(),
        0o600,
    )?;
    write_file(&dir.join(OPERATOR_KEY), operator.key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join(CA_KEY), ca.key_pem.as_bytes(), 0o600)?;
    Ok(dir)
}

/// The store's fleet CA.
pub fn load_ca(store: &Path) -> Result<Issued, CertError> {
    let dir = fleet_dir(store);
    if !dir.join(CA_KEY).exists() {
        return Err(CertError::NoCa(store.to_path_buf()));
    }
    Ok(Issued {
        cert_pem: read_text(&dir.join(CA_CERT))?,
        key_pem: read_text(&dir.join(CA_KEY))?,
    })
}

/// `fleet cert NAME --out DIR`: ca.pem, cert.pem, key.pem for host NAME (DIR 0700, key 0600).
pub fn write_host_files(store: &Path, name: &str, out: &Path) -> Result<(), CertError> {
    check_host_name(name)?;
    let ca = load_ca(store)?;
    // A new or empty directory only: it is made 0700, which must not befall a directory in use
    // (`--out .`), and no earlier host's key is overwritten.
    if let Ok(mut entries) = std::fs::read_dir(out) {
        if entries.next().is_some() {
            return Err(CertError::Exists(out.to_path_buf()));
        }
    }
    let host = issue(&ca, Role::Host, name)?;
    private_dir(out)?;
    write_file(&out.join("ca.pem"), ca.cert_pem.as_bytes(), 0o644)?;
    write_file(&out.join("cert.pem"), host.cert_pem.as_bytes(), 0o644)?;
    write_file(&out.join("key.pem"), host.key_pem.as_bytes(), 0o600)?;
    Ok(())
}

/// Every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem_err = |what: String| CertError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let data = std::fs::read(path).map_err(io_at(path))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("holds no certificate".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let data = std::fs::read(path).map_err(io_at(path))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        what: format!("no private key: {e}"),
    })
}

/// The rustls root store holding the CA certificates of `path`.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, CertError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The crypto provider both ends use (ring, as object_store's rustls already does).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::server::danger::ClientCertVerifier;

    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verifiers(
        ca: &Issued,
    ) -> (
        Arc<dyn ServerCertVerifier>,
        Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.cert_pem)).unwrap();
        let roots = Arc::new(roots);
        let server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .unwrap();
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        (server, client)
    }

    fn as_server(v: &dyn ServerCertVerifier, cert: &Issued, name: &str) -> bool {
        let name = ServerName::try_from(name.to_string()).unwrap();
        v.verify_server_cert(&der(&cert.cert_pem), &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    fn as_client(v: &dyn ClientCertVerifier, cert: &Issued) -> bool {
        v.verify_client_cert(&der(&cert.cert_pem), &[], UnixTime::now())
            .is_ok()
    }

    /// (serverAuth, clientAuth, any other extended usage, is a CA), as the certificate says.
    fn usages(cert: &Issued) -> (bool, bool, bool, bool) {
        let der = der(&cert.cert_pem);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca = x.basic_constraints().unwrap().is_some_and(|b| b.value.ca);
        match x.extended_key_usage().unwrap() {
            Some(e) => {
                let e = e.value;
                let other = e.any
                    || e.code_signing
                    || e.email_protection
                    || e.time_stamping
                    || e.ocsp_signing
                    || !e.other.is_empty();
                (e.server_auth, e.client_auth, other, ca)
            }
            None => (false, false, false, ca),
        }
    }

    #[test]
    fn host_certificates_serve_only_and_operator_certificates_only_connect() {
        let ca = new_ca().unwrap();
        let host = issue(&ca, Role::Host, "host-1").unwrap();
        let op = issue(&ca, Role::Operator, "op").unwrap();
        assert_eq!(
            usages(&host),
            (true, false, false, false),
            "host: serverAuth only"
        );
        assert_eq!(
            usages(&op),
            (false, true, false, false),
            "operator: clientAuth only"
        );
        assert!(usages(&ca).3, "the fleet CA must be a CA");

        let (server, client) = verifiers(&ca);
        // The host is a server under its own name only.
        assert!(as_server(&*server, &host, "host-1"));
        assert!(!as_server(&*server, &host, "host-2"));
        // The operator is a client; a host's certificate (serverAuth only) is not.
        assert!(as_client(&*client, &op));
        assert!(!as_client(&*client, &host));
        // A certificate of another fleet's CA is nothing here.
        let other = new_ca().unwrap();
        let stranger = issue(&other, Role::Operator, "op").unwrap();
        assert!(!as_client(&*client, &stranger));
        let impostor = issue(&other, Role::Host, "host-1").unwrap();
        assert!(!as_server(&*server, &impostor, "host-1"));
        // A host certificate cannot sign (not a CA): what it signs does not chain to the CA
        // even with the host's certificate offered as the intermediate.
        let forged = issue(&host, Role::Operator, "op").unwrap();
        let chain = [der(&host.cert_pem)];
        assert!(client
            .verify_client_cert(&der(&forged.cert_pem), &chain, UnixTime::now())
            .is_err());
    }

    #[test]
    fn host_names_are_dns_names_never_addresses() {
        for ok in ["host-1", "web.example", "h1"] {
            check_host_name(ok).unwrap();
        }
        for bad in ["192.0.2.1", "::1", "", "a b", "host/1", "x."] {
            assert!(check_host_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_store_keeps_its_fleet_files_private_and_host_files_are_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let fleet = init_ca(&store).unwrap();
        assert!(matches!(init_ca(&store), Err(CertError::CaExists(_))));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fleet), 0o700);
        for f in [CA_CERT, CA_KEY, OPERATOR_CERT, OPERATOR_KEY] {
            assert_eq!(mode(&fleet.join(f)), 0o600, "{f}");
        }
        let out = dir.path().join("host-1");
        write_host_files(&store, "host-1", &out).unwrap();
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("key.pem")), 0o600);
        load_key(&out.join("key.pem")).unwrap();
        assert_eq!(load_certs(&out.join("cert.pem")).unwrap().len(), 1);
        assert!(matches!(
            write_host_files(&store, "host-1", &out),
            Err(CertError::Exists(_))
        ));
        assert!(matches!(
            write_host_files(&store, "10.0.0.1", &dir.path().join("x")),
            Err(CertError::BadName(_))
        ));
        // A directory in use is refused, and its mode left alone.
        let busy = dir.path().join("busy");
        std::fs::create_dir(&busy).unwrap();
        std::fs::set_permissions(&busy, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(busy.join("notes"), b"x").unwrap();
        assert!(matches!(
            write_host_files(&store, "host-2", &busy),
            Err(CertError::Exists(_))
        ));
        assert_eq!(mode(&busy), 0o755);
        assert!(!busy.join("key.pem").exists());
    }
}
