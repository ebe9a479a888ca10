//! Scenario module: metrics (issue 13). A real store, a real FUSE mount (root needed) with
//! `--metrics`: reads of an instance file and of a version file through the mount show up as
//! exactly the bytes read, per file, with a read latency histogram whose counts match; a write,
//! a substitution (with its step times) and a corrupt block (an integrity error, EIO) are
//! counted; the same is served on a Unix socket (owner-only), and a client that sends nothing
//! holds the endpoint no longer than its deadline. With a real Garage, the remote fetches,
//! bytes, blocks and cache hits of lazy reads are exactly the store's own counters
//! (`remote stats`). With a live QEMU guest (`vm start`), a substitution counts the agent's
//! notice round trip and the guest steps' times. A non-loopback address is refused at
//! argument parsing (exit 2), a taken port fails `mount` (exit 1).

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use imagefs_tests::garage::{self, Garage};
use imagefs_tests::{bin, is_root, noise, skip, wait_until};
use serde_json::Value;

use crate::remote_cli::{result, store_with_remote};
use crate::remote_lazy::read_direct;

const BS: usize = 4096;

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_ref()))
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A store and a mountpoint, and the daemon serving them (a foreground child).
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
        let m = Mounted::of(dir, store);
        m.ok(&["init"]);
        m
    }

    /// The existing `store`, mounted on DIR/mnt.
    fn of(dir: tempfile::TempDir, store: PathBuf) -> Mounted {
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        Mounted {
            dir,
            store,
            mnt,
            daemon: None,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env_remove("IMAGEFS_FAULT")
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

    fn import(&self, name: &str, bytes: &[u8], spec: &str) {
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
        self.ok(&["import", name, spec, "--block-size", "4096"]);
    }

    /// `mount ARGS...` as it exits when it cannot start (no mount comes up).
    fn mount_fails(&self, extra: &[&str]) -> Output {
        let mut child = Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&self.store)
            .arg("mount")
            .arg(&self.mnt)
            .args(extra)
            .env_remove("IMAGEFS_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A mount that came up would serve until stopped: it must exit by itself, at once.
        let exited = wait_until(Duration::from_secs(20), || {
            child.try_wait().unwrap().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            exited && !is_mounted(&self.mnt),
            "mount {extra:?} came up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn start(&mut self, extra: &[&str]) {
        let log = File::create(self.dir.path().join("daemon.stderr")).unwrap();
        let child = Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&self.store)
            .arg("mount")
            .arg(&self.mnt)
            .args(extra)
            .env_remove("IMAGEFS_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let mnt = self.mnt.clone();
        assert!(
            wait_until(Duration::from_secs(10), || is_mounted(&mnt)
                && mnt.join("images").exists()),
            "mount did not come up: {}",
            std::fs::read_to_string(self.dir.path().join("daemon.stderr")).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        let mnt = self.mnt.to_string_lossy().into_owned();
        self.ok(&["umount", &mnt]);
        let status = self.daemon.take().unwrap().wait().unwrap();
        assert!(status.success(), "daemon exit status {status}");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
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

/// One HTTP exchange: sends `GET /metrics`, returns the status line, headers and body.
fn get(stream: &mut (impl Read + Write)) -> (String, String, String) {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_string(), headers.to_string(), body.to_string())
}

fn scrape_tcp(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, headers, body) = get(&mut s);
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers
            .lines()
            .any(|h| h.eq_ignore_ascii_case("content-type: text/plain; version=0.0.4")),
        "{headers}"
    );
    body
}

/// The samples of a text exposition: (name, labels sorted) -> value. Panics on a line that is
/// neither a comment nor a sample.
fn parse(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.insert((name.to_string(), map), value);
    }
    out
}

type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// The value of `name{labels}` (0 when absent, as Prometheus reads a series not yet made).
fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), want)).copied().unwrap_or(0.0)
}

/// A histogram's buckets for `labels` are cumulative and end at its count.
fn assert_histogram(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let count = value(s, &format!("{name}_count"), labels);
    let mut buckets: Vec<(f64, f64)> = s
        .iter()
        .filter(|((n, l), _)| {
            n == &format!("{name}_bucket")
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|((_, l), v)| {
            let le = l["le"].as_str();
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                *v,
            )
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 2, "{name}{labels:?}: no buckets");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name}{labels:?}: buckets not cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().unwrap(),
        &(f64::INFINITY, count),
        "{name}{labels:?}"
    );
    count
}

#[test]
fn reads_writes_substitutions_and_integrity_errors_are_counted_per_file() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    // 300 blocks and a tail: the file's size is what a whole read returns, however the
    // kernel splits it into requests.
    let a = noise("metrics a", 300 * BS + 123);
    let mut b = a.clone();
    b[10 * BS..13 * BS].copy_from_slice(&noise("metrics b", 3 * BS));
    let bad = noise("metrics bad", 16 * BS);
    m.import("a.img", &a, "web:v1");
    m.import("b.img", &b, "web:v2");
    m.import("bad.img", &bad, "bad:v1");
    // Flip a bit of block 5 of bad:v1 where it lies in a pack.
    let block = &bad[5 * BS..6 * BS];
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
    assert!(hit, "block 5 of bad:v1 is in no pack");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // No flat copies: every read of a version file reaches the daemon.
    m.start(&["--metrics", &addr, "--flat-cache", "0"]);
    let before = parse(&scrape_tcp(port));
    assert_eq!(
        value(&before, "imagefs_substitutions_total", &[]),
        0.0,
        "a fresh daemon has done nothing"
    );

    m.ok(&["instance", "create", "web:v1", "vm1"]);
    let inst = m.mnt.join("instances/vm1.raw");
    assert_eq!(std::fs::read(&inst).unwrap(), a);
    assert_eq!(std::fs::read(m.mnt.join("images/web/v1.raw")).unwrap(), a);
    let f = OpenOptions::new().write(true).open(&inst).unwrap();
    f.write_all_at(&noise("w", 3 * BS), 200 * BS as u64)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let out = m.ok(&["substitute", "vm1", "web:v2", "--json"]);
    assert!(out.contains("\"changed_blocks\":3"), "{out}");
    let f = File::open(m.mnt.join("images/bad/v1.raw")).unwrap();
    let mut buf = vec![0u8; BS];
    let err = f.read_exact_at(&mut buf, 5 * BS as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(f);

    let s = parse(&scrape_tcp(port));
    let vm1 = [("kind", "instance"), ("file", "vm1")];
    let v1 = [("kind", "version"), ("file", "web:v1")];
    let len = a.len() as f64;
    assert_eq!(
        value(&s, "imagefs_read_bytes_total", &vm1),
        len,
        "instance bytes"
    );
    assert_eq!(
        value(&s, "imagefs_read_bytes_total", &v1),
        len,
        "version bytes"
    );
    let reads = value(&s, "imagefs_reads_total", &vm1);
    assert!(reads >= 1.0, "instance reads: {reads}");
    assert_eq!(
        value(&s, "imagefs_written_bytes_total", &vm1),
        (3 * BS) as f64,
        "instance writes"
    );
    // Every read of the instance was timed, and nothing else of its kind was read.
    let timed = assert_histogram(&s, "imagefs_read_duration_seconds", &[("kind", "instance")]);
    assert_eq!(timed, reads, "instance reads timed");
    let version_reads = value(&s, "imagefs_reads_total", &v1)
        + value(
            &s,
            "imagefs_reads_total",
            &[("kind", "version"), ("file", "bad:v1")],
        )
        + value(&s, "imagefs_read_errors_total", &[("kind", "version")]);
    assert_eq!(
        assert_histogram(&s, "imagefs_read_duration_seconds", &[("kind", "version")]),
        version_reads,
        "version reads timed"
    );
    // Without flat copies no open is passed through (whose reads the daemon would not see).
    assert!(value(&s, "imagefs_opens_total", &[("mode", "cached")]) >= 4.0);
    assert_eq!(
        value(&s, "imagefs_opens_total", &[("mode", "passthrough")]),
        0.0
    );
    assert_eq!(value(&s, "imagefs_substitutions_total", &[]), 1.0);
    for step in ["prepare", "diff", "persist", "swap", "invalidate", "total"] {
        assert_eq!(
            assert_histogram(&s, "imagefs_substitution_step_seconds", &[("step", step)]),
            1.0,
            "substitution step {step}"
        );
    }
    assert!(
        value(
            &s,
            "imagefs_substitution_step_seconds_sum",
            &[("step", "total")]
        ) > 0.0,
        "a substitution takes time"
    );
    assert!(
        value(&s, "imagefs_integrity_errors_total", &[]) >= 1.0,
        "the corrupt block was not counted"
    );
    assert!(value(&s, "imagefs_read_errors_total", &[("kind", "version")]) >= 1.0);
    // Nothing else answers: the endpoint serves /metrics only.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /secrets HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    m.stop();
}

#[test]
fn a_unix_socket_serves_the_same_to_its_owner_and_a_silent_client_holds_it_only_briefly() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let mut m = Mounted::new();
    let a = noise("metrics unix", 40 * BS);
    m.import("a.img", &a, "app:v1");
    let sock = m.dir.path().join("run/metrics.sock");
    std::fs::create_dir(sock.parent().unwrap()).unwrap();
    let sock_arg = sock.to_string_lossy().into_owned();
    m.start(&["--metrics", &sock_arg]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket grants only the store's owner");
    m.ok(&["instance", "create", "app:v1", "db"]);
    assert_eq!(std::fs::read(m.mnt.join("instances/db.raw")).unwrap(), a);

    // A client that connects and says nothing: the next scrape waits at most its deadline.
    let _silent = UnixStream::connect(&sock).unwrap();
    let t = Instant::now();
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (status, headers, body) = get(&mut s);
    let waited = t.elapsed();
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}");
    assert!(
        waited < Duration::from_secs(8),
        "a silent client held the endpoint {waited:?}"
    );
    let samples = parse(&body);
    assert_eq!(
        value(
            &samples,
            "imagefs_read_bytes_total",
            &[("kind", "instance"), ("file", "db")]
        ),
        a.len() as f64
    );
    m.stop();
    assert!(!sock.exists(), "the socket outlived the daemon");
    // A daemon that fails to mount (no such mountpoint) takes its socket with it.
    let missing = m.dir.path().join("missing");
    let out = m.cli(&["mount", missing.to_str().unwrap(), "--metrics", &sock_arg]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        !sock.exists(),
        "a daemon that never came up left its socket"
    );
}

#[test]
fn a_non_loopback_address_is_refused_and_a_taken_port_fails_the_mount() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let m = Mounted::new();
    for addr in [
        "0.0.0.0:9464",
        "192.0.2.10:9464",
        "[::]:9464",
        "localhost:9464",
    ] {
        let out = m.mount_fails(&["--metrics", addr]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--metrics {addr}: {err}");
        assert!(err.contains("--metrics"), "--metrics {addr}: {err}");
    }
    let out = m.mount_fails(&["--metrics", "0.0.0.0:9464"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a loopback address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = m.mount_fails(&["--metrics", &addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("--metrics {addr}")), "{err}");
    // Something that is not a socket is never removed to make room.
    let file = m.dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep").unwrap();
    let out = m.mount_fails(&["--metrics", &file.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

/// The store's own fetch counters, through the daemon.
fn remote_stats(m: &Mounted) -> Value {
    let out = m.cli(&["remote", "stats", "--json"]);
    assert!(out.status.success(), "{out:?}");
    result(&out)["total"].clone()
}

#[test]
fn remote_fetches_and_cache_hits_of_lazy_reads_are_the_stores_counters() {
    if garage::binary().is_none() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let a = store_with_remote(tmp.path(), "a", &g, "10s");
    let img = noise("metrics remote", 256 * BS);
    let f = tmp.path().join("v1.img");
    std::fs::write(&f, &img).unwrap();
    let run = |store: &Path, args: &[&str]| {
        let out = Command::new(bin("imagefs"))
            .arg("--store")
            .arg(store)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "imagefs {args:?}: {out:?}");
    };
    run(&a, &["import", f.to_str().unwrap(), "app:v1"]);
    run(&a, &["push", "app:v1"]);
    let b = store_with_remote(tmp.path(), "b", &g, "10s");
    run(&b, &["pull", "app:v1", "--lazy"]);
    let mut m = Mounted::of(tmp, b);
    let port = free_port();
    m.start(&[
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--flat-cache",
        "0",
    ]);
    let g_ = [("remote", "g")];
    let counters = |s: &Samples| {
        [
            "imagefs_remote_requests_total",
            "imagefs_remote_fetched_bytes_total",
            "imagefs_remote_fetched_blocks_total",
            "imagefs_cache_hits_total",
            "imagefs_remote_integrity_errors_total",
        ]
        .map(|n| value(s, n, &g_))
    };
    let of_store = |t: &Value| {
        [
            "requests",
            "bytes_fetched",
            "blocks_fetched",
            "cache_hits",
            "integrity_errors",
        ]
        .map(|k| t[k].as_f64().unwrap_or(0.0))
    };
    let file = m.mnt.join("images/app/v1.raw");
    let head = read_direct(&file, 0, 256 << 10).unwrap();
    assert!(
        head == img[..256 << 10],
        "the first 256 KiB differ from A's"
    );
    let first = counters(&parse(&scrape_tcp(port)));
    assert_eq!(first, of_store(&remote_stats(&m)), "after the first read");
    assert!(first[1] >= (256 << 10) as f64, "fetched {first:?}");
    // Read again: served from the blocks fetched, each a cache hit, nothing fetched.
    assert!(read_direct(&file, 0, 256 << 10).unwrap() == img[..256 << 10]);
    let again = counters(&parse(&scrape_tcp(port)));
    assert_eq!(again, of_store(&remote_stats(&m)), "after the second read");
    eprintln!(
        "metrics: remote counters [requests, bytes, blocks, cache hits, integrity errors] \
         after a first 256 KiB read {first:?}, after the same read again {again:?}"
    );
    assert_eq!(again[..3], first[..3], "a second read fetched");
    assert!(again[3] > first[3], "no cache hits counted: {again:?}");
    m.stop();
}

/// Stops the VM (and with it the guest's hold on the mount) before the mount goes.
struct VmGuard<'a>(&'a Mounted, &'a str);

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.cli(&["vm", "stop", "--timeout", "3", self.1]);
    }
}

#[test]
fn a_substitution_under_a_live_guest_counts_the_agent_round_trip_and_its_steps() {
    if !is_root() {
        skip!("FUSE mounts need root here");
    }
    let (kernel, initrd) = match imagefs_tests::qemu::guest_artifacts() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    let mut m = Mounted::new();
    let v1 =
        imagefs_tests::qemu::build_rootfs(m.dir.path(), 32, &[("/opt/app/version", b"app 1.0\n")])
            .unwrap();
    let block = imagefs_tests::qemu::file_blocks(&v1, "/opt/app/version").unwrap()[0];
    let v2 = m.dir.path().join("v2.img");
    std::fs::copy(&v1, &v2).unwrap();
    let f = OpenOptions::new().write(true).open(&v2).unwrap();
    f.write_all_at(b"app 2.0\n", block * BS as u64).unwrap();
    drop(f);
    for (img, tag) in [(&v1, "app:v1"), (&v2, "app:v2")] {
        m.ok(&["import", img.to_str().unwrap(), tag, "--block-size", "4096"]);
    }
    let port = free_port();
    m.start(&["--metrics", &format!("127.0.0.1:{port}")]);
    let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
    let _vm = VmGuard(&m, "web-1");
    m.ok(&[
        "vm",
        "start",
        "app:v1",
        "web-1",
        "--hypervisor",
        "auto",
        "--wait",
        "90",
        "--kernel",
        &k,
        "--initrd",
        &i,
    ]);
    let out = m.ok(&["substitute", "web-1", "app:v2", "--json"]);
    assert!(out.contains("\"guest\":\"told\""), "{out}");
    let s = parse(&scrape_tcp(port));
    let notice = [("op", "notice")];
    assert_eq!(
        assert_histogram(&s, "imagefs_agent_round_trip_seconds", &notice),
        1.0,
        "the notice's round trip"
    );
    assert!(value(&s, "imagefs_agent_round_trip_seconds_sum", &notice) > 0.0);
    assert_eq!(value(&s, "imagefs_agent_failures_total", &notice), 0.0);
    for step in ["files", "notify", "guest"] {
        assert_eq!(
            assert_histogram(&s, "imagefs_substitution_step_seconds", &[("step", step)]),
            1.0,
            "substitution step {step}"
        );
    }
    drop(_vm);
    m.stop();
}
