//! Scenario module: mount. Real FUSE mounts of a real store (root needed): version files read
//! byte-identical to their sources (and `qemu-img compare` agrees), instances are private,
//! partial-write capable, durable on fsync and committable, readers (O_DIRECT and buffered) never
//! see a torn or stale read while substitutions race them, and kill -9 of the daemon mid-write or
//! mid-substitution leaves a consistent store. Every mount is unmounted on drop, lazily if a test
//! failed.
// The harness helpers below are test code: a panic there is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imagefs_tests::{bin, is_root, missing_tools, noise, skip, tool_command, wait_until};

const BS: usize = 4096;

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

/// A store, a mountpoint, and the daemon serving it (a foreground child we can kill -9).
struct Mounted {
    dir: tempfile::TempDir,
    store: PathBuf,
    mnt: PathBuf,
    daemon: Option<Child>,
}

impl Mounted {
    fn new() -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let m = Mounted {
            dir,
            store,
            mnt,
            daemon: None,
        };
        m.ok(&["init"]);
        m
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "imagefs {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `bytes` as DIR/name and imports it as `spec` (4 KiB blocks).
    fn import(&self, name: &str, bytes: &[u8], spec: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        // A relative path: the CLI must resolve it even when a daemon runs the command.
        self.ok(&["import", name, spec, "--block-size", "4096"]);
        p
    }

    fn start(&mut self) {
        self.start_with(&[]);
    }

    fn start_with(&mut self, extra: &[&str]) {
        self.start_faulted(extra, None);
    }

    /// Starts the daemon with `IMAGEFS_FAULT=fault` (a named fault point, fault.rs) if given.
    fn start_faulted(&mut self, extra: &[&str], fault: Option<&str>) {
        let log = File::create(self.dir.path().join("daemon.stderr")).unwrap();
        let mut cmd = Command::new(bin("imagefs"));
        cmd.arg("--store")
            .arg(&self.store)
            .arg("mount")
            .arg(&self.mnt)
            .args(extra)
            .env_remove("IMAGEFS_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(f) = fault {
            cmd.env("IMAGEFS_FAULT", f);
        }
        let child = cmd.spawn().unwrap();
        self.daemon = Some(child);
        let mnt = self.mnt.clone();
        assert!(
            wait_until(Duration::from_secs(10), || is_mounted(&mnt)
                && mnt.join("images").exists()),
            "mount did not come up: {}",
            std::fs::read_to_string(self.dir.path().join("daemon.stderr")).unwrap_or_default()
        );
    }

    /// `imagefs umount`: the daemon must exit 0 and the mount must be gone.
    fn stop(&mut self) {
        let mnt = self.mnt.to_string_lossy().into_owned();
        self.ok(&["umount", &mnt]);
        let mut child = self.daemon.take().unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "daemon exit status {status}");
        assert!(!is_mounted(&self.mnt));
        assert!(!self.store.join("control.sock").exists());
    }

    /// SIGTERM: the daemon must unmount, flush and exit 0 on its own.
    fn term(&mut self) {
        let mut child = self.daemon.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "daemon exit status {status} after SIGTERM"
        );
        assert!(!is_mounted(&self.mnt));
    }

    /// Waits for a daemon started with a fault point armed to kill itself there: it must die
    /// of SIGKILL and have printed `IMAGEFS-FAULT name` (the kill landed inside the operation).
    fn wait_fault(&mut self, name: &str) {
        let mut c = self.daemon.take().unwrap();
        let dead = wait_until(Duration::from_secs(30), || c.try_wait().unwrap().is_some());
        if !dead {
            let _ = c.kill();
        }
        let status = c.wait().unwrap();
        lazy_umount(&self.mnt);
        assert!(wait_until(Duration::from_secs(5), || !is_mounted(
            &self.mnt
        )));
        let said =
            std::fs::read_to_string(self.dir.path().join("daemon.stderr")).unwrap_or_default();
        assert!(
            dead && std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL)
                && said.lines().any(|l| l == format!("IMAGEFS-FAULT {name}")),
            "the daemon did not die at fault point {name} ({status}): {said}"
        );
    }

    /// `imagefs fsck` (no daemon running) must be clean.
    fn fsck_clean(&self, when: &str) {
        let fsck = self.cli(&["fsck"]);
        assert!(
            fsck.status.success(),
            "fsck {when}: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            lazy_umount(&self.mnt);
        }
    }
}

/// An image of `blocks` blocks with a 1 MiB hole in the middle and a 123-byte tail.
fn source_image(blocks: usize, seed: &str) -> Vec<u8> {
    let mut v = noise(seed, blocks * BS + 123);
    let mid = blocks * BS / 2;
    v[mid..mid + (1 << 20)].fill(0);
    v
}

#[test]
fn version_files_read_identical_to_their_sources() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    if let Some(why) = missing_tools(&["qemu-img"]) {
        skip!("{why}");
    }
    let mut m = Mounted::new();
    let a = source_image(768, "a");
    let a_path = m.import("a.img", &a, "web:v1");
    m.start();
    // Imported while mounted: the CLI hands the command to the daemon, and it shows up.
    let mut b = a.clone();
    b[40 * BS..43 * BS].copy_from_slice(&noise("b", 3 * BS));
    m.import("b.img", &b, "web:v2");
    assert_eq!(m.read("images/web/v1.raw"), a);
    assert_eq!(m.read("images/web/v2.raw"), b);
    let versions: Vec<_> = std::fs::read_dir(m.path("versions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(versions.len(), 2);
    for v in &versions {
        let bytes = std::fs::read(v).unwrap();
        assert!(
            bytes == a || bytes == b,
            "{} matches no source",
            v.display()
        );
    }
    let meta = std::fs::metadata(m.path("images/web/v1.raw")).unwrap();
    assert_eq!(meta.len(), a.len() as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    assert!(
        meta.blocks() * 512 < a.len() as u64,
        "the hole is not allocated"
    );
    assert!(meta.blocks() * 512 >= a.len() as u64 - (1 << 20));

    let compare = |x: &Path, y: &Path| {
        tool_command("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(x)
            .arg(y)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(compare(&m.path("images/web/v1.raw"), &a_path), Some(0));
    assert_eq!(compare(&m.path("images/web/v2.raw"), &a_path), Some(1));

    // Version files are read-only; reads past the end are short.
    let err = OpenOptions::new()
        .write(true)
        .open(m.path("images/web/v1.raw"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let f = File::open(m.path("images/web/v1.raw")).unwrap();
    let mut buf = [0u8; 100];
    assert_eq!(f.read_at(&mut buf, a.len() as u64 - 10).unwrap(), 10);
    assert_eq!(&buf[..10], &a[a.len() - 10..]);
    assert_eq!(f.read_at(&mut buf, a.len() as u64 + 10).unwrap(), 0);
    // An open file keeps the mount busy: a plain umount refuses (exit 4) and changes nothing.
    let busy = m.cli(&["umount", &m.mnt.to_string_lossy()]);
    assert_eq!(busy.status.code(), Some(4));
    drop(f);

    // New tags appear without a remount; a second mount of the store is refused.
    m.ok(&["tag", "web:latest", "web:v2"]);
    assert_eq!(m.read("images/web/latest.raw"), b);
    let other = m.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let second = m.cli(&["mount", &other.to_string_lossy()]);
    assert_eq!(second.status.code(), Some(4));
    m.stop();
}

#[test]
fn a_corrupt_block_is_eio_never_wrong_bytes() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = noise("corrupt", 64 * BS);
    m.import("a.img", &a, "web:v1");
    // Flip one bit of block 5 where its bytes lie in a pack file.
    let block = &a[5 * BS..6 * BS];
    let mut hit = false;
    for e in std::fs::read_dir(m.store.join("packs")).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        if let Some(at) = bytes.windows(BS).position(|w| w == block) {
            bytes[at + 100] ^= 1;
            std::fs::write(&p, &bytes).unwrap();
            hit = true;
        }
    }
    assert!(hit, "block 5 not found in any pack file");
    m.start();
    let f = File::open(m.path("images/web/v1.raw")).unwrap();
    let mut buf = vec![0u8; BS];
    let err = f.read_exact_at(&mut buf, 5 * BS as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    f.read_exact_at(&mut buf, 6 * BS as u64).unwrap();
    assert_eq!(buf, &a[6 * BS..7 * BS]);
    drop(f);
    m.stop();
    let log = std::fs::read_to_string(m.dir.path().join("daemon.stderr")).unwrap();
    assert!(
        log.contains("corrupt"),
        "the daemon did not log the corruption: {log}"
    );
}

/// The flat copies the daemon holds, from `prefetch --list --json`: (id, allocated bytes).
fn flat_copies(m: &Mounted) -> Vec<(String, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&m.ok(&["prefetch", "--list", "--json"])).unwrap();
    v["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["allocated"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Bytes of `path` in the page cache (util-linux fincore).
fn resident(path: &Path) -> u64 {
    let out = tool_command("fincore")
        .args(["--bytes", "--noheadings", "-o", "RES"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn bulk_read_versions_are_passed_through_to_a_flat_copy() {
    if !is_root() {
        skip!("FUSE mounts and passthrough need root here");
    }
    if let Some(why) = missing_tools(&["fincore", "qemu-img"]) {
        skip!("{why}");
    }
    let mut m = Mounted::new();
    let a = source_image(768, "pa");
    let mut b = a.clone();
    b[7 * BS..9 * BS].copy_from_slice(&noise("pb", 2 * BS));
    m.import("a.img", &a, "web:v1");
    m.import("b.img", &b, "web:v2");
    m.ok(&["tag", "web:latest", "web:v1"]);
    m.start();
    let log = || std::fs::read_to_string(m.dir.path().join("daemon.stderr")).unwrap_or_default();
    let flat_dir = m.store.join("flat");

    // A peek (qemu-img info reads a few KiB) costs no copy; a bulk read gets one, in the
    // background.
    let mut head = [0u8; BS];
    File::open(m.path("images/web/v1.raw"))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(head, a[..BS]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(flat_copies(&m).is_empty(), "a 4 KiB read made a copy");
    if log().contains("no FUSE passthrough") {
        skip!("this kernel offers no FUSE passthrough: {}", log());
    }
    assert_eq!(m.read("images/web/v1.raw"), a);
    assert!(
        wait_until(Duration::from_secs(20), || flat_copies(&m).len() == 1),
        "no flat copy after a bulk read: {}",
        log()
    );
    let v1_id = flat_copies(&m)[0].0.clone();
    let v1_copy = flat_dir.join(format!("{v1_id}.raw"));
    assert_eq!(std::fs::read(&v1_copy).unwrap(), a);
    let copy_meta = std::fs::metadata(&v1_copy).unwrap();
    assert!(
        copy_meta.blocks() * 512 < a.len() as u64,
        "the copy is not sparse"
    );

    // The next open is served by the kernel from the copy: with the copy's pages dropped, a
    // read through the mount brings them back (the daemon's own reads come from packs).
    let drop_cache = |p: &Path| {
        let st = Command::new("dd")
            .arg(format!("if={}", p.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .unwrap();
        assert!(st.success());
    };
    drop_cache(&v1_copy);
    assert!(resident(&v1_copy) < a.len() as u64 / 4);
    assert_eq!(m.read("images/web/v1.raw"), a);
    assert!(
        resident(&v1_copy) >= copy_meta.blocks() * 512 * 9 / 10,
        "reading the mount did not read the flat copy ({} of {} bytes resident)",
        resident(&v1_copy),
        copy_meta.blocks() * 512
    );
    let out = tool_command("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(m.path("images/web/v1.raw"))
        .arg(m.dir.path().join("a.img"))
        .status()
        .unwrap();
    assert_eq!(out.code(), Some(0));

    // prefetch builds a copy now, and the mount serves it.
    let said = m.ok(&["prefetch", "web:v2"]);
    assert!(said.contains("flat copy ready"), "{said}");
    assert_eq!(flat_copies(&m).len(), 2);
    assert_eq!(m.read("images/web/v2.raw"), b);

    // A tag moved while its old version is passed through: the open file keeps the old bytes,
    // a new open shows the new version (a moved tag is a new file to the kernel).
    let held = File::open(m.path("images/web/latest.raw")).unwrap();
    let mut buf = vec![0u8; 4 * BS];
    held.read_exact_at(&mut buf, 6 * BS as u64).unwrap();
    assert_eq!(buf, a[6 * BS..10 * BS]);
    m.ok(&["tag", "web:latest", "web:v2"]);
    assert_eq!(
        m.read("images/web/latest.raw"),
        b,
        "the moved tag shows its new version at once"
    );
    held.read_exact_at(&mut buf, 6 * BS as u64).unwrap();
    assert_eq!(
        buf,
        a[6 * BS..10 * BS],
        "the open file changed under its reader"
    );
    drop(held);
    assert_eq!(m.read("images/web/latest.raw"), b);

    // gc drops the copy of a version it removes.
    m.ok(&["rm", "web:latest"]);
    m.ok(&["rm", "web:v2"]);
    m.ok(&["gc"]);
    let left = flat_copies(&m);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, v1_id);
    m.stop();

    // --flat-cache 0: no copies, no passthrough, the same bytes.
    m.start_with(&["--flat-cache", "0"]);
    assert_eq!(m.read("images/web/v1.raw"), a);
    let refused = m.cli(&["prefetch", "web:v1"]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no flat copies"));
    m.stop();
}

#[test]
fn readers_racing_copies_and_tag_moves_never_fail_or_see_wrong_bytes() {
    if !is_root() {
        skip!("FUSE mounts and passthrough need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "ra");
    let b = source_image(512, "rb");
    m.import("a.img", &a, "web:v1");
    m.import("b.img", &b, "web:v2");
    m.ok(&["tag", "web:latest", "web:v1"]);
    m.start();
    let versions = Arc::new((a, b));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    // Readers open, read a stretch, keep some files open across others' opens, and close:
    // every open and read must succeed, in whatever mode the kernel serves it.
    let readers: Vec<_> = (0..4)
        .map(|n| {
            let (versions, stop, reads) = (versions.clone(), stop.clone(), reads.clone());
            let mnt = m.mnt.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let names = [
                    "images/web/v1.raw",
                    "images/web/v2.raw",
                    "images/web/latest.raw",
                ];
                let mut held: Vec<File> = Vec::new();
                let mut i: u64 = n;
                while !stop.load(Ordering::Relaxed) {
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let name = names[((i >> 33) % 3) as usize];
                    let f = File::open(mnt.join(name)).map_err(|e| format!("open {name}: {e}"))?;
                    let len = versions.0.len();
                    let off = (i >> 20) % (len as u64 - 64 * 1024);
                    let whole = i.is_multiple_of(5);
                    let mut buf = vec![0u8; if whole { len } else { 64 * 1024 }];
                    let got = if buf.len() == len {
                        f.read_exact_at(&mut buf, 0).map(|_| 0)
                    } else {
                        f.read_exact_at(&mut buf, off).map(|_| off)
                    }
                    .map_err(|e| format!("read {name}: {e}"))?
                        as usize;
                    let want_a = &versions.0[got..got + buf.len()];
                    let want_b = &versions.1[got..got + buf.len()];
                    let ok = match name {
                        "images/web/v1.raw" => buf == want_a,
                        "images/web/v2.raw" => buf == want_b,
                        _ => buf == want_a || buf == want_b,
                    };
                    if !ok {
                        return Err(format!("{name} at {got}: bytes of neither version"));
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    if i.is_multiple_of(3) {
                        held.push(f);
                    }
                    if held.len() > 3 {
                        held.remove(0);
                    }
                    // Now and then hold nothing, so an inode can leave cached mode for its copy.
                    if i.is_multiple_of(7) {
                        held.clear();
                    }
                }
                Ok(())
            })
        })
        .collect();
    // Meanwhile: copies get built, the tag moves back and forth.
    for round in 0..6 {
        let target = if round % 2 == 0 { "web:v2" } else { "web:v1" };
        m.ok(&["tag", "web:latest", target]);
        if round == 2 {
            m.ok(&["prefetch", "web:v1", "web:v2"]);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap().unwrap();
    }
    assert!(
        reads.load(Ordering::Relaxed) > 50,
        "too few reads to mean anything"
    );
    assert_eq!(flat_copies(&m).len(), 2);
    m.stop();
    let log = std::fs::read_to_string(m.dir.path().join("daemon.stderr")).unwrap();
    assert!(!log.contains("refused a passthrough"), "{log}");
}

fn pwrite_all(f: &File, data: &[u8], off: u64) {
    f.write_all_at(data, off).unwrap();
}

#[test]
fn instances_are_private_partial_durable_and_committable() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "a");
    m.import("a.img", &a, "web:v1");
    m.start();
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    assert_eq!(m.read("instances/vm1.raw"), a);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("instances/vm1.raw"))
        .unwrap();
    let mut want = a.clone();
    for (off, len, seed) in [(100, 10, "p1"), (BS - 5, 10, "p2"), (7 * BS, 3 * BS, "p3")] {
        let d = noise(seed, len);
        pwrite_all(&f, &d, off as u64);
        want[off..off + len].copy_from_slice(&d);
    }
    // Discard: punch a hole over two whole blocks and part of a third.
    // SAFETY: a valid open fd; fallocate has no memory arguments.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            20 * BS as i64,
            2 * BS as i64 + 100,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    want[20 * BS..22 * BS + 100].fill(0);
    f.sync_all().unwrap();
    assert_eq!(m.read("instances/vm1.raw"), want);
    assert_eq!(m.read("images/web/v1.raw"), a, "shared blocks never change");
    assert!(f.set_len(1).is_err(), "a live disk does not change size");
    assert_eq!(
        m.cli(&["instance", "rm", "vm1"]).status.code(),
        Some(4),
        "an open instance cannot be removed"
    );
    drop(f);

    m.ok(&["instance", "commit", "vm1", "web:v3"]);
    assert_eq!(m.read("images/web/v3.raw"), want);
    let log = m.ok(&["log", "vm1"]);
    assert!(
        log.contains("created") && log.contains("committed as web:v3"),
        "{log}"
    );
    // Removed and re-created under the same name: the new instance shows its own bytes, not
    // what the kernel cached of the old one.
    m.ok(&["instance", "rm", "vm1"]);
    assert!(!m.path("instances/vm1.raw").exists());
    m.ok(&["instance", "create", "web:v3", "vm1"]);
    assert_eq!(m.read("instances/vm1.raw"), want);
    m.ok(&["instance", "rm", "vm1"]);
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    assert_eq!(m.read("instances/vm1.raw"), a);

    // Clear errors for unknown names and a target of another size.
    assert_eq!(
        m.cli(&["substitute", "nope", "web:v1"]).status.code(),
        Some(3)
    );
    assert_eq!(
        m.cli(&["instance", "create", "web:nope", "vm2"])
            .status
            .code(),
        Some(3)
    );
    m.import("big.img", &source_image(513, "c"), "web:big");
    assert_eq!(
        m.cli(&["substitute", "vm1", "web:big"]).status.code(),
        Some(2)
    );

    // Everything fsynced is there after a clean restart too (SIGTERM stops the daemon cleanly).
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("instances/vm1.raw"))
        .unwrap();
    pwrite_all(&f, &want, 0);
    f.sync_all().unwrap();
    drop(f);
    m.term();
    m.start();
    assert_eq!(m.read("instances/vm1.raw"), want);
    m.stop();
}

/// v1 and v2 differ in a 1 MiB region: all 0xAA in v1, all 0xBB in v2.
fn ab_images() -> (Vec<u8>, Vec<u8>) {
    let mut a = noise("base", 1024 * BS);
    a[256 * BS..512 * BS].fill(0xAA);
    let mut b = a.clone();
    b[256 * BS..512 * BS].fill(0xBB);
    (a, b)
}

/// What one reader of the substituted range has seen: its reads so far, the version of its
/// latest read (0xAA, 0xBB, or MIXED for a buffered read that spanned a substitution), and how
/// many reads showed each version whole.
#[derive(Default)]
struct ReaderSeen {
    reads: AtomicUsize,
    last: AtomicU8,
    a: AtomicUsize,
    b: AtomicUsize,
}

/// A buffered read whose blocks are whole but not all of one version.
const MIXED: u8 = 1;

#[test]
fn readers_never_see_a_torn_or_stale_read_while_substitutions_race() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let (a, b) = ab_images();
    m.import("a.img", &a, "web:v1");
    m.import("b.img", &b, "web:v2");
    m.start();
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    let path = m.path("instances/vm1.raw");
    let stop = Arc::new(AtomicBool::new(false));
    // Readers 0-2 use O_DIRECT: each read is one FUSE request, wholly v1 or wholly v2. Readers
    // 3-4 go through the page cache: a read may span a substitution (its blocks then come from
    // both versions), but no block is ever torn, and once `substitute` has returned (the kernel's
    // cached pages of the range invalidated) every read is the new version.
    const DIRECT: usize = 3;
    let seen: Arc<Vec<ReaderSeen>> = Arc::new((0..5).map(|_| ReaderSeen::default()).collect());
    let mut threads = Vec::new();
    for r in 0..seen.len() {
        let (path, stop, seen) = (path.clone(), stop.clone(), seen.clone());
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let direct = r < DIRECT;
            let mut open = OpenOptions::new();
            open.read(true);
            if direct {
                open.custom_flags(libc::O_DIRECT);
            }
            let f = open.open(&path).map_err(|e| e.to_string())?;
            let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
            // O_DIRECT needs an aligned buffer.
            let mut buf = AlignedBuf::new(layout);
            let (len, at) = [
                (1 << 20, 256 * BS),
                (512 << 10, 256 * BS),
                (128 << 10, 256 * BS),
                (1 << 20, 256 * BS),
                (64 << 10, 400 * BS),
            ][r];
            let me = &seen[r];
            while !stop.load(Ordering::Relaxed) {
                let n = f
                    .read_at(&mut buf.as_mut()[..len], at as u64)
                    .map_err(|e| e.to_string())?;
                if n != len {
                    return Err(format!("reader {r}: short read of {n} bytes"));
                }
                let got = &buf.as_mut()[..n];
                let whole = |part: &[u8]| {
                    let first = part[0];
                    (first == 0xAA || first == 0xBB) && part.iter().all(|&x| x == first)
                };
                let version = if whole(got) {
                    got[0]
                } else if !direct && got.chunks(BS).all(whole) {
                    MIXED
                } else {
                    return Err(format!(
                        "reader {r} ({}): torn read of {len} bytes",
                        if direct { "O_DIRECT" } else { "buffered" }
                    ));
                };
                match version {
                    0xAA => me.a.fetch_add(1, Ordering::SeqCst),
                    0xBB => me.b.fetch_add(1, Ordering::SeqCst),
                    _ => 0,
                };
                me.last.store(version, Ordering::SeqCst);
                me.reads.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }));
    }
    // A writer outside the substituted range keeps going too.
    {
        let (path, stop) = (path.clone(), stop.clone());
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| e.to_string())?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&noise(&i.to_string(), BS), (i % 200) * BS as u64)
                    .map_err(|e| e.to_string())?;
                i += 1;
            }
            Ok(())
        }));
    }
    // An odd number of substitutions, v2 first: the range ends on v2, not where it started.
    let mut stale = None;
    for i in 0..21 {
        let (target, byte) = if i % 2 == 0 {
            ("web:v2", 0xBB)
        } else {
            ("web:v1", 0xAA)
        };
        m.ok(&["substitute", "vm1", target]);
        // Every reader's second read from now on began after `substitute` returned: it must
        // show the target whole.
        let since: Vec<usize> = seen
            .iter()
            .map(|s| s.reads.load(Ordering::SeqCst))
            .collect();
        let caught_up = wait_until(Duration::from_secs(20), || {
            seen.iter()
                .zip(&since)
                .all(|(s, &n)| s.reads.load(Ordering::SeqCst) >= n + 2)
        });
        let lasts: Vec<u8> = seen.iter().map(|s| s.last.load(Ordering::SeqCst)).collect();
        if !caught_up || lasts.iter().any(|&l| l != byte) {
            stale = Some(format!(
                "after substitution {i} to {target}: readers caught up {caught_up}, their latest \
                 reads {lasts:02x?} (want {byte:02x} for all)"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap().unwrap();
    }
    if let Some(why) = stale {
        panic!("a reader did not see the substitution: {why}");
    }
    for (r, s) in seen.iter().enumerate() {
        let (na, nb) = (s.a.load(Ordering::SeqCst), s.b.load(Ordering::SeqCst));
        assert!(
            na > 0 && nb > 0,
            "reader {r} did not see both versions whole: {na} reads of v1, {nb} of v2"
        );
    }
    // 21 substitutions: the range is v2 now, to a fresh reader too.
    let now = m.read("instances/vm1.raw");
    assert!(now[256 * BS..512 * BS].iter().all(|&x| x == 0xBB));
    m.stop();
}

/// A heap buffer with the alignment O_DIRECT needs.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(layout: std::alloc::Layout) -> AlignedBuf {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[test]
fn kill9_mid_write_keeps_every_fsynced_write() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "a");
    m.import("a.img", &a, "web:v1");
    m.start();
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    m.stop();
    // The daemon kills itself inside its 300th write, after the data file write and before the
    // overlay change (fault.rs): past several fsyncs, provably mid-write.
    const FAULT: &str = "instance.data_written";
    m.start_faulted(&[], Some(&format!("{FAULT}@300")));
    let path = m.path("instances/vm1.raw");
    let durable = noise("durable", 64 * BS);
    {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        pwrite_all(&f, &durable, 0);
        f.sync_data().unwrap();
    }
    // Writes in flight while the daemon dies: over the fsynced region and past it, with an
    // fsync every 50 writes (so replaced slots are freed and reused as the guest goes on).
    const SPAN: u64 = 364;
    let synced = Arc::new(AtomicUsize::new(0));
    let attempted = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (path, synced, attempted) = (path.clone(), synced.clone(), attempted.clone());
        std::thread::spawn(move || {
            let Ok(f) = OpenOptions::new().write(true).open(&path) else {
                return;
            };
            for i in 0u64.. {
                attempted.store(i as usize + 1, Ordering::SeqCst);
                let at = (i % SPAN) * BS as u64;
                if f.write_all_at(&noise(&i.to_string(), BS), at).is_err() {
                    return;
                }
                if i % 50 == 49 {
                    if f.sync_data().is_err() {
                        return;
                    }
                    synced.store(i as usize + 1, Ordering::SeqCst);
                }
            }
        })
    };
    m.wait_fault(FAULT);
    writer.join().unwrap();
    m.fsck_clean("after the kill mid-write");
    let (synced, attempted) = (
        synced.load(Ordering::SeqCst),
        attempted.load(Ordering::SeqCst),
    );
    assert!(
        synced >= 50,
        "no fsync completed before the kill ({attempted} writes)"
    );
    m.start();
    let after = m.read("instances/vm1.raw");
    assert_eq!(after.len(), a.len());
    // Each block holds its last fsynced bytes or bytes written after them, never older ones.
    for b in 0..SPAN as usize {
        let got = &after[b * BS..(b + 1) * BS];
        let writes: Vec<usize> = (b..attempted).step_by(SPAN as usize).collect();
        let last_synced = writes.iter().rev().find(|&&j| j < synced).copied();
        let before = if b < 64 {
            &durable[b * BS..(b + 1) * BS]
        } else {
            &a[b * BS..(b + 1) * BS]
        };
        let mut allowed: Vec<Vec<u8>> = writes
            .iter()
            .filter(|&&j| last_synced.is_none_or(|s| j >= s))
            .map(|j| noise(&j.to_string(), BS))
            .collect();
        if last_synced.is_none() {
            allowed.push(before.to_vec());
        }
        assert!(
            allowed.iter().any(|x| x.as_slice() == got),
            "block {b}: neither its last fsynced write nor a later one ({attempted} writes, {synced} synced)"
        );
    }
    // Untouched blocks are the base's.
    assert_eq!(&after[400 * BS..], &a[400 * BS..]);
    m.stop();
    let fsck = m.cli(&["fsck"]);
    assert!(
        fsck.status.success(),
        "fsck after the kill: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn kill9_mid_substitution_leaves_wholly_old_or_wholly_new() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let (a, b) = ab_images();
    m.import("a.img", &a, "web:v1");
    m.import("b.img", &b, "web:v2");
    // Each round's daemon kills itself at a point inside a substitution (fault.rs): after the
    // rebase record is durable and before the swap, between the record's append and its fsync,
    // and between page-cache invalidations after the swap.
    let faults = [
        ("substitute.logged", 2),
        ("instance_log.appended", 3),
        ("substitute.invalidating", 1),
    ];
    for (round, (fault, at)) in faults.into_iter().enumerate() {
        m.start();
        let vm = format!("vm{round}");
        m.ok(&["instance", "create", "web:v1", &vm]);
        m.stop();
        m.start_faulted(&[], Some(&format!("{fault}@{at}")));
        // The kernel knows the inode, so substitution invalidates its pages.
        let held = File::open(m.path(&format!("instances/{vm}.raw"))).unwrap();
        let mut first = vec![0u8; BS];
        held.read_exact_at(&mut first, 0).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // The substitution the daemon died in: even ones go to v2, odd ones back to v1.
        let in_flight = Arc::new(AtomicUsize::new(0));
        let flipper = {
            let (store, dir, stop, vm, in_flight) = (
                m.store.clone(),
                m.dir.path().to_path_buf(),
                stop.clone(),
                vm.clone(),
                in_flight.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let target = if i % 2 == 0 { "web:v2" } else { "web:v1" };
                    in_flight.store(i, Ordering::SeqCst);
                    let done = Command::new(bin("imagefs"))
                        .arg("--store")
                        .arg(&store)
                        .args(["substitute", &vm, target])
                        .current_dir(&dir)
                        .output()
                        .is_ok_and(|o| o.status.success());
                    if !done {
                        return;
                    }
                    i += 1;
                }
            })
        };
        m.wait_fault(fault);
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        drop(held);
        m.fsck_clean(&format!("after the kill at {fault}"));
        m.start();
        let now = m.read(&format!("instances/{vm}.raw"));
        assert!(
            now == a || now == b,
            "round {round}: neither wholly v1 nor wholly v2"
        );
        // Every point lies past the commit (the record reached the file: a process kill keeps
        // the page cache), so the substitution the daemon died in shows, wholly.
        let new = if in_flight.load(Ordering::SeqCst).is_multiple_of(2) {
            &b
        } else {
            &a
        };
        assert!(
            &now == new,
            "round {round}: the substitution killed at {fault}, past its commit, was lost"
        );
        m.stop();
    }
}

#[test]
fn daemon_mode_detaches_and_owns_the_store_through_a_private_socket() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let m = Mounted::new();
    let a = source_image(512, "d");
    m.import("a.img", &a, "web:v1");
    let mnt = m.mnt.to_string_lossy().into_owned();
    // Returns only once the mount is up, leaving the daemon in the background.
    m.ok(&["mount", &mnt, "--daemon"]);
    assert!(is_mounted(&m.mnt));
    let sock = m.store.join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is private");
    // Commands go through the daemon (it holds the store's lock).
    let ls = m.ok(&["ls"]);
    assert!(ls.contains("web"), "{ls}");
    assert_eq!(m.read("images/web/v1.raw"), a);
    // A second daemon on the same store is refused with a clear error.
    let other = m.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let again = m.cli(&["mount", &other.to_string_lossy(), "--daemon"]);
    assert_eq!(again.status.code(), Some(4));
    m.ok(&["umount", &mnt]);
    assert!(!is_mounted(&m.mnt));
    assert!(!sock.exists());
    // The store is free again for a process of its own.
    m.ok(&["ls"]);
}

#[test]
fn gc_while_mounted_keeps_what_instances_use() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "gc");
    m.import("a.img", &a, "web:v1");
    m.start();
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("instances/vm1.raw"))
        .unwrap();
    let mut want = a.clone();
    let synced = noise("synced", 8 * BS);
    pwrite_all(&f, &synced, 0);
    want[..8 * BS].copy_from_slice(&synced);
    f.sync_all().unwrap();
    // Written but not yet flushed: only the live daemon knows these blocks.
    let pending = noise("pending", 4 * BS);
    pwrite_all(&f, &pending, 100 * BS as u64);
    want[100 * BS..104 * BS].copy_from_slice(&pending);
    // The only tag goes; gc runs inside the daemon.
    m.ok(&["rm", "web:v1"]);
    m.ok(&["gc"]);
    // Checked through a fresh mount after a clean stop: every byte must come from the store,
    // not from the kernel's cache.
    drop(f);
    m.stop();
    m.start();
    assert_eq!(m.read("instances/vm1.raw"), want);
    m.stop();
}

#[test]
fn instance_writes_past_max_bytes_fail_with_enospc_store_nothing_and_spare_other_instances() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "a");
    m.import("a.img", &a, "web:v1");
    m.start();
    m.ok(&[
        "instance",
        "create",
        "web:v1",
        "small",
        "--max-bytes",
        "64K",
    ]);
    m.ok(&["instance", "create", "web:v1", "other"]);
    let open = |m: &Mounted, name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path(&format!("instances/{name}.raw")))
            .unwrap()
    };
    let (small, other) = (open(&m, "small"), open(&m, "other"));
    let mut want = a.clone();
    // 16 sub-blocks of 4 KiB fill the 64 KiB limit exactly.
    for i in 0..16usize {
        let d = noise(&format!("w{i}"), BS);
        pwrite_all(&small, &d, (i * 2 * BS) as u64);
        want[i * 2 * BS..i * 2 * BS + BS].copy_from_slice(&d);
    }
    let past = noise("past", BS);
    let err = small.write_all_at(&past, (40 * BS) as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    small.sync_all().unwrap();
    // Nothing of the refused write is visible, and the other instance writes on.
    assert_eq!(m.read("instances/small.raw"), want);
    let d = noise("other", 64 * BS);
    other.write_all_at(&d, 0).unwrap();
    other.sync_all().unwrap();
    let ls = m.ok(&["instance", "ls", "--json"]);
    let small_line = ls.lines().find(|l| l.contains("\"small\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(small_line).unwrap();
    assert_eq!(v["max_bytes"], 65536);
    assert_eq!(v["data_bytes"], 65536, "{small_line}");
    // The limit survives a restart; a write into an already written sub-block after its
    // flush needs a new slot while the old one is not reclaimed, so it is refused too.
    drop((small, other));
    m.stop();
    m.start();
    let small = open(&m, "small");
    let err = small.write_all_at(&past, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(m.read("instances/small.raw"), want);
}

#[test]
fn below_the_store_reserve_new_data_is_refused_while_metadata_and_substitution_go_on() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "a");
    let mut b = a.clone();
    b[5 * BS..6 * BS].copy_from_slice(&noise("b", BS));
    m.import("a.img", &a, "web:v1");
    m.import("b.img", &b, "web:v2");
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    // A reserve of the whole filesystem: the store is always below it.
    m.start_with(&["--reserve", "100%"]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("instances/vm1.raw"))
        .unwrap();
    let err = f.write_all_at(&noise("w", BS), 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    std::fs::write(m.dir.path().join("c.img"), noise("c", 64 * BS)).unwrap();
    let out = m.cli(&["import", "c.img", "web:v3"]);
    assert!(
        !out.status.success(),
        "an import below the reserve succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space"), "{err}");
    // Metadata commits and substitutions go on.
    m.ok(&["tag", "web:stable", "web:v2"]);
    m.ok(&["substitute", "vm1", "web:stable"]);
    assert_eq!(m.read("instances/vm1.raw"), b);
    drop(f);
    m.stop();
    m.start_with(&["--reserve", "0"]);
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("instances/vm1.raw"))
        .unwrap();
    f.write_all_at(&noise("w", BS), 0).unwrap();
}

#[test]
fn local_users_cannot_read_disks_versions_packs_or_the_control_socket() {
    if !is_root() {
        skip!("FUSE mounts and setpriv need root here");
    }
    if let Some(t) = missing_tools(&["setpriv", "python3"]) {
        skip!("{t} missing");
    }
    let mut m = Mounted::new();
    // Only the store's own protections count: its parent is open to all.
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = source_image(512, "a");
    m.import("a.img", &a, "web:v1");
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    m.start();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("instances/vm1.raw"))
        .unwrap();
    pwrite_all(&f, &noise("secret", BS), 0);
    f.sync_all().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&m.store), 0o700, "store directory");
    assert_eq!(mode(&m.path("instances/vm1.raw")), 0o600);
    assert_eq!(mode(&m.path("images/web/v1.raw")), 0o400);
    let pack = std::fs::read_dir(m.store.join("packs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .unwrap();
    // Even were the store directory opened up, its files grant no one else anything.
    for p in [
        &pack,
        &m.store.join("instances/vm1.data"),
        &m.store.join("refs.log"),
    ] {
        assert_eq!(mode(p) & 0o077, 0, "{} is {:o}", p.display(), mode(p));
    }
    imagefs_tests::assert_nobody_is_refused(
        &[
            &m.path("instances/vm1.raw"),
            &m.path("images/web/v1.raw"),
            &pack,
            &m.store.join("instances/vm1.data"),
        ],
        &[&m.store.join("control.sock")],
    );
    // Opened up by hand, the mount and store files still refuse others.
    std::fs::set_permissions(&m.store, std::fs::Permissions::from_mode(0o755)).unwrap();
    imagefs_tests::assert_nobody_is_refused(
        &[
            &m.path("instances/vm1.raw"),
            &pack,
            &m.store.join("instances/vm1.data"),
        ],
        &[&m.store.join("control.sock")],
    );
}

#[test]
fn scrub_finds_a_flipped_byte_in_a_flat_copy_removes_it_and_reads_are_right_again() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = source_image(512, "a");
    m.import("a.img", &a, "web:v1");
    m.ok(&["instance", "create", "web:v1", "vm1"]);
    m.start();
    m.ok(&["prefetch", "web:v1"]);
    // The instance reads its unwritten blocks from the copy once it is there.
    assert!(
        m.read("instances/vm1.raw") == a,
        "the instance before the damage"
    );
    let copies = flat_copies(&m);
    assert_eq!(copies.len(), 1);
    let id = &copies[0].0;
    let copy = m.store.join("flat").join(format!("{id}.raw"));
    let at = 7 * BS + 5;
    let f = OpenOptions::new().write(true).open(&copy).unwrap();
    f.write_all_at(&[a[at] ^ 0xFF], at as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // The bad byte would reach a reader of the copy (drop the page cache of the mount's files).
    let out = m.cli(&["scrub"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "flat copy {id}: corrupt at offset {}: removed",
            7 * BS
        )),
        "{text}"
    );
    assert!(!copy.exists(), "the bad copy is still there");
    // fs-verity is on for the copy, or the machine says it has none (this project's kernels are
    // built without it): never silence.
    let verity: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fs-verity: "))
        .collect();
    assert!(
        verity == ["fs-verity: on for 1 of 1 flat copies"]
            || (verity.len() == 1
                && verity[0].starts_with("fs-verity: not available on this kernel")),
        "{text}"
    );
    // New opens read verified bytes: the version file and the instance's unwritten blocks.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(
        m.read("images/web/v1.raw") == a,
        "the version file after scrub"
    );
    let mut buf = vec![0u8; BS];
    let inst = File::open(m.path("instances/vm1.raw")).unwrap();
    inst.read_exact_at(&mut buf, (7 * BS) as u64).unwrap();
    assert!(
        buf == a[7 * BS..8 * BS],
        "the instance's unwritten block after scrub"
    );
    // A clean scrub exits 0.
    let out = m.cli(&["scrub"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
