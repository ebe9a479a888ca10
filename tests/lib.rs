//! Shared helpers for the end-to-end tests: where the built binaries are, polling instead of
//! sleeping, and loud skips. Each scenario lives in its own module under e2e/.

pub mod nested;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The workspace root (the folder holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a binary built by this workspace (`imagefs`, `vmm`, `guest-agent`).
///
/// Looks in `$IMAGEFS_BIN_DIR` first, then next to the running test executable
/// (target/<profile>/deps/.. = target/<profile>). `make test` builds every binary first.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("IMAGEFS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join(name)
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes: the same seed gives the same bytes in every scenario.
pub fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// True when the tests run as root (FUSE mounts and /dev/kvm need it here).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the current test loudly: prints why on stderr. Under `IMAGEFS_STRICT=1` (CI, after the
/// set-up has installed everything) a skip is a failure instead, so nothing passes silently.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        let why = format!($($arg)*);
        if std::env::var("IMAGEFS_STRICT").map(|v| v == "1").unwrap_or(false) {
            panic!("IMAGEFS_STRICT=1 and a prerequisite is missing: {why}");
        }
        eprintln!("\n*** SKIPPED {}: {why} ***\n", module_path!());
        return;
    }};
}
