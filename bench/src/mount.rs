//! Mount benches: sequential reads (cold, warm) and fio 4 KiB random reads through the real
//! `imagefs mount` against the raw file on local disk, and substitution of 1,000 changed blocks
//! into an idle instance (command to new bytes served). Invariant: the mount is always released
//! (`imagefs umount`, else kill of our own daemon child and a lazy umount), even on failure.
//! `BENCH_MOUNT_ONLY=substitute` runs just the substitution metric (the read benches print
//! BENCH-SKIP lines), e.g. `BENCH_MOUNT_ONLY=substitute BENCH_ARGS="--only mount" make bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{self, Rng, BASE_SIZE};
use crate::import::{fresh_store, import};
use crate::report::{Better, Metric, Report};
use crate::sys::{self, io, BenchError, Result};
use crate::Env;

const MIB: f64 = 1048576.0;
const SUB_BLOCKS: u64 = 1000;

/// Every metric this module reports, for the skip lines.
const NAMES: [&str; 6] = [
    "mount_seq_read_cold",
    "mount_seq_read_warm",
    "mount_randread_4k_psync_1job",
    "mount_randread_4k_psync_4jobs",
    "substitute_1000_blocks_idle_vs_goal",
    "mount_seq_read_first_cold_daemon",
];

/// Why this machine cannot run a mount bench, if it cannot.
pub(crate) fn cannot_mount() -> Option<&'static str> {
    if !sys::is_root() {
        Some("needs root (FUSE mount, drop_caches)")
    } else if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing")
    } else {
        None
    }
}

pub fn run(env: &Env, rep: &mut Report) {
    if let Some(why) = cannot_mount() {
        for n in NAMES {
            rep.skip(n, why);
        }
        return;
    }
    let setup = match Setup::new(env) {
        Ok(s) => s,
        Err(e) => {
            for n in NAMES {
                rep.skip(n, format!("mount set-up failed: {e}"));
            }
            return;
        }
    };
    let mut mounted = match Mounted::start(env, &setup.store, &env.work.join("mnt")) {
        Ok(m) => m,
        Err(e) => {
            for n in NAMES {
                rep.skip(n, format!("imagefs mount failed: {e}"));
            }
            return;
        }
    };
    benches(env, &setup, &mounted, rep);
    if let Err(e) = mounted.stop() {
        eprintln!("bench: unmount: {e}");
    }
}

fn benches(env: &Env, s: &Setup, m: &Mounted, rep: &mut Report) {
    if std::env::var("BENCH_MOUNT_ONLY").is_ok_and(|v| v == "substitute") {
        for n in NAMES[..4].iter().chain(&NAMES[5..]) {
            rep.skip(n, "BENCH_MOUNT_ONLY=substitute");
        }
    } else {
        reads(env, s, m, rep);
    }
    match substitute(env, s, m) {
        Ok(metric) => rep.add(metric),
        Err(e) => rep.skip(NAMES[4], format!("failed: {e}")),
    }
}

fn reads(env: &Env, s: &Setup, m: &Mounted, rep: &mut Report) {
    let file = m.mnt.join("images/m/v1.raw");
    // The first bulk read is served by the daemon and asks for the version's flat copy; every
    // later open reads that copy through FUSE passthrough (what the other read metrics measure).
    match first_read(env, s, &file) {
        Ok(metric) => rep.add(metric),
        Err(e) => rep.skip(NAMES[5], format!("failed: {e}")),
    }
    match seq_reads(env, &file) {
        Ok((cold, warm)) => {
            rep.add(cold);
            rep.add(warm);
        }
        Err(e) => {
            rep.skip(NAMES[0], format!("failed: {e}"));
            rep.skip(NAMES[1], format!("failed: {e}"));
        }
    }
    for (jobs, name) in [(1, NAMES[2]), (4, NAMES[3])] {
        if !sys::have("fio") {
            rep.skip(name, "fio is not installed");
            continue;
        }
        match randread(env, &file, jobs, name) {
            Ok(metric) => rep.add(metric),
            Err(e) => rep.skip(name, format!("failed: {e}")),
        }
    }
}

/// A store holding m:v1 (the ext4 image) and m:v2 (the same with 1,000 blocks rewritten).
struct Setup {
    store: PathBuf,
    v2_img: PathBuf,
    changed: Vec<u64>,
}

impl Setup {
    fn new(env: &Env) -> Result<Setup> {
        let store = env.work.join("mount-store");
        let v2_img = env.work.join("mount-v2.img");
        fresh_store(env, &store)?;
        import(env, &store, &env.base, "m:v1")?;
        fixture::sparse_copy(&env.base, &v2_img)?;
        let changed =
            fixture::patch_blocks(&v2_img, env.block_size, SUB_BLOCKS, &mut Rng::new(0x5ab))?;
        import(env, &store, &v2_img, "m:v2")?;
        Ok(Setup {
            store,
            v2_img,
            changed,
        })
    }
}

/// Our own `imagefs mount` daemon (a foreground child), released on drop.
pub(crate) struct Mounted {
    bin: PathBuf,
    store: PathBuf,
    pub(crate) mnt: PathBuf,
    child: Option<Child>,
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(want.as_ref()))
    })
}

impl Mounted {
    pub(crate) fn start(env: &Env, store: &Path, mnt: &Path) -> Result<Mounted> {
        std::fs::create_dir_all(mnt).map_err(io("mkdir", mnt))?;
        let log_path = env.work.join("mount.log");
        let log = std::fs::File::create(&log_path).map_err(io("create", &log_path))?;
        let child = env
            .imagefs(store)
            .arg("mount")
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                cmd: "imagefs mount".into(),
                source,
            })?;
        let mut m = Mounted {
            bin: env.bin.clone(),
            store: store.to_path_buf(),
            mnt: mnt.to_path_buf(),
            child: Some(child),
        };
        let t = Instant::now();
        while !is_mounted(mnt) {
            let exited = m
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || t.elapsed() > Duration::from_secs(15) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(BenchError::Failed {
                    cmd: "imagefs mount".into(),
                    status: if exited { "exited" } else { "timed out" }.into(),
                    stderr: log.lines().last().unwrap_or("").to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// The daemon's process id (it runs in the foreground: no fork), while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `imagefs umount`, then wait for the daemon to exit.
    pub(crate) fn stop(&mut self) -> Result<()> {
        let r = sys::run(
            Command::new(&self.bin)
                .arg("--store")
                .arg(&self.store)
                .arg("umount")
                .arg(&self.mnt),
        );
        if r.is_ok() {
            if let Some(mut c) = self.child.take() {
                let _ = c.wait();
            }
        }
        r.map(|_| ())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn mib_per_s(secs: f64) -> f64 {
    BASE_SIZE as f64 / MIB / secs
}

/// The first read of a version, cold, served and verified by the daemon (one sample: only the
/// first read is); then `imagefs prefetch` waits for the flat copy that read asked for.
fn first_read(env: &Env, s: &Setup, file: &Path) -> Result<Metric> {
    let mut first = Metric::new(
        NAMES[5],
        "MiB/s",
        Better::Higher,
        "the same raw file on local disk, page cache dropped",
        "report only",
    );
    sys::drop_caches()?;
    let (t, _) = sys::timed(|| sys::read_all(file, 1 << 20))?;
    first.ours.push(mib_per_s(t));
    sys::drop_caches()?;
    let (t, _) = sys::timed(|| sys::read_all(&env.base, 1 << 20))?;
    first.peer.push(mib_per_s(t));
    let (t, _) = sys::timed(|| sys::run(env.imagefs(&s.store).args(["prefetch", "m:v1"])))?;
    eprintln!(
        "bench: the flat copy of m:v1 was ready {:.0} ms after the first read",
        t * 1e3
    );
    Ok(first)
}

/// Sequential 1 MiB reads of the whole version through the mount vs the raw file: cold (page
/// cache dropped before each read) and warm; the version has its flat copy by now.
fn seq_reads(env: &Env, file: &Path) -> Result<(Metric, Metric)> {
    let mut cold = Metric::new(
        NAMES[0],
        "MiB/s",
        Better::Higher,
        "the same raw file on local disk, page cache dropped",
        "report only",
    );
    let mut warm = Metric::new(
        NAMES[1],
        "MiB/s",
        Better::Higher,
        "the same raw file on local disk, warm page cache",
        ">= 0.9x",
    );
    for _ in 0..env.runs.clamp(1, 3) {
        sys::drop_caches()?;
        let (t, _) = sys::timed(|| sys::read_all(file, 1 << 20))?;
        cold.ours.push(mib_per_s(t));
        sys::drop_caches()?;
        let (t, _) = sys::timed(|| sys::read_all(&env.base, 1 << 20))?;
        cold.peer.push(mib_per_s(t));
    }
    sys::warm(file)?;
    sys::warm(&env.base)?;
    for _ in 0..env.runs {
        let (t, n) = sys::timed(|| sys::read_all(file, 1 << 20))?;
        if n != BASE_SIZE {
            return Err(BenchError::WrongBytes(format!(
                "read {n} bytes through the mount, want {BASE_SIZE}"
            )));
        }
        warm.ours.push(mib_per_s(t));
        let (t, _) = sys::timed(|| sys::read_all(&env.base, 1 << 20))?;
        warm.peer.push(mib_per_s(t));
    }
    Ok((cold, warm))
}

/// IOPS of one fio run: 4 KiB random reads, psync, `jobs` jobs, warm page cache.
fn fio_iops(file: &Path, jobs: u32, secs: u32) -> Result<f64> {
    let out = sys::stdout(
        Command::new("fio")
            .arg("--name=randread")
            .arg(format!("--filename={}", file.display()))
            .args(["--rw=randread", "--bs=4k", "--ioengine=psync"])
            .arg(format!("--numjobs={jobs}"))
            .arg(format!("--runtime={secs}"))
            .args(["--time_based", "--group_reporting", "--readonly"])
            .args(["--invalidate=0", "--output-format=json"]),
    )?;
    let json = out.find('{').and_then(|i| out.get(i..)).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.pointer("/jobs/0/read/iops").and_then(|x| x.as_f64()))
        .ok_or_else(|| BenchError::Parse {
            what: "fio read iops",
            text: out.chars().take(300).collect(),
        })
}

fn randread(env: &Env, file: &Path, jobs: u32, name: &str) -> Result<Metric> {
    let mut m = Metric::new(
        name,
        "IOPS",
        Better::Higher,
        "fio on the same raw file on local disk, warm page cache",
        "report (DESIGN: passthrough_hp reaches ~0.9x direct)",
    );
    sys::warm(file)?;
    sys::warm(&env.base)?;
    for _ in 0..env.runs.clamp(1, 3) {
        m.ours.push(fio_iops(file, jobs, 3)?);
        m.peer.push(fio_iops(&env.base, jobs, 3)?);
    }
    Ok(m)
}

/// Time from `imagefs substitute idle m:vX` to a fresh read of a changed block through the mount
/// returning vX's bytes, alternating v2 and v1 (each switch changes the same 1,000 blocks).
fn substitute(env: &Env, s: &Setup, m: &Mounted) -> Result<Metric> {
    let mut metric = Metric::new(
        NAMES[4],
        "ms",
        Better::Lower,
        "the 20 ms goal (no direct peer measured yet: reboot onto the new image comes with the VM benches)",
        "<= 20 ms",
    );
    sys::run(
        env.imagefs(&s.store)
            .args(["instance", "create", "m:v1", "idle"]),
    )?;
    let inst = m.mnt.join("instances/idle.raw");
    let bs = env.block_size;
    let probe = s.changed.last().copied().unwrap_or(0) * bs;
    let len = usize::try_from(bs).unwrap_or(65536);
    let new_bytes = fixture::read_at(&s.v2_img, probe, len)?;
    let old_bytes = fixture::read_at(&env.base, probe, len)?;
    sys::warm(&inst)?;
    for i in 0..env.runs * 2 {
        let (tag, want, src) = if i % 2 == 0 {
            ("m:v2", &new_bytes, &s.v2_img)
        } else {
            ("m:v1", &old_bytes, &env.base)
        };
        let (t, got) = sys::timed(|| {
            sys::run(env.imagefs(&s.store).args(["substitute", "idle", tag]))?;
            fixture::read_at(&inst, probe, len)
        })?;
        if &got != want {
            return Err(BenchError::WrongBytes(format!(
                "after substitute to {tag} the mount served old bytes at {probe}"
            )));
        }
        metric.ours.push(t * 1000.0);
        metric.peer.push(20.0);
        // Untimed: every changed block now reads as the target version.
        for &b in &s.changed {
            if fixture::read_at(&inst, b * bs, len)? != fixture::read_at(src, b * bs, len)? {
                return Err(BenchError::WrongBytes(format!(
                    "after substitute to {tag} block {b} reads wrong"
                )));
            }
        }
    }
    let _ = sys::run(env.imagefs(&s.store).args(["instance", "rm", "idle"]));
    Ok(metric)
}
