//! Boots the guest kernel and initramfs under QEMU (software emulation, q35) with the agent channel
//! on a Unix socket, for tests that need a real guest (several at once is fine).
//! Invariant: a `Qemu` value owns its QEMU process; dropping it kills and reaps QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_proto::{AgentClient, AgentLink, Pong};
use anyhow::{bail, Context};

use crate::workspace_root;

/// A disk attached as virtio-blk-pci: the guest sees them as /dev/vda, /dev/vdb, ... in order.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// QEMU cache mode: "none" (O_DIRECT, the default) or e.g. "writeback".
    pub cache: &'static str,
}

impl Disk {
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            cache: "none",
        }
    }

    pub fn ro(path: impl Into<PathBuf>) -> Self {
        Self {
            read_only: true,
            ..Self::rw(path)
        }
    }
}

/// The guest kernel and initramfs that `make guest` builds, once QEMU and e2fsprogs (which the
/// guest tests use to build root disks) are here.
pub fn guest_artifacts() -> Result<(PathBuf, PathBuf), String> {
    let guest = workspace_root().join("target/guest");
    let kernel = guest.join("kernel/vmlinuz");
    let initrd = guest.join("initramfs.cpio.gz");
    for p in [&kernel, &initrd] {
        if !p.exists() {
            return Err(format!("{} missing (run make guest)", p.display()));
        }
    }
    if !has_program("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 not installed (run make setup)".into());
    }
    // The guest tests build their root disks with mkfs.ext4 and find blocks with debugfs.
    if let Some(why) = crate::missing_tools(&["mkfs.ext4", "debugfs"]) {
        return Err(why);
    }
    Ok((kernel, initrd))
}

/// The full Debian guest's root disk that `make fullguest` builds (scripts/build-fullguest.sh):
/// systemd as its init, the agent as its service. An image older than what it is built from
/// (the agent binary, the script, the unit) is refused, so a test never boots a stale agent.
pub fn fullguest_image() -> Result<PathBuf, String> {
    let root = workspace_root();
    let image = root.join("target/guest/fullguest.img");
    let built = std::fs::metadata(&image)
        .and_then(|m| m.modified())
        .map_err(|_| {
            format!(
                "{} missing (run make fullguest: debootstrap from the Debian archive, as root)",
                image.display()
            )
        })?;
    for input in [
        "target/x86_64-unknown-linux-gnu/release/guest-agent",
        "scripts/build-fullguest.sh",
        "guest-agent/guest-agent.service",
    ] {
        let changed = std::fs::metadata(root.join(input)).and_then(|m| m.modified());
        if changed.is_ok_and(|t| t > built) {
            return Err(format!(
                "{} is older than {input} (run make fullguest)",
                image.display()
            ));
        }
    }
    Ok(image)
}

/// Where `Qemu::start` writes the console (ttyS0) of the guest whose agent socket is `agent_socket`.
pub fn console_log_path(agent_socket: &Path) -> PathBuf {
    agent_socket.with_extension("console.log")
}

/// True when `name` runs (found on PATH).
pub fn has_program(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A running QEMU guest.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    started: Instant,
    agent_socket: PathBuf,
    console_log: PathBuf,
}

impl Qemu {
    /// Starts QEMU: console (ttyS0) to `<agent_socket>.console.log`, the agent channel (ttyS1)
    /// on `agent_socket`, `disks` as virtio-blk-pci, `cmdline_extra` appended to the kernel's.
    pub fn start(
        kernel: &Path,
        initrd: &Path,
        disks: &[Disk],
        agent_socket: &Path,
        cmdline_extra: &str,
    ) -> anyhow::Result<Qemu> {
        let console_log = console_log_path(agent_socket);
        let _ = std::fs::remove_file(agent_socket);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-M", "q35", "-m", "512", "-smp", "1"])
            .args(["-nodefaults", "-nographic", "-no-user-config", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                // no_timer_check: a loaded host can make TCG fail the IO-APIC timer check.
                "console=ttyS0 panic=-1 loglevel=4 no_timer_check {cmdline_extra}"
            ))
            .arg("-chardev")
            .arg(format!("file,id=con,path={}", console_log.display()))
            .args(["-device", "isa-serial,chardev=con"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_socket.display()
            ))
            .args(["-device", "isa-serial,chardev=agent"]);
        for (i, d) in disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=d{i},format=raw,cache={}{ro}",
                    d.path.display(),
                    d.cache
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=d{i}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        Ok(Qemu {
            child,
            started,
            agent_socket: agent_socket.to_path_buf(),
            console_log,
        })
    }

    /// A client for this guest's agent with a per-call deadline.
    pub fn agent(&self, timeout: Duration) -> AgentClient {
        AgentClient::new(&self.agent_socket).with_timeout(timeout)
    }

    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// Pings until the agent answers; returns the answer and the time since QEMU started.
    pub fn wait_agent(&mut self, timeout: Duration) -> anyhow::Result<(Pong, Duration)> {
        // Until the agent says on the console that it serves, requests are lost rather than
        // queued: retry briefly; after that, give a slow (emulated, loaded) guest time to answer.
        let deadline = Instant::now() + timeout;
        loop {
            let serving = self.console().contains("guest-agent: ready");
            let attempt = Duration::from_millis(if serving { 5000 } else { 250 });
            if let Ok(p) = self.agent(attempt).ping() {
                return Ok((p, self.started.elapsed()));
            }
            if !self.is_running() {
                bail!("QEMU exited before the agent answered:\n{}", self.console());
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent did not answer within {timeout:?}; console:\n{}",
                    self.console()
                );
            }
        }
    }

    /// The guest console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for QEMU to exit by itself (the guest powered off); true when it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        crate::wait_until(timeout, || !self.is_running())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes an ext4 image of `size_mb` from a root tree holding a static busybox (with the applets
/// tests use), the directories the agent switches into, and `files` (guest path, contents).
/// Block size 4096, so one small file is one block.
pub fn build_rootfs(
    workdir: &Path,
    size_mb: u64,
    files: &[(&str, &[u8])],
) -> anyhow::Result<PathBuf> {
    let tree = workdir.join("rootfs");
    for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "etc"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("copying /bin/busybox (install busybox-static)")?;
    for applet in [
        "sh", "sleep", "cat", "echo", "ls", "true", "false", "mount", "umount", "sync", "head",
        "ps",
    ] {
        let link = tree.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    for (path, contents) in files {
        let p = tree.join(path.trim_start_matches('/'));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, contents)?;
        if path.contains("/bin/") || path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let image = workdir.join("rootfs.ext4");
    let out = crate::tool_command("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg(format!("{size_mb}M"))
        .output()
        .context("running mkfs.ext4")?;
    if !out.status.success() {
        bail!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(image)
}

/// The filesystem blocks of `path` inside an ext4 image (debugfs `blocks`).
pub fn file_blocks(image: &Path, path: &str) -> anyhow::Result<Vec<u64>> {
    let out = crate::tool_command("debugfs")
        .arg("-R")
        .arg(format!("blocks {path}"))
        .arg(image)
        .output()
        .context("running debugfs")?;
    let blocks: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if blocks.is_empty() {
        bail!(
            "debugfs found no blocks for {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(blocks)
}
