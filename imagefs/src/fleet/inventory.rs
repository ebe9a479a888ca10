//! The fleet inventory: hosts by name and address, in STORE/fleet/hosts.json (0600), replaced
//! whole on each change. A host's name is what its certificate must say; its address is only
//! where to connect.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::certs::{self, CertError};

/// One host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The name its certificate carries (checked on every connection).
    pub name: String,
    /// HOST:PORT to connect to.
    pub address: String,
}

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    hosts: Vec<Host>,
}

/// Errors of the inventory.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Reading or writing the file
    #[error(transparent)]
    File(#[from] CertError),
    /// The file does not parse
    #[error("{0}: not a fleet inventory: {1}")]
    Malformed(PathBuf, String),
    /// Not HOST:PORT
    #[error("{0:?} is not an address (HOST:PORT, e.g. 192.0.2.10:7443 or [2001:db8::1]:7443)")]
    BadAddress(String),
    /// `add` of a name already there
    #[error("host {0} is already in the inventory (fleet rm it first)")]
    Exists(String),
    /// `rm` of a name not there
    #[error("no host named {0} in the inventory")]
    NotFound(String),
}

impl InventoryError {
    /// The CLI exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            InventoryError::File(e) => e.exit_code(),
            InventoryError::Malformed(..) => 5,
            InventoryError::BadAddress(_) => 2,
            InventoryError::Exists(_) => 4,
            InventoryError::NotFound(_) => 3,
        }
    }
}

fn path(store: &Path) -> PathBuf {
    certs::fleet_dir(store).join("hosts.json")
}

/// Checks `addr` is HOST:PORT with a port number.
pub fn check_address(addr: &str) -> Result<(), InventoryError> {
    let bad = || InventoryError::BadAddress(addr.to_string());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ok = host.parse::<std::net::IpAddr>().is_ok() || certs::check_host_name(host).is_ok();
    if !ok {
        return Err(bad());
    }
    Ok(())
}

/// The hosts, ordered by name.
pub fn load(store: &Path) -> Result<Vec<Host>, InventoryError> {
    let p = path(store);
    let data = match std::fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CertError::Io { path: p, source }.into()),
    };
    let f: File =
        serde_json::from_slice(&data).map_err(|e| InventoryError::Malformed(p, e.to_string()))?;
    let mut hosts = f.hosts;
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts)
}

fn save(store: &Path, hosts: Vec<Host>) -> Result<(), InventoryError> {
    let dir = certs::fleet_dir(store);
    certs::private_dir(&dir)?;
    let data = serde_json::to_vec_pretty(&File { hosts })
        .map_err(|e| InventoryError::Malformed(path(store), e.to_string()))?;
    certs::write_file(&path(store), &data, 0o600)?;
    Ok(())
}

/// `fleet add NAME ADDR:PORT`.
pub fn add(store: &Path, name: &str, address: &str) -> Result<(), InventoryError> {
    certs::check_host_name(name)?;
    check_address(address)?;
    let mut hosts = load(store)?;
    if hosts.iter().any(|h| h.name == name) {
        return Err(InventoryError::Exists(name.to_string()));
    }
    hosts.push(Host {
        name: name.to_string(),
        address: address.to_string(),
    });
    save(store, hosts)
}

/// `fleet rm NAME`.
pub fn remove(store: &Path, name: &str) -> Result<(), InventoryError> {
    let mut hosts = load(store)?;
    let before = hosts.len();
    hosts.retain(|h| h.name != name);
    if hosts.len() == before {
        return Err(InventoryError::NotFound(name.to_string()));
    }
    save(store, hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_added_listed_in_order_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        add(dir.path(), "host-2", "127.0.0.1:7444").unwrap();
        add(dir.path(), "host-1", "[::1]:7443").unwrap();
        add(dir.path(), "host-3", "h3.example:7443").unwrap();
        assert!(matches!(
            add(dir.path(), "host-1", "127.0.0.1:1"),
            Err(InventoryError::Exists(_))
        ));
        for bad in ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:x", "a b:1", ":7443"] {
            assert!(
                matches!(
                    add(dir.path(), "h", bad),
                    Err(InventoryError::BadAddress(_))
                ),
                "{bad}"
            );
        }
        assert!(add(dir.path(), "10.0.0.1", "10.0.0.1:1").is_err());
        let names: Vec<String> = load(dir.path())
            .unwrap()
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["host-1", "host-2", "host-3"]);
        remove(dir.path(), "host-2").unwrap();
        assert!(matches!(
            remove(dir.path(), "host-2"),
            Err(InventoryError::NotFound(_))
        ));
        assert_eq!(load(dir.path()).unwrap().len(), 2);
    }
}
