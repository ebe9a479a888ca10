//! Scenario: scripted rollouts into live QEMU guests through the real mount. Three VMs started by
//! `imagefs vm start` from app:v1; app:v2 and app:v3 are v1 patched in place (dd at the file's
//! blocks), so only /opt/app/version's block differs. A rollout in two waves reaches every guest
//! (their hash of the file equals the target's, a process holding the old file is reported); a
//! health check failing in the second wave rolls back that wave, or every wave; a rollout killed
//! with -9 mid-wave is resumed to the end.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use imagefs_tests::qemu::{build_rootfs, file_blocks, guest_artifacts};
use imagefs_tests::{bin, is_root, wait_until};
use serde_json::Value;

const VMS: [&str; 3] = ["web-1", "web-2", "web-3"];
/// Fails while /dev/app-broken exists in the guest (/dev is the guest's only writable tree).
const CHECK: &[u8] = b"#!/bin/sh\n[ ! -e /dev/app-broken ]\n";

struct Env {
    store: PathBuf,
    mnt: PathBuf,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("imagefs"));
        c.env("IMAGEFS_STORE", &self.store).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let o = self.cmd(args).output().context("running imagefs")?;
        Ok(o)
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = self.run(args)?;
        ensure!(
            o.status.success(),
            "imagefs {args:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The guest's blake3 of the app's version file.
    fn guest_hash(&self, vm: &str) -> anyhow::Result<String> {
        Ok(self
            .ok(&["agent", "hash", "--vm", vm, "/opt/app/version"])?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let mut stop = vec!["vm", "stop", "--timeout", "3"];
        stop.extend(VMS);
        let _ = self.run(&stop);
        let _ = self.run(&["umount", self.mnt.to_str().unwrap_or_default()]);
    }
}

fn events(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// Patches `contents` over the file's first block in a copy of `v1`.
fn patched(v1: &Path, out: &Path, block: u64, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::copy(v1, out)?;
    let f = std::fs::OpenOptions::new().write(true).open(out)?;
    f.write_all_at(contents, block * 4096)?;
    Ok(())
}

#[test]
fn rollout_in_waves_health_rollback_and_resume_in_live_guests() {
    if !is_root() {
        imagefs_tests::skip!("FUSE mounts need root here");
    }
    let (kernel, initrd) = match guest_artifacts() {
        Ok(a) => a,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    scenario(&kernel, &initrd).unwrap_or_else(|e| panic!("{e:#}"));
}

fn scenario(kernel: &Path, initrd: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    // Only the store's own protections count (checked below): its parent is open to all.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let (v1b, v2b, v3b) = (b"app 1.0\n", b"app 2.0\n", b"app 3.0\n");
    let v1 = build_rootfs(
        dir.path(),
        32,
        &[("/opt/app/version", v1b), ("/opt/app/bin/check", CHECK)],
    )?;
    let block = *file_blocks(&v1, "/opt/app/version")?
        .first()
        .context("no block")?;
    let (v2, v3) = (dir.path().join("v2.img"), dir.path().join("v3.img"));
    patched(&v1, &v2, block, v2b)?;
    patched(&v1, &v3, block, v3b)?;
    let env = Env {
        store: dir.path().join("store"),
        mnt: dir.path().join("mnt"),
    };
    std::fs::create_dir_all(&env.mnt)?;
    env.ok(&["init"])?;
    for (img, tag) in [(&v1, "app:v1"), (&v2, "app:v2"), (&v3, "app:v3")] {
        env.ok(&[
            "import",
            img.to_str().context("path")?,
            tag,
            "--block-size",
            "4096",
        ])?;
    }
    env.ok(&["mount", env.mnt.to_str().context("path")?, "--daemon"])?;
    let mut start = vec![
        "vm",
        "start",
        "app:v1",
        "--hypervisor",
        "auto",
        "--wait",
        "90",
    ];
    let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
    start.extend(["--kernel", &k, "--initrd", &i]);
    start.extend(VMS);
    env.ok(&start)?;
    eprintln!("3 VMs up in {:.1}s", t0.elapsed().as_secs_f64());
    // No other local user reads a guest's console or reaches its agent (a root shell in it).
    let vms = env.store.join("vms");
    imagefs_tests::assert_nobody_is_refused(
        &[
            &vms.join("web-1.console.log"),
            &env.mnt.join("instances/web-1.raw"),
        ],
        &[&vms.join("web-1.agent")],
    );
    // A process in web-1 holds the old file open across the substitution.
    env.ok(&[
        "agent",
        "exec",
        "--vm",
        "web-1",
        "--shell",
        "sleep 1000 < /opt/app/version &",
    ])?;

    // 1. app:v2 in two waves: every guest reads v2's bytes; the holder is reported.
    let t = Instant::now();
    let out = env.ok(&[
        "rollout",
        "app:v2",
        "--instances",
        "web-*",
        "--waves",
        "1,100%",
        "--health-cmd",
        "/opt/app/bin/check",
        "--json",
    ])?;
    eprintln!(
        "rollout of app:v2 to 3 live VMs: {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let ev = events(&out);
    let plan = ev
        .iter()
        .find(|e| e["event"] == "plan")
        .context("no plan event")?;
    ensure!(
        plan["waves"] == serde_json::json!([["web-1"], ["web-2", "web-3"]]),
        "{plan}"
    );
    ensure!(
        plan["files"] == serde_json::json!(["/opt/app/version"]),
        "{plan}"
    );
    let sub1 = ev
        .iter()
        .find(|e| e["event"] == "substituted" && e["instance"] == "web-1")
        .context("web-1 not substituted")?;
    ensure!(sub1["guest"] == "told", "{sub1}");
    let holders = sub1["processes"].as_array().context("no processes")?;
    ensure!(
        holders
            .iter()
            .any(|p| p["comm"] == "sleep" && p["file"] == "/opt/app/version"),
        "the process holding the old file is not reported: {sub1}"
    );
    ensure!(
        ev.iter().filter(|e| e["event"] == "wave_healthy").count() == 2,
        "{out}"
    );
    let last = ev.last().context("no result")?;
    ensure!(
        last["type"] == "result" && last["state"] == "completed",
        "{last}"
    );
    for vm in VMS {
        ensure!(env.guest_hash(vm)? == hash(v2b), "{vm} does not read v2");
    }
    let ls = events(&env.ok(&["vm", "ls", "--json"])?);
    ensure!(ls.len() == 3, "{ls:?}");
    for v in &ls {
        ensure!(
            v["state"] == "running" && v["tags"] == serde_json::json!(["app:v2"]),
            "{v}"
        );
    }

    // 2. app:v3, the second wave's health check fails on web-3: that wave goes back to v2.
    env.ok(&[
        "agent",
        "exec",
        "--vm",
        "web-3",
        "--shell",
        "touch /dev/app-broken",
    ])?;
    let o = env.run(&[
        "rollout",
        "app:v3",
        "--instances",
        "web-*",
        "--waves",
        "1,100%",
        "--health-cmd",
        "/opt/app/bin/check",
        "--json",
    ])?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.code() == Some(1),
        "a failed wave must exit 1: {out}"
    );
    let ev = events(&out);
    ensure!(
        ev.iter()
            .any(|e| e["event"] == "wave_failed" && e["wave"] == 2),
        "{out}"
    );
    for (vm, want) in [("web-1", v3b), ("web-2", v2b), ("web-3", v2b)] {
        ensure!(
            env.guest_hash(vm)? == hash(want),
            "{vm} after rollback-wave:\n{out}"
        );
    }

    // 3. The same with --on-failure rollback-all: web-1 goes back to v2 as well.
    env.ok(&["rollout", "app:v2", "--instances", "web-1"])?;
    let o = env.run(&[
        "rollout",
        "app:v3",
        "--instances",
        "web-*",
        "--waves",
        "1,100%",
        "--health-cmd",
        "/opt/app/bin/check",
        "--on-failure",
        "rollback-all",
    ])?;
    ensure!(o.status.code() == Some(1), "{o:?}");
    for vm in VMS {
        ensure!(env.guest_hash(vm)? == hash(v2b), "{vm} after rollback-all");
    }
    env.ok(&[
        "agent",
        "exec",
        "--vm",
        "web-3",
        "--shell",
        "rm /dev/app-broken",
    ])?;

    // 4. kill -9 during the first wave's (slow) health check, then --resume finishes it.
    let mut child = env
        .cmd(&[
            "rollout",
            "app:v1",
            "--instances",
            "web-*",
            "--waves",
            "1,100%",
            "--health-cmd",
            "sleep 3; /opt/app/bin/check",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut id = String::new();
    for line in lines.by_ref() {
        let v: Value = serde_json::from_str(&line?)?;
        id = v["rollout"].as_str().unwrap_or_default().to_string();
        if v["event"] == "substituted" {
            break;
        }
    }
    child.kill()?;
    child.wait()?;
    let st: Value = serde_json::from_str(env.ok(&["rollout", "status", &id, "--json"])?.trim())?;
    ensure!(
        st["state"] == "interrupted" && st["done"] == serde_json::json!(["web-1"]),
        "{st}"
    );
    ensure!(
        env.guest_hash("web-2")? == hash(v2b),
        "web-2 moved before its wave"
    );
    env.ok(&["rollout", "--resume", &id])?;
    for vm in VMS {
        ensure!(env.guest_hash(vm)? == hash(v1b), "{vm} after resume");
    }
    let st: Value = serde_json::from_str(env.ok(&["rollout", "status", &id, "--json"])?.trim())?;
    ensure!(st["state"] == "completed", "{st}");
    ensure!(env.ok(&["rollout", "ls"])?.lines().count() == 5);

    // 5. web-2's disk was written where the patch changes it (as a guest write would): the
    // rollout skips it and exits 4, the dry run says so first; --abort puts web-1 back.
    {
        use std::os::unix::fs::FileExt;
        let disk = env.mnt.join("instances/web-2.raw");
        let f = std::fs::OpenOptions::new().write(true).open(&disk)?;
        f.write_all_at(b"app 9.0\n", block * 4096)?;
        f.sync_all()?;
    }
    let args = ["rollout", "app:v2", "--instances", "web-1,web-2", "--json"];
    let o = env.run(&[&args[..], &["--dry-run"]].concat())?;
    let dry = events(&String::from_utf8_lossy(&o.stdout));
    ensure!(o.status.code() == Some(4), "dry run: {dry:?}");
    ensure!(
        dry.last()
            .is_some_and(|d| d["conflicts"] == serde_json::json!(["web-2"])),
        "{dry:?}"
    );
    ensure!(
        env.guest_hash("web-1")? == hash(v1b),
        "the dry run changed web-1"
    );
    let o = env.run(&args)?;
    let ev = events(&String::from_utf8_lossy(&o.stdout));
    ensure!(o.status.code() == Some(4), "conflicts must exit 4: {ev:?}");
    ensure!(
        ev.iter()
            .any(|e| e["event"] == "conflict" && e["instance"] == "web-2"),
        "{ev:?}"
    );
    ensure!(env.guest_hash("web-1")? == hash(v2b), "web-1 not on v2");
    let id = ev
        .last()
        .and_then(|e| e["id"].as_str())
        .context("no id")?
        .to_string();
    env.ok(&["rollout", "--abort", &id])?;
    ensure!(
        env.guest_hash("web-1")? == hash(v1b),
        "web-1 not back on v1 after --abort"
    );
    env.ok(&["rollout", "app:v2", "--instances", "web-2", "--force"])?;
    ensure!(
        env.guest_hash("web-2")? == hash(v2b),
        "--force did not take the patch's block"
    );
    ensure!(
        env.ok(&["vm", "logs", "web-1"])?.contains("guest-agent"),
        "no console log"
    );

    // A VM that exits is shown stopped.
    env.ok(&["vm", "stop", "web-3"])?;
    ensure!(
        wait_until(Duration::from_secs(10), || env
            .ok(&["vm", "ls"])
            .map(|o| o.lines().any(|l| l.starts_with("web-3\tstopped")))
            .unwrap_or(false)),
        "web-3 not shown stopped"
    );
    eprintln!("rollout scenario took {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
