//! Scenario module: crash (kill campaigns, issue 11). One test per operation: import, apply,
//! gc, the daemon mid copy-on-write write, the daemon mid substitution, the rollout driver
//! mid-wave. Each runs `CRASH_KILLS` kills (default 20; `make crashtest` runs 1000) on one
//! store, seeded by `CRASH_SEED` (default: the clock; always printed, so a failure replays).
//!
//! A kill either arms a named fault point (`IMAGEFS_FAULT=name@N`, the store library's
//! `fault` module: the process prints `IMAGEFS-FAULT name` and SIGKILLs itself there, so the
//! kill provably lands inside the operation) or sends kill -9 after a random delay. After each
//! kill: `imagefs fsck` must be clean, everything acknowledged before the kill must be intact
//! (tags export their bytes, fsynced instance writes read back, a substitution shows wholly
//! the old or the new version), and re-running or resuming the operation must complete.
//! Each test prints `CRASH <scenario> kills=N inside=M damage=D seed=S ...` and asserts
//! damage == 0 and that every armed fault point fired (so inside >= the fault kills).
// Test code: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imagefs_tests::{bin, is_root, noise, skip, wait_until};
use serde_json::Value;

const BS: usize = 4096;
/// Blocks per test image (1 MiB): small, so 1,000 kills per scenario fit the time budget.
const BLOCKS: usize = 256;

/// `CRASH_KILLS` (default 20).
fn kills_wanted() -> u64 {
    std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// `CRASH_SEED`, or the clock; printed either way.
fn campaign_seed() -> u64 {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("CRASH_SEED={seed}");
    seed
}

/// splitmix64: small, seedable, good enough to pick kills.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64, stream: &str) -> Rng {
        let mix = blake3::hash(stream.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&mix.as_bytes()[..8]);
        Rng(seed ^ u64::from_le_bytes(b))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// How one kill is delivered.
#[derive(Debug, Clone)]
pub(crate) enum Kill {
    /// `IMAGEFS_FAULT=spec`: the process kills itself at the named point.
    Fault { name: &'static str, spec: String },
    /// kill -9 after this delay.
    Delay(Duration),
}

impl Kill {
    fn env(&self) -> Option<&str> {
        match self {
            Kill::Fault { spec, .. } => Some(spec),
            Kill::Delay(_) => None,
        }
    }
}

/// One scenario's count of kills, kills inside the operation, and damage.
pub(crate) struct Campaign {
    pub(crate) scenario: &'static str,
    pub(crate) rng: Rng,
    seed: u64,
    wanted: u64,
    kills: u64,
    inside: u64,
    armed: u64,
    fired: u64,
    damage: Vec<String>,
    missed: Vec<String>,
    start: Instant,
    /// How long the operation takes unkilled (a moving average of the re-runs), so delay
    /// kills land across its whole length; zero until measured.
    typical: Duration,
}

impl Campaign {
    pub(crate) fn new(scenario: &'static str) -> Campaign {
        let seed = campaign_seed();
        Campaign {
            scenario,
            rng: Rng::new(seed, scenario),
            seed,
            wanted: kills_wanted(),
            kills: 0,
            inside: 0,
            armed: 0,
            fired: 0,
            damage: Vec::new(),
            missed: Vec::new(),
            start: Instant::now(),
            typical: Duration::ZERO,
        }
    }

    pub(crate) fn rounds(&self) -> u64 {
        self.wanted
    }

    /// Records how long an unkilled run of the operation took.
    pub(crate) fn observe(&mut self, took: Duration) {
        self.typical = if self.typical.is_zero() {
            took
        } else {
            (self.typical * 3 + took) / 4
        };
    }

    /// Half the kills arm one of `points` (name, highest N sure to be reached), half are a
    /// kill -9 after a delay up to the operation's measured length (`max_delay` until known).
    pub(crate) fn pick(&mut self, points: &[(&'static str, u64)], max_delay: Duration) -> Kill {
        if !points.is_empty() && self.rng.below(2) == 0 {
            let (name, max) = points[self.rng.below(points.len() as u64) as usize];
            let n = 1 + self.rng.below(max);
            Kill::Fault {
                name,
                spec: format!("{name}@{n}"),
            }
        } else {
            let max = if self.typical.is_zero() {
                max_delay
            } else {
                self.typical
            };
            let ms = max.as_millis() as u64;
            Kill::Delay(Duration::from_millis(self.rng.below(ms + 1)))
        }
    }

    /// Records how a kill went: `died` = the process died of SIGKILL; `fired` = its fault
    /// line was printed; `started` = (delay kills) the operation was visibly under way.
    pub(crate) fn record(&mut self, kill: &Kill, died: bool, fired: bool, started: bool) {
        if let Kill::Fault { spec, .. } = kill {
            self.armed += 1;
            if fired && died {
                self.fired += 1;
            } else if self.missed.len() < 20 {
                eprintln!("CRASH MISSED {}: {spec} never fired", self.scenario);
                self.missed.push(spec.clone());
            }
        }
        if died {
            self.kills += 1;
            if fired || started {
                self.inside += 1;
            }
        }
    }

    /// Records damage found after a kill (the campaign stops at the first: what follows
    /// would only report its consequences).
    pub(crate) fn damage(&mut self, round: u64, kill: &Kill, what: impl Into<String>) {
        let what = what.into();
        eprintln!(
            "CRASH DAMAGE {} round {round} ({kill:?}): {what}",
            self.scenario
        );
        self.damage
            .push(format!("round {round} ({kill:?}): {what}"));
    }

    /// Checks `r`; an error is damage.
    pub(crate) fn check(&mut self, round: u64, kill: &Kill, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.damage(round, kill, e);
                false
            }
        }
    }

    /// Prints the CRASH line and asserts: no damage, every armed fault point fired.
    pub(crate) fn finish(self) {
        let secs = self.start.elapsed().as_secs_f64();
        let line = format!(
            "CRASH {} kills={} inside={} damage={} seed={} fault_kills={}/{} secs={secs:.1}",
            self.scenario,
            self.kills,
            self.inside,
            self.damage.len(),
            self.seed,
            self.fired,
            self.armed,
        );
        println!("{line}");
        eprintln!("{line}");
        if let Some(dir) = std::env::var_os("CRASH_RESULTS") {
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(Path::new(&dir).join(self.scenario), format!("{line}\n"));
        }
        assert!(
            self.damage.is_empty(),
            "{}: damage after kills (CRASH_SEED={} replays it): {:#?}",
            self.scenario,
            self.seed,
            self.damage
        );
        assert!(
            self.missed.is_empty(),
            "{}: armed fault points never fired (CRASH_SEED={}): {:?}",
            self.scenario,
            self.seed,
            self.missed
        );
        assert!(self.kills > 0, "{}: no kill landed", self.scenario);
        assert!(
            self.inside >= self.fired,
            "{}: fewer kills inside the operation ({}) than fault points fired ({})",
            self.scenario,
            self.inside,
            self.fired
        );
    }
}

/// Whether `stderr` holds the fault line of the armed point.
fn fault_line(stderr: &str, kill: &Kill) -> bool {
    match kill {
        Kill::Fault { name, .. } => stderr
            .lines()
            .any(|l| l.trim() == format!("IMAGEFS-FAULT {name}")),
        Kill::Delay(_) => false,
    }
}

/// What became of a process run under a kill.
pub(crate) struct Ran {
    pub(crate) died: bool,
    pub(crate) fired: bool,
    pub(crate) started: bool,
    pub(crate) stdout: String,
}

/// Runs `cmd` under `kill`. `started` tells (just before a delay kill) whether the operation is
/// visibly under way. A process that outlives `limit` is damage (hung) and is killed.
pub(crate) fn run_killed(
    cmd: &mut Command,
    kill: &Kill,
    limit: Duration,
    started: impl Fn() -> bool,
) -> Result<Ran, String> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    cmd.env_remove("IMAGEFS_FAULT")
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap());
    if let Some(spec) = kill.env() {
        cmd.env("IMAGEFS_FAULT", spec);
    }
    let mut child = cmd.spawn().unwrap();
    let mut was_started = false;
    let t = Instant::now();
    if let Kill::Delay(d) = kill {
        std::thread::sleep(*d);
        if child.try_wait().unwrap().is_none() {
            was_started = started();
            let _ = child.kill();
        }
    }
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let read = |f: &tempfile::NamedTempFile| {
        let mut s = String::new();
        let _ = f.reopen().unwrap().read_to_string(&mut s);
        s
    };
    let (stdout, stderr) = (read(&out), read(&err));
    let died = status.signal() == Some(libc::SIGKILL);
    let fired = fault_line(&stderr, kill);
    if !died && !status.success() {
        return Err(format!(
            "{cmd:?} failed ({status}) under {kill:?}: {stderr}{stdout}"
        ));
    }
    Ok(Ran {
        died,
        fired,
        started: was_started,
        stdout,
    })
}

pub(crate) fn imagefs(store: &Path) -> Command {
    let mut c = Command::new(bin("imagefs"));
    c.arg("--store")
        .arg(store)
        .env_remove("IMAGEFS_STORE")
        .env_remove("IMAGEFS_FAULT");
    c
}

/// Runs `imagefs ARGS` to success; the error says why not.
pub(crate) fn run(store: &Path, args: &[&str]) -> Result<String, String> {
    let o = imagefs(store).args(args).output().unwrap();
    if !o.status.success() {
        return Err(format!(
            "imagefs {args:?}: {} {}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `imagefs fsck` must exit 0.
pub(crate) fn fsck_clean(store: &Path) -> Result<(), String> {
    run(store, &["fsck"])
        .map(|_| ())
        .map_err(|e| format!("fsck: {e}"))
}

fn hash(b: &[u8]) -> blake3::Hash {
    blake3::hash(b)
}

/// Exports `spec` and compares it with `want`.
fn exports(store: &Path, scratch: &Path, spec: &str, want: &blake3::Hash) -> Result<(), String> {
    let out = scratch.join("export.raw");
    run(store, &["export", spec, out.to_str().unwrap()])?;
    let got = hash(&std::fs::read(&out).unwrap());
    if &got != want {
        return Err(format!("{spec} exports other bytes than were imported"));
    }
    Ok(())
}

/// Sizes of the files an operation writes first (packs, refs log): a change means it started.
fn fingerprint(store: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(store.join("packs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let len = e.metadata().map_or(0, |m| m.len());
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    v.push((
        "refs.log".into(),
        std::fs::metadata(store.join("refs.log")).map_or(0, |m| m.len()),
    ));
    v.sort();
    v
}

/// `base` with `n` blocks replaced by noise named after `seed` (blocks picked by `rng`).
fn mutated(base: &[u8], rng: &mut Rng, seed: &str, n: usize) -> (Vec<u8>, Vec<usize>) {
    let mut img = base.to_vec();
    let mut picked = Vec::new();
    while picked.len() < n {
        let b = rng.below(BLOCKS as u64) as usize;
        if !picked.contains(&b) {
            picked.push(b);
        }
    }
    for &b in &picked {
        img[b * BS..(b + 1) * BS].copy_from_slice(&noise(&format!("{seed}/{b}"), BS));
    }
    (img, picked)
}

fn need_binary() -> Option<String> {
    (!bin("imagefs").exists()).then(|| "needs a built imagefs binary (cargo build)".to_string())
}

/// Points an import reaches (name, the highest N sure to be reached).
const IMPORT_POINTS: &[(&str, u64)] = &[
    ("objects.put", 32),
    ("pack.synced", 1),
    ("import.blocks_stored", 1),
    ("refs.appended", 1),
    ("refs.synced", 1),
    ("log.appending", 1),
];

#[test]
fn crash_import() {
    if let Some(why) = need_binary() {
        skip!("{why}");
    }
    let mut c = Campaign::new("import");
    let t = tempfile::tempdir().unwrap();
    let st = t.path().join("s");
    run(&st, &["init"]).unwrap();
    let base = noise("crash-import-base", BLOCKS * BS);
    let src = t.path().join("img.raw");
    std::fs::write(&src, &base).unwrap();
    run(
        &st,
        &[
            "import",
            src.to_str().unwrap(),
            "base:v1",
            "--block-size",
            "4096",
        ],
    )
    .unwrap();
    let mut live: VecDeque<(String, blake3::Hash)> = VecDeque::new();
    live.push_back(("base:v1".into(), hash(&base)));
    for round in 0..c.rounds() {
        let (img, _) = mutated(&base, &mut c.rng, &format!("import{round}"), 32);
        std::fs::write(&src, &img).unwrap();
        let tag = format!("imp:k{round}");
        let kill = c.pick(IMPORT_POINTS, Duration::from_millis(250));
        let before = fingerprint(&st);
        let mut cmd = imagefs(&st);
        cmd.args([
            "import",
            src.to_str().unwrap(),
            &tag,
            "--block-size",
            "4096",
        ]);
        let ran = run_killed(&mut cmd, &kill, Duration::from_secs(60), || {
            fingerprint(&st) != before
        });
        let ran = match ran {
            Ok(r) => r,
            Err(e) => {
                c.damage(round, &kill, e);
                break;
            }
        };
        c.record(&kill, ran.died, ran.fired, ran.started);
        let mut ok = c.check(round, &kill, fsck_clean(&st));
        for (spec, want) in &live {
            ok = ok && c.check(round, &kill, exports(&st, t.path(), spec, want));
        }
        // Re-running the import completes it (or finds it complete).
        let t0 = Instant::now();
        let again = run(
            &st,
            &[
                "import",
                src.to_str().unwrap(),
                &tag,
                "--block-size",
                "4096",
            ],
        );
        if ran.died {
            c.observe(t0.elapsed());
        }
        ok = ok
            && c.check(round, &kill, again.map(|_| ()))
            && c.check(round, &kill, exports(&st, t.path(), &tag, &hash(&img)));
        if !ok {
            break;
        }
        live.push_back((tag, hash(&img)));
        if live.len() > 4 {
            let (old, _) = live.remove(1).unwrap();
            run(&st, &["rm", &old]).unwrap();
        }
        if round % 8 == 7 {
            run(&st, &["gc"]).unwrap();
        }
    }
    c.finish();
}

const APPLY_POINTS: &[(&str, u64)] = &[
    ("objects.put", 32),
    ("pack.synced", 1),
    ("apply.blocks_stored", 1),
    ("refs.appended", 2),
    ("refs.synced", 2),
    ("apply.committed", 1),
    ("log.appending", 2),
];

#[test]
fn crash_apply() {
    if let Some(why) = need_binary() {
        skip!("{why}");
    }
    let mut c = Campaign::new("apply");
    let t = tempfile::tempdir().unwrap();
    let (src_store, st) = (t.path().join("src"), t.path().join("dst"));
    let base = noise("crash-apply-base", BLOCKS * BS);
    let src = t.path().join("img.raw");
    std::fs::write(&src, &base).unwrap();
    for s in [&src_store, &st] {
        run(s, &["init"]).unwrap();
        run(
            s,
            &[
                "import",
                src.to_str().unwrap(),
                "a:v1",
                "--block-size",
                "4096",
            ],
        )
        .unwrap();
    }
    let bundle = t.path().join("b.bundle");
    let bundle_s = bundle.to_str().unwrap().to_string();
    let mut live: VecDeque<(String, blake3::Hash)> = VecDeque::new();
    live.push_back(("a:v1".into(), hash(&base)));
    for round in 0..c.rounds() {
        let (img, _) = mutated(&base, &mut c.rng, &format!("apply{round}"), 32);
        std::fs::write(&src, &img).unwrap();
        let tag = format!("a:k{round}");
        run(
            &src_store,
            &[
                "import",
                src.to_str().unwrap(),
                &tag,
                "--block-size",
                "4096",
            ],
        )
        .unwrap();
        run(&src_store, &["bundle", "a:v1", &tag, &bundle_s]).unwrap();
        let kill = c.pick(APPLY_POINTS, Duration::from_millis(150));
        let before = fingerprint(&st);
        let mut cmd = imagefs(&st);
        cmd.args(["apply", &bundle_s]);
        let ran = match run_killed(&mut cmd, &kill, Duration::from_secs(60), || {
            fingerprint(&st) != before
        }) {
            Ok(r) => r,
            Err(e) => {
                c.damage(round, &kill, e);
                break;
            }
        };
        c.record(&kill, ran.died, ran.fired, ran.started);
        let mut ok = c.check(round, &kill, fsck_clean(&st));
        for (spec, want) in &live {
            ok = ok && c.check(round, &kill, exports(&st, t.path(), spec, want));
        }
        let t0 = Instant::now();
        let again = run(&st, &["apply", &bundle_s]);
        if ran.died {
            c.observe(t0.elapsed());
        }
        ok = ok
            && c.check(round, &kill, again.map(|_| ()))
            && c.check(round, &kill, exports(&st, t.path(), &tag, &hash(&img)));
        if !ok {
            break;
        }
        live.push_back((tag, hash(&img)));
        if live.len() > 4 {
            let (old, _) = live.remove(1).unwrap();
            run(&st, &["rm", &old]).unwrap();
            run(&src_store, &["rm", &old]).unwrap();
        }
        if round % 8 == 7 {
            run(&st, &["gc"]).unwrap();
            run(&src_store, &["gc"]).unwrap();
        }
    }
    c.finish();
}

const GC_POINTS: &[(&str, u64)] = &[
    ("gc.dropped", 1),
    ("gc.copied", 1),
    ("gc.index_rewritten", 1),
    ("gc.deleting", 1),
    ("objects.put", 16),
    ("pack.synced", 1),
    ("refs.appended", 1),
    ("refs.synced", 1),
    ("log.appending", 1),
];

#[test]
fn crash_gc() {
    if let Some(why) = need_binary() {
        skip!("{why}");
    }
    let mut c = Campaign::new("gc");
    let t = tempfile::tempdir().unwrap();
    let st = t.path().join("s");
    run(&st, &["init"]).unwrap();
    let base = noise("crash-gc-base", BLOCKS * BS);
    let src = t.path().join("img.raw");
    std::fs::write(&src, &base).unwrap();
    run(
        &st,
        &[
            "import",
            src.to_str().unwrap(),
            "base:v1",
            "--block-size",
            "4096",
        ],
    )
    .unwrap();
    // Each round's image shares 16 of its 48 new blocks with the previous one, so dropping the
    // previous one leaves a pack gc must rewrite (live copies), not just delete.
    // Round 0 drops this one.
    let (mut prev_img, mut prev_new) = mutated(&base, &mut c.rng, "gc-init", 32);
    std::fs::write(&src, &prev_img).unwrap();
    run(
        &st,
        &[
            "import",
            src.to_str().unwrap(),
            "g:init",
            "--block-size",
            "4096",
        ],
    )
    .unwrap();
    let mut prev_tag = Some("g:init".to_string());
    for round in 0..c.rounds() {
        let (mut img, picked) = mutated(&base, &mut c.rng, &format!("gc{round}"), 32);
        for &b in prev_new.iter().filter(|b| !picked.contains(*b)).take(16) {
            img[b * BS..(b + 1) * BS].copy_from_slice(&prev_img[b * BS..(b + 1) * BS]);
        }
        std::fs::write(&src, &img).unwrap();
        let tag = format!("g:k{round}");
        run(
            &st,
            &[
                "import",
                src.to_str().unwrap(),
                &tag,
                "--block-size",
                "4096",
            ],
        )
        .unwrap();
        if let Some(p) = prev_tag.take() {
            run(&st, &["rm", &p]).unwrap();
        }
        let kill = c.pick(GC_POINTS, Duration::from_millis(120));
        let before = fingerprint(&st);
        let mut cmd = imagefs(&st);
        cmd.arg("gc");
        let ran = match run_killed(&mut cmd, &kill, Duration::from_secs(60), || {
            fingerprint(&st) != before
        }) {
            Ok(r) => r,
            Err(e) => {
                c.damage(round, &kill, e);
                break;
            }
        };
        c.record(&kill, ran.died, ran.fired, ran.started);
        let ok = c.check(round, &kill, fsck_clean(&st))
            && c.check(
                round,
                &kill,
                exports(&st, t.path(), "base:v1", &hash(&base)),
            )
            && c.check(round, &kill, exports(&st, t.path(), &tag, &hash(&img)));
        let t0 = Instant::now();
        let again = run(&st, &["gc"]);
        if ran.died {
            c.observe(t0.elapsed());
        }
        let ok = ok
            && c.check(round, &kill, again.map(|_| ()))
            && c.check(round, &kill, fsck_clean(&st));
        if !ok {
            break;
        }
        prev_new = picked;
        prev_img = img;
        prev_tag = Some(tag);
    }
    c.finish();
}

// ---- the daemon -------------------------------------------------------------------------

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_ref()))
}

fn lazy_umount(path: &Path) {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// A foreground mount daemon, started with a fault point armed or not.
pub(crate) struct Daemon {
    pub(crate) store: PathBuf,
    pub(crate) mnt: PathBuf,
    child: Option<Child>,
    stderr: PathBuf,
}

impl Daemon {
    pub(crate) fn new(dir: &Path) -> Daemon {
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        Daemon {
            store: dir.join("store"),
            mnt,
            child: None,
            stderr: dir.join("daemon.stderr"),
        }
    }

    /// Starts the daemon (with `IMAGEFS_FAULT=fault` if given) and waits for the mount.
    pub(crate) fn start(&mut self, fault: Option<&str>) -> Result<(), String> {
        let mut cmd = imagefs(&self.store);
        cmd.arg("mount")
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&self.stderr).unwrap());
        if let Some(f) = fault {
            cmd.env("IMAGEFS_FAULT", f);
        }
        self.child = Some(cmd.spawn().unwrap());
        let mnt = self.mnt.clone();
        if !wait_until(Duration::from_secs(20), || {
            is_mounted(&mnt) && mnt.join("images").exists()
        }) {
            return Err(format!(
                "mount did not come up: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ));
        }
        Ok(())
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `limit` for the daemon to die on its own; true if it died of SIGKILL.
    pub(crate) fn wait_dead(&mut self, limit: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return false;
        };
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                self.detach();
                return s.signal() == Some(libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// kill -9 (if still alive); true if this call killed it.
    pub(crate) fn kill9(&mut self) -> bool {
        let mut killed = false;
        if let Some(mut c) = self.child.take() {
            killed = c.try_wait().unwrap().is_none();
            let _ = c.kill();
            let _ = c.wait();
        }
        self.detach();
        killed
    }

    fn detach(&self) {
        lazy_umount(&self.mnt);
        assert!(wait_until(Duration::from_secs(10), || !is_mounted(
            &self.mnt
        )));
    }

    /// `imagefs umount`: a clean stop.
    pub(crate) fn stop(&mut self) {
        let _ = run(&self.store, &["umount", self.mnt.to_str().unwrap()]);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            lazy_umount(&self.mnt);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            lazy_umount(&self.mnt);
        }
    }
}

/// Byte-granular model of what the guest may read after a crash: per 512-byte sector, the
/// bytes as of the last completed fsync, or bytes of any write issued after it.
const SEC: usize = 512;

struct Issued {
    /// Every write issued this round, in order: offset and bytes.
    writes: Vec<(usize, Vec<u8>)>,
    /// How many of `writes` an fsync that returned success covered.
    synced: usize,
}

/// Checks `got` against `durable` (the disk as of the round's start) and this round's writes.
fn check_writes(durable: &[u8], issued: &Issued, got: &[u8]) -> Result<(), String> {
    if got.len() != durable.len() {
        return Err(format!("size {} != {}", got.len(), durable.len()));
    }
    let mut floor = durable.to_vec();
    for (off, data) in &issued.writes[..issued.synced] {
        floor[*off..off + data.len()].copy_from_slice(data);
    }
    for s in 0..got.len() / SEC {
        let r = s * SEC..(s + 1) * SEC;
        if got[r.clone()] == floor[r.clone()] {
            continue;
        }
        let later = issued.writes[issued.synced..].iter().any(|(off, data)| {
            *off <= r.start
                && r.end <= off + data.len()
                && data[r.start - off..r.end - off] == got[r.clone()]
        });
        if !later {
            return Err(format!(
                "sector {s} (byte {}) holds neither its last fsynced bytes nor a later write's \
                 ({} writes, {} fsynced)",
                r.start,
                issued.writes.len(),
                issued.synced
            ));
        }
    }
    Ok(())
}

const WRITE_POINTS: &[(&str, u64)] = &[
    ("instance.data_written", 16),
    ("instance.flush.data_synced", 3),
    ("instance_log.appended", 3),
    ("instance.flush.synced", 3),
    ("log.appending", 3),
];

#[test]
fn crash_daemon_mid_cow_write() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    if let Some(why) = need_binary() {
        skip!("{why}");
    }
    let mut c = Campaign::new("daemon-write");
    let t = tempfile::tempdir().unwrap();
    let mut d = Daemon::new(t.path());
    run(&d.store, &["init"]).unwrap();
    let base = noise("crash-write-base", BLOCKS * BS);
    let src = t.path().join("img.raw");
    std::fs::write(&src, &base).unwrap();
    run(
        &d.store,
        &[
            "import",
            src.to_str().unwrap(),
            "w:v1",
            "--block-size",
            "4096",
        ],
    )
    .unwrap();
    d.start(None).unwrap();
    run(&d.store, &["instance", "create", "w:v1", "vm1"]).unwrap();
    d.stop();
    let disk = d.mnt.join("instances/vm1.raw");
    let mut durable = base.clone();
    let mut last: Option<(Kill, Issued)> = None;
    for round in 0..=c.rounds() {
        let kill = if round < c.rounds() {
            Some(c.pick(WRITE_POINTS, Duration::from_millis(300)))
        } else {
            None // the last start only checks the last kill
        };
        let fault = kill.as_ref().and_then(Kill::env).map(str::to_string);
        if let Err(e) = d.start(fault.as_deref()) {
            c.damage(
                round,
                kill.as_ref().unwrap_or(&Kill::Delay(Duration::ZERO)),
                e,
            );
            break;
        }
        // What the last kill left: fsynced writes intact, nothing else but later writes.
        let got = std::fs::read(&disk).unwrap();
        if let Some((k, issued)) = last.take() {
            if !c.check(round, &k, check_writes(&durable, &issued, &got)) {
                break;
            }
        }
        durable = got;
        let Some(kill) = kill else { break };
        let issued = Arc::new(Mutex::new(Issued {
            writes: Vec::new(),
            synced: 0,
        }));
        let in_flight = Arc::new(AtomicBool::new(false));
        let writes_done = Arc::new(AtomicUsize::new(0));
        let every = 4 + c.rng.below(12) as usize;
        let wseed = c.rng.next();
        let writer = {
            let (disk, issued, in_flight, writes_done) = (
                disk.clone(),
                issued.clone(),
                in_flight.clone(),
                writes_done.clone(),
            );
            std::thread::spawn(move || {
                // A kill at once may beat the open: nothing written, nothing to check.
                let Ok(f) = OpenOptions::new().write(true).open(&disk) else {
                    return;
                };
                let mut rng = Rng::new(wseed, "writer");
                let t = Instant::now();
                for i in 0..3000usize {
                    if t.elapsed() > Duration::from_secs(30) {
                        return;
                    }
                    let sectors = 1 + rng.below(16) as usize;
                    let off = rng.below((BLOCKS * BS / SEC - sectors) as u64) as usize * SEC;
                    let data = noise(&format!("{wseed}/{i}"), sectors * SEC);
                    issued.lock().unwrap().writes.push((off, data.clone()));
                    in_flight.store(true, Ordering::SeqCst);
                    let r = f.write_all_at(&data, off as u64);
                    in_flight.store(false, Ordering::SeqCst);
                    if r.is_err() {
                        return;
                    }
                    writes_done.store(i + 1, Ordering::SeqCst);
                    if i % every == every - 1 {
                        let n = issued.lock().unwrap().writes.len();
                        in_flight.store(true, Ordering::SeqCst);
                        let r = f.sync_data();
                        in_flight.store(false, Ordering::SeqCst);
                        if r.is_err() {
                            return;
                        }
                        issued.lock().unwrap().synced = n;
                    }
                }
            })
        };
        let (died, fired, started) = match &kill {
            Kill::Fault { .. } => {
                let died = d.wait_dead(Duration::from_secs(40));
                let fired = fault_line(&d.stderr(), &kill);
                if !died {
                    d.kill9();
                }
                (died, fired, false)
            }
            Kill::Delay(delay) => {
                std::thread::sleep(*delay);
                let started =
                    writes_done.load(Ordering::SeqCst) > 0 || in_flight.load(Ordering::SeqCst);
                (d.kill9(), false, started)
            }
        };
        writer.join().unwrap();
        c.record(&kill, died, fired, started);
        if !c.check(round, &kill, fsck_clean(&d.store)) {
            break;
        }
        let issued = Arc::try_unwrap(issued).ok().unwrap().into_inner().unwrap();
        last = Some((kill, issued));
    }
    d.stop();
    c.finish();
}

const SUB_POINTS: &[(&str, u64)] = &[
    ("substitute.logged", 3),
    ("instance_log.appended", 3),
    ("substitute.invalidating", 3),
    ("log.appending", 3),
];

#[test]
fn crash_daemon_mid_substitution() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    if let Some(why) = need_binary() {
        skip!("{why}");
    }
    let mut c = Campaign::new("daemon-substitute");
    let t = tempfile::tempdir().unwrap();
    let mut d = Daemon::new(t.path());
    run(&d.store, &["init"]).unwrap();
    let images: Vec<Vec<u8>> = (0..3)
        .map(|i| noise(&format!("crash-sub-{i}"), BLOCKS * BS))
        .collect();
    let specs = ["s:v0", "s:v1", "s:v2"];
    for (img, spec) in images.iter().zip(specs) {
        let src = t.path().join("img.raw");
        std::fs::write(&src, img).unwrap();
        run(
            &d.store,
            &[
                "import",
                src.to_str().unwrap(),
                spec,
                "--block-size",
                "4096",
            ],
        )
        .unwrap();
    }
    let hashes: Vec<blake3::Hash> = images.iter().map(|i| hash(i)).collect();
    d.start(None).unwrap();
    run(&d.store, &["instance", "create", "s:v0", "vs"]).unwrap();
    d.stop();
    let disk = d.mnt.join("instances/vs.raw");
    // Versions the instance may show after the last kill: the last acknowledged one, and the
    // one a substitution was in flight to.
    let mut allowed: Vec<usize> = vec![0];
    let mut last_kill: Option<Kill> = None;
    for round in 0..=c.rounds() {
        let kill = (round < c.rounds()).then(|| c.pick(SUB_POINTS, Duration::from_millis(400)));
        let fault = kill.as_ref().and_then(Kill::env).map(str::to_string);
        if let Err(e) = d.start(fault.as_deref()) {
            c.damage(
                round,
                kill.as_ref().unwrap_or(&Kill::Delay(Duration::ZERO)),
                e,
            );
            break;
        }
        // Keeps the instance's inode known to the kernel, so substitution invalidates it.
        let f = File::open(&disk).unwrap();
        let mut got = vec![0u8; BLOCKS * BS];
        f.read_exact_at(&mut got, 0).unwrap();
        let now = hashes.iter().position(|h| *h == hash(&got));
        match (now, &last_kill) {
            (Some(v), _) if allowed.contains(&v) => {}
            (other, k) => {
                let k = k.clone().unwrap_or(Kill::Delay(Duration::ZERO));
                c.damage(
                    round,
                    &k,
                    format!("instance shows version {other:?}, allowed {allowed:?} (None: a mix)"),
                );
                break;
            }
        }
        let Some(kill) = kill else { break };
        let current = now.unwrap_or(0);
        let acked = Arc::new(Mutex::new((current, None::<usize>)));
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (store, acked, stop) = (d.store.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut at = current;
                while !stop.load(Ordering::SeqCst) {
                    let to = (at + 1) % 3;
                    acked.lock().unwrap().1 = Some(to);
                    let o = imagefs(&store)
                        .args(["substitute", "vs", specs[to]])
                        .output()
                        .unwrap();
                    if !o.status.success() {
                        return;
                    }
                    *acked.lock().unwrap() = (to, None);
                    at = to;
                }
            })
        };
        let (died, fired, started) = match &kill {
            Kill::Fault { .. } => {
                let died = d.wait_dead(Duration::from_secs(40));
                let fired = fault_line(&d.stderr(), &kill);
                if !died {
                    d.kill9();
                }
                (died, fired, false)
            }
            Kill::Delay(delay) => {
                std::thread::sleep(*delay);
                let started = acked.lock().unwrap().1.is_some();
                (d.kill9(), false, started)
            }
        };
        stop.store(true, Ordering::SeqCst);
        flipper.join().unwrap();
        drop(f);
        c.record(&kill, died, fired, started);
        if !c.check(round, &kill, fsck_clean(&d.store)) {
            break;
        }
        let (done, in_flight) = *acked.lock().unwrap();
        allowed = vec![done];
        allowed.extend(in_flight);
        last_kill = Some(kill);
    }
    d.stop();
    c.finish();
}

const ROLLOUT_POINTS: &[(&str, u64)] = &[
    ("rollout.between_vms", 4),
    ("rollout.wave_saved", 3),
    ("log.appending", 8),
];

const ROLL_INSTANCES: [&str; 4] = ["r-1", "r-2", "r-3", "r-4"];

/// Rollout journals (`ID.log`; a `.log.tmp` is one being created).
fn journals(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let t = p.metadata().and_then(|m| m.modified()).unwrap();
            (p, t)
        })
        .collect()
}

/// The rollout a `--json` run printed its id for, if it got that far.
fn rollout_id(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["rollout"].as_str().map(str::to_string))
}

#[test]
fn crash_rollout_driver_mid_wave() {
    if !is_root() {
        skip!("FUSE mounts need root here (the rollout drives a mount daemon)");
    }
    if let Some(why) = need_binary() {
        skip!("{why}");
    }
    let mut c = Campaign::new("rollout");
    let t = tempfile::tempdir().unwrap();
    let mut d = Daemon::new(t.path());
    run(&d.store, &["init"]).unwrap();
    let images: Vec<Vec<u8>> = (0..2)
        .map(|i| noise(&format!("crash-rollout-{i}"), BLOCKS * BS))
        .collect();
    let specs = ["r:v0", "r:v1"];
    for (img, spec) in images.iter().zip(specs) {
        let src = t.path().join("img.raw");
        std::fs::write(&src, img).unwrap();
        run(
            &d.store,
            &[
                "import",
                src.to_str().unwrap(),
                spec,
                "--block-size",
                "4096",
            ],
        )
        .unwrap();
    }
    let hashes: Vec<blake3::Hash> = images.iter().map(|i| hash(i)).collect();
    d.start(None).unwrap();
    for i in ROLL_INSTANCES {
        run(&d.store, &["instance", "create", "r:v0", i]).unwrap();
    }
    let shows = |mnt: &Path, inst: &str| -> Option<usize> {
        let got = std::fs::read(mnt.join(format!("instances/{inst}.raw"))).ok()?;
        hashes.iter().position(|h| *h == hash(&got))
    };
    let mut from = 0usize;
    for round in 0..c.rounds() {
        let to = 1 - from;
        let kill = c.pick(ROLLOUT_POINTS, Duration::from_millis(150));
        let jdir = d.store.join("rollouts");
        let before = journals(&jdir).len();
        let mut cmd = imagefs(&d.store);
        cmd.args([
            "rollout",
            specs[to],
            "--instances",
            "r-*",
            "--waves",
            "1,50%,100%",
            "--json",
        ]);
        let ran = match run_killed(&mut cmd, &kill, Duration::from_secs(60), || {
            journals(&jdir).len() > before
        }) {
            Ok(r) => r,
            Err(e) => {
                c.damage(round, &kill, e);
                break;
            }
        };
        c.record(&kill, ran.died, ran.fired, ran.started);
        let mut ok = c.check(round, &kill, fsck_clean(&d.store));
        // Acknowledged: every substitution the journal records shows the target wholly; the
        // rest show the old version or (substituted, not yet journaled) the new one, wholly.
        let id = rollout_id(&ran.stdout);
        let done: Vec<String> = match &id {
            Some(id) if ran.died => match run(&d.store, &["rollout", "status", id, "--json"]) {
                Ok(s) => serde_json::from_str::<Value>(s.trim()).map_or(Vec::new(), |v| {
                    v["done"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                }),
                Err(e) => {
                    c.damage(round, &kill, format!("status after the kill: {e}"));
                    break;
                }
            },
            _ => Vec::new(),
        };
        for inst in ROLL_INSTANCES {
            let v = shows(&d.mnt, inst);
            let fine = if done.iter().any(|x| x == inst) {
                v == Some(to)
            } else {
                v == Some(to) || v == Some(from)
            };
            if !fine {
                ok = ok
                    && c.check(
                        round,
                        &kill,
                        Err(format!(
                            "{inst} shows {v:?} (done: {done:?}, from {from} to {to})"
                        )),
                    );
            }
        }
        // Resume (or, killed before its journal existed, start again) to the end.
        let again = match (&id, ran.died) {
            (Some(id), true) => run(&d.store, &["rollout", "--resume", id]),
            (None, true) => {
                // Killed before it printed an id: its journal, if any, is the newest one.
                let all = journals(&jdir);
                let resumable = all
                    .iter()
                    .max_by_key(|(_, t)| *t)
                    .filter(|_| all.len() > before)
                    .and_then(|(p, _)| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
                match resumable {
                    Some(id) => run(&d.store, &["rollout", "--resume", &id]),
                    None => run(
                        &d.store,
                        &[
                            "rollout",
                            specs[to],
                            "--instances",
                            "r-*",
                            "--waves",
                            "1,50%,100%",
                        ],
                    ),
                }
            }
            _ => Ok(String::new()),
        };
        ok = ok && c.check(round, &kill, again.map(|_| ()));
        for inst in ROLL_INSTANCES {
            let v = shows(&d.mnt, inst);
            if v != Some(to) {
                ok = ok
                    && c.check(
                        round,
                        &kill,
                        Err(format!(
                            "{inst} shows {v:?} after the resumed rollout to {to}"
                        )),
                    );
            }
        }
        if !ok {
            break;
        }
        from = to;
    }
    d.stop();
    c.finish();
}
