//! Starting and stopping hypervisors on instances of the mount: picks vmm or QEMU, builds the
//! command line, spawns it as the daemon's child with a supervisor thread that marks the VM
//! stopped when it exits, and stops it (agent shutdown, then SIGTERM, then SIGKILL).
//! Invariant: a spawned VM has a registry record saying "running" before the supervisor can
//! mark it stopped, and the supervisor is the only one that reaps it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::AgentClient;

use super::registry::{self, VmEvent, VmRecord, VmState};

/// Which hypervisor runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hypervisor {
    /// Our KVM microVM.
    Vmm,
    /// QEMU (KVM where it can run the guest, software emulation otherwise).
    Qemu,
    /// vmm where the host's KVM runs unmodified guests, otherwise QEMU.
    Auto,
}

/// The resolved choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Vmm,
    QemuKvm,
    QemuTcg,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Vmm => "vmm",
            Engine::QemuKvm => "qemu-kvm",
            Engine::QemuTcg => "qemu-tcg",
        }
    }
}

/// Whether this host's /dev/kvm runs unmodified Linux guests: present, and not kvm_pvm (which
/// runs PVM-aware kernels only).
pub fn host_kvm_usable() -> bool {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    kvm && !pvm
}

/// Resolves `--hypervisor`.
pub fn pick(h: Hypervisor) -> Engine {
    let kvm = host_kvm_usable();
    match (h, kvm) {
        (Hypervisor::Vmm, _) => Engine::Vmm,
        (Hypervisor::Qemu | Hypervisor::Auto, false) => Engine::QemuTcg,
        (Hypervisor::Qemu, true) => Engine::QemuKvm,
        (Hypervisor::Auto, true) => Engine::Vmm,
    }
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub name: String,
    pub instance: String,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory: String,
    pub cpus: u32,
    pub engine: Engine,
    pub cmdline_extra: String,
    /// Most bytes of the console log (one rotated file, LOG.1, is kept beside it).
    pub console_max: u64,
    /// Disk bytes per second and burst (`RATE[/s][,BURST]`), as vmm --disk-bw takes it.
    pub disk_bw: Option<String>,
    /// Disk operations per second and burst (`N[,BURST]`).
    pub disk_iops: Option<String>,
}

/// The default cap of a VM's console log.
pub const CONSOLE_MAX: u64 = 16 << 20;

/// Errors of starting or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The hypervisor could not be spawned
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// The registry failed
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// The supervisor thread could not start
    #[error("starting the supervisor thread: {0}")]
    Thread(std::io::Error),
    /// The VM would not stop
    #[error("VM {0} did not exit after SIGKILL")]
    Unkillable(String),
}

/// The vmm binary: next to this executable, else on PATH.
fn vmm_program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vmm"))
}

/// Memory as QEMU's -m wants it (MiB), from "512M", "1G" or a MiB count.
fn mem_mib(m: &str) -> String {
    let t = m.trim().to_ascii_uppercase();
    if let Some(g) = t.strip_suffix('G').and_then(|g| g.parse::<u64>().ok()) {
        return (g * 1024).to_string();
    }
    t.trim_end_matches('M').to_string()
}

/// The hypervisor command line for `s`, agent socket and console log at the given paths.
pub fn command(s: &LaunchSpec, agent: &Path, console: &Path) -> Command {
    let base = "console=ttyS0 panic=-1 loglevel=4";
    match s.engine {
        Engine::Vmm => {
            let mut c = Command::new(vmm_program());
            c.arg("--kernel")
                .arg(&s.kernel)
                .arg("--initrd")
                .arg(&s.initrd)
                .arg("--disk")
                .arg(&s.disk)
                .args(["--memory", &s.memory, "--cpus", &s.cpus.to_string()])
                .arg("--agent-socket")
                .arg(agent)
                .arg("--console")
                .arg(console)
                .arg("--console-max")
                .arg(s.console_max.to_string())
                .args(s.disk_bw.iter().flat_map(|l| ["--disk-bw", l.as_str()]))
                .args(s.disk_iops.iter().flat_map(|l| ["--disk-iops", l.as_str()]))
                .arg("--cmdline")
                .arg(format!("{base} reboot=k pci=off {}", s.cmdline_extra));
            c
        }
        Engine::QemuKvm | Engine::QemuTcg => {
            let accel = if s.engine == Engine::QemuKvm {
                "kvm"
            } else {
                "tcg"
            };
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-accel", accel, "-M", "q35", "-m", &mem_mib(&s.memory)])
                .args(["-smp", &s.cpus.to_string()])
                .args(["-nodefaults", "-nographic", "-no-user-config", "-no-reboot"])
                .arg("-kernel")
                .arg(&s.kernel)
                .arg("-initrd")
                .arg(&s.initrd)
                .arg("-append")
                // Under software emulation on a loaded host the IO-APIC timer check can fail
                // and panic the guest; the check proves nothing about an emulated timer.
                .arg(format!("{base} no_timer_check {}", s.cmdline_extra))
                .arg("-chardev")
                // append: the daemon caps the file by copying it aside and truncating it
                .arg(format!("file,id=con,path={},append=on", console.display()))
                .args(["-device", "isa-serial,chardev=con"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    agent.display()
                ))
                .args(["-device", "isa-serial,chardev=agent"])
                .arg("-drive")
                // The mount serves O_DIRECT; bypassing QEMU's own host caching means a
                // substitution is seen on the next guest read. An I/O error (the instance
                // at its --max-bytes, the store at its reserve) goes to the guest, instead of
                // QEMU pausing the VM.
                .arg(format!(
                    "file={},if=none,id=d0,format=raw,cache=none,werror=report,rerror=report{}",
                    s.disk.display(),
                    qemu_throttling(s)
                ))
                .args(["-device", "virtio-blk-pci,drive=d0"]);
            c
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Spawns the VM as a child of this process, registers it and supervises it.
pub fn spawn(store: &Path, s: &LaunchSpec) -> Result<VmRecord, LaunchError> {
    let (agent, console) = registry::paths(store, &s.name);
    std::fs::create_dir_all(registry::dir(store)).map_err(|source| LaunchError::Spawn {
        program: "mkdir".into(),
        source,
    })?;
    let _ = std::fs::remove_file(&agent);
    let _ = std::fs::remove_file(&console);
    let err_log = console.with_extension("stderr.log");
    let stderr = std::fs::File::create(&err_log).map_err(|source| LaunchError::Spawn {
        program: err_log.display().to_string(),
        source,
    })?;
    let mut cmd = command(s, &agent, &console);
    // Own process group: a Ctrl-C meant for a foreground daemon does not kill its VMs.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .spawn()
        .map_err(|source| LaunchError::Spawn { program, source })?;
    let rec = VmRecord {
        name: s.name.clone(),
        instance: s.instance.clone(),
        hypervisor: s.engine.name().into(),
        pid: Some(child.id()),
        agent_socket: agent,
        console_log: console,
        state: VmState::Stopped.on(VmEvent::Spawned),
        started_at: now(),
        exit: None,
        kernel: s.kernel.clone(),
        initrd: s.initrd.clone(),
        disk: Some(s.disk.clone()),
    };
    if let Err(e) = registry::save(store, &rec) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e.into());
    }
    let running = Arc::new(AtomicBool::new(true));
    if s.engine != Engine::Vmm {
        // QEMU cannot cap its console file itself; the vmm does (--console-max).
        spawn_console_cap(&rec.console_log, s.console_max, running.clone())?;
    }
    let (store, name, pid) = (store.to_path_buf(), s.name.clone(), child.id());
    std::thread::Builder::new()
        .name(format!("vm-{name}"))
        .spawn(move || {
            let status = child.wait();
            running.store(false, Ordering::Relaxed);
            // Only the record of this very process: a restart under the same name keeps its own.
            if let Ok(mut r) = registry::load(&store, &name) {
                if r.pid == Some(pid) {
                    r.state = r.state.on(VmEvent::Exited);
                    r.exit = Some(match &status {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    });
                    if let Err(e) = registry::save(&store, &r) {
                        tracing::error!(vm = %name, error = %e, "cannot mark the VM stopped");
                    }
                }
            }
            tracing::info!(vm = %name, ?status, "VM exited");
        })
        .map_err(LaunchError::Thread)?;
    Ok(rec)
}

/// QEMU's drive throttling options for the spec's limits (same meaning as the vmm's buckets:
/// a rate per second, and a burst on top).
fn qemu_throttling(s: &LaunchSpec) -> String {
    let mut out = String::new();
    let parts = |l: &str| -> Option<(u64, Option<u64>)> {
        let (rate, burst) = match l.split_once(',') {
            Some((r, b)) => (r, Some(b)),
            None => (l, None),
        };
        let rate = crate::cli::parse_size(rate.trim().trim_end_matches("/s")).ok()?;
        let burst = burst.and_then(|b| crate::cli::parse_size(b.trim()).ok());
        Some((rate, burst))
    };
    for (spec, key) in [(&s.disk_bw, "bps-total"), (&s.disk_iops, "iops-total")] {
        if let Some((rate, burst)) = spec.as_deref().and_then(parts) {
            out.push_str(&format!(",throttling.{key}={rate}"));
            if let Some(b) = burst.filter(|&b| b > rate) {
                out.push_str(&format!(",throttling.{key}-max={b}"));
            }
        }
    }
    out
}

/// How often a QEMU console log's size is checked.
const CONSOLE_CHECK: Duration = Duration::from_millis(500);

/// While `running`, keeps `log` under `max` bytes: past it, its bytes are copied to LOG.1
/// (replacing the one before) and it is truncated (QEMU appends, so it writes on at the new
/// end). A guest writing without end overshoots by what it writes in one check period.
fn spawn_console_cap(log: &Path, max: u64, running: Arc<AtomicBool>) -> Result<(), LaunchError> {
    let log = log.to_path_buf();
    std::thread::Builder::new()
        .name("console-cap".into())
        .spawn(move || {
            while running.load(Ordering::Relaxed) {
                std::thread::sleep(CONSOLE_CHECK);
                if let Err(e) = cap_log(&log, max) {
                    tracing::warn!(log = %log.display(), error = %e, "capping a console log");
                }
            }
        })
        .map(drop)
        .map_err(LaunchError::Thread)
}

/// One capping step of `spawn_console_cap` (copy aside, then truncate).
pub fn cap_log(log: &Path, max: u64) -> std::io::Result<()> {
    if std::fs::metadata(log)?.len() <= max {
        return Ok(());
    }
    let mut old = log.as_os_str().to_os_string();
    old.push(".1");
    std::fs::copy(log, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers; the pid was checked live just before.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stops VM `rec`: asks its agent to power off, then SIGTERM after `grace`, then SIGKILL.
/// Returns how it went down ("agent", "sigterm", "sigkill", or "not running").
pub fn stop(store: &Path, rec: &VmRecord, grace: Duration) -> Result<&'static str, LaunchError> {
    if !registry::is_live(rec) {
        mark_stopped(store, rec)?;
        return Ok("not running");
    }
    let gone = |t: Duration| crate::vm::wait_for(t, || !registry::is_live(rec));
    let agent = AgentClient::new(&rec.agent_socket).with_timeout(Duration::from_secs(3));
    let how = if agent.shutdown().is_ok() && gone(grace) {
        "agent"
    } else {
        let pid = rec.pid.unwrap_or(0);
        signal(pid, libc::SIGTERM);
        if gone(grace) {
            "sigterm"
        } else {
            signal(pid, libc::SIGKILL);
            if !gone(Duration::from_secs(5)) {
                return Err(LaunchError::Unkillable(rec.name.clone()));
            }
            "sigkill"
        }
    };
    mark_stopped(store, rec)?;
    Ok(how)
}

/// Marks `rec` stopped unless a newer process took its name.
fn mark_stopped(store: &Path, rec: &VmRecord) -> Result<(), LaunchError> {
    let mut cur = registry::load(store, &rec.name)?;
    if cur.pid == rec.pid && cur.state == VmState::Running {
        cur.state = cur.state.on(VmEvent::Exited);
        cur.exit.get_or_insert_with(|| "stopped".into());
        registry::save(store, &cur)?;
    }
    Ok(())
}

/// Waits until `agent` answers a ping, or `timeout` passes.
pub fn wait_agent(agent: &Path, timeout: Duration) -> bool {
    use agent_proto::AgentLink;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if AgentClient::new(agent)
            .with_timeout(Duration::from_millis(1500))
            .ping()
            .is_ok()
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(engine: Engine) -> LaunchSpec {
        LaunchSpec {
            name: "web-1".into(),
            instance: "web-1".into(),
            disk: "/m/instances/web-1.raw".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            memory: "1G".into(),
            cpus: 2,
            engine,
            cmdline_extra: String::new(),
            console_max: 1 << 20,
            disk_bw: Some("50M/s,100M".into()),
            disk_iops: Some("2000".into()),
        }
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_console_log_past_its_cap_is_copied_aside_and_cut() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("web-1.console.log");
        std::fs::write(&log, vec![b'x'; 1000])?;
        cap_log(&log, 1000)?;
        assert_eq!(
            std::fs::metadata(&log)?.len(),
            1000,
            "at the cap: left alone"
        );
        std::fs::write(&log, vec![b'y'; 1001])?;
        cap_log(&log, 1000)?;
        assert_eq!(std::fs::metadata(&log)?.len(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("web-1.console.log.1"))?,
            vec![b'y'; 1001]
        );
        Ok(())
    }

    #[test]
    fn qemu_gets_the_disk_and_the_agent_on_com2() {
        let c = command(&spec(Engine::QemuTcg), Path::new("/s/a"), Path::new("/s/c"));
        let a = args(&c).join(" ");
        assert!(a.contains("-accel tcg -M q35 -m 1024"), "{a}");
        assert!(
            a.contains("socket,id=agent,path=/s/a,server=on,wait=off"),
            "{a}"
        );
        assert!(a.contains("file=/m/instances/web-1.raw,"), "{a}");
        assert!(a.contains(",werror=report,rerror=report"), "{a}");
        assert!(a.contains("file,id=con,path=/s/c,append=on"), "{a}");
        assert!(
            a.contains(",throttling.bps-total=52428800,throttling.bps-total-max=104857600,throttling.iops-total=2000"),
            "{a}"
        );
        // The agent's port is the second isa-serial (COM2), after the console.
        let con = a.find("chardev=con").unwrap();
        assert!(con < a.find("chardev=agent").unwrap());
        let v = command(&spec(Engine::Vmm), Path::new("/s/a"), Path::new("/s/c"));
        let a = args(&v).join(" ");
        assert!(a.contains("--disk /m/instances/web-1.raw"), "{a}");
        assert!(a.contains("--agent-socket /s/a"), "{a}");
        assert!(a.contains("--console-max 1048576"), "{a}");
        assert!(a.contains("--disk-bw 50M/s,100M --disk-iops 2000"), "{a}");
    }
}
