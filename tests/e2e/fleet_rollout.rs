//! Scenario: fleet rollouts (issue 13) across hosts that are network namespaces on one bridge
//! (tests/netns.rs). An operator namespace holds the operator's store (the fleet CA, app:v1 and
//! app:v2, the inventory); three host namespaces h1..h3 each hold a store with app:v1, a daemon
//! `imagefs mount --listen IP:7443 --tls-dir DIR` started inside the namespace (so the QEMU it
//! starts runs there too) and one live guest on instance web-1. app:v2 is app:v1 with the block of
//! /opt/app/version patched, so a rollout changes one 4 KiB block per host.
//!
//! - With a remote (Garage in its own namespace; the operator pushed app:v2; the hosts pull):
//!   `rollout --hosts 'h*' --waves 1,100% --by host`, h3's link cut mid wave 1 (when h1 has
//!   substituted, before its 1 s health check ends), so wave 2 finds h3 cut: h3 is reported
//!   unreachable, h1 and h2 stay on v2, exit 1, state interrupted, h3/web-1 pending;
//!   `fleet status --timeout 3s` meanwhile answers in time and marks h3; with the link back,
//!   `--resume` exits 0 and every guest reads v2 without a reboot, each host having fetched
//!   exactly the changed block.
//! - Without a remote (the driver uploads bundles): an operator store lacking the hosts' base is
//!   refused with exit 3 before any step; kill -9 of the driver after its first substitution,
//!   then `--resume`, completes with each host fed by a bundle and every guest reading v2.
//! - The harness itself: namespaces talk over the bridge, the root namespace has no address on
//!   it, a cut link stops traffic and a restored one carries it again, drop removes everything.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use imagefs_tests::garage::{self, Garage};
use imagefs_tests::netns::{self, Net, NsHost};
use imagefs_tests::qemu::{build_rootfs, file_blocks, guest_artifacts};
use imagefs_tests::{bin, skip, wait_until};
use serde_json::{json, Value};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const PORT: u16 = 7443;
/// The health check the rollouts run in each guest.
const CHECK: &[u8] = b"#!/bin/sh\n[ -r /opt/app/version ]\n";
const DAEMON_LOG: &str = "warn,imagefs::daemon::tls=info,sled=off,fuser::session=error";
/// No step of a scenario may take longer (a hung driver or daemon fails the test instead).
const STEP: Duration = Duration::from_secs(120);

/// `imagefs --store STORE ARGS` as users run it here (AWS_CA_BUNDLE set, as on these machines;
/// no AWS keys in the environment), behind `prefix` (nsenter into a namespace, or nothing).
fn imagefs_in(prefix: &[OsString], store: &Path, args: &[&str]) -> Command {
    let mut c = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin("imagefs"));
            c
        }
        None => Command::new(bin("imagefs")),
    };
    c.arg("--store").arg(store).args(args);
    c.env("AWS_CA_BUNDLE", "/nonexistent/imagefs-test-ca.pem")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("IMAGEFS_FAULT")
        .env_remove("IMAGEFS_STORE")
        .stdin(Stdio::null());
    c
}

fn output(mut c: Command) -> anyhow::Result<Output> {
    c.output().context("spawning imagefs")
}

/// Exit 0, or an error with what it printed.
fn ok(c: Command) -> anyhow::Result<String> {
    let desc = format!("{c:?}");
    let o = output(c)?;
    ensure!(
        o.status.success(),
        "{desc} failed ({:?}):\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_ref()))
}

/// The images every scenario uses, built once per scenario (a few seconds).
struct Images {
    v1: PathBuf,
    v2: PathBuf,
    v1_bytes: &'static [u8],
    v2_bytes: &'static [u8],
    /// 4 KiB blocks in which v2 differs from v1 (the bytes a host must receive).
    changed_blocks: u64,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Images {
    fn build(dir: &Path, mib: u64, kernel: PathBuf, initrd: PathBuf) -> anyhow::Result<Images> {
        let (v1_bytes, v2_bytes): (&'static [u8], &'static [u8]) = (b"app 1.0\n", b"app 2.0\n");
        let v1 = build_rootfs(
            dir,
            mib,
            &[
                ("/opt/app/version", v1_bytes),
                ("/opt/app/bin/check", CHECK),
            ],
        )?;
        let block = *file_blocks(&v1, "/opt/app/version")?
            .first()
            .context("no block")?;
        let v2 = dir.join("v2.img");
        {
            use std::os::unix::fs::FileExt;
            std::fs::copy(&v1, &v2)?;
            let f = std::fs::OpenOptions::new().write(true).open(&v2)?;
            f.write_all_at(v2_bytes, block * 4096)?;
        }
        let (a, b) = (std::fs::read(&v1)?, std::fs::read(&v2)?);
        let changed_blocks = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .filter(|(x, y)| x != y)
            .count() as u64;
        ensure!(changed_blocks == 1, "{changed_blocks} blocks changed");
        Ok(Images {
            v1,
            v2,
            v1_bytes,
            v2_bytes,
            changed_blocks,
            kernel,
            initrd,
        })
    }
}

/// One host namespace: its store, its mount and daemon (a child of the test, in the namespace),
/// and the live guest on web-1. Drop stops the guest, unmounts, and ends the daemon.
struct Host {
    ns: NsHost,
    store: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
    daemon: Option<Child>,
}

impl Host {
    fn addr(&self) -> String {
        format!("{}:{PORT}", self.ns.ip)
    }

    /// imagefs on this host's store from the root namespace (local files, or the daemon's
    /// control socket, which is a file and so reachable from any network namespace).
    fn local(&self, args: &[&str]) -> Command {
        imagefs_in(&[], &self.store, args)
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts `imagefs mount MNT --listen IP:7443 --tls-dir TLS` inside the namespace and waits
    /// until it is mounted and its listener takes connections from `probe`'s namespace.
    fn start_daemon(&mut self, tls: &Path, probe: &NsHost) -> anyhow::Result<()> {
        let log = std::fs::File::create(&self.log)?;
        let mnt = self.mnt.to_str().context("path")?.to_string();
        let tls = tls.to_str().context("path")?.to_string();
        let addr = self.addr();
        let mut c = imagefs_in(
            &self.ns.prefix(),
            &self.store,
            &["mount", &mnt, "--listen", &addr, "--tls-dir", &tls],
        );
        c.env("IMAGEFS_LOG", DAEMON_LOG)
            .stdout(Stdio::null())
            .stderr(log);
        self.daemon = Some(c.spawn().context("spawning the daemon")?);
        ensure!(
            wait_until(Duration::from_secs(20), || is_mounted(&self.mnt)
                && probe.can_connect(&addr)),
            "{}'s daemon did not come up: {}",
            self.ns.name,
            self.daemon_log()
        );
        Ok(())
    }

    /// The guest's blake3 of /opt/app/version (read by the guest through its own disk).
    fn guest_hash(&self) -> anyhow::Result<String> {
        Ok(
            ok(self.local(&["agent", "hash", "--vm", "web-1", "/opt/app/version"]))?
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        )
    }

    /// The guest kernel's boot id: it changes on every boot, so an equal one means no reboot.
    fn boot_id(&self) -> anyhow::Result<String> {
        let id = ok(self.local(&[
            "agent",
            "exec",
            "--vm",
            "web-1",
            "--",
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ]))?
        .trim()
        .to_string();
        ensure!(id.len() == 36, "not a boot id: {id:?}");
        Ok(id)
    }

    /// The version web-1 runs, as the host's daemon says.
    fn base(&self) -> anyhow::Result<String> {
        let out = ok(self.local(&["--json", "instance", "ls"]))?;
        json_lines(&out)
            .iter()
            .find(|v| v["instance"] == "web-1")
            .and_then(|v| v["base"].as_str().map(str::to_string))
            .with_context(|| format!("no web-1 in {out}"))
    }

    /// The version ids in the host's store.
    fn versions(&self) -> anyhow::Result<Vec<String>> {
        let out = ok(self.local(&["--json", "ls"]))?;
        let r = json_lines(&out).pop().context("no ls result")?;
        let mut v: Vec<String> = r["versions"]
            .as_array()
            .context("no versions")?
            .iter()
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .collect();
        v.sort();
        Ok(v)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self
            .local(&["vm", "stop", "--timeout", "3", "web-1"])
            .output();
        let _ = self
            .local(&["umount", self.mnt.to_str().unwrap_or_default()])
            .output();
        if let Some(mut c) = self.daemon.take() {
            if !wait_until(Duration::from_secs(10), || {
                c.try_wait().ok().flatten().is_some()
            }) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            if let Ok(c) = std::ffi::CString::new(self.mnt.to_string_lossy().as_bytes()) {
                // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// The operator: its namespace and store.
struct Operator {
    ns: NsHost,
    store: PathBuf,
}

impl Operator {
    /// imagefs on the operator's store, run inside the operator's namespace.
    fn cmd(&self, args: &[&str]) -> Command {
        imagefs_in(&self.ns.prefix(), &self.store, args)
    }

    /// `fleet status --json --timeout T`: its result, exit code and how long it took.
    fn status(&self, timeout: &str) -> anyhow::Result<(Value, i32, Duration)> {
        let start = Instant::now();
        let mut child = self
            .cmd(&["--json", "fleet", "status", "--timeout", timeout])
            .stdout(Stdio::piped())
            .spawn()?;
        let done = wait_until(Duration::from_secs(30), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !done {
            let _ = child.kill();
        }
        let out = child.wait_with_output()?;
        let took = start.elapsed();
        ensure!(
            done,
            "fleet status --timeout {timeout} still ran after {took:?}"
        );
        let r = json_lines(&String::from_utf8_lossy(&out.stdout))
            .pop()
            .unwrap_or(Value::Null);
        Ok((r, out.status.code().unwrap_or(-1), took))
    }
}

/// A rollout driver running in the operator's namespace, its JSON lines read as they come.
struct Driver {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<Value>,
    stderr: PathBuf,
}

impl Driver {
    fn spawn(mut c: Command, stderr: PathBuf) -> anyhow::Result<Driver> {
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Driver {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
        })
    }

    fn context(&self) -> String {
        format!(
            "driver output so far:\n{}\nits stderr:\n{}",
            self.seen
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Reads lines until one satisfies `want`, which it returns.
    fn until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let Ok(v) = serde_json::from_str::<Value>(&l) else {
                        continue;
                    };
                    self.seen.push(v.clone());
                    if want(&v) {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no {what} within {STEP:?}; {}", self.context())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the driver ended before {what}; {}", self.context())
                }
            }
        }
    }

    /// Reads to the end and waits: the exit code and every JSON line.
    fn finish(mut self) -> anyhow::Result<(i32, Vec<Value>)> {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&l) {
                        self.seen.push(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("the driver still ran after {STEP:?}; {}", self.context())
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = self.child.wait()?;
        Ok((status.code().unwrap_or(-1), std::mem::take(&mut self.seen)))
    }

    /// kill -9, waited for.
    fn kill(mut self) -> anyhow::Result<Vec<Value>> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(std::mem::take(&mut self.seen))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The whole fleet. Fields drop in order: the hosts (guests stopped, daemons unmounted) and
/// Garage before the namespaces they run in, the temp dir last.
struct Fleet {
    hosts: Vec<Host>,
    garage: Option<Garage>,
    op: Operator,
    net: Net,
    img: Images,
    dir: tempfile::TempDir,
}

/// What a scenario's fleet starts with.
struct Setup {
    /// Garage in its own namespace; the operator pushes app:v2, each host adds the remote.
    remote: bool,
    /// The operator's store holds app:v1 (the hosts' base) besides app:v2.
    operator_has_v1: bool,
    /// The images' size (the ext4 file system's).
    image_mib: u64,
}

impl Fleet {
    fn up(kernel: PathBuf, initrd: PathBuf, s: Setup) -> anyhow::Result<Fleet> {
        let t0 = Instant::now();
        let dir = tempfile::tempdir()?;
        // Only the stores' own protections count: their parent is open to all.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let img = Images::build(dir.path(), s.image_mib, kernel, initrd)?;
        let mut net = Net::create();
        let op_ns = net.host("op");
        let garage = if s.remote {
            let g_ns = net.host("s3");
            Some(Garage::start_at("fleet", &g_ns.ip, g_ns.prefix()))
        } else {
            None
        };
        let host_ns: Vec<NsHost> = HOSTS.iter().map(|h| net.host(h)).collect();
        let op = Operator {
            store: new_store(dir.path(), "operator", garage.as_ref())?,
            ns: op_ns,
        };
        let mut fleet = Fleet {
            hosts: Vec::new(),
            garage,
            op,
            net,
            img,
            dir,
        };
        let (v1, v2) = (path(&fleet.img.v1)?, path(&fleet.img.v2)?);
        let op = &fleet.op;
        let import = |tag: &str, f: &str| {
            ok(imagefs_in(
                &[],
                &op.store,
                &["import", f, tag, "--block-size", "4096"],
            ))
        };
        import("app:v2", &v2)?;
        if s.operator_has_v1 {
            import("app:v1", &v1)?;
        }
        ok(op.cmd(&["fleet", "ca", "init"]))?;
        if fleet.garage.is_some() {
            ok(op.cmd(&["push", "app:v2"]))?;
        }
        for ns in host_ns {
            let d = fleet.dir.path().join(&ns.name);
            std::fs::create_dir_all(&d)?;
            let tls = d.join("tls");
            ok(op.cmd(&["fleet", "cert", &ns.name, "--out", &path(&tls)?]))?;
            let store = new_store(&d, "store", fleet.garage.as_ref())?;
            ok(imagefs_in(
                &[],
                &store,
                &["import", &v1, "app:v1", "--block-size", "4096"],
            ))?;
            let mnt = d.join("mnt");
            std::fs::create_dir_all(&mnt)?;
            let mut h = Host {
                store,
                mnt,
                log: d.join("daemon.log"),
                daemon: None,
                ns,
            };
            h.start_daemon(&tls, &op.ns)?;
            ok(op.cmd(&["fleet", "add", &h.ns.name, &h.addr()]))?;
            fleet.hosts.push(h);
        }
        // The three guests boot at once.
        let (k, i) = (path(&fleet.img.kernel)?, path(&fleet.img.initrd)?);
        let starts: Vec<Child> = fleet
            .hosts
            .iter()
            .map(|h| {
                h.local(&[
                    "vm",
                    "start",
                    "app:v1",
                    "--hypervisor",
                    "auto",
                    "--wait",
                    "90",
                    "--kernel",
                    &k,
                    "--initrd",
                    &i,
                    "web-1",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            })
            .collect::<Result<_, _>>()?;
        for (c, h) in starts.into_iter().zip(&fleet.hosts) {
            let o = c.wait_with_output()?;
            ensure!(
                o.status.success(),
                "vm start on {}: {}{}\ndaemon log:\n{}",
                h.ns.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                h.daemon_log()
            );
        }
        eprintln!(
            "fleet_rollout: {} namespaces, 3 daemons and 3 guests up in {:.1} s",
            fleet.hosts.len() + 1 + usize::from(fleet.garage.is_some()),
            t0.elapsed().as_secs_f64()
        );
        Ok(fleet)
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.ns.name == name).unwrap()
    }

    /// `imagefs rollout ARGS --json` in the operator's namespace, read as it runs.
    fn driver(&self, args: &[&str]) -> anyhow::Result<Driver> {
        let mut a = args.to_vec();
        a.push("--json");
        let n = std::fs::read_dir(self.dir.path())?.count();
        Driver::spawn(
            self.op.cmd(&a),
            self.dir.path().join(format!("driver-{n}.stderr")),
        )
    }

    fn v1_hash(&self) -> String {
        hash(self.img.v1_bytes)
    }

    fn v2_hash(&self) -> String {
        hash(self.img.v2_bytes)
    }

    /// A version's id in the operator's store.
    fn version_id(&self, spec: &str) -> anyhow::Result<String> {
        let out = ok(imagefs_in(&[], &self.op.store, &["--json", "ls"]))?;
        let r = json_lines(&out).pop().context("no ls result")?;
        let (name, tag) = spec.split_once(':').context("spec")?;
        r["images"]
            .as_array()
            .context("no images")?
            .iter()
            .find(|i| i["name"] == name)
            .and_then(|i| i["tags"][tag].as_str().map(str::to_string))
            .with_context(|| format!("no {spec} in {r}"))
    }

    /// Each guest's boot id, by host.
    fn boot_ids(&self) -> anyhow::Result<BTreeMap<String, String>> {
        self.hosts
            .iter()
            .map(|h| Ok((h.ns.name.clone(), h.boot_id()?)))
            .collect()
    }
}

fn path(p: &Path) -> anyhow::Result<String> {
    Ok(p.to_str().context("non-UTF-8 path")?.to_string())
}

/// A new store DIR/NAME, with the remote `g` on `garage` when there is one.
fn new_store(dir: &Path, name: &str, garage: Option<&Garage>) -> anyhow::Result<PathBuf> {
    match garage {
        Some(g) => Ok(crate::remote_cli::store_with_remote(dir, name, g, "10s")),
        None => {
            let store = dir.join(name);
            ok(imagefs_in(&[], &store, &["init"]))?;
            Ok(store)
        }
    }
}

fn events<'a>(ev: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    ev.iter().filter(move |e| e["event"] == kind)
}

fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    if let Some(why) = netns::missing() {
        return Err(why);
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("needs /dev/fuse (FUSE mounts)".into());
    }
    guest_artifacts()
}

const ROLLOUT: [&str; 12] = [
    "rollout",
    "app:v2",
    "--hosts",
    "h*",
    "--instances",
    "web-*",
    "--waves",
    "1,100%",
    "--by",
    "host",
    "--host-timeout",
    "5s",
];

#[test]
fn fleet_rollout_with_a_remote_survives_a_cut_host_and_resumes() {
    let (kernel, initrd) = match prerequisites() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    if garage::binary().is_none() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let t0 = Instant::now();
    with_remote(kernel, initrd).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "fleet_rollout: scenario with a remote took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

fn with_remote(kernel: PathBuf, initrd: PathBuf) -> anyhow::Result<()> {
    let fleet = Fleet::up(
        kernel,
        initrd,
        Setup {
            remote: true,
            operator_has_v1: true,
            image_mib: 32,
        },
    )?;
    let (v1h, v2h) = (fleet.v1_hash(), fleet.v2_hash());
    let v1 = fleet.version_id("app:v1")?;
    let v2 = fleet.version_id("app:v2")?;
    for h in &fleet.hosts {
        ensure!(h.guest_hash()? == v1h, "{} does not start on v1", h.ns.name);
        ensure!(h.base()? == v1, "{}", h.ns.name);
    }
    let booted = fleet.boot_ids()?;
    // Boot ids are per boot (random), not a constant that would make the no-reboot check pass.
    let distinct: std::collections::BTreeSet<&String> = booted.values().collect();
    ensure!(distinct.len() == HOSTS.len(), "{booted:?}");
    let h3 = fleet.host("h3");

    // The rollout, h3's link cut mid wave 1: once h1 has substituted, while its health check
    // (1 s) runs. h3 is not contacted in wave 1, so wave 2 is the first to find it cut (cut at
    // wave 1's end instead, the cut raced h3's pull: a pull cut midway fetched its block twice).
    let t = Instant::now();
    let mut args = ROLLOUT.to_vec();
    args.extend(["--health-cmd", "sleep 1; /opt/app/bin/check"]);
    let mut d = fleet.driver(&args)?;
    let plan = d.until("the plan", |e| e["event"] == "plan")?;
    ensure!(
        plan["waves"] == json!([["h1/web-1"], ["h2/web-1", "h3/web-1"]]),
        "{plan}"
    );
    ensure!(plan["target_id"] == v2.as_str(), "{plan}");
    d.until("h1's substitution", |e| {
        e["event"] == "substituted" && e["pair"] == "h1/web-1"
    })?;
    fleet.net.cut(&h3.ns);
    let cut_at = t.elapsed();
    let (code, ev) = d.finish()?;
    let took = t.elapsed();
    let all = ev
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "fleet_rollout: rollout with h3 cut mid wave 1 ({:.1} s in): exit {code} after {:.1} s",
        cut_at.as_secs_f64(),
        took.as_secs_f64()
    );
    ensure!(
        code == 1,
        "an interrupted rollout exits 1, got {code}:\n{all}"
    );
    let unreachable: Vec<&Value> = events(&ev, "unreachable").collect();
    ensure!(
        unreachable.len() == 1 && unreachable[0]["host"] == "h3",
        "h3 (only) must be reported unreachable:\n{all}"
    );
    ensure!(
        unreachable[0]["pairs"] == json!(["h3/web-1"]),
        "{}",
        unreachable[0]
    );
    ensure!(
        events(&ev, "wave_healthy").any(|e| e["wave"] == 1),
        "wave 1 (h1) must be healthy:\n{all}"
    );
    ensure!(
        events(&ev, "rolled_back").next().is_none() && events(&ev, "wave_failed").next().is_none(),
        "an unreachable host is not a failed health check:\n{all}"
    );
    let mut substituted: Vec<&str> = events(&ev, "substituted")
        .filter_map(|e| e["pair"].as_str())
        .collect();
    substituted.sort();
    ensure!(substituted == ["h1/web-1", "h2/web-1"], "{all}");
    let r = ev.last().context("no result")?;
    ensure!(r["type"] == "result" && r["state"] == "interrupted", "{r}");
    ensure!(r["pending"] == json!(["h3/web-1"]), "{r}");
    let id = r["id"].as_str().context("no id")?.to_string();
    for e in &ev {
        ensure!(e["type"] != "event" || e["rollout"] == id.as_str(), "{e}");
    }
    // h1 and h2 stay on the target; h3 (still reachable through its control socket) is not.
    for name in ["h1", "h2"] {
        let h = fleet.host(name);
        ensure!(h.guest_hash()? == v2h, "{name}'s guest does not read v2");
        ensure!(h.base()? == v2, "{name}");
    }
    ensure!(h3.guest_hash()? == v1h, "h3 moved while cut off");
    ensure!(h3.base()? == v1, "h3 moved while cut off");
    let st: Value = serde_json::from_str(
        ok(imagefs_in(
            &[],
            &fleet.op.store,
            &["rollout", "status", &id, "--json"],
        ))?
        .trim(),
    )?;
    ensure!(
        st["state"] == "interrupted" && st["pending"] == json!(["h3/web-1"]),
        "{st}"
    );

    // fleet status while h3 is cut: within its deadline (+ a margin), h3 marked, exit 0.
    let (s, code, took) = fleet.op.status("3s")?;
    eprintln!(
        "fleet_rollout: fleet status with h3 cut, --timeout 3s: {:.2} s",
        took.as_secs_f64()
    );
    ensure!(code == 0, "{s}");
    ensure!(took < Duration::from_secs(5), "fleet status took {took:?}");
    let hosts = s["hosts"].as_array().context("no hosts")?;
    let reach: Vec<(&str, bool)> = hosts
        .iter()
        .map(|h| (h["name"].as_str().unwrap_or(""), h["reachable"] == true))
        .collect();
    ensure!(reach == [("h1", true), ("h2", true), ("h3", false)], "{s}");

    // Link back: --resume finishes h3 and exits 0.
    fleet.net.restore(&h3.ns);
    let t = Instant::now();
    let (code, ev2) = fleet.driver(&["rollout", "--resume", &id])?.finish()?;
    let all2 = ev2
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "fleet_rollout: --resume after the link came back: exit {code} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    ensure!(code == 0, "resume exit {code}:\n{all2}");
    let r = ev2.last().context("no result")?;
    ensure!(
        r["state"] == "completed" && r["pending"] == json!([]),
        "{r}"
    );
    ensure!(
        events(&ev2, "substituted").any(|e| e["pair"] == "h3/web-1"),
        "{all2}"
    );
    for h in &fleet.hosts {
        ensure!(
            h.guest_hash()? == v2h,
            "{}'s guest does not read v2",
            h.ns.name
        );
        ensure!(h.base()? == v2, "{}", h.ns.name);
    }
    ensure!(
        fleet.boot_ids()? == booted,
        "a guest rebooted (its boot id changed)"
    );

    // Each host received exactly the changed block: its pull fetched it and nothing else.
    let want = fleet.img.changed_blocks * 4096;
    for h in &fleet.hosts {
        let f: Vec<&Value> = ev
            .iter()
            .chain(&ev2)
            .filter(|e| e["event"] == "fetched" && e["host"] == h.ns.name.as_str())
            .collect();
        ensure!(
            f.len() == 1 && f[0]["how"] == "pull" && f[0]["bytes"] == want,
            "{}: fetched events {f:?}, want one pull of {want} bytes",
            h.ns.name
        );
        let stats = json_lines(&ok(h.local(&["remote", "stats", "--json"]))?)
            .pop()
            .context("no stats")?;
        eprintln!(
            "fleet_rollout: {} remote stats: {}",
            h.ns.name, stats["total"]
        );
        ensure!(
            stats["total"]["bytes_fetched"] == want
                && stats["total"]["blocks_fetched"] == fleet.img.changed_blocks,
            "{}: {stats}",
            h.ns.name
        );
    }

    // A failed health check rolls back across hosts: app:v1 by host with a check that fails
    // in every guest; wave 1 (h1) fails and h1 goes back to v2; h2 and h3 are never touched.
    let mut args: Vec<&str> = ROLLOUT.to_vec();
    args[1] = "app:v1";
    args.extend(["--health-cmd", "exit 3", "--json"]);
    let o = output(fleet.op.cmd(&args))?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.code() == Some(1),
        "a failing health check: exit {:?}\n{text}",
        o.status.code()
    );
    let ev3 = json_lines(&text);
    let r = ev3.last().context("no result")?;
    ensure!(r["state"] == "failed", "{r}");
    let back: Vec<&Value> = events(&ev3, "rolled_back").map(|e| &e["pair"]).collect();
    ensure!(back == [&json!("h1/web-1")], "{text}");
    ensure!(
        events(&ev3, "substituted").all(|e| e["host"] == "h1")
            && events(&ev3, "unreachable").count() == 0,
        "{text}"
    );
    for h in &fleet.hosts {
        ensure!(
            h.guest_hash()? == v2h && h.base()? == v2,
            "{}: not back on v2 after the failed wave",
            h.ns.name
        );
    }
    Ok(())
}

#[test]
fn fleet_rollout_by_bundles_refuses_a_missing_base_and_resumes_after_kill_9() {
    let (kernel, initrd) = match prerequisites() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    let t0 = Instant::now();
    by_bundles(kernel, initrd).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "fleet_rollout: scenario with bundles took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

fn by_bundles(kernel: PathBuf, initrd: PathBuf) -> anyhow::Result<()> {
    let fleet = Fleet::up(
        kernel,
        initrd,
        Setup {
            remote: false,
            operator_has_v1: false,
            image_mib: 32,
        },
    )?;
    let (v1h, v2h) = (fleet.v1_hash(), fleet.v2_hash());
    let v2 = fleet.version_id("app:v2")?;
    let before: Vec<(String, Vec<String>)> = fleet
        .hosts
        .iter()
        .map(|h| Ok((h.base()?, h.versions()?)))
        .collect::<anyhow::Result<_>>()?;
    let v1 = before[0].0.clone();

    // The operator's store lacks app:v1, the base every host runs: no bundle can be built, so
    // the rollout refuses with exit 3 before any step.
    let mut args = ROLLOUT.to_vec();
    args.extend(["--health-cmd", "/opt/app/bin/check"]);
    let (code, ev) = fleet.driver(&args)?.finish()?;
    let all = ev
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(code == 3, "a missing base must exit 3, got {code}:\n{all}");
    let err = ev.last().context("no error line")?;
    ensure!(
        err["type"] == "error"
            && err["error"]
                .as_str()
                .is_some_and(|e| e.contains("lacks") && e.contains(&v1[..12])),
        "exit 3 must be for the missing base {v1}: {err}"
    );
    for kind in ["wave_start", "fetched", "substituted"] {
        ensure!(events(&ev, kind).next().is_none(), "a step ran:\n{all}");
    }
    for (h, b) in fleet.hosts.iter().zip(&before) {
        ensure!(
            (h.base()?, h.versions()?) == *b,
            "{} changed by a refused rollout",
            h.ns.name
        );
        ensure!(h.guest_hash()? == v1h, "{}", h.ns.name);
    }

    // With the base there: kill -9 of the driver right after its first substitution (h1, in
    // wave 1, whose health check takes 3 s), then --resume.
    ok(imagefs_in(
        &[],
        &fleet.op.store,
        &[
            "import",
            &path(&fleet.img.v1)?,
            "app:v1",
            "--block-size",
            "4096",
        ],
    ))?;
    ensure!(fleet.version_id("app:v1")? == v1, "not the hosts' v1");
    let booted = fleet.boot_ids()?;
    let mut args = ROLLOUT.to_vec();
    args.extend(["--health-cmd", "sleep 3; /opt/app/bin/check"]);
    let t = Instant::now();
    let mut d = fleet.driver(&args)?;
    let sub = d.until("a substitution", |e| e["event"] == "substituted")?;
    ensure!(sub["pair"] == "h1/web-1", "{sub}");
    let ev = d.kill()?;
    let id = sub["rollout"].as_str().context("no id")?.to_string();
    let st: Value = serde_json::from_str(
        ok(imagefs_in(
            &[],
            &fleet.op.store,
            &["rollout", "status", &id, "--json"],
        ))?
        .trim(),
    )?;
    eprintln!("fleet_rollout: status after kill -9: {st}");
    ensure!(
        st["state"] == "interrupted" && st["done"] == json!(["h1/web-1"]),
        "{st}"
    );
    ensure!(fleet.host("h1").guest_hash()? == v2h, "h1 not on v2");
    for name in ["h2", "h3"] {
        ensure!(
            fleet.host(name).guest_hash()? == v1h,
            "{name} moved before its wave"
        );
    }
    let (code, ev2) = fleet.driver(&["rollout", "--resume", &id])?.finish()?;
    let all = ev
        .iter()
        .chain(&ev2)
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "fleet_rollout: bundles, killed after the first substitution, resumed: exit {code}, {:.1} s in all",
        t.elapsed().as_secs_f64()
    );
    ensure!(code == 0, "resume exit {code}:\n{all}");
    let r = ev2.last().context("no result")?;
    ensure!(r["state"] == "completed", "{r}");
    let mut done: Vec<&str> = r["done"]
        .as_array()
        .context("no done")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    done.sort();
    ensure!(done == ["h1/web-1", "h2/web-1", "h3/web-1"], "{r}");
    for h in &fleet.hosts {
        ensure!(
            h.guest_hash()? == v2h,
            "{}'s guest does not read v2",
            h.ns.name
        );
        ensure!(h.base()? == v2, "{}", h.ns.name);
        // Its target came as a bundle of about the changed block (not a whole image).
        let bundles: Vec<&Value> = ev
            .iter()
            .chain(&ev2)
            .filter(|e| {
                e["event"] == "fetched" && e["host"] == h.ns.name.as_str() && e["how"] == "bundle"
            })
            .collect();
        ensure!(!bundles.is_empty(), "{} got no bundle:\n{all}", h.ns.name);
        for b in bundles {
            let bytes = b["bytes"].as_u64().context("no bytes")?;
            ensure!(
                bytes >= fleet.img.changed_blocks * 4096 && bytes < 64 * 1024,
                "{}'s bundle is {bytes} bytes",
                h.ns.name
            );
        }
    }
    ensure!(
        fleet.boot_ids()? == booted,
        "a guest rebooted (its boot id changed)"
    );
    Ok(())
}

/// The harness: two namespaces talk over the bridge, the root namespace has no address there,
/// a cut link stops traffic and a restored one carries it again, and drop removes it all.
#[test]
fn netns_hosts_talk_over_the_bridge_and_a_cut_link_stops_them() {
    if let Some(why) = netns::missing() {
        skip!("{why}");
    }
    let mut net = Net::create();
    let a = net.host("a");
    let b = net.host("b");
    let listener = b.within(|| std::net::TcpListener::bind((b.ip.as_str(), 0)).unwrap());
    let addr = listener.local_addr().unwrap().to_string();
    // A listener made in b's namespace is reached from a, not from the root namespace.
    assert!(a.can_connect(&addr), "a cannot reach {addr}");
    assert!(
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(300))
            .is_err(),
        "the root namespace reached {addr}"
    );
    let root_addrs = Command::new(imagefs_tests::tool("ip").unwrap())
        .args(["-o", "addr", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&root_addrs.stdout);
    assert!(
        !text.contains("10.213."),
        "the root namespace has an address there:\n{text}"
    );
    net.cut(&b);
    assert!(!a.can_connect(&addr), "reached {addr} through a cut link");
    net.restore(&b);
    assert!(
        wait_until(Duration::from_secs(5), || a.can_connect(&addr)),
        "no traffic after restore"
    );
    // A program run through the prefix is in the namespace: it sees b's address.
    let out = b
        .command("ip")
        .args(["-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&b.ip));
    let names = [a.ns.clone(), b.ns.clone()];
    drop(listener);
    drop(net);
    let left = Command::new(imagefs_tests::tool("ip").unwrap())
        .args(["netns", "list"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    for n in names {
        assert!(!left.contains(&n), "{n} is still there:\n{left}");
    }
}

/// `make bench` (group fleet): one patch rolled out across the 3 hosts (one live guest each,
/// Garage as their remote) against copying the full patched image from the same Garage to each
/// host with rclone and booting a guest on each copy, both side by side over the hosts, in the
/// same run, on a 512 MiB image. Prints `BENCH fleet-rollout|fleet-copy seconds S` and `... host-bytes B HOST`
/// lines (bench/src/fleet.rs reads them). Run N rolls out app:rN, the previous version with
/// /opt/app/version's one block rewritten, so each run's hosts fetch one new block.
#[test]
#[ignore = "benchmark: cargo test -p imagefs-tests --test e2e -- --ignored fleet_rollout::bench_fleet_rollout_vs_copy_and_reboot --nocapture"]
fn bench_fleet_rollout_vs_copy_and_reboot() {
    let (kernel, initrd) = match prerequisites() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    if garage::binary().is_none() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    if !imagefs_tests::qemu::has_program("rclone") {
        skip!("needs rclone, the peer (scripts/setup.sh --bench)");
    }
    bench(kernel, initrd).unwrap_or_else(|e| panic!("{e:#}"));
}

/// rclone with the remote `g:` on `garage` from environment variables, in `ns`'s network.
fn rclone(ns: &NsHost, g: &Garage, args: &[&str]) -> Command {
    let mut c = ns.command("rclone");
    c.args(args)
        .env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG", "/dev/null")
        .env("RCLONE_CONFIG_G_TYPE", "s3")
        .env("RCLONE_CONFIG_G_PROVIDER", "Other")
        .env("RCLONE_CONFIG_G_ENDPOINT", &g.endpoint)
        .env("RCLONE_CONFIG_G_REGION", "garage")
        .env("RCLONE_CONFIG_G_FORCE_PATH_STYLE", "true")
        .env("RCLONE_CONFIG_G_ACCESS_KEY_ID", &g.key_id)
        .env("RCLONE_CONFIG_G_SECRET_ACCESS_KEY", &g.secret);
    c
}

/// Bytes each host's remote stats say it fetched for version `id`.
fn fetched_for(fleet: &Fleet, id: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    fleet
        .hosts
        .iter()
        .map(|h| {
            let s = json_lines(&ok(h.local(&["remote", "stats", "--json"]))?)
                .pop()
                .context("no stats")?;
            Ok((
                h.ns.name.clone(),
                s["versions"][id]["bytes_fetched"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

fn bench(kernel: PathBuf, initrd: PathBuf) -> anyhow::Result<()> {
    use agent_proto::AgentLink as _;
    use imagefs_tests::qemu::{Disk, Qemu};
    let runs: usize = std::env::var("IMAGEFS_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let fleet = Fleet::up(
        kernel.clone(),
        initrd.clone(),
        Setup {
            remote: true,
            operator_has_v1: true,
            // the peer copies the whole image: a size closer to a real root disk
            image_mib: 512,
        },
    )?;
    let g = fleet.garage.as_ref().context("no garage")?;
    let block = *file_blocks(&fleet.img.v1, "/opt/app/version")?
        .first()
        .context("no block")?;
    let bench_dir = fleet.dir.path().join("bench");
    std::fs::create_dir_all(&bench_dir)?;
    for run in 1..=runs {
        // this run's target: one block new to every host, pushed to the bucket as versions are,
        // and as a raw image for the peer
        let contents = format!("app 9.{}\n", run % 10);
        let img = bench_dir.join(format!("r{run}.img"));
        {
            use std::os::unix::fs::FileExt;
            std::fs::copy(&fleet.img.v1, &img)?;
            let f = std::fs::OpenOptions::new().write(true).open(&img)?;
            f.write_all_at(contents.as_bytes(), block * 4096)?;
        }
        let tag = format!("app:r{run}");
        ok(imagefs_in(
            &[],
            &fleet.op.store,
            &["import", &path(&img)?, &tag, "--block-size", "4096"],
        ))?;
        ok(fleet.op.cmd(&["push", &tag]))?;
        let id = fleet.version_id(&tag)?;
        let raw = format!("g:{}/raw/r{run}.img", g.bucket);
        let out = rclone(&fleet.op.ns, g, &["copyto", &path(&img)?, &raw]).output()?;
        ensure!(
            out.status.success(),
            "rclone upload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = hash(contents.as_bytes());
        // ours: the rollout, from the operator's namespace
        let mut args: Vec<&str> = ROLLOUT.to_vec();
        args[1] = &tag;
        args.extend(["--health-cmd", "/opt/app/bin/check", "--json"]);
        let t = Instant::now();
        let o = output(fleet.op.cmd(&args))?;
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        ensure!(
            o.status.success(),
            "rollout run {run}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ev = json_lines(&text);
        ensure!(
            events(&ev, "fetched").count() == HOSTS.len()
                && events(&ev, "fetched").all(|e| e["how"] == "pull"),
            "run {run}: every host must pull the target: {text}"
        );
        println!("BENCH fleet-rollout seconds {secs:.3}");
        for (h, b) in fetched_for(&fleet, &id)? {
            println!("BENCH fleet-rollout host-bytes {b} {h}");
        }
        for h in &fleet.hosts {
            ensure!(h.guest_hash()? == want, "{} not on {tag}", h.ns.name);
        }
        // the peer: the full image from the same Garage to each host, a guest booted on each copy
        let (fleet_ref, dir) = (&fleet, fleet.dir.path());
        let t = Instant::now();
        let results: Vec<anyhow::Result<u64>> = std::thread::scope(|s| {
            let hs: Vec<_> = fleet_ref
                .hosts
                .iter()
                .map(|h| {
                    let (raw, kernel, initrd, want) = (&raw, &kernel, &initrd, &want);
                    s.spawn(move || -> anyhow::Result<u64> {
                        let copy = dir.join(&h.ns.name).join("copy.img");
                        let o = rclone(&h.ns, g, &["copyto", raw, &path(&copy)?]).output()?;
                        ensure!(
                            o.status.success(),
                            "rclone to {}: {}",
                            h.ns.name,
                            String::from_utf8_lossy(&o.stderr)
                        );
                        let bytes = std::fs::metadata(&copy)?.len();
                        let sock = dir.join(&h.ns.name).join("copy.agent");
                        let mut vm = Qemu::start(kernel, initrd, &[Disk::rw(&copy)], &sock, "")?;
                        vm.wait_agent(STEP)?;
                        let r = vm.agent(Duration::from_secs(30)).hash("/opt/app/version")?;
                        ensure!(
                            r.blake3 == *want,
                            "{}'s copy boots a guest not on the target",
                            h.ns.name
                        );
                        drop(vm);
                        std::fs::remove_file(&copy)?;
                        Ok(bytes)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("peer thread panicked")))
                })
                .collect()
        });
        let secs = t.elapsed().as_secs_f64();
        println!("BENCH fleet-copy seconds {secs:.3}");
        for (h, r) in fleet.hosts.iter().zip(results) {
            println!("BENCH fleet-copy host-bytes {} {}", r?, h.ns.name);
        }
    }
    Ok(())
}
