//! The VM registry: one small JSON record per VM in STORE/vms/NAME.json (instance, hypervisor,
//! pid, agent socket, console log, state), plus the guest defaults in STORE/vms/config.json.
//! Invariants: a record is replaced atomically (write, fsync, rename), so a crash leaves the old
//! one or the new one; a record says "running" only while its process is alive, and `is_live`
//! checks the process (pid and its command line naming the agent socket) before trusting it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The hypervisor process runs.
    Running,
    /// The hypervisor exited (or was never seen again after a daemon restart).
    Stopped,
}

/// What happens to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The hypervisor was spawned.
    Spawned,
    /// The hypervisor exited, or its process is gone.
    Exited,
}

impl VmState {
    /// Every transition in one place.
    pub fn on(self, e: VmEvent) -> VmState {
        match (self, e) {
            (_, VmEvent::Spawned) => VmState::Running,
            (_, VmEvent::Exited) => VmState::Stopped,
        }
    }
}

/// One VM as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's name (also its instance's name).
    pub name: String,
    /// The instance it runs on (MOUNT/instances/INSTANCE.raw).
    pub instance: String,
    /// "vmm", "qemu-kvm" or "qemu-tcg".
    pub hypervisor: String,
    /// The hypervisor's pid while running.
    pub pid: Option<u32>,
    /// The agent's Unix socket (guest COM2).
    pub agent_socket: PathBuf,
    /// The guest console log.
    pub console_log: PathBuf,
    /// Running or stopped.
    pub state: VmState,
    /// Unix seconds of the start.
    pub started_at: u64,
    /// How the hypervisor ended, once it did.
    pub exit: Option<String>,
    /// The kernel and initramfs booted.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The disk the hypervisor reads (MOUNT/instances/INSTANCE.raw).
    #[serde(default)]
    pub disk: Option<PathBuf>,
}

/// Guest defaults remembered by `vm config` or the last `vm start --kernel/--initrd`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub memory: Option<String>,
    pub cpus: Option<u32>,
    /// Default limit of a new VM's instance data on the host (bytes).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Most bytes of a VM's console log (one rotated file is kept beside it).
    #[serde(default)]
    pub console_max: Option<u64>,
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Reading or writing a record failed
    #[error("vm registry {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A record does not parse
    #[error("vm registry {path}: damaged record: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// No VM of this name
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// A name that cannot be a file name
    #[error("{0:?} is not a VM name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")]
    BadName(String),
}

/// The directory of the registry.
pub fn dir(store: &Path) -> PathBuf {
    store.join("vms")
}

/// Checks a VM name (the same rule as instance names: it names files).
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName(name.to_string()))
    }
}

fn record_path(store: &Path, name: &str) -> PathBuf {
    dir(store).join(format!("{name}.json"))
}

/// The agent socket and console log paths of VM `name`.
pub fn paths(store: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = dir(store);
    (
        d.join(format!("{name}.agent")),
        d.join(format!("{name}.console.log")),
    )
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Serializes writers in this process (the supervisor thread and `vm stop` may both mark a VM).
static WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes `value` to `path` atomically.
fn write_json(path: &Path, value: &impl Serialize) -> Result<(), RegistryError> {
    let _guard = WRITE.lock().unwrap_or_else(|p| p.into_inner());
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    // Unique per process: a CLI and the daemon never share a temporary file.
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| RegistryError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    imagefs_store::log::sync_parent(path).map_err(io(parent))
}

/// Saves a record (replacing the previous one).
pub fn save(store: &Path, rec: &VmRecord) -> Result<(), RegistryError> {
    check_name(&rec.name)?;
    write_json(&record_path(store, &rec.name), rec)
}

/// Loads VM `name`.
pub fn load(store: &Path, name: &str) -> Result<VmRecord, RegistryError> {
    check_name(name)?;
    let path = record_path(store, name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::NotFound(name.to_string()))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|source| RegistryError::Parse { path, source })
}

/// Every VM, by name. Damaged records are skipped with a warning.
pub fn list(store: &Path) -> Result<Vec<VmRecord>, RegistryError> {
    let d = dir(store);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&d)(e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vm) = name.strip_suffix(".json") else {
            continue;
        };
        if vm == "config" {
            continue;
        }
        match load(store, vm) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(error = %e, "skipping a vm record"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes VM `name`'s record.
pub fn remove(store: &Path, name: &str) -> Result<(), RegistryError> {
    let p = record_path(store, name);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(RegistryError::NotFound(name.to_string()))
        }
        Err(e) => Err(io(&p)(e)),
    }
}

/// The guest defaults.
pub fn config(store: &Path) -> GuestConfig {
    std::fs::read(dir(store).join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Saves the guest defaults.
pub fn save_config(store: &Path, c: &GuestConfig) -> Result<(), RegistryError> {
    write_json(&dir(store).join("config.json"), c)
}

/// Whether `rec`'s hypervisor still runs: the pid exists, is not a zombie, and its command line
/// names the VM's agent socket (so a reused pid is not mistaken for the VM).
pub fn is_live(rec: &VmRecord) -> bool {
    let Some(pid) = rec.pid.filter(|_| rec.state == VmState::Running) else {
        return false;
    };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    if zombie {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let sock = rec.agent_socket.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(sock.as_ref())
}

/// The live VM running on `instance`, if any.
pub fn live_on_instance(store: &Path, instance: &str) -> Option<VmRecord> {
    list(store)
        .ok()?
        .into_iter()
        .find(|r| r.instance == instance && is_live(r))
}

/// Resolves VM `name` to its agent socket (for `imagefs agent --vm NAME`).
pub fn agent_socket(store: &Path, name: &str) -> Result<PathBuf, RegistryError> {
    Ok(load(store, name)?.agent_socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            instance: name.into(),
            hypervisor: "qemu-tcg".into(),
            pid: Some(std::process::id()),
            agent_socket: PathBuf::from("/nonexistent/sock"),
            console_log: PathBuf::from("/nonexistent/log"),
            state: VmState::Running,
            started_at: 1,
            exit: None,
            kernel: PathBuf::from("k"),
            initrd: PathBuf::from("i"),
            disk: None,
        }
    }

    #[test]
    fn records_round_trip_and_list_skips_config() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), &rec("web-2")).unwrap();
        save(d.path(), &rec("web-1")).unwrap();
        save_config(
            d.path(),
            &GuestConfig {
                kernel: Some("k".into()),
                ..GuestConfig::default()
            },
        )
        .unwrap();
        let names: Vec<String> = list(d.path())
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["web-1", "web-2"]);
        assert_eq!(load(d.path(), "web-1").unwrap(), rec("web-1"));
        assert!(matches!(
            load(d.path(), "nope"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            save(d.path(), &rec("../x")),
            Err(RegistryError::BadName(_))
        ));
        assert_eq!(config(d.path()).kernel, Some(PathBuf::from("k")));
    }

    #[test]
    fn a_running_record_is_live_only_if_its_process_names_the_socket() {
        // Our own pid runs, but its command line does not name the socket: not the VM.
        assert!(!is_live(&rec("a")));
        let mut r = rec("a");
        r.state = VmState::Stopped;
        assert!(!is_live(&r));
        assert_eq!(VmState::Running.on(VmEvent::Exited), VmState::Stopped);
    }
}
