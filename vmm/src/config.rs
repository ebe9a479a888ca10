//! The vmm's configuration: plain data parsed from the command line, then checked against the
//! host before anything is built. A `VmmConfig` that passed `validate` names files that exist and
//! sizes the vmm can honour, so boot errors are about the guest, not about the user's input.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::layout::MAX_VIRTIO_DEVICES;

/// Smallest guest RAM we accept: the Debian cloud kernel with a small initramfs needs about this.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest vCPU count: each vCPU is a thread and an APIC ID below the IOAPIC's 8-bit space.
pub const MAX_CPUS: u8 = 64;
/// Command line used when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// Errors in the vmm's configuration; each message is the one line the user sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The kernel image does not exist.
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    /// The initrd does not exist.
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    /// A disk's backing file does not exist.
    #[error("disk {0} does not exist")]
    DiskMissing(PathBuf),
    /// A --disk value that is not PATH or PATH,ro.
    #[error("bad disk {0:?}: expected PATH or PATH,ro")]
    BadDisk(String),
    /// More disks than virtio-mmio slots.
    #[error("{0} disks given, at most {max} are supported", max = MAX_VIRTIO_DEVICES)]
    TooManyDisks(usize),
    /// A --memory value that is not a size.
    #[error("bad memory size {0:?}: expected a number with an optional K, M or G suffix")]
    BadMemory(String),
    /// Guest RAM below what the kernel needs.
    #[error("memory {given} MiB is too small: at least {min} MiB is needed", given = .0 >> 20, min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    /// Guest RAM above what the host has.
    #[error("memory {given} MiB is too large: this host has {max} MiB", given = .0 >> 20, max = .1 >> 20)]
    MemoryTooLarge(u64, u64),
    /// A vCPU count out of range.
    #[error("bad vCPU count {0}: expected 1 to {max}", max = MAX_CPUS)]
    BadCpus(u64),
    /// The agent socket path is held by a live listener or by something that is not a socket.
    #[error("agent socket {0} is taken (another process listens there, or it is not a socket)")]
    AgentSocketTaken(PathBuf),
    /// The --console value names a file in a folder that does not exist.
    #[error("console file {0} cannot be created: its folder does not exist")]
    ConsoleFolderMissing(PathBuf),
}

/// One virtio-blk disk, in the order the guest enumerates them (vda, vdb, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `PATH` or `PATH,ro` (also `PATH,rw`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some(_) => return Err(ConfigError::BadDisk(s.to_string())),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(ConfigError::BadDisk(s.to_string()));
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    Stdio,
    File(PathBuf),
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdio" | "-" => ConsoleConfig::Stdio,
            path => ConsoleConfig::File(PathBuf::from(path)),
        })
    }
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub memory_bytes: u64,
    pub cpus: u8,
    pub cmdline: String,
    pub agent_socket: Option<PathBuf>,
    pub console: ConsoleConfig,
    /// Most bytes of a console log file (one rotated file is kept beside it).
    pub console_max: u64,
    /// Per-disk limit of bytes per second (each disk its own bucket).
    pub disk_bw: Option<crate::devices::virtio::block::limit::Limit>,
    /// Per-disk limit of operations per second.
    pub disk_iops: Option<crate::devices::virtio::block::limit::Limit>,
}

/// Parses a size such as `512M`, `2G`, `65536K` or a plain byte count.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadMemory(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some(_) => (t, 0),
        None => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parses a vCPU count.
pub fn parse_cpus(n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(c) if (1..=MAX_CPUS).contains(&c) => Ok(c),
        _ => Err(ConfigError::BadCpus(n)),
    }
}

/// Total RAM of this host in bytes (from /proc/meminfo), if it can be read.
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl VmmConfig {
    /// Checks the configuration against the host: files exist, sizes fit `host_memory` bytes of
    /// RAM, and the agent socket path is free (a stale socket file left by a dead vmm is removed).
    pub fn validate(&self, host_memory: u64) -> Result<(), ConfigError> {
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        if self.disks.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        for disk in &self.disks {
            if !disk.path.exists() {
                return Err(ConfigError::DiskMissing(disk.path.clone()));
            }
        }
        if self.memory_bytes < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory_bytes));
        }
        if self.memory_bytes > host_memory {
            return Err(ConfigError::MemoryTooLarge(self.memory_bytes, host_memory));
        }
        parse_cpus(u64::from(self.cpus))?;
        if let Some(path) = &self.agent_socket {
            claim_socket_path(path)?;
        }
        if let ConsoleConfig::File(path) = &self.console {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                return Err(ConfigError::ConsoleFolderMissing(path.clone()));
            }
        }
        Ok(())
    }
}

/// Makes `path` free for a new listener: a live listener or a non-socket file there is an error;
/// a socket nobody listens on (left by a vmm that died) is removed.
fn claim_socket_path(path: &Path) -> Result<(), ConfigError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(_) => return Ok(()),
    };
    let taken = || ConfigError::AgentSocketTaken(path.to_path_buf());
    if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
        return Err(taken());
    }
    std::fs::remove_file(path).map_err(|_| taken())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn config(dir: &Path) -> VmmConfig {
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap_or_default();
        VmmConfig {
            kernel,
            initrd: None,
            disks: vec![],
            memory_bytes: 512 << 20,
            cpus: 1,
            cmdline: DEFAULT_CMDLINE.into(),
            agent_socket: None,
            console: ConsoleConfig::Stdio,
            console_max: crate::devices::legacy::CONSOLE_MAX,
            disk_bw: None,
            disk_iops: None,
        }
    }

    #[test]
    fn memory_sizes_parse_with_suffixes() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("65536k"), Ok(64 << 20));
        assert_eq!(parse_memory("1048576"), Ok(1 << 20));
        assert!(parse_memory("").is_err());
        assert!(parse_memory("M").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("-1G").is_err());
        assert!(parse_memory("99999999999999999999G").is_err());
        assert!(parse_memory("18446744073709551615G").is_err());
    }

    #[test]
    fn disks_parse_with_ro_flag() {
        let d: DiskConfig = "/tmp/a.raw".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(d.path, PathBuf::from("/tmp/a.raw"));
        assert!(!d.read_only);
        let d: DiskConfig = "/tmp/b,c.raw,ro".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(d.path, PathBuf::from("/tmp/b,c.raw"));
        assert!(d.read_only);
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert!("/x,rx".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn cpus_in_range() {
        assert_eq!(parse_cpus(1), Ok(1));
        assert_eq!(parse_cpus(64), Ok(64));
        assert!(parse_cpus(0).is_err());
        assert!(parse_cpus(65).is_err());
        assert!(parse_cpus(1 << 40).is_err());
    }

    #[test]
    fn validate_names_each_bad_input() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ok = config(dir.path());
        assert_eq!(ok.validate(1 << 40), Ok(()));

        let mut c = ok.clone();
        c.kernel = dir.path().join("nope");
        assert_eq!(
            c.validate(1 << 40),
            Err(ConfigError::KernelMissing(c.kernel.clone()))
        );

        let mut c = ok.clone();
        c.disks.push("/nonexistent/disk.raw,ro".parse()?);
        let err = c.validate(1 << 40).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("disk /nonexistent/disk.raw does not exist")
        );

        let mut c = ok.clone();
        c.memory_bytes = 16 << 20;
        assert_eq!(
            c.validate(1 << 40),
            Err(ConfigError::MemoryTooSmall(16 << 20))
        );
        c.memory_bytes = 8 << 30;
        assert_eq!(
            c.validate(4 << 30),
            Err(ConfigError::MemoryTooLarge(8 << 30, 4 << 30))
        );
        Ok(())
    }

    #[test]
    fn agent_socket_taken_by_live_listener_but_stale_one_is_reclaimed(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut c = config(dir.path());
        let sock = dir.path().join("agent.sock");
        c.agent_socket = Some(sock.clone());
        let listener = UnixListener::bind(&sock)?;
        assert_eq!(
            c.validate(1 << 40),
            Err(ConfigError::AgentSocketTaken(sock.clone()))
        );
        drop(listener); // the socket file stays, nobody listens: stale
        assert_eq!(c.validate(1 << 40), Ok(()));
        assert!(!sock.exists());

        std::fs::write(&sock, b"not a socket")?;
        assert_eq!(
            c.validate(1 << 40),
            Err(ConfigError::AgentSocketTaken(sock))
        );
        Ok(())
    }
}
