//! `imagefs-bench`: runs imagefs and its peers side by side in one run, prints one `BENCH` (or
//! `BENCH-SKIP`) line per metric with medians and the ratio, and writes every raw sample plus the
//! machine's facts to OUT/results.json. Invariant: the scratch area is removed at the end; only
//! the cached fixture image and the results stay under OUT.
//!
//! Usage: imagefs-bench [--imagefs BIN] [--out DIR] [--runs N] [--only GROUP,...] [--cargo-target DIR]
//! Groups, in priority order: import, chain, mount, disk, remote, vm, vm-live, fleet.

mod chain;
mod disk;
mod fixture;
mod fleet;
mod import;
mod mount;
mod remote;
mod report;
mod sys;
mod vm;
mod vm_live;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// What every bench needs: the binary under test, the scratch dir, the fixture and the run count.
#[derive(Debug)]
pub struct Env {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub base: PathBuf,
    pub runs: usize,
    pub block_size: u64,
    /// Where `cargo test --release` builds the e2e benchmark tests (the VM group).
    pub cargo_target: PathBuf,
}

impl Env {
    /// `imagefs --store STORE` (the rest of the arguments are the caller's).
    pub fn imagefs(&self, store: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--store").arg(store);
        c
    }
}

#[derive(Debug)]
struct Opts {
    bin: PathBuf,
    out: PathBuf,
    runs: usize,
    only: Vec<String>,
    cargo_target: PathBuf,
}

const GROUPS: [&str; 8] = [
    "import", "chain", "mount", "disk", "remote", "vm", "vm-live", "fleet",
];

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        bin: PathBuf::from("target/release/imagefs"),
        out: PathBuf::from("target/bench"),
        runs: 5,
        only: GROUPS.iter().map(|s| s.to_string()).collect(),
        cargo_target: PathBuf::from("target"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--imagefs" => o.bin = PathBuf::from(val()?),
            "--out" => o.out = PathBuf::from(val()?),
            "--runs" => o.runs = val()?.parse().context("--runs takes a number")?,
            "--cargo-target" => o.cargo_target = PathBuf::from(val()?),
            "--only" => o.only = val()?.split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                println!("usage: imagefs-bench [--imagefs BIN] [--out DIR] [--runs N] [--only import,chain,mount,disk,remote,vm,vm-live,fleet] [--cargo-target DIR]");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a:?} (try --help)"),
        }
    }
    if let Some(g) = o.only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
        bail!("unknown group {g:?}: the groups are {}", GROUPS.join(","));
    }
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    let o = parse_args()?;
    let bin = std::path::absolute(&o.bin)?;
    if !bin.is_file() {
        bail!(
            "{} is not built (cargo build --release -p imagefs)",
            bin.display()
        );
    }
    let out = std::path::absolute(&o.out)?;
    let work = out.join("work");
    let _ = Command::new("umount")
        .arg("-l")
        .arg(work.join("mnt"))
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    let base = fixture::base_image(&out.join("cache")).context("building the ext4 fixture")?;
    let env = Env {
        bin,
        work,
        base,
        runs: o.runs,
        block_size: 65536,
        cargo_target: std::path::absolute(&o.cargo_target)?,
    };
    let mut machine = sys::machine();
    if let Some(m) = machine.as_object_mut() {
        m.insert("argv".into(), std::env::args().collect::<Vec<_>>().into());
    }
    println!("bench: {machine}");
    let mut rep = report::Report::default();
    let t = std::time::Instant::now();
    for g in GROUPS.iter().filter(|g| o.only.iter().any(|x| x == *g)) {
        eprintln!("bench: {g} ({:.0} s so far)", t.elapsed().as_secs_f64());
        match *g {
            "import" => import::run(&env, &mut rep),
            "chain" => chain::run(&env, &mut rep),
            "mount" => mount::run(&env, &mut rep),
            "disk" => disk::run(&env, &mut rep),
            "remote" => remote::run(&env, &mut rep),
            "vm" => vm::run(&env, &mut rep),
            "fleet" => fleet::run(&env, &mut rep),
            _ => vm_live::run(&env, &mut rep),
        }
    }
    let _ = std::fs::remove_dir_all(&env.work);
    let results = out.join("results.json");
    let json = serde_json::to_string_pretty(&rep.json(machine))?;
    std::fs::write(&results, json + "\n")
        .with_context(|| format!("write {}", results.display()))?;
    println!(
        "bench: {} metrics, {} skipped, {:.0} s; results in {}",
        rep.metrics.len(),
        rep.skipped.len(),
        t.elapsed().as_secs_f64(),
        results.display()
    );
    Ok(())
}
