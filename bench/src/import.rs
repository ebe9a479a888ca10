//! Import benches: a fresh import against `cp --sparse=always` + fsync and against `casync make`,
//! a re-import of stored bytes against `b3sum`, and the peak RSS of importing a 20 GiB sparse
//! image against a fixed 256 MiB budget. Invariant: both sides of a pair read the same image from
//! a warm page cache, interleaved run by run, so drift in machine load hits both alike.

use std::path::Path;
use std::process::Command;

use crate::fixture::{self, BASE_SIZE};
use crate::report::{Better, Metric, Report};
use crate::sys::{self, io, BenchError, Result};
use crate::Env;

const MIB: f64 = 1048576.0;

/// Runs every import metric, in priority order; each failure becomes a BENCH-SKIP line.
pub fn run(env: &Env, rep: &mut Report) {
    let fresh_secs = match fresh_vs_cp(env) {
        Ok((m, secs)) => {
            rep.add(m);
            Some(secs)
        }
        Err(e) => {
            rep.skip("import_fresh_vs_cp_sparse_sync", format!("failed: {e}"));
            None
        }
    };
    match fresh_secs {
        Some(ours) if sys::have("casync") => match vs_casync(env, ours) {
            Ok(m) => rep.add(m),
            Err(e) => rep.skip("import_fresh_vs_casync_make", format!("failed: {e}")),
        },
        Some(_) => rep.skip("import_fresh_vs_casync_make", "casync is not installed"),
        None => rep.skip("import_fresh_vs_casync_make", "the fresh import failed"),
    }
    match reimport_vs_b3sum(env) {
        Ok(m) => rep.add(m),
        Err(e) => rep.skip("reimport_vs_b3sum", format!("failed: {e}")),
    }
    if !Path::new("/usr/bin/time").is_file() {
        rep.skip(
            "import_20g_sparse_peak_rss",
            "/usr/bin/time is not installed",
        );
        return;
    }
    match peak_rss(env) {
        Ok(m) => rep.add(m),
        Err(e) => rep.skip("import_20g_sparse_peak_rss", format!("failed: {e}")),
    }
}

/// A new, empty store at `dir` (removing what was there).
pub fn fresh_store(env: &Env, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    sys::run(env.imagefs(dir).arg("init"))?;
    Ok(())
}

/// `imagefs import FILE NAME:TAG` with the bench's block size.
pub fn import(env: &Env, store: &Path, file: &Path, name_tag: &str) -> Result<()> {
    sys::run(
        env.imagefs(store)
            .arg("import")
            .arg(file)
            .arg(name_tag)
            .arg("--block-size")
            .arg(env.block_size.to_string()),
    )?;
    Ok(())
}

fn mib_per_s(secs: f64) -> f64 {
    BASE_SIZE as f64 / MIB / secs
}

/// Fresh import into an empty store vs `cp --sparse=always` + fsync of the copy (the disk-bound
/// limit). Returns the metric and our raw times (reused against casync).
fn fresh_vs_cp(env: &Env) -> Result<(Metric, Vec<f64>)> {
    let mut m = Metric::new(
        "import_fresh_vs_cp_sparse_sync",
        "MiB/s",
        Better::Higher,
        "cp --sparse=always IMG COPY && sync COPY (MiB of image per second)",
        ">= 0.8x",
    );
    let store = env.work.join("fresh-store");
    let copy = env.work.join("fresh-copy.img");
    let mut secs = Vec::new();
    for _ in 0..env.runs {
        sys::warm(&env.base)?;
        fresh_store(env, &store)?;
        let (t, ()) = sys::timed(|| import(env, &store, &env.base, "base:v0"))?;
        secs.push(t);
        m.ours.push(mib_per_s(t));
        let _ = std::fs::remove_dir_all(&store);

        sys::warm(&env.base)?;
        let _ = std::fs::remove_file(&copy);
        let (t, ()) = sys::timed(|| {
            fixture::sparse_copy(&env.base, &copy)?;
            sys::run(Command::new("sync").arg(&copy)).map(|_| ())
        })?;
        m.peer.push(mib_per_s(t));
        std::fs::remove_file(&copy).map_err(io("remove", &copy))?;
    }
    Ok((m, secs))
}

/// The fresh import's times against `casync make` of the same image into a fresh store.
fn vs_casync(env: &Env, ours: Vec<f64>) -> Result<Metric> {
    let mut m = Metric::new(
        "import_fresh_vs_casync_make",
        "s",
        Better::Lower,
        "casync make --store=NEW.castr OUT.caibx IMG (seconds)",
        "ratio <= 0.1 (10x faster)",
    );
    m.ours = ours;
    let dir = env.work.join("casync");
    // casync is slow (tens of seconds for 2 GiB) and far from the bar: two runs.
    for _ in 0..env.runs.clamp(1, 2) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        sys::warm(&env.base)?;
        let (t, _) = sys::timed(|| {
            sys::run(
                Command::new("casync")
                    .arg("make")
                    .arg(format!("--store={}", dir.join("s.castr").display()))
                    .arg(dir.join("i.caibx"))
                    .arg(&env.base),
            )
        })?;
        m.peer.push(t);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(m)
}

/// Importing bytes the store already holds (every block dedups) vs `b3sum` of the same file.
fn reimport_vs_b3sum(env: &Env) -> Result<Metric> {
    let mut m = Metric::new(
        "reimport_vs_b3sum",
        "MiB/s",
        Better::Higher,
        "b3sum IMG (MiB of image per second)",
        ">= 0.7x",
    );
    let store = env.work.join("reimport-store");
    fresh_store(env, &store)?;
    import(env, &store, &env.base, "base:v0")?;
    sys::warm(&env.base)?;
    for i in 0..env.runs {
        let tag = format!("base:r{i}");
        let (t, ()) = sys::timed(|| import(env, &store, &env.base, &tag))?;
        m.ours.push(mib_per_s(t));
        let (t, _) = sys::timed(|| sys::run(Command::new("b3sum").arg(&env.base)))?;
        m.peer.push(mib_per_s(t));
    }
    let _ = std::fs::remove_dir_all(&store);
    Ok(m)
}

/// Peak RSS of importing a 20 GiB sparse image (the ext4 image, then holes) into a fresh store,
/// against a fixed budget of 256 MiB.
fn peak_rss(env: &Env) -> Result<Metric> {
    let mut m = Metric::new(
        "import_20g_sparse_peak_rss",
        "MiB",
        Better::Lower,
        "fixed budget of 256 MiB",
        "<= 256 MiB",
    );
    let img = fixture::sparse_20g(&env.base, &env.work.join("sparse-20g.img"))?;
    let store = env.work.join("rss-store");
    for _ in 0..env.runs.clamp(1, 3) {
        fresh_store(env, &store)?;
        let mut c = Command::new("/usr/bin/time");
        c.arg("-v")
            .arg(&env.bin)
            .arg("--store")
            .arg(&store)
            .arg("import")
            .arg(&img)
            .arg("big:v0")
            .arg("--block-size")
            .arg(env.block_size.to_string());
        let out = sys::run(&mut c)?;
        let err = String::from_utf8_lossy(&out.stderr);
        let kib: f64 = err
            .lines()
            .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| BenchError::Parse {
                what: "maximum resident set size",
                text: err.chars().take(300).collect(),
            })?;
        m.ours.push(kib / 1024.0);
        m.peer.push(256.0);
    }
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_file(&img);
    Ok(m)
}
