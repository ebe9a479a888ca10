//! What the remote scenarios (remote, remote_lazy, remote_gc, remote_cluster) share: the
//! `imagefs` command line as a user runs it on these machines, its JSON result, and a store
//! with a Garage remote added.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use imagefs_tests::bin;
use serde_json::Value;

/// The store's block size.
pub const BS: usize = 64 * 1024;

/// `imagefs --store STORE ARGS` as a user runs it on these machines: AWS_CA_BUNDLE set (it
/// must not matter for an http endpoint) and no AWS keys in the environment (the remote's
/// credentials file is what signs).
pub fn imagefs(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("imagefs"));
    c.arg("--store").arg(store).args(args);
    c.env("AWS_CA_BUNDLE", "/nonexistent/imagefs-test-ca.pem")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("IMAGEFS_FAULT");
    c
}

pub fn run(store: &Path, args: &[&str]) -> Output {
    imagefs(store, args).output().expect("spawn imagefs")
}

/// Runs and asserts exit 0.
pub fn ok(store: &Path, args: &[&str]) -> Output {
    let out = run(store, args);
    assert!(
        out.status.success(),
        "imagefs {args:?} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON Lines of `out` (events, then the result last).
pub fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The last JSON line, which must be the command's result.
pub fn result(out: &Output) -> Value {
    let r = lines(out).pop().unwrap_or(Value::Null);
    assert_eq!(r["type"], "result", "no result in {out:?}");
    r
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// A new store `DIR/NAME` with the remote `g` at `s3://BUCKET/fleet` on `endpoints` (in that
/// order), signed by the credentials file `write_creds` writes.
pub fn store_with_endpoints(
    dir: &Path,
    name: &str,
    bucket: &str,
    endpoints: &[String],
    write_creds: impl FnOnce(&Path),
    timeout: &str,
) -> PathBuf {
    let store = dir.join(name);
    ok(&store, &["init"]);
    let creds = dir.join(format!("{name}.creds"));
    write_creds(&creds);
    let url = format!("s3://{bucket}/fleet");
    let mut args = vec![
        "remote",
        "add",
        "g",
        &url,
        "--region",
        "garage",
        "--credentials",
        creds.to_str().unwrap(),
        "--timeout",
        timeout,
    ];
    for e in endpoints {
        args.extend(["--endpoint", e.as_str()]);
    }
    ok(&store, &args);
    store
}

/// A new store `DIR/NAME` with the remote `g` on the single-node Garage `g`.
pub fn store_with_remote(
    dir: &Path,
    name: &str,
    g: &imagefs_tests::garage::Garage,
    timeout: &str,
) -> PathBuf {
    store_with_endpoints(
        dir,
        name,
        &g.bucket,
        std::slice::from_ref(&g.endpoint),
        |p| g.credentials_file(p),
        timeout,
    )
}

/// How many distinct non-zero blocks `img` holds (what a push of it into an empty remote sends).
pub fn distinct_blocks(img: &[u8]) -> u64 {
    img.chunks(BS)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| *blake3::hash(b).as_bytes())
        .collect::<HashSet<_>>()
        .len() as u64
}
