//! Scenario module: remote gc (issue 12) against a real Garage with the real `imagefs` binary:
//! after `remote untag`, two `remote gc` passes delete exactly the objects only the untagged
//! version reached and the other version still pulls whole; a push stopped (SIGSTOP) between
//! its first pack upload and its tag while two gc passes delete what it had uploaded still
//! ends with a tag whose version pulls whole.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use imagefs_store::remote::Remote;
use imagefs_tests::garage::{self, Garage};
use imagefs_tests::{noise, skip};
use serde_json::Value;

use crate::remote_cli::{imagefs, ok, result, run, store_with_remote, BS};

/// `blocks` blocks of noise (no holes); blocks in `changed` get other noise.
fn make_image(path: &Path, seed: &str, blocks: usize, changed: &[usize]) -> Vec<u8> {
    let mut img = noise(seed, blocks * BS);
    for i in changed {
        img[i * BS..(i + 1) * BS].copy_from_slice(&noise(&format!("{seed}-changed-{i}"), BS));
    }
    std::fs::write(path, &img).unwrap();
    img
}

fn keys(s3: &impl Remote, prefix: &str) -> HashSet<String> {
    s3.list(prefix)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Pulls `name_tag` into a fresh store `name` and checks its export is `want`.
fn pulls_whole(dir: &Path, name: &str, g: &Garage, name_tag: &str, want: &[u8]) {
    let b = store_with_remote(dir, name, g, "10s");
    ok(&b, &["pull", name_tag]);
    let out = dir.join(format!("{name}.img"));
    ok(&b, &["export", name_tag, out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "{name_tag} pulled other bytes"
    );
}

#[test]
fn gc_deletes_only_what_no_tag_reaches_in_two_passes() {
    if garage::binary().is_none() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let s3 = g.client("fleet", Duration::from_secs(10));
    let a = store_with_remote(tmp.path(), "a", &g, "10s");
    // 1 MiB packs (16 blocks): v2 changes v1's first 32 blocks, so two of v1's packs hold only
    // blocks v2 lacks; block 200 changes too, in a pack v2 still needs for its other blocks.
    let (f1, f2) = (tmp.path().join("v1.img"), tmp.path().join("v2.img"));
    let _i1 = make_image(&f1, "gc-v1", 256, &[]);
    let mut changed: Vec<usize> = (0..32).collect();
    changed.push(200);
    let i2 = make_image(&f2, "gc-v1", 256, &changed);
    ok(&a, &["import", f1.to_str().unwrap(), "app:v1"]);
    ok(&a, &["import", f2.to_str().unwrap(), "app:v2"]);
    let p1 = result(&ok(&a, &["push", "app:v1", "--json", "--pack-size", "1M"]));
    ok(&a, &["push", "app:v2", "--json", "--pack-size", "1M"]);
    let v1_id = p1["id"].as_str().unwrap().to_string();
    ok(&a, &["remote", "untag", "app:v1"]);
    assert_eq!(
        run(&a, &["remote", "untag", "app:v1"]).status.code(),
        Some(3)
    );
    let before = keys(&s3, "");
    assert!(!before.contains("tags/app/v1.json"));
    // First pass: marks, deletes nothing; a second pass inside the grace deletes nothing.
    let g1 = result(&ok(&a, &["remote", "gc", "--json"]));
    assert_eq!(g1["action"], "marked", "{g1}");
    // v1's map and its two v1-only packs with their indexes
    assert_eq!(g1["candidates"], 5, "{g1}");
    let g2 = result(&ok(&a, &["remote", "gc", "--json", "--grace", "1h"]));
    assert_eq!(
        (g2["action"].as_str(), g2["deleted"].as_u64()),
        (Some("waiting"), Some(0))
    );
    let now = keys(&s3, "");
    assert!(before.is_subset(&now), "{:?}", before.difference(&now));
    assert!(s3.head(&format!("maps/{v1_id}.map")).unwrap().is_some());
    // Second pass past the grace: exactly those 5 objects go.
    let g3 = result(&ok(&a, &["remote", "gc", "--json", "--grace", "0s"]));
    eprintln!("remote gc: first pass {g1}\nremote gc: deletion pass {g3}");
    assert_eq!(
        (g3["action"].as_str(), g3["deleted"].as_u64()),
        (Some("deleted"), Some(5))
    );
    assert!(g3["deleted_bytes"].as_u64().unwrap() > 2 << 20, "{g3}");
    let after = keys(&s3, "");
    let gone: HashSet<&String> = before.difference(&after).collect();
    assert_eq!(gone.len(), 5, "{gone:?}");
    assert!(gone.contains(&format!("maps/{v1_id}.map")));
    assert_eq!(gone.iter().filter(|k| k.ends_with(".pack")).count(), 2);
    // v2 still pulls whole, verified block by block; v1 pinned by id is gone (exit 3)
    pulls_whole(tmp.path(), "b", &g, "app:v2", &i2);
    let c = store_with_remote(tmp.path(), "c", &g, "10s");
    let pinned = format!("app:v1@{v1_id}");
    assert_eq!(run(&c, &["pull", &pinned]).status.code(), Some(3));
    // nothing more to delete
    let g4 = result(&ok(&a, &["remote", "gc", "--json", "--grace", "0s"]));
    assert_eq!(
        (g4["deleted"].as_u64(), g4["candidates"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn gc_passes_while_a_push_is_between_its_packs_and_its_tag_do_not_break_it() {
    if garage::binary().is_none() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let s3 = g.client("fleet", Duration::from_secs(10));
    let a = store_with_remote(tmp.path(), "a", &g, "10s");
    // 32 MiB in 32 packs, one upload at a time: the push is stopped after its first pack.
    let f = tmp.path().join("app.img");
    let img = make_image(&f, "gc-race", 512, &[]);
    ok(&a, &["import", f.to_str().unwrap(), "app:v1"]);
    let args = [
        "push",
        "app:v1",
        "--json",
        "--pack-size",
        "1M",
        "--jobs",
        "1",
    ];
    // gc runs from another operator's store (the push holds store A's lock)
    let ops = store_with_remote(tmp.path(), "ops", &g, "10s");
    let mut child = imagefs(&a, &args).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = child.id() as libc::pid_t;
    let mut guard = KillOnDrop(Some(pid));
    loop {
        let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_ne!(
            v["type"], "tag",
            "the push finished before it could be stopped"
        );
        if v["type"] == "pack" {
            // SAFETY: kill(2) on our own child, which has not been waited for.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
            break;
        }
    }
    assert!(s3.head("tags/app/v1.json").unwrap().is_none());
    let uploaded_before: HashSet<String> = keys(&s3, "packs/")
        .into_iter()
        .filter(|k| k.ends_with(".pack"))
        .collect();
    // Two passes with no grace: the first marks the stopped push's packs (no tag reaches
    // them yet), the second deletes them.
    let m = result(&ok(&ops, &["remote", "gc", "--json", "--grace", "0s"]));
    let d = result(&ok(&ops, &["remote", "gc", "--json", "--grace", "0s"]));
    eprintln!("remote gc mid-push: {m}\nremote gc mid-push: {d}");
    assert!(d["deleted"].as_u64().unwrap() >= 2, "{d}");
    let left: HashSet<String> = keys(&s3, "packs/");
    assert!(
        uploaded_before.iter().any(|k| !left.contains(k)),
        "gc deleted none of the push's packs"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = child.wait().unwrap();
    guard.0 = None;
    assert!(status.success(), "the push failed: {rest:?}");
    let r = rest.last().unwrap();
    eprintln!("remote gc mid-push: the push went on: {r}");
    pulls_whole(tmp.path(), "b", &g, "app:v1", &img);
    // it noticed the deletion pass and uploaded again what it had lost
    assert!(r["packs_uploaded"].as_u64().unwrap() > 32, "{r}");
    // and a later gc keeps all of it
    let d = result(&ok(&ops, &["remote", "gc", "--json", "--grace", "0s"]));
    assert_eq!(d["deleted"], 0, "{d}");
    pulls_whole(tmp.path(), "c", &g, "app:v1", &img);
}

/// SIGKILLs a child (stopped or not) that a failed assertion left behind.
struct KillOnDrop(Option<libc::pid_t>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on our own child, not yet waited for (the field is cleared once
            // it is, so the pid cannot have been reused).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
