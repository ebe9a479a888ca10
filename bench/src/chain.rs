//! Store size after 10 versions, each changing 1% of the blocks, against a qcow2 overlay chain
//! holding the same changes. Invariant: both sides get byte-identical versions (one image patched
//! in place, each version taken from it), and the qcow2 chain is checked to read back as the last
//! version before its size counts.

use std::path::Path;
use std::process::Command;

use crate::fixture::{self, Rng};
use crate::import::{fresh_store, import};
use crate::report::{Better, Metric, Report};
use crate::sys::{self, Result};
use crate::Env;

const VERSIONS: u64 = 10;

pub fn run(env: &Env, rep: &mut Report) {
    const NAME: &str = "store_size_10_versions_1pct_vs_qcow2_chain";
    if !sys::have("qemu-img") {
        rep.skip(NAME, "qemu-img is not installed");
        return;
    }
    match chain(env) {
        Ok(m) => rep.add(m),
        Err(e) => rep.skip(NAME, format!("failed: {e}")),
    }
}

fn qemu_img(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<()> {
    let mut c = Command::new("qemu-img");
    for a in args {
        c.arg(a);
    }
    sys::run(&mut c).map(|_| ())
}

/// Overlay `ov` holding exactly the clusters where `img` (raw) differs from `backing` (qcow2):
/// made on top of `img`, then rebased (safe mode) onto `backing`, which copies in those clusters.
fn overlay(img: &Path, backing: &Path, ov: &Path) -> Result<()> {
    qemu_img(&[
        &"create", &"-q", &"-f", &"qcow2", &"-b", &img, &"-F", &"raw", &ov,
    ])?;
    qemu_img(&[&"rebase", &"-q", &"-b", &backing, &"-F", &"qcow2", &ov])
}

fn chain(env: &Env) -> Result<Metric> {
    let mut m = Metric::new(
        "store_size_10_versions_1pct_vs_qcow2_chain",
        "MiB",
        Better::Lower,
        "qcow2 base + 10 overlays (qemu-img rebase), du of all files",
        "no larger (ratio <= 1.0)",
    );
    let dir = env.work.join("chain");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(sys::io("mkdir", &dir))?;
    let img = dir.join("patched.img");
    let store = dir.join("store");
    let q = |i: u64| dir.join(format!("v{i}.qcow2"));
    fixture::sparse_copy(&env.base, &img)?;
    fresh_store(env, &store)?;
    import(env, &store, &img, "chain:v0")?;
    qemu_img(&[&"convert", &"-O", &"qcow2", &img, &q(0)])?;
    let len = std::fs::metadata(&img)
        .map_err(sys::io("stat", &img))?
        .len();
    let per_version = len / env.block_size / 100;
    let mut rng = Rng::new(0x1e55);
    for i in 1..=VERSIONS {
        fixture::patch_blocks(&img, env.block_size, per_version, &mut rng)?;
        import(env, &store, &img, &format!("chain:v{i}"))?;
        overlay(&img, &q(i - 1), &q(i))?;
    }
    // The chain must read back as the last version, or its size means nothing.
    qemu_img(&[&"compare", &"-q", &img, &q(VERSIONS)])?;
    let ours = sys::du_bytes(&store)?;
    let mut peer = 0;
    for i in 0..=VERSIONS {
        peer += sys::du_bytes(&q(i))?;
    }
    m.ours.push(ours as f64 / 1048576.0);
    m.peer.push(peer as f64 / 1048576.0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(m)
}
