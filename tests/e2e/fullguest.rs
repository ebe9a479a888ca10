//! Scenario: a full Debian guest (debootstrap, systemd as pid 1) booted from a store instance
//! through the real mount. Our initramfs mounts the root read-only and hands pid 1 to
//! /sbin/init (`agent.init`); systemd starts the agent as its service. The agent answers in
//! service mode, a live substitution plus notice makes the guest read v2's bytes, and a
//! Shutdown powers the guest off through systemd. A hand-off to an init that is not there
//! leaves the agent serving as pid 1.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_proto::{AgentLink, Command as GuestCommand, ExecRequest};
use anyhow::{ensure, Context};
use imagefs_tests::qemu::{
    build_rootfs, console_log_path, file_blocks, fullguest_image, guest_artifacts, Disk, Qemu,
};
use imagefs_tests::{bin, is_root};
use serde_json::Value;

/// Software-emulated boot of kernel + systemd takes 10-60 s on a loaded 2-core host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const V1: &[u8] = b"app 1.0\n";
/// Same length as V1: only the file's data block changes.
const V2: &[u8] = b"app 2.0\n";

struct Env {
    store: PathBuf,
    mnt: PathBuf,
}

impl Env {
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(bin("imagefs"))
            .env("IMAGEFS_STORE", &self.store)
            .args(args)
            .output()
            .context("running imagefs")
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<Output> {
        let o = self.run(args)?;
        ensure!(
            o.status.success(),
            "imagefs {args:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(o)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["umount", &self.mnt.to_string_lossy()]);
    }
}

fn hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

fn exec(vm: &Qemu, argv: &[&str]) -> anyhow::Result<String> {
    let r = vm.agent(Duration::from_secs(60)).exec(ExecRequest {
        command: GuestCommand::Argv(argv.iter().map(|a| a.to_string()).collect()),
        timeout_ms: 30_000,
    })?;
    ensure!(r.exit_code == Some(0), "{argv:?} in the guest: {r:?}");
    Ok(r.stdout)
}

#[test]
fn a_hand_off_to_a_missing_init_leaves_the_agent_serving_as_pid_1() {
    let (kernel, initrd) = match guest_artifacts() {
        Ok(a) => a,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let root = build_rootfs(dir.path(), 16, &[("/opt/app/version", V1)]).unwrap();
    let sock = dir.path().join("vm.agent");
    let mut vm = Qemu::start(
        &kernel,
        &initrd,
        &[Disk::ro(&root)],
        &sock,
        "agent.init=/sbin/no-such-init",
    )
    .unwrap();
    let (pong, _) = vm.wait_agent(Duration::from_secs(60)).unwrap();
    let console = vm.console();
    assert!(pong.init_mode, "{pong:?}\n{console}");
    assert!(
        console.contains("/sbin/no-such-init did not start") && console.contains("serving instead"),
        "{console}"
    );
    // It still serves from the switched root, with the initramfs emptied.
    let agent = vm.agent(Duration::from_secs(20));
    assert_eq!(agent.hash("/opt/app/version").unwrap().blake3, hex(V1));
    assert!(console.contains("initramfs emptied"), "{console}");
    agent.shutdown().unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "guest did not power off"
    );
}

#[test]
fn full_debian_guest_runs_the_agent_under_systemd_and_takes_a_live_substitution() {
    if !is_root() {
        imagefs_tests::skip!("FUSE mounts need root here");
    }
    let (kernel, initrd) = match guest_artifacts() {
        Ok(a) => a,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    let image = match fullguest_image() {
        Ok(i) => i,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fullguest.agent");
    if let Err(e) = scenario(dir.path(), &kernel, &initrd, &image, &sock) {
        let console = std::fs::read_to_string(console_log_path(&sock)).unwrap_or_default();
        panic!("{e:#}\n--- guest console ---\n{console}");
    }
}

fn scenario(
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    image: &Path,
    sock: &Path,
) -> anyhow::Result<()> {
    // v2: the image with /opt/app/version rewritten in its own block (found with debugfs), so
    // every other block stays identical.
    let block = *file_blocks(image, "/opt/app/version")?
        .first()
        .context("no block")?;
    let v2 = dir.join("fullguest-v2.img");
    std::fs::copy(image, &v2)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&v2)?
        .write_all_at(V2, block * 4096)?;
    let host_v1 = imagefs_tests::tool_command("debugfs")
        .args(["-R", "cat /opt/app/version"])
        .arg(image)
        .output()?
        .stdout;
    ensure!(host_v1 == V1, "the image's /opt/app/version is {host_v1:?}");

    let env = Env {
        store: dir.join("store"),
        mnt: dir.join("mnt"),
    };
    std::fs::create_dir_all(&env.mnt)?;
    env.ok(&["init"])?;
    let t = Instant::now();
    for (img, tag) in [(image, "deb:v1"), (v2.as_path(), "deb:v2")] {
        let path = img.to_str().context("path")?;
        env.ok(&["import", path, tag, "--block-size", "4096"])?;
    }
    eprintln!("imported v1 and v2 in {:.1}s", t.elapsed().as_secs_f64());
    env.ok(&["mount", env.mnt.to_str().context("path")?, "--daemon"])?;
    env.ok(&["instance", "create", "deb:v1", "deb-1"])?;
    let disk = env.mnt.join("instances/deb-1.raw");

    let mut vm = Qemu::start(
        kernel,
        initrd,
        &[Disk::ro(&disk)],
        sock,
        "agent.init=/sbin/init",
    )?;
    let (pong, ready) = vm.wait_agent(BOOT_TIMEOUT)?;
    eprintln!("full guest (systemd) to agent-ready under QEMU TCG: {ready:?}");
    ensure!(
        vm.console().contains("handing pid 1 to /sbin/init"),
        "the initramfs agent did not hand off"
    );
    ensure!(
        !pong.init_mode,
        "the agent should run as a service: {pong:?}"
    );
    let root = pong
        .mounts
        .iter()
        .find(|m| m.mountpoint == "/")
        .context("no root mount")?;
    ensure!(
        root.device == "/dev/vda" && root.read_only,
        "root must be /dev/vda read-only: {root:?}"
    );

    ensure!(exec(&vm, &["cat", "/proc/1/comm"])? == "systemd\n");
    ensure!(exec(&vm, &["systemctl", "is-active", "guest-agent"])? == "active\n");
    // Nothing failed or hangs: the boot finishes (a masked unit coming back would show here).
    let t = Instant::now();
    let state = vm
        .agent(Duration::from_secs(150))
        .exec(ExecRequest {
            command: GuestCommand::Shell("systemctl is-system-running --wait".into()),
            timeout_ms: 120_000,
        })?
        .stdout;
    if state != "running\n" {
        let failed = exec(&vm, &["systemctl", "--failed", "--no-pager"]).unwrap_or_default();
        let jobs = exec(&vm, &["systemctl", "list-jobs", "--no-pager"]).unwrap_or_default();
        anyhow::bail!("system state {state:?}; failed units:\n{failed}\njobs:\n{jobs}");
    }
    let analyze = exec(&vm, &["systemd-analyze"]).unwrap_or_default();
    eprintln!(
        "systemd finished ({:.1}s more): {}",
        t.elapsed().as_secs_f64(),
        analyze.lines().next().unwrap_or_default()
    );

    let agent = vm.agent(Duration::from_secs(30));
    ensure!(agent.hash("/opt/app/version")?.blake3 == hex(V1));

    // Live change: the instance moves to v2 (no VM is registered, so the guest is not told) ...
    let out = env.ok(&["substitute", "deb-1", "deb:v2"])?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(said.contains("not told"), "substitute: {said}");
    ensure!(
        agent.hash("/opt/app/version")?.blake3 == hex(V1),
        "the guest's page cache should still hold v1 before the notice"
    );
    // ... until the notice names the changed ranges and files.
    let diff = env.ok(&["diff", "deb:v1", "deb:v2", "--files", "--json"])?;
    let result: Value = String::from_utf8_lossy(&diff.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .next_back()
        .context("no diff result")?;
    ensure!(
        result["files"] == serde_json::json!(["/opt/app/version"]),
        "{result}"
    );
    let mut notice = vec![
        "agent",
        "notice",
        "--socket",
        sock.to_str().context("path")?,
    ];
    let ranges: Vec<String> = result["ranges"]
        .as_array()
        .context("no ranges")?
        .iter()
        .map(|r| format!("{}:{}", r[0], r[1]))
        .collect();
    for r in &ranges {
        notice.extend(["--range", r]);
    }
    notice.extend(["--file", "/opt/app/version"]);
    if result["metadata_changed"] == true {
        notice.push("--metadata-changed");
    }
    let t = Instant::now();
    env.ok(&notice)?;
    eprintln!(
        "notice round trip through systemd's agent: {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    ensure!(
        agent.hash("/opt/app/version")?.blake3 == hex(V2),
        "after the notice the guest must read v2's bytes"
    );

    // Shutdown goes through systemd: units stop, then the machine powers off.
    let t = Instant::now();
    agent.shutdown()?;
    ensure!(
        vm.wait_exit(Duration::from_secs(120)),
        "guest did not power off after Shutdown"
    );
    ensure!(
        vm.console().contains("Reached target") && vm.console().contains("System Power Off"),
        "the power-off did not go through systemd"
    );
    eprintln!("shutdown to QEMU exit: {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}
