//! Scenario module: remote_lazy (issue 12). Lazy pull and lazy reads through a real mount from
//! a real Garage: `pull --lazy` records a version at once and fetches nothing; reads through
//! the mount fetch each block once (coalesced, read-ahead bounded) and give A's bytes; a
//! substitution onto a lazy version fetches exactly its changed blocks, and a rollout of two
//! instances onto one fetches them once for both; prefetch completes a
//! version and builds its flat copy; a tampered pack is EIO through the mount, never wrong
//! bytes, and a full pull exits 5; with Garage stopped a lazy read is EIO within the remote's
//! deadline while the daemon and local reads go on, and it succeeds once Garage is back; a
//! guest (QEMU, `vm start`) boots from a lazily pulled root disk fetching a small fraction of
//! it, no flat copy of the lazy base is built behind its back, and a live substitution onto a
//! lazy v2 fetches exactly its changed block before the guest reads v2.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use imagefs_store::remote::Remote;
use imagefs_tests::garage::{self, Garage};
use imagefs_tests::{is_root, noise, skip, wait_until};
use serde_json::Value;

use crate::remote_cli::{distinct_blocks, imagefs, ok, result, run, store_with_remote, BS};

const BLOCKS: usize = 384;

/// v1: incompressible blocks with a hole every 29 blocks; v2: `changed` blocks replaced.
fn make_image(path: &Path, changed: &[usize], seed: &str) -> Vec<u8> {
    let mut img = noise("lazy-base", BLOCKS * BS);
    for (i, b) in img.chunks_mut(BS).enumerate() {
        if i % 29 == 5 {
            b.fill(0);
        } else if changed.contains(&i) {
            b.copy_from_slice(&noise(&format!("{seed}-{i}"), BS));
        }
    }
    std::fs::write(path, &img).unwrap();
    img
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_ref()))
}

/// A daemon serving `store` on `mnt` (by default no flat copies, so every read reaches the
/// daemon).
pub(crate) struct Mount {
    store: PathBuf,
    pub(crate) mnt: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mount {
    pub(crate) fn start(store: &Path, mnt: &Path) -> Mount {
        Mount::start_with(store, mnt, "0")
    }

    fn start_with(store: &Path, mnt: &Path, flat_cache: &str) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        let log = mnt.with_extension("daemon.log");
        let child = imagefs(
            store,
            &["mount", mnt.to_str().unwrap(), "--flat-cache", flat_cache],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
        let m = Mount {
            store: store.to_path_buf(),
            mnt: mnt.to_path_buf(),
            log,
            child: Some(child),
        };
        assert!(
            wait_until(Duration::from_secs(10), || is_mounted(mnt)
                && mnt.join("images").exists()),
            "mount did not come up: {}",
            std::fs::read_to_string(&m.log).unwrap_or_default()
        );
        m
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub(crate) fn stop(&mut self) {
        ok(&self.store, &["umount", self.mnt.to_str().unwrap()]);
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "daemon exit status {status}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let c = std::ffi::CString::new(self.mnt.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Reads `len` bytes at `off` with O_DIRECT (the kernel's page cache cannot answer, so the
/// daemon does): the bytes, or the errno.
pub(crate) fn read_direct(path: &Path, off: u64, len: usize) -> Result<Vec<u8>, i32> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: a non-zero size and a valid alignment; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    // SAFETY: ptr is valid for len bytes until dealloc below.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    let r = f
        .read_exact_at(buf, off)
        .map(|()| buf.to_vec())
        .map_err(|e| e.raw_os_error().unwrap_or(-1));
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    r
}

fn stats(store: &Path) -> Value {
    result(&ok(store, &["remote", "stats", "--json"]))
}

fn version_local(store: &Path, id: &str) -> f64 {
    let ls = result(&ok(store, &["ls", "--json"]));
    ls["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no version {id} in {ls}"))["local"]
        .as_f64()
        .unwrap()
}

fn prerequisites() -> Option<String> {
    if garage::binary().is_none() {
        return Some("needs garage 2.5.0 (make garage)".into());
    }
    if !is_root() || !Path::new("/dev/fuse").exists() {
        return Some("needs root and /dev/fuse (FUSE mounts)".into());
    }
    None
}

/// Store A with app:v1 and app:v2 pushed (pack size `pack_size`), and the images.
fn pushed(tmp: &Path, g: &Garage, pack_size: &str) -> (Vec<u8>, Vec<u8>) {
    let a = store_with_remote(tmp, "a", g, "10s");
    let (f1, f2) = (tmp.join("v1.img"), tmp.join("v2.img"));
    let i1 = make_image(&f1, &[], "v1");
    let i2 = make_image(&f2, &[7, 8, 9, 300], "v2");
    ok(&a, &["import", f1.to_str().unwrap(), "app:v1"]);
    ok(&a, &["import", f2.to_str().unwrap(), "app:v2"]);
    ok(&a, &["push", "app:v1", "--pack-size", pack_size]);
    ok(&a, &["push", "app:v2", "--pack-size", pack_size]);
    (i1, i2)
}

#[test]
fn lazy_pull_reads_each_block_once_substitutes_with_changed_blocks_and_prefetch_completes() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let (i1, i2) = pushed(tmp.path(), &g, "32M");
    let b = store_with_remote(tmp.path(), "b", &g, "10s");

    // pull --lazy records the version and fetches no block
    let t = Instant::now();
    let p1 = result(&ok(&b, &["pull", "app:v1", "--lazy", "--json"]));
    let pull_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "remote_lazy: pull --lazy of a {} MiB version: {:.0} ms in the command ({pull_ms:.0} ms with process start), {} bytes of metadata",
        (BLOCKS * BS) >> 20,
        p1["ms"].as_f64().unwrap(),
        p1["meta_bytes"]
    );
    assert!(p1["ms"].as_f64().unwrap() < 500.0, "{p1}");
    assert_eq!(p1["blocks_fetched"], 0);
    let v1 = p1["id"].as_str().unwrap().to_string();
    let s = stats(&b);
    assert_eq!(s["total"]["blocks_fetched"], 0, "{s}");
    assert_eq!(version_local(&b, &v1), 0.0);
    // fsck: the absent blocks are "remote", not missing
    let f = result(&ok(&b, &["fsck", "--json"]));
    assert_eq!(f["remote_blocks"], distinct_blocks(&i1), "{f}");
    let mut m = Mount::start(&b, &tmp.path().join("mnt-b"));
    // pulled through the daemon, which serves it at once
    let p2 = result(&ok(&b, &["pull", "app:v2", "--lazy", "--json"]));
    let v2 = p2["id"].as_str().unwrap().to_string();
    let file = m.mnt.join("images/app/v1.raw");
    // 1 MiB at the start: its blocks, in one request
    let head = read_direct(&file, 0, 1 << 20).unwrap();
    assert!(head == i1[..1 << 20], "the first MiB differs from A's");
    let s = stats(&b);
    let first = &s["versions"][&v1];
    let fetched = first["blocks_fetched"].as_u64().unwrap();
    eprintln!(
        "remote_lazy: reading 1 MiB fetched {fetched} blocks in {} requests",
        first["requests"]
    );
    // a first read gets no read-ahead (no sequential run yet); never more than 4 MiB of it
    let in_head = distinct_blocks(&i1[..1 << 20]);
    assert!(
        (in_head..=in_head + 64).contains(&fetched),
        "1 MiB ({in_head} blocks) + at most 4 MiB read-ahead: {s}"
    );
    assert!(first["requests"].as_u64().unwrap() <= 2, "{s}");
    let local = version_local(&b, &v1);
    assert!(
        local > 0.0 && local < 0.25,
        "ls says {local} of v1 is local"
    );

    // substitution onto lazy v2 fetches exactly v2's changed blocks first
    ok(&b, &["instance", "create", "app:v1", "web-1"]);
    let sub = result(&ok(&b, &["substitute", "web-1", "app:v2", "--json"]));
    assert_eq!(sub["blocks_fetched"], 4, "{sub}");
    assert_eq!(sub["bytes_fetched"], (4 * BS) as u64, "{sub}");
    let s = stats(&b);
    assert_eq!(s["versions"][&v2]["blocks_fetched"], 4, "{s}");

    // the whole version file: A's bytes, each block fetched once
    assert!(
        std::fs::read(&file).unwrap() == i1,
        "v1 read through B's mount differs"
    );
    let s = stats(&b);
    assert_eq!(
        s["versions"][&v1]["blocks_fetched"],
        distinct_blocks(&i1),
        "{s}"
    );
    let hits_before = s["versions"][&v1]["cache_hits"].as_u64().unwrap();
    // again, through another inode (no page cache): nothing fetched, cache hits
    let again = read_direct(&m.mnt.join(format!("versions/{v1}.raw")), 0, BLOCKS * BS).unwrap();
    assert!(again == i1);
    let s = stats(&b);
    assert_eq!(
        s["versions"][&v1]["blocks_fetched"],
        distinct_blocks(&i1),
        "{s}"
    );
    let hits = s["versions"][&v1]["cache_hits"].as_u64().unwrap() - hits_before;
    assert!(hits >= distinct_blocks(&i1), "{hits} cache hits: {s}");
    // the instance now reads as v2, with no further fetch
    let inst = read_direct(&m.mnt.join("instances/web-1.raw"), 0, BLOCKS * BS).unwrap();
    assert!(inst == i2, "the substituted instance differs from v2");
    assert_eq!(stats(&b)["versions"][&v2]["blocks_fetched"], 4);
    let live = stats(&b);
    eprintln!(
        "remote_lazy: stats after reading v1 twice and substituting onto v2: {}",
        live["total"]
    );
    m.stop();
    // the daemon's counters outlive it (kept in the store)
    let kept = stats(&b);
    assert_eq!(kept["total"], live["total"], "{kept}");

    // export on a third store (after a local gc, which keeps what a lazy version needs):
    // fetches what it needs and gives v2's bytes
    let c = store_with_remote(tmp.path(), "c", &g, "10s");
    ok(&c, &["pull", "app:v2", "--lazy"]);
    ok(&c, &["gc"]);
    let out = tmp.path().join("v2.out");
    ok(&c, &["export", "app:v2", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == i2);
    assert_eq!(version_local(&c, &v2), 1.0);

    // prefetch on a fourth: fetches every block, builds the flat copy; ls says 100%
    let d = store_with_remote(tmp.path(), "d", &g, "10s");
    ok(&d, &["pull", "app:v2", "--lazy"]);
    ok(&d, &["gc"]);
    let c = d;
    let t = Instant::now();
    let pf = String::from_utf8_lossy(&ok(&c, &["prefetch", "app:v2", "--json"]).stdout).to_string();
    eprintln!(
        "remote_lazy: prefetch of a {} MiB lazy version: {:.0} ms: {pf}",
        (BLOCKS * BS) >> 20,
        t.elapsed().as_secs_f64() * 1e3
    );
    let pf: Value = serde_json::from_str(pf.trim()).unwrap();
    assert_eq!(pf["prefetched"][0]["blocks_fetched"], distinct_blocks(&i2));
    assert_eq!(version_local(&c, &v2), 1.0);
    let copies =
        String::from_utf8_lossy(&ok(&c, &["prefetch", "--list", "--json"]).stdout).to_string();
    assert!(copies.contains(&v2), "no flat copy of v2: {copies}");
    ok(&c, &["fsck"]);

    // prefetch --background without a daemon returns at once; a detached imagefs completes it
    let e = store_with_remote(tmp.path(), "e", &g, "10s");
    ok(&e, &["pull", "app:v2", "--lazy"]);
    let t = Instant::now();
    ok(&e, &["prefetch", "app:v2", "--background"]);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let done = wait_until(Duration::from_secs(30), || {
        let out = run(&e, &["ls", "--json"]);
        out.status.success()
            && result(&out)["versions"][0]["local"].as_f64() == Some(1.0)
            && String::from_utf8_lossy(&run(&e, &["prefetch", "--list"]).stdout).contains(&v2)
    });
    assert!(done, "the background prefetch did not complete v2");
}

/// The packs of the bucket and, per pack, the blake3 of each block its index lists.
fn pack_blocks(client: &dyn Remote) -> Vec<(String, u64, HashSet<[u8; 32]>)> {
    let mut out = Vec::new();
    for (key, size) in client.list("packs/").unwrap() {
        let Some(p) = key.strip_suffix(".pack") else {
            continue;
        };
        let idx = client.get(&format!("{p}.idx")).unwrap();
        let hashes = idx[8..]
            .chunks_exact(44)
            .map(|e| e[..32].try_into().unwrap())
            .collect();
        out.push((key.clone(), size, hashes));
    }
    out
}

#[test]
fn a_tampered_pack_is_eio_through_the_mount_and_a_full_pull_exits_5() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    // 8 MiB packs: v1 spans three, one of which is tampered with
    let (i1, _) = pushed(tmp.path(), &g, "8M");
    let client = g.client("fleet", Duration::from_secs(10));
    let packs = pack_blocks(&client);
    let block0 = *blake3::hash(&i1[..BS]).as_bytes();
    let (bad_key, bad_len, bad_blocks) = packs
        .iter()
        .find(|(_, _, h)| h.contains(&block0))
        .cloned()
        .unwrap();
    assert!(packs.len() >= 3, "{} packs", packs.len());
    client
        .put(&bad_key, noise("tampered", bad_len as usize))
        .unwrap();

    let b = store_with_remote(tmp.path(), "b", &g, "10s");
    let v1 = result(&ok(&b, &["pull", "app:v1", "--lazy", "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let m = Mount::start(&b, &tmp.path().join("mnt-b"));
    let file = m.mnt.join("images/app/v1.raw");
    let (mut eio, mut good) = (0, 0);
    for (i, want) in i1.chunks(BS).enumerate() {
        if want.iter().all(|&x| x == 0) {
            continue;
        }
        let h: [u8; 32] = *blake3::hash(want).as_bytes();
        match read_direct(&file, (i * BS) as u64, BS) {
            Ok(got) => {
                assert!(got == want, "block {i}: wrong bytes through the mount");
                assert!(
                    !bad_blocks.contains(&h),
                    "block {i} of the tampered pack read"
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e, libc::EIO, "block {i}");
                assert!(bad_blocks.contains(&h), "block {i} of a good pack failed");
                eio += 1;
            }
        }
    }
    eprintln!("remote_lazy: tampered pack: {eio} blocks EIO, {good} read right");
    assert!(eio > 0 && good > 0);
    let s = stats(&b);
    assert!(
        s["versions"][&v1]["integrity_errors"].as_u64().unwrap() >= eio as u64,
        "{s}"
    );
    // none of the tampered pack's blocks were stored
    let local = version_local(&b, &v1);
    let want = good as f64 / distinct_blocks(&i1) as f64;
    assert!((local - want).abs() < 1e-9, "local {local}, want {want}");
    let full = run(&b, &["pull", "app:v1"]);
    assert_eq!(full.status.code(), Some(5), "{full:?}");
    drop(m);
}

#[test]
fn a_lazy_read_with_garage_stopped_is_eio_within_the_deadline_and_works_once_it_is_back() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Garage::start("images");
    let (i1, _) = pushed(tmp.path(), &g, "32M");
    let b = store_with_remote(tmp.path(), "b", &g, "3s");
    ok(&b, &["pull", "app:v1", "--lazy"]);
    let local = tmp.path().join("local.img");
    let li = noise("local", 16 * BS);
    std::fs::write(&local, &li).unwrap();
    ok(&b, &["import", local.to_str().unwrap(), "loc:v1"]);
    let mut m = Mount::start(&b, &tmp.path().join("mnt-b"));
    let file = m.mnt.join("images/app/v1.raw");

    g.stop();
    let t = Instant::now();
    let r = read_direct(&file, 0, BS);
    let took = t.elapsed();
    eprintln!(
        "remote_lazy: lazy read with garage stopped: {r:?} after {took:?} (deadline 3 s)",
        r = r.as_ref().map(|b| b.len())
    );
    assert_eq!(r.err(), Some(libc::EIO));
    assert!(took < Duration::from_millis(4500), "{took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "gave up after {took:?}, before retrying to the deadline"
    );
    assert!(m.alive(), "the daemon died");
    let l = read_direct(&m.mnt.join("images/loc/v1.raw"), 0, 16 * BS).unwrap();
    assert!(
        l == li,
        "a local version read wrong while the remote was down"
    );
    // 12 lazy reads at once (more than the daemon's 8 session threads) must not hold up a
    // local read: while a remote fails, only a few reads wait out its deadline
    let lazy: Vec<_> = (0..12)
        .map(|i| {
            let f = file.clone();
            // blocks 31i+2: none is a hole
            std::thread::spawn(move || read_direct(&f, ((i * 31 + 2) * BS) as u64, BS).err())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let l = read_direct(&m.mnt.join("images/loc/v1.raw"), 0, 16 * BS).unwrap();
    let local_took = t.elapsed();
    let errs: Vec<Option<i32>> = lazy.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!(
        "remote_lazy: a local read during 12 stuck lazy reads took {local_took:?}; lazy reads: {errs:?}"
    );
    assert!(l == li);
    assert!(local_took < Duration::from_secs(1), "{local_took:?}");
    assert!(errs.iter().all(|e| *e == Some(libc::EIO)), "{errs:?}");

    g.restart();
    let back = read_direct(&file, 0, BS).unwrap();
    assert!(
        back == i1[..BS],
        "the lazy read after garage came back differs"
    );
    m.stop();
}

/// Stops the VM before the mount goes (the hypervisor is the daemon's child, in its own group).
struct Vm<'a>(&'a Path, &'a str);

impl Drop for Vm<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["vm", "stop", "--timeout", "3", self.1]);
    }
}

#[test]
fn a_guest_boots_from_a_lazy_version_fetching_a_fraction_and_a_live_substitution_only_the_change() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let (kernel, initrd) = match imagefs_tests::qemu::guest_artifacts() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    // a root disk with busybox and 48 MiB of application data the boot never reads
    let data = noise("lazy-boot-data", 48 << 20);
    let img = imagefs_tests::qemu::build_rootfs(
        tmp.path(),
        128,
        &[("/opt/app/version", b"app 1.0\n"), ("/opt/app/data", &data)],
    )
    .unwrap();
    let size = std::fs::metadata(&img).unwrap().len();
    let a = store_with_remote(tmp.path(), "a", &g, "10s");
    ok(&a, &["import", img.to_str().unwrap(), "app:v1"]);
    ok(&a, &["push", "app:v1"]);
    let b = store_with_remote(tmp.path(), "b", &g, "10s");
    ok(&b, &["pull", "app:v1", "--lazy"]);
    // flat copies on: the instance's reads ask for one of its base, which must not be built
    // (that would fetch the whole version in the background)
    let mut m = Mount::start_with(&b, &tmp.path().join("mnt-b"), "1G");
    let t = Instant::now();
    let vm = Vm(&b, "web-1");
    ok(
        &b,
        &[
            "vm",
            "start",
            "app:v1",
            "--hypervisor",
            "auto",
            "--wait",
            "120",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "web-1",
        ],
    );
    let boot = t.elapsed();
    let s = stats(&b);
    let fetched = s["total"]["bytes_fetched"].as_u64().unwrap();
    eprintln!(
        "remote_lazy: a guest booted from a lazy {} MiB version in {:.1} s (agent ready), fetching {fetched} bytes = {:.2}% of the image in {} requests",
        size >> 20,
        boot.as_secs_f64(),
        fetched as f64 * 100.0 / size as f64,
        s["total"]["requests"]
    );
    assert!(fetched > 0 && fetched < size / 4, "{s}");
    // the guest reads the image's bytes
    let h = String::from_utf8_lossy(
        &ok(&b, &["agent", "hash", "--vm", "web-1", "/opt/app/version"]).stdout,
    )
    .split_whitespace()
    .next()
    .unwrap_or_default()
    .to_string();
    assert_eq!(h, blake3::hash(b"app 1.0\n").to_hex().to_string());
    std::thread::sleep(Duration::from_secs(2));
    let later = stats(&b)["total"]["bytes_fetched"].as_u64().unwrap();
    assert!(later < size / 4, "{later} bytes fetched in the background");
    let copies =
        String::from_utf8_lossy(&ok(&b, &["prefetch", "--list", "--json"]).stdout).to_string();
    let v1 = result(&ok(&b, &["ls", "--json"]))["versions"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !copies.contains(&v1),
        "a flat copy of a lazy version: {copies}"
    );
    // v2 (the version file rewritten in place, in its own block) pushed by A and pulled lazily
    // by B: substituting the live guest's instance fetches exactly that block, and the guest
    // reads v2's bytes
    let block = imagefs_tests::qemu::file_blocks(&img, "/opt/app/version").unwrap()[0];
    let img2 = tmp.path().join("v2.img");
    std::fs::copy(&img, &img2).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&img2)
        .unwrap()
        .write_all_at(b"app 2.0\n", block * 4096)
        .unwrap();
    ok(&a, &["import", img2.to_str().unwrap(), "app:v2"]);
    ok(&a, &["push", "app:v2"]);
    ok(&b, &["pull", "app:v2", "--lazy"]);
    let sub = result(&ok(&b, &["substitute", "web-1", "app:v2", "--json"]));
    eprintln!("remote_lazy: live substitution onto lazy v2: {sub}");
    assert_eq!(sub["blocks_fetched"], 1, "{sub}");
    assert_eq!(sub["bytes_fetched"], BS as u64, "{sub}");
    let h = String::from_utf8_lossy(
        &ok(&b, &["agent", "hash", "--vm", "web-1", "/opt/app/version"]).stdout,
    )
    .split_whitespace()
    .next()
    .unwrap_or_default()
    .to_string();
    assert_eq!(h, blake3::hash(b"app 2.0\n").to_hex().to_string());
    drop(vm);
    assert!(m.alive());
    m.stop();
}

/// `make bench` (group `remote`) runs this: the Debian guest (debootstrap, systemd) booted from
/// a lazily pulled version through the mount, and the bytes fetched until its agent answers,
/// as a fraction of the image (printed as `BENCH lazy-boot ...` lines). Ignored by `make test`:
/// the boot takes a minute or more under QEMU TCG, and `fullguest` covers the boot itself.
#[test]
#[ignore]
fn bench_lazy_debian_boot() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let (kernel, initrd) = match imagefs_tests::qemu::guest_artifacts() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    let image = match imagefs_tests::qemu::fullguest_image() {
        Ok(i) => i,
        Err(why) => skip!("{why}"),
    };
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let a = store_with_remote(tmp.path(), "a", &g, "30s");
    ok(&a, &["import", image.to_str().unwrap(), "deb:v1"]);
    ok(&a, &["push", "deb:v1"]);
    let b = store_with_remote(tmp.path(), "b", &g, "30s");
    let t = Instant::now();
    ok(&b, &["pull", "deb:v1", "--lazy"]);
    let pulled = t.elapsed();
    let m = Mount::start_with(&b, &tmp.path().join("mnt-b"), "1G");
    ok(&b, &["instance", "create", "deb:v1", "deb-1"]);
    let sock = tmp.path().join("deb.agent");
    let t = Instant::now();
    let mut vm = imagefs_tests::qemu::Qemu::start(
        &kernel,
        &initrd,
        &[imagefs_tests::qemu::Disk::ro(
            m.mnt.join("instances/deb-1.raw"),
        )],
        &sock,
        "agent.init=/sbin/init",
    )
    .unwrap();
    let (pong, ready) = vm.wait_agent(Duration::from_secs(300)).unwrap();
    assert!(
        !pong.init_mode,
        "the agent should run under systemd: {pong:?}"
    );
    let s = stats(&b);
    let fetched = s["total"]["bytes_fetched"].as_u64().unwrap();
    let size = std::fs::metadata(&image).unwrap().len();
    let used = ok(&a, &["ls", "--json"]);
    eprintln!(
        "remote_lazy: Debian guest to agent-ready in {:.1} s ({:.1} s since boot) from a lazy \
         {} MiB version (pull --lazy {:.0} ms), {fetched} bytes fetched in {} requests; A's ls: {}",
        t.elapsed().as_secs_f64(),
        ready.as_secs_f64(),
        size >> 20,
        pulled.as_secs_f64() * 1000.0,
        s["total"]["requests"],
        String::from_utf8_lossy(&used.stdout).trim()
    );
    println!("BENCH lazy-boot-image-bytes {size}");
    println!("BENCH lazy-boot-fetched-bytes {fetched}");
    println!(
        "BENCH lazy-boot-fraction-percent {:.3}",
        fetched as f64 * 100.0 / size as f64
    );
    assert!(fetched > 0 && fetched < size, "{s}");
}

#[test]
fn a_rollout_onto_a_lazy_version_fetches_its_changed_blocks_once_for_all_instances() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let (_, i2) = pushed(tmp.path(), &g, "32M");
    let b = store_with_remote(tmp.path(), "b", &g, "10s");
    ok(&b, &["pull", "app:v1", "--lazy"]);
    let p2 = result(&ok(&b, &["pull", "app:v2", "--lazy", "--json"]));
    let v2 = p2["id"].as_str().unwrap().to_string();
    let m = Mount::start(&b, &tmp.path().join("mnt-b"));
    for id in ["web-1", "web-2"] {
        ok(&b, &["instance", "create", "app:v1", id]);
    }
    // no VMs: each instance passes its health check as "not checked"
    let out = run(&b, &["rollout", "app:v2", "--instances", "web-*", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "rollout: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = stats(&b);
    eprintln!(
        "remote_lazy: rollout of 2 instances onto lazy v2: {}",
        s["versions"][&v2]
    );
    // v2's 4 changed blocks, fetched once for both instances
    assert_eq!(s["versions"][&v2]["blocks_fetched"], 4, "{s}");
    for id in ["web-1", "web-2"] {
        let got = read_direct(&m.mnt.join(format!("instances/{id}.raw")), 0, BLOCKS * BS);
        assert!(got.as_deref() == Ok(i2.as_slice()), "{id} does not read v2");
    }
}
