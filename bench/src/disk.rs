//! Disk benches: an instance file (MOUNT/instances/ID.raw, what a VM's disk is) on the real
//! `imagefs mount` (default options) against the same bytes as a raw file on local disk, under
//! fio: 4 KiB random and 1 MiB sequential reads, 4 KiB random writes (each write run on a fresh
//! instance), the daemon's CPU per request beside each, and the store's growth per byte written
//! against a qcow2 overlay (64 KiB clusters) taking the same writes. Invariant: the mount is
//! always released (mount.rs's `Mounted` guard), both sides of a pair run back to back with the
//! same fio job, and the page cache is dropped before every O_DIRECT run (the daemon's pack
//! reads would otherwise start warm). `BENCH_DISK_ONLY=NAME,...` runs only the named metrics,
//! e.g. `BENCH_DISK_ONLY=disk_space_randwrite_4k BENCH_ARGS="--only disk" make bench`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::fixture::{self, BASE_SIZE};
use crate::import::{fresh_store, import};
use crate::mount::{cannot_mount, Mounted};
use crate::report::{Better, Metric, Report};
use crate::sys::{self, io, BenchError, Result};
use crate::Env;

/// Seconds of every timed fio run.
const RUNTIME: u32 = 6;
/// Writes per space run (the same count at 4 KiB and at 512 B).
const SPACE_WRITES: u64 = 16384;
const MIB: f64 = 1048576.0;
/// The version the instances are made from.
const VERSION: &str = "d:v1";

// Random I/O must spread over more than any small cache: the fixture is at least 512 MiB.
const _: () = assert!(BASE_SIZE >= 512 << 20);

/// One fio pattern, run on the instance file and on the raw file.
struct Pattern {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    engine: &'static str,
    depth: u32,
    /// O_DIRECT with the page cache dropped first; else buffered, the file read once first.
    direct: bool,
    /// fsync every N writes (0: never).
    fsync: u32,
    goal: &'static str,
}

impl Pattern {
    fn writes(&self) -> bool {
        self.rw.contains("write")
    }

    /// The fio JSON section holding the figures.
    fn side(&self) -> &'static str {
        if self.writes() {
            "write"
        } else {
            "read"
        }
    }

    fn sequential(&self) -> bool {
        !self.rw.starts_with("rand")
    }

    fn cpu_name(&self) -> String {
        format!("{}_cpu", self.name)
    }
}

const PATTERNS: [Pattern; 8] = [
    Pattern {
        name: "disk_randread_4k_psync_qd1",
        rw: "randread",
        bs: "4k",
        engine: "psync",
        depth: 1,
        direct: true,
        fsync: 0,
        goal: ">= 0.8x",
    },
    Pattern {
        name: "disk_randread_4k_uring_qd32",
        rw: "randread",
        bs: "4k",
        engine: "io_uring",
        depth: 32,
        direct: true,
        fsync: 0,
        goal: ">= 0.5x",
    },
    Pattern {
        name: "disk_randread_4k_buffered_warm",
        rw: "randread",
        bs: "4k",
        engine: "psync",
        depth: 1,
        direct: false,
        fsync: 0,
        goal: ">= 0.8x",
    },
    Pattern {
        name: "disk_seqread_1m_psync_qd1",
        rw: "read",
        bs: "1m",
        engine: "psync",
        depth: 1,
        direct: true,
        fsync: 0,
        goal: ">= 0.9x",
    },
    Pattern {
        name: "disk_seqread_1m_uring_qd8",
        rw: "read",
        bs: "1m",
        engine: "io_uring",
        depth: 8,
        direct: true,
        fsync: 0,
        goal: ">= 0.9x",
    },
    Pattern {
        name: "disk_randwrite_4k_psync_qd1",
        rw: "randwrite",
        bs: "4k",
        engine: "psync",
        depth: 1,
        direct: true,
        fsync: 0,
        goal: ">= 0.5x",
    },
    Pattern {
        name: "disk_randwrite_4k_uring_qd32",
        rw: "randwrite",
        bs: "4k",
        engine: "io_uring",
        depth: 32,
        direct: true,
        fsync: 0,
        goal: ">= 0.5x",
    },
    Pattern {
        name: "disk_randwrite_4k_fsync64",
        rw: "randwrite",
        bs: "4k",
        engine: "psync",
        depth: 1,
        direct: true,
        fsync: 64,
        goal: ">= 0.5x",
    },
];

/// Space per byte written: (write size, metric name, goal).
const SPACE: [(u64, &str, &str); 2] = [
    (4096, "disk_space_randwrite_4k", "<= 1.25x"),
    (512, "disk_space_randwrite_512", "<= 8x"),
];

fn vs_qcow2(name: &str) -> String {
    format!("{name}_vs_qcow2")
}

/// Every metric this module reports, for the skip lines.
fn names() -> Vec<String> {
    let mut v = Vec::new();
    for p in &PATTERNS {
        v.push(p.name.to_string());
        v.push(p.cpu_name());
    }
    for (_, name, _) in SPACE {
        v.push(name.to_string());
        v.push(vs_qcow2(name));
    }
    v
}

fn skip_all(rep: &mut Report, why: &str) {
    for n in names() {
        rep.skip(&n, why);
    }
}

pub fn run(env: &Env, rep: &mut Report) {
    if let Some(why) = cannot_mount() {
        return skip_all(rep, why);
    }
    if !sys::have("fio") {
        return skip_all(rep, "fio is not installed");
    }
    let setup = match Setup::new(env) {
        Ok(s) => s,
        Err(e) => return skip_all(rep, &format!("disk set-up failed: {e}")),
    };
    let mut mounted = match Mounted::start(env, &setup.store, &env.work.join("mnt")) {
        Ok(m) => m,
        Err(e) => return skip_all(rep, &format!("imagefs mount failed: {e}")),
    };
    match Side::new(env, &setup, &mounted) {
        Ok(side) => benches(env, &setup, &side, rep),
        Err(e) => skip_all(rep, &format!("instance set-up failed: {e}")),
    }
    if let Err(e) = mounted.stop() {
        eprintln!("bench: unmount: {e}");
    }
    let _ = std::fs::remove_file(&setup.raw);
    let _ = std::fs::remove_dir_all(&setup.store);
}

/// `BENCH_DISK_ONLY=NAME,...` runs only the named metrics (a pattern's CPU metric comes with
/// it; a space metric with its qcow2 line); the rest print BENCH-SKIP lines.
fn wanted(name: &str) -> bool {
    std::env::var("BENCH_DISK_ONLY").map_or(true, |only| only.split(',').any(|n| n == name))
}

fn benches(env: &Env, s: &Setup, side: &Side, rep: &mut Report) {
    for p in &PATTERNS {
        if !wanted(p.name) {
            rep.skip(p.name, "BENCH_DISK_ONLY");
            rep.skip(&p.cpu_name(), "BENCH_DISK_ONLY");
            continue;
        }
        match pattern(env, s, side, p) {
            Ok((perf, cpu)) => {
                rep.add(perf);
                rep.add(cpu);
            }
            Err(e) => {
                rep.skip(p.name, format!("failed: {e}"));
                rep.skip(&p.cpu_name(), format!("failed: {e}"));
            }
        }
    }
    let qcow2 = sys::have("qemu-img") && sys::have("qemu-io");
    for (bs, name, goal) in SPACE {
        if !wanted(name) {
            rep.skip(name, "BENCH_DISK_ONLY");
            rep.skip(&vs_qcow2(name), "BENCH_DISK_ONLY");
            continue;
        }
        match space(env, s, side, bs, name, goal, qcow2) {
            Ok((ours, vs)) => {
                rep.add(ours);
                match vs {
                    Some(m) => rep.add(m),
                    None => rep.skip(&vs_qcow2(name), "qemu-img or qemu-io is not installed"),
                }
            }
            Err(e) => {
                rep.skip(name, format!("failed: {e}"));
                rep.skip(&vs_qcow2(name), format!("failed: {e}"));
            }
        }
    }
}

/// A store holding the fixture as d:v1, and the same bytes as a raw file: a sparse copy, as
/// `cp` and `qemu-img` make them (the store keeps zero blocks for nothing too; a preallocated
/// copy would make the raw side read its 1.3 GiB of zeros from the disk).
struct Setup {
    store: PathBuf,
    raw: PathBuf,
}

impl Setup {
    fn new(env: &Env) -> Result<Setup> {
        let store = env.work.join("disk-store");
        let raw = env.work.join("disk-raw.img");
        fresh_store(env, &store)?;
        import(env, &store, &env.base, VERSION)?;
        fixture::sparse_copy(&env.base, &raw)?;
        sys::run(Command::new("sync").arg(&raw))?;
        Ok(Setup { store, raw })
    }
}

/// The mounted side: the daemon, the instance the read patterns use, and the clock tick.
struct Side<'a> {
    mounted: &'a Mounted,
    pid: u32,
    inst: PathBuf,
    tick_us: f64,
}

impl<'a> Side<'a> {
    fn new(env: &Env, s: &Setup, mounted: &'a Mounted) -> Result<Side<'a>> {
        let pid = mounted.pid().ok_or_else(|| BenchError::Failed {
            cmd: "imagefs mount".into(),
            status: "exited".into(),
            stderr: String::new(),
        })?;
        let ticks = sys::stdout(Command::new("getconf").arg("CLK_TCK"))?;
        let ticks: f64 = ticks.trim().parse().map_err(|_| BenchError::Parse {
            what: "CLK_TCK",
            text: ticks.clone(),
        })?;
        let mut side = Side {
            mounted,
            pid,
            inst: PathBuf::new(),
            tick_us: 1e6 / ticks,
        };
        side.inst = side.create(env, s, "inst")?;
        // Instances read unwritten bytes from their version's flat copy once it is built (a
        // read asks for it, a later read takes it): build it now, so every read pattern sees
        // the steady state.
        fixture::read_at(&side.inst, 0, 4096)?;
        sys::run(env.imagefs(&s.store).args(["prefetch", VERSION]))?;
        fixture::read_at(&side.inst, 0, 4096)?;
        Ok(side)
    }

    /// `imagefs instance create d:v1 ID` (forwarded to the daemon); its file in the mount.
    fn create(&self, env: &Env, s: &Setup, id: &str) -> Result<PathBuf> {
        sys::run(
            env.imagefs(&s.store)
                .args(["instance", "create", VERSION, id]),
        )?;
        Ok(self.mounted.mnt.join(format!("instances/{id}.raw")))
    }

    fn remove(&self, env: &Env, s: &Setup, id: &str) {
        if let Err(e) = sys::run(env.imagefs(&s.store).args(["instance", "rm", id])) {
            eprintln!("bench: instance rm {id}: {e}");
        }
    }

    /// The daemon's utime + stime so far, in microseconds (all its threads).
    fn cpu_us(&self) -> Result<f64> {
        let p = PathBuf::from(format!("/proc/{}/stat", self.pid));
        let text = std::fs::read_to_string(&p).map_err(io("read", &p))?;
        // Fields after the command name (which may hold spaces) start at field 3 (state), so
        // utime (field 14) and stime (15) are the 12th and 13th.
        let f: Vec<&str> = text
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let num = |i: usize| f.get(i).and_then(|w| w.parse::<u64>().ok());
        match (num(11), num(12)) {
            (Some(u), Some(s)) => Ok((u + s) as f64 * self.tick_us),
            _ => Err(BenchError::Parse {
                what: "utime and stime",
                text,
            }),
        }
    }
}

/// What one fio run did.
struct Fio {
    /// IOPS, or MiB/s for a sequential pattern.
    rate: f64,
    ios: f64,
    bytes: f64,
    /// Kernel CPU of fio's own thread per request (sys_cpu of its runtime).
    sys_us_per_io: f64,
}

/// `fio --name=NAME --filename=FILE`, JSON out; the caller adds the job.
fn fio_cmd(name: &str, file: &Path) -> Command {
    let mut c = Command::new("fio");
    c.arg(format!("--name={name}"))
        .arg(format!("--filename={}", file.display()))
        .args(["--output-format=json", "--group_reporting"]);
    c
}

/// Runs a fio job and reads its `side` ("read" or "write") figures from the JSON.
fn fio_run(c: &mut Command, side: &str, sequential: bool) -> Result<Fio> {
    let out = sys::stdout(c)?;
    let parse = || -> Option<Fio> {
        let v: Value = serde_json::from_str(out.get(out.find('{')?..)?).ok()?;
        let job = v.pointer("/jobs/0")?;
        let num = |k: &str| job.get(side)?.get(k)?.as_f64();
        let ios = num("total_ios").filter(|&n| n > 0.0)?;
        let sys_pct = job.get("sys_cpu")?.as_f64()?;
        let runtime_ms = job.get("job_runtime")?.as_f64()?;
        Some(Fio {
            rate: if sequential {
                num("bw_bytes")? / MIB
            } else {
                num("iops")?
            },
            ios,
            bytes: num("io_bytes")?,
            sys_us_per_io: sys_pct / 100.0 * runtime_ms * 1000.0 / ios,
        })
    };
    parse().ok_or_else(|| BenchError::Parse {
        what: "fio figures",
        text: out.chars().take(300).collect(),
    })
}

/// The timed fio job of a pattern.
fn pattern_cmd(p: &Pattern, file: &Path) -> Command {
    let mut c = fio_cmd(p.name, file);
    c.arg(format!("--rw={}", p.rw))
        .arg(format!("--bs={}", p.bs))
        .arg(format!("--ioengine={}", p.engine))
        .arg(format!("--iodepth={}", p.depth))
        .arg(format!("--direct={}", u8::from(p.direct)))
        .arg(format!("--runtime={RUNTIME}"))
        .args(["--time_based", "--invalidate=0"]);
    if p.fsync > 0 {
        c.arg(format!("--fsync={}", p.fsync));
    }
    if p.writes() {
        c.arg("--refill_buffers");
    } else {
        c.arg("--readonly");
    }
    c
}

/// Cold for O_DIRECT (page cache dropped), else warm (the file read once).
/// Before a run: buffered patterns read the file once (page cache warm); O_DIRECT ones drop the
/// page cache, and on our side then read the store's flat copies back in: a host serving VMs
/// keeps its shared, verified version data in memory (the premise of the instance goals),
/// while the raw file under O_DIRECT pays its disk on every request either way.
fn ready(p: &Pattern, file: &Path, ours: Option<&Path>) -> Result<()> {
    if !p.direct {
        return sys::warm(file).map(|_| ());
    }
    sys::drop_caches()?;
    let Some(store) = ours else {
        return Ok(());
    };
    let flat = store.join("flat");
    let copies = std::fs::read_dir(&flat).map_err(io("read dir", &flat))?;
    for entry in copies.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "raw") {
            sys::warm(&path)?;
        }
    }
    Ok(())
}

/// A pattern, `env.runs` times on each side (instance first, then the raw file); a write
/// pattern gets a fresh instance each run. Returns the rate metric and the CPU metric.
fn pattern(env: &Env, s: &Setup, side: &Side, p: &Pattern) -> Result<(Metric, Metric)> {
    let cache = if p.direct {
        "O_DIRECT; page cache dropped, then ours has the version's flat copy read back in"
    } else {
        "buffered, page cache warm"
    };
    let mut perf = Metric::new(
        p.name,
        if p.sequential() { "MiB/s" } else { "IOPS" },
        Better::Higher,
        &format!("the same fio job on the same bytes as a raw file on local disk ({cache})"),
        p.goal,
    );
    let mut cpu = Metric::new(
        &p.cpu_name(),
        "us/req",
        Better::Lower,
        "ours: imagefs daemon utime+stime per fio request; peer: fio's own kernel CPU \
         (sys_cpu) per request on the raw file",
        "report only",
    );
    for run in 0..env.runs {
        let fresh = p.writes().then(|| format!("{}-{run}", p.name));
        let file = match &fresh {
            Some(id) => side.create(env, s, id)?,
            None => side.inst.clone(),
        };
        let timed = || -> Result<(Fio, f64)> {
            ready(p, &file, Some(&s.store))?;
            let before = side.cpu_us()?;
            let r = fio_run(&mut pattern_cmd(p, &file), p.side(), p.sequential())?;
            Ok((r, side.cpu_us()? - before))
        };
        let ours = timed();
        if let Some(id) = &fresh {
            side.remove(env, s, id);
        }
        let (r, used_us) = ours?;
        perf.ours.push(r.rate);
        cpu.ours.push(used_us / r.ios);
        // Writes go to a fresh copy of the raw file too: both sides start from the image.
        let raw = if p.writes() {
            let copy = env.work.join("disk-raw-w.img");
            let _ = std::fs::remove_file(&copy);
            fixture::sparse_copy(&s.raw, &copy)?;
            copy
        } else {
            s.raw.clone()
        };
        ready(p, &raw, None)?;
        let r = fio_run(&mut pattern_cmd(p, &raw), p.side(), p.sequential())?;
        perf.peer.push(r.rate);
        cpu.peer.push(r.sys_us_per_io);
        if p.writes() {
            std::fs::remove_file(&raw).map_err(io("remove", &raw))?;
        }
    }
    Ok((perf, cpu))
}

/// Bytes the store holds, after `sync`, without its flat copies (caches of versions that a
/// background build may be filling; not the instance's writes).
fn store_bytes(store: &Path) -> Result<u64> {
    sys::run(&mut Command::new("sync"))?;
    let flat = store.join("flat");
    let flat = if flat.exists() {
        sys::du_bytes(&flat)?
    } else {
        0
    };
    Ok(sys::du_bytes(store)?.saturating_sub(flat))
}

/// The (offset, length) of every write in a fio iolog (`[TIME] FILE write OFFSET LENGTH`).
fn iolog_writes(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.get(w.len().checked_sub(3)?..)? {
                ["write", off, len] => Some((off.parse().ok()?, len.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

/// Growth of a fresh qcow2 overlay (64 KiB clusters) over `raw` after the writes of `log`
/// (through qemu-io), and the bytes written.
fn qcow2_growth(dir: &Path, raw: &Path, log: &Path) -> Result<(u64, u64)> {
    let ov = dir.join("overlay.qcow2");
    let _ = std::fs::remove_file(&ov);
    sys::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(raw)
            .args(["-F", "raw", "-o", "cluster_size=65536"])
            .arg(&ov),
    )?;
    let text = std::fs::read_to_string(log).map_err(io("read", log))?;
    let writes = iolog_writes(&text);
    let mut q = Command::new("qemu-io");
    q.args(["-f", "qcow2"]);
    let mut bytes = 0;
    for (i, (off, len)) in writes.iter().enumerate() {
        let mut cmd = String::new();
        let _ = write!(cmd, "write -P {} {off} {len}", i % 255 + 1);
        q.arg("-c").arg(cmd);
        bytes += len;
    }
    q.arg(&ov);
    sys::run(&mut Command::new("sync"))?;
    let before = sys::du_bytes(&ov)?;
    sys::run(&mut q)?;
    sys::run(&mut Command::new("sync"))?;
    let grown = sys::du_bytes(&ov)?.saturating_sub(before);
    std::fs::remove_file(&ov).map_err(io("remove", &ov))?;
    Ok((grown, bytes))
}

/// Store growth per byte written by `SPACE_WRITES` random `bs`-byte O_DIRECT writes (fio, ended
/// by an fsync) into a fresh instance, against 1.0 (no overhead); and beside it the same writes
/// (fio's iolog replayed by qemu-io) into a qcow2 overlay, when `qcow2`.
fn space(
    env: &Env,
    s: &Setup,
    side: &Side,
    bs: u64,
    name: &str,
    goal: &str,
    qcow2: bool,
) -> Result<(Metric, Option<Metric>)> {
    let mut ours = Metric::new(
        name,
        "x",
        Better::Lower,
        "the bytes the guest wrote (fio io_bytes), i.e. 1.0x; ours: growth of du STORE \
         (after sync, no gc, flat copies excluded) per byte written",
        goal,
    );
    let mut vs = Metric::new(
        &vs_qcow2(name),
        "x",
        Better::Lower,
        "a qcow2 overlay (64 KiB clusters) over the raw file taking the same writes \
         (qemu-io): growth of its du per byte written",
        "report only",
    );
    let dir = env.work.join("disk-space");
    std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
    for run in 0..env.runs {
        let id = format!("space{bs}-{run}");
        let log = dir.join(format!("{id}.iolog"));
        let file = side.create(env, s, &id)?;
        let measured = || -> Result<(u64, Fio)> {
            let before = store_bytes(&s.store)?;
            let mut c = fio_cmd(&id, &file);
            c.args(["--rw=randwrite", "--ioengine=psync", "--direct=1"])
                .args(["--refill_buffers", "--end_fsync=1"])
                .arg(format!("--bs={bs}"))
                .arg(format!("--io_size={}", bs * SPACE_WRITES))
                .arg(format!("--randseed={}", 1 + run))
                .arg(format!("--write_iolog={}", log.display()));
            let r = fio_run(&mut c, "write", false)?;
            Ok((store_bytes(&s.store)?.saturating_sub(before), r))
        };
        let measured = measured();
        side.remove(env, s, &id);
        let (grown, r) = measured?;
        let per_byte = grown as f64 / r.bytes;
        ours.ours.push(per_byte);
        ours.peer.push(1.0);
        if qcow2 {
            let (q_grown, q_bytes) = qcow2_growth(&dir, &s.raw, &log)?;
            vs.ours.push(per_byte);
            vs.peer.push(q_grown as f64 / q_bytes.max(1) as f64);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((ours, qcow2.then_some(vs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iolog_writes_are_read_with_and_without_times() {
        let log = "fio version 3 iolog\n52 /a b.raw add\n294 /a b.raw open\n\
                   299 /a b.raw write 4046848 4096\n/x write 512 512\n900 /a b.raw close\n";
        assert_eq!(iolog_writes(log), vec![(4046848, 4096), (512, 512)]);
    }

    #[test]
    fn every_metric_has_a_distinct_name() {
        let n = names();
        let set: std::collections::BTreeSet<_> = n.iter().collect();
        assert_eq!(set.len(), n.len());
        assert_eq!(n.len(), 2 * PATTERNS.len() + 2 * SPACE.len());
    }
}
