//! Shared helpers for the end-to-end tests: where the built binaries are, polling instead of
//! sleeping, and loud skips. Each scenario lives in its own module under e2e/.

pub mod garage;
pub mod nested;
pub mod netns;
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

/// The external tools tests run, each with the Debian package `scripts/setup.sh` installs it from.
pub const TOOLS: &[(&str, &str)] = &[
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("as", "binutils"),
    ("objcopy", "binutils"),
    ("file", "file"),
    ("fincore", "util-linux"),
    ("cpio", "cpio"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
];

/// Where `name` is: the first match on PATH, then /usr/sbin and /sbin (a non-root PATH often
/// lacks them, and mkfs.ext4 and debugfs live there). None when it is nowhere.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A command for the tool `name`, found as `tool` finds it (the bare name if nowhere, so the
/// spawn error names it).
pub fn tool_command(name: &str) -> std::process::Command {
    std::process::Command::new(tool(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// Why a test needing `names` cannot run, if one is missing: names the tool and the package
/// `make setup` installs it from. Use with `skip!`, so a missing tool fails under IMAGEFS_STRICT.
pub fn missing_tools(names: &[&str]) -> Option<String> {
    let missing: Vec<String> = names
        .iter()
        .filter(|n| tool(n).is_none())
        .map(|n| {
            let package = TOOLS.iter().find(|(t, _)| t == n).map_or("?", |(_, p)| p);
            format!("{n} (package {package})")
        })
        .collect();
    (!missing.is_empty()).then(|| format!("needs {} (make setup)", missing.join(", ")))
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

/// Ends the current test loudly, and as a pass, because its premise does not hold on this host
/// (for example a refusal of kvm_pvm on a host whose KVM is not kvm_pvm). Not a missing
/// prerequisite: nothing can be installed to change it, so IMAGEFS_STRICT does not fail it.
#[macro_export]
macro_rules! not_applicable {
    ($($arg:tt)*) => {{
        let why = format!($($arg)*);
        eprintln!("\n*** NOT APPLICABLE {}: {why} ***\n", module_path!());
        return;
    }};
}

/// Runs `args` as the unprivileged user nobody (setpriv, util-linux), for checks that a local
/// user cannot reach what is not theirs. `None` when setpriv is missing.
pub fn as_nobody(args: &[&str]) -> Option<std::process::Output> {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .ok()
}

/// Fails the test unless user nobody is refused each of: reading the files in `read` and
/// connecting to the Unix sockets in `connect`.
pub fn assert_nobody_is_refused(read: &[&std::path::Path], connect: &[&std::path::Path]) {
    for p in read {
        let p = p.to_string_lossy();
        let out = as_nobody(&["head", "-c", "1", &p]).expect("setpriv");
        assert!(
            !out.status.success(),
            "user nobody read {p}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for p in connect {
        let code = format!(
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})",
            p.to_string_lossy()
        );
        let out = as_nobody(&["python3", "-c", &code]).expect("setpriv");
        assert!(
            !out.status.success(),
            "user nobody connected to {}",
            p.display()
        );
    }
}
