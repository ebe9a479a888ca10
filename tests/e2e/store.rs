//! Scenario module: store. Drives the real `imagefs` binary on real ext4 images (mkfs.ext4 -d,
//! patched with debugfs) and qcow2 files made by qemu-img: the user story end to end, bad
//! inputs that must change nothing, corruption that must be caught with exit 5, index loss
//! repaired from the logs, and kill -9 at random points of import, apply, tag and gc.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use imagefs_tests::{bin, missing_tools, noise, skip, tool_command};
use serde_json::Value;

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image of `mb` MiB holding a few generated files (text and incompressible data).
fn make_ext4(dir: &Path, name: &str, mb: u64, seed: &str) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    for i in 0..20 {
        std::fs::write(
            root.join(format!("etc/conf{i}")),
            format!("setting{i} = {seed}\n").repeat(50),
        )
        .unwrap();
        std::fs::write(
            root.join(format!("usr/bin/tool{i}")),
            noise(&format!("{seed}{i}"), 200_000 + i * 1000),
        )
        .unwrap();
    }
    let img = dir.join(name);
    run_ok(
        tool_command("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-U", "clear", "-d"])
            .arg(&root)
            .arg(&img)
            .arg(format!("{mb}M"))
            .env("E2FSPROGS_FAKE_TIME", "1700000000"),
    );
    img
}

/// A copy of `base` with one file replaced, as a security fix would: few changed blocks.
fn patch_ext4(dir: &Path, base: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    std::fs::copy(base, &img).unwrap();
    let new = dir.join(format!("{name}.tool3"));
    std::fs::write(&new, noise("patched tool3", 203_000)).unwrap();
    run_ok(
        tool_command("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} usr/bin/tool3.new", new.display()))
            .arg(&img)
            .env("E2FSPROGS_FAKE_TIME", "1700000000"),
    );
    img
}

/// Why the scenarios cannot run here, if they cannot.
fn prerequisites() -> Option<String> {
    if let Some(why) = missing_tools(&["mkfs.ext4", "debugfs", "qemu-img"]) {
        return Some(why);
    }
    (!bin("imagefs").exists()).then(|| "needs a built imagefs binary (cargo build)".to_string())
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The final JSON object (the result) of a --json run.
    fn result(&self) -> Value {
        let last = self.stdout.lines().last().unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON {last:?}: {e}"))
    }
}

fn imagefs(store: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(bin("imagefs"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("IMAGEFS_STORE")
        .output()
        .expect("run imagefs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(store: &Path, args: &[&str]) -> Run {
    let r = imagefs(store, args);
    assert_eq!(r.code, 0, "imagefs {args:?}: {}{}", r.stdout, r.stderr);
    r
}

fn fails(store: &Path, args: &[&str], code: i32) -> Run {
    let r = imagefs(store, args);
    assert_eq!(r.code, code, "imagefs {args:?}: {}{}", r.stdout, r.stderr);
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "one clear line: {}",
        r.stderr
    );
    r
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The store's visible state: versions and tags, as `ls --json` prints them.
fn state(store: &Path) -> Value {
    let mut v = ok(store, &["ls", "--json"]).result();
    v.as_object_mut().unwrap().remove("type");
    v
}

#[test]
fn user_story_import_diff_bundle_apply_export_gc() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = make_ext4(d, "base.img", 64, "v1");
    let patched = patch_ext4(d, &base, "patched.img");
    let (st, st2) = (d.join("s"), d.join("t"));
    ok(&st, &["init"]);
    let r1 = ok(&st, &["import", s(&base), "web:v1", "--json"]).result();
    assert_eq!(r1["format"], "raw");
    // the patched image goes in as qcow2 (detected by its header)
    let v2_src = d.join("patched.qcow2");
    run_ok(tool_command("qemu-img").args(["convert", "-O", "qcow2", s(&patched), s(&v2_src)]));
    let r2 = ok(&st, &["import", s(&v2_src), "web:v2", "--json"]).result();
    assert_eq!(r2["format"], "qcow2");
    let blocks = r2["new_blocks"].as_u64().unwrap();
    let shared = r2["dedup_blocks"].as_u64().unwrap();
    assert!(
        blocks * 10 < shared,
        "v2 shares nearly everything with v1: {r2}"
    );
    // re-import of stored bytes: same version, nothing new
    let again = ok(&st, &["import", s(&base), "web:v1", "--json"]).result();
    assert_eq!(again["id"], r1["id"]);
    assert_eq!(again["new_blocks"], 0);

    let ls = state(&st);
    assert_eq!(ls["images"][0]["tags"]["v1"], r1["id"]);
    assert_eq!(ls["images"][0]["tags"]["v2"], r2["id"]);
    assert_eq!(ls["versions"].as_array().unwrap().len(), 2);

    let diff = ok(&st, &["diff", "web:v1", "web:v2", "--json"]).result();
    let changed: Vec<u64> = diff["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert!(!changed.is_empty() && changed.len() < 40, "{diff}");
    // the ranges cover exactly the bytes that differ
    let (a, b) = (
        std::fs::read(&base).unwrap(),
        std::fs::read(&patched).unwrap(),
    );
    let bs = diff["block_size"].as_u64().unwrap() as usize;
    for (i, (x, y)) in a.chunks(bs).zip(b.chunks(bs)).enumerate() {
        assert_eq!(x != y, changed.contains(&(i as u64)), "block {i}");
    }
    let bytes: u64 = diff["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_u64().unwrap())
        .sum();
    assert_eq!(bytes, changed.len() as u64 * bs as u64);

    let bundle = d.join("fix.bundle");
    ok(&st, &["bundle", "web:v1", "web:v2", s(&bundle)]);
    let blen = std::fs::metadata(&bundle).unwrap().len();
    assert!(
        blen < (changed.len() as u64 + 2) * bs as u64,
        "bundle holds only changes: {blen}"
    );
    ok(&st2, &["init"]);
    ok(&st2, &["import", s(&base), "web:v1"]);
    let applied = ok(&st2, &["apply", s(&bundle), "--json"]).result();
    assert_eq!(applied["id"], r2["id"]);
    let out2 = d.join("out2.img");
    ok(&st2, &["export", "web:v2", s(&out2)]);
    assert!(
        same_file(&out2, &patched),
        "export from the applied store is byte-identical"
    );
    let out = d.join("out.img");
    ok(&st, &["export", "web:v2", s(&out)]);
    assert!(same_file(&out, &patched));

    let fsck = ok(&st, &["fsck", "--json"]).result();
    assert_eq!(fsck["ok"], true);
    assert_eq!(fsck["versions"], 2);

    // tags move and go; a version stays addressable by id until gc
    ok(&st, &["tag", "web:prod", "web:v2"]);
    let v1_id = r1["id"].as_str().unwrap().to_string();
    ok(&st, &["rm", "web:v1"]);
    fails(&st, &["export", "web:v1", s(&out)], 3);
    ok(&st, &["export", &v1_id[..12], s(&out)]);
    assert!(same_file(&out, &base));
    let packs_before = dir_size(&st.join("packs"));
    let gc = ok(&st, &["gc", "--json"]).result();
    assert_eq!(gc["versions_removed"][0], v1_id.as_str());
    assert!(dir_size(&st.join("packs")) < packs_before);
    fails(&st, &["export", &v1_id, s(&out)], 3);
    ok(&st, &["export", "web:prod", s(&out)]);
    assert!(same_file(&out, &patched));
    assert_eq!(ok(&st, &["fsck", "--json"]).result()["ok"], true);
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn bad_inputs_get_one_line_a_code_and_change_nothing() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = make_ext4(d, "base.img", 16, "b1");
    let patched = patch_ext4(d, &base, "patched.img");
    let st = d.join("s");
    ok(&st, &["init"]);
    ok(&st, &["import", s(&base), "web:v1"]);
    ok(&st, &["import", s(&patched), "web:v2"]);
    let bundle = d.join("fix.bundle");
    ok(&st, &["bundle", "web:v1", "web:v2", s(&bundle)]);
    let before = state(&st);
    let out = d.join("out.img");

    fails(&st, &["import", s(&d.join("missing.img")), "web:v3"], 3);
    fails(&st, &["import", s(&base), "web"], 2);
    fails(&st, &["import", s(&base), "we/b:v3"], 2);
    fails(&st, &["import", s(&base), "web:.v3"], 2);
    fails(
        &st,
        &["import", s(&base), "web:v3", "--block-size", "5000"],
        2,
    );
    fails(
        &st,
        &["import", s(&base), "web:v3", "--block-size", "4096"],
        4,
    );
    fails(&st, &["export", "web:nope", s(&out)], 3);
    fails(&st, &["export", "nope:v1", s(&out)], 3);
    fails(&st, &["export", "web:v1:x", s(&out)], 2);
    fails(&st, &["diff", "web:v1", "zz"], 2);
    assert!(!out.exists(), "a failed export leaves no file");

    // bundles: truncated, tampered, and one whose base this store lacks
    let raw = std::fs::read(&bundle).unwrap();
    let st2 = d.join("t");
    ok(&st2, &["init"]);
    ok(&st2, &["import", s(&base), "web:v1"]);
    let before2 = state(&st2);
    let cut = d.join("cut.bundle");
    std::fs::write(&cut, &raw[..raw.len() * 2 / 3]).unwrap();
    let r = fails(&st2, &["apply", s(&cut)], 5);
    assert!(r.stderr.contains("truncated"), "{}", r.stderr);
    let mut bad = raw.clone();
    let mid = raw.len() / 2;
    bad[mid] ^= 0x40;
    let tampered = d.join("tampered.bundle");
    std::fs::write(&tampered, &bad).unwrap();
    fails(&st2, &["apply", s(&tampered)], 5);
    fails(&st2, &["apply", s(&d.join("none.bundle"))], 3);
    let st3 = d.join("u");
    ok(&st3, &["init"]);
    let r = fails(&st3, &["apply", s(&bundle)], 3);
    assert!(
        r.stderr.contains("web:v1"),
        "names the missing base: {}",
        r.stderr
    );
    assert_eq!(state(&st2), before2);
    assert_eq!(
        ok(&st3, &["ls", "--json"]).result()["versions"],
        serde_json::json!([])
    );

    // not a store, an unknown format, a second writer
    let plain = d.join("plain");
    std::fs::create_dir(&plain).unwrap();
    fails(&plain, &["ls"], 2);
    fails(&st, &["init"], 4);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(st.join("lock"))
        .unwrap();
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    let r = fails(&st, &["import", s(&base), "web:v9"], 4);
    assert!(r.stderr.contains("store is busy"), "{}", r.stderr);
    drop(lock);
    assert_eq!(state(&st), before);
    assert_eq!(ok(&st, &["fsck", "--json"]).result()["ok"], true);
}

#[test]
fn corrupt_pack_byte_fails_export_with_5_and_fsck_lists_it() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = make_ext4(d, "base.img", 16, "c1");
    let st = d.join("s");
    ok(&st, &["init"]);
    ok(&st, &["import", s(&base), "web:v1"]);
    // flip a byte inside the data of the first record of the pack
    let pack = std::fs::read_dir(st.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, 1000).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], 1000).unwrap();
    drop(f);
    let out = d.join("out.img");
    let r = fails(&st, &["export", "web:v1", s(&out)], 5);
    assert!(
        r.stderr.contains("offset") && r.stderr.contains("block"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("web:v1"), "{}", r.stderr);
    assert!(!out.exists());
    let r = imagefs(&st, &["fsck", "--json"]);
    assert_eq!(r.code, 5, "{}{}", r.stdout, r.stderr);
    let res = r.result();
    assert_eq!(res["ok"], false);
    let problems = res["problems"].as_array().unwrap();
    assert!(!problems.is_empty());
    assert!(problems.iter().all(|p| p["offset"].is_u64()), "{res}");
}

#[test]
fn deleted_or_damaged_index_is_rebuilt_by_fsck_repair() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = make_ext4(d, "base.img", 32, "r1");
    let patched = patch_ext4(d, &base, "patched.img");
    let st = d.join("s");
    ok(&st, &["init"]);
    ok(&st, &["import", s(&base), "web:v1"]);
    ok(
        &st,
        &["import", s(&patched), "web:v2", "--block-size", "64K"],
    );
    ok(
        &st,
        &["import", s(&patched), "db:v1", "--block-size", "4096"],
    );
    ok(&st, &["tag", "web:prod", "web:v2"]);
    ok(&st, &["rm", "web:v2"]);
    let before = state(&st);
    let out = d.join("out.img");
    for damage in ["delete", "garble"] {
        let index = st.join("index");
        if damage == "delete" {
            std::fs::remove_dir_all(&index).unwrap();
        } else {
            for e in std::fs::read_dir(&index).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    std::fs::write(&p, noise("garbage", 4096)).unwrap();
                }
            }
        }
        let r = ok(&st, &["fsck", "--repair", "--json"]).result();
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(state(&st), before, "after {damage}");
        for (spec, src) in [
            ("web:v1", &base),
            ("web:prod", &patched),
            ("db:v1", &patched),
        ] {
            ok(&st, &["export", spec, s(&out)]);
            assert!(same_file(&out, src), "{spec} after {damage}");
        }
    }
}

/// A tiny deterministic generator for kill points.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn kill_9_during_import_apply_tag_gc_leaves_a_consistent_store() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let st = d.join("s");
    let st2 = d.join("t");
    // incompressible images so import does real work for a while
    let imgs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = d.join(format!("img{i}.raw"));
            std::fs::write(&p, noise(&format!("img{i}"), 24 << 20)).unwrap();
            p
        })
        .collect();
    ok(&st, &["init"]);
    ok(&st, &["import", s(&imgs[0]), "a:v1"]);
    let mut v2 = std::fs::read(&imgs[0]).unwrap();
    for k in 0..64 {
        v2[k * 350_000] ^= 1;
    }
    let v2p = d.join("a2.raw");
    std::fs::write(&v2p, &v2).unwrap();
    ok(&st, &["import", s(&v2p), "a:v2"]);
    let bundle = d.join("a.bundle");
    ok(&st, &["bundle", "a:v1", "a:v2", s(&bundle)]);
    ok(&st2, &["init"]);
    ok(&st2, &["import", s(&imgs[0]), "a:v1"]);

    // CRASH_SEED replays a run (default: the clock; printed either way).
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("CRASH_SEED={seed}");
    let mut rng = Lcg(seed);
    let start = Instant::now();
    let mut kills = 0;
    // Every other command runs with a fault point armed that it is sure to reach (fault.rs):
    // that kill must land inside the operation, so at least 10 of the 20 must.
    let (mut armed, mut landed) = (0, 0);
    let mut tagged: Vec<(String, usize)> = Vec::new();
    for i in 0..20 {
        let mut fault: Option<String> = None;
        // Even iterations import or apply, with a point armed; odd ones kill at random times.
        let pick = if i % 2 == 0 { rng.next(4) } else { rng.next(5) };
        let (store, args, max_ms): (&Path, Vec<String>, u64) = match pick {
            0..=2 => {
                // a new image name with a random block size: mostly new blocks to write
                let which = rng.next(3) as usize;
                let img = &imgs[which];
                let bs = ["4096", "16384"][rng.next(2) as usize];
                tagged.push((format!("b{i}:t"), which));
                let argv = vec![
                    "import".into(),
                    s(img).into(),
                    format!("b{i}:t"),
                    "--block-size".into(),
                    bs.into(),
                ];
                // a 24 MiB image has at least 1536 blocks; new ones unless deduplicated
                fault = Some(format!("refs.synced@{}", 1 + rng.next(2)));
                if i % 4 == 0 {
                    fault = Some("import.blocks_stored@1".to_string());
                }
                (&st, argv, 900)
            }
            3 if i % 2 == 0 => {
                // a repeated apply commits nothing new but still passes the point once
                fault = Some("refs.appended@1".to_string());
                (&st2, vec!["apply".into(), s(&bundle).into()], 60)
            }
            3 => {
                let target = ["a:v1", "a:v2"][rng.next(2) as usize];
                fault = Some("refs.synced@1".to_string());
                (
                    &st,
                    vec!["tag".into(), "a:moving".into(), target.into()],
                    40,
                )
            }
            _ => {
                // give gc something to free
                for _ in 0..2 {
                    if !tagged.is_empty() {
                        let (t, _) = tagged.remove(rng.next(tagged.len() as u64) as usize);
                        ok(&st, &["rm", &t]);
                    }
                }
                (&st, vec!["gc".into()], 300)
            }
        };
        if i % 2 == 1 {
            fault = None;
        }
        let errf = d.join("cmd.stderr");
        let mut cmd = Command::new(bin("imagefs"));
        cmd.arg("--store")
            .arg(store)
            .args(&args)
            .env_remove("IMAGEFS_FAULT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errf).unwrap());
        if let Some(f) = &fault {
            cmd.env("IMAGEFS_FAULT", f);
        }
        let mut child = cmd.spawn().unwrap();
        if let Some(f) = &fault {
            // The process kills itself at the point: it must die of SIGKILL, saying where.
            armed += 1;
            let status = child.wait().unwrap();
            let name = f.split('@').next().unwrap();
            let said = std::fs::read_to_string(&errf).unwrap_or_default();
            if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL)
                && said.contains(&format!("IMAGEFS-FAULT {name}"))
            {
                landed += 1;
                kills += 1;
            } else {
                eprintln!(
                    "iteration {i} ({args:?}, {f}) did not die at its fault point: {status} {said}"
                );
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.next(max_ms)));
            if child.try_wait().unwrap().is_none() {
                kills += 1;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for sdir in [&st, &st2] {
            let r = imagefs(sdir, &["fsck", "--json"]);
            assert_eq!(
                r.code, 0,
                "iteration {i} ({args:?}): {}{}",
                r.stdout, r.stderr
            );
        }
        // re-running the interrupted command succeeds
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(store, &argv);
    }
    eprintln!(
        "{kills} of 20 commands killed mid-run ({landed} of {armed} at armed fault points) in {:?}",
        start.elapsed()
    );
    assert_eq!(armed, 10, "every even iteration arms a point");
    assert_eq!(
        landed, armed,
        "every armed fault point must fire (CRASH_SEED={seed})"
    );
    assert!(kills >= landed);
    let out = d.join("out.raw");
    // apply is idempotent: run it once more in case the random ops never picked it
    ok(&st2, &["apply", s(&bundle)]);
    ok(&st2, &["export", "a:v2", s(&out)]);
    assert!(same_file(&out, &v2p));
    for (tag, which) in &tagged {
        ok(&st, &["export", tag, s(&out)]);
        assert!(
            same_file(&out, &imgs[*which]),
            "{tag} survived byte-identical"
        );
    }
}

#[test]
fn one_bad_byte_in_refs_log_stops_every_command_until_repair_drops_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    ok(&store, &["init"]);
    for (name, seed) in [("a.img", "a"), ("b.img", "b")] {
        std::fs::write(dir.path().join(name), noise(seed, 300_000)).unwrap();
    }
    ok(&store, &["import", s(&dir.path().join("a.img")), "web:v1"]);
    ok(&store, &["tag", "web:doomed", "web:v1"]);
    ok(&store, &["import", s(&dir.path().join("b.img")), "web:v2"]);
    let refs = store.join("refs.log");
    let mut bytes = std::fs::read(&refs).unwrap();
    let at = bytes
        .windows(6)
        .position(|w| w == b"doomed")
        .expect("the tag record");
    bytes[at] ^= 0x01;
    std::fs::write(&refs, &bytes).unwrap();
    // Every command that opens the store stops with exit 5, names the log, and changes nothing.
    for args in [&["ls"][..], &["fsck"], &["export", "web:v1", "/dev/null"]] {
        let r = fails(&store, args, 5);
        assert!(
            r.stderr.contains("refs.log") && r.stderr.contains("offset"),
            "{}",
            r.stderr
        );
        assert_eq!(
            std::fs::read(&refs).unwrap(),
            bytes,
            "{args:?} changed refs.log"
        );
    }
    let r = ok(&store, &["fsck", "--repair", "--drop-damaged"]);
    assert!(
        r.stdout.contains("REPAIRED") && r.stdout.contains("damaged-"),
        "{}",
        r.stdout
    );
    let saved: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("refs.log.damaged-")
        })
        .collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(std::fs::read(saved[0].path()).unwrap(), bytes);
    // Only the damaged record is gone: both versions and their tags are there.
    let ls = ok(&store, &["ls"]).stdout;
    assert!(
        ls.contains("v1") && ls.contains("v2") && !ls.contains("doomed"),
        "{ls}"
    );
    ok(&store, &["fsck"]);
    let out = dir.path().join("out.img");
    ok(&store, &["export", "web:v2", s(&out)]);
    assert!(same_file(&out, &dir.path().join("b.img")));
    // One bit of the first record's length (it then runs past the file's end): damage too,
    // never a torn tail that takes every record after it.
    let before = std::fs::read(&refs).unwrap();
    let mut bytes = before.clone();
    bytes[7] ^= 0x01; // +64 KiB
    std::fs::write(&refs, &bytes).unwrap();
    let r = fails(&store, &["ls"], 5);
    assert!(
        r.stderr.contains("refs.log") && r.stderr.contains("offset 0"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&refs).unwrap(), bytes, "ls changed refs.log");
}
