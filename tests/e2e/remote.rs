//! Scenario module: remote (issue 12). The real `imagefs` binary pushing to and pulling from a
//! real Garage (started per test on loopback, `make garage`): only new blocks cross the
//! network each way, exports are byte-identical, a tampered pack in the bucket is exit 5 with
//! nothing wrong stored, a kill -9 push resumes without re-uploading a finished object and
//! shows no tag before all its blocks, and an unknown tag or a stopped Garage fail in one line
//! with exit 3 or exit 1 within the remote's deadline.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use imagefs_store::remote::Remote;
use imagefs_tests::garage::{self, Garage};
use imagefs_tests::{noise, skip};
use serde_json::Value;

use crate::remote_cli::{
    code, distinct_blocks, imagefs, lines, ok, result, run, store_with_remote, BS,
};

/// An image of `blocks` blocks of incompressible data with some holes; `changed` blocks get
/// other bytes (as a patch would).
fn make_image(path: &Path, blocks: usize, changed: &[usize], seed: &str) -> Vec<u8> {
    let mut img = noise("remote-base", blocks * BS);
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

fn garage_or_skip() -> bool {
    garage::binary().is_some()
}

#[test]
fn push_and_pull_move_only_new_blocks_and_a_tampered_pack_stores_nothing() {
    if !garage_or_skip() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let a = store_with_remote(tmp.path(), "a", &g, "10s");
    let (f1, f2) = (tmp.path().join("v1.img"), tmp.path().join("v2.img"));
    let changed = [7, 8, 9, 300];
    let i1 = make_image(&f1, 384, &[], "v1");
    let i2 = make_image(&f2, 384, &changed, "v2");
    ok(&a, &["import", f1.to_str().unwrap(), "app:v1"]);
    ok(&a, &["import", f2.to_str().unwrap(), "app:v2"]);

    let p1 = result(&ok(&a, &["push", "app:v1", "--json"]));
    assert_eq!(p1["new_blocks"], distinct_blocks(&i1));
    let out = ok(&a, &["push", "app:v2", "--remote", "g", "--json"]);
    let p2 = result(&out);
    // only v2's new blocks, plus its map (32 bytes a block), one pack index (44 bytes a new
    // block), the tag and the pack names
    assert_eq!(p2["new_blocks"], changed.len() as u64, "{p2}");
    assert_eq!(p2["block_bytes"], (changed.len() * BS) as u64, "{p2}");
    let meta = p2["bytes_uploaded"].as_u64().unwrap() - p2["block_bytes"].as_u64().unwrap();
    eprintln!(
        "remote: push v1 sent {} bytes; push v2 sent {} bytes ({} of blocks, {meta} of metadata)",
        p1["bytes_uploaded"], p2["bytes_uploaded"], p2["block_bytes"]
    );
    assert!(
        meta <= 384 * 32 + 4 * 44 + 2048,
        "v2's push sent {meta} bytes of metadata"
    );
    let events: Vec<String> = lines(&out)
        .iter()
        .filter_map(|v| v["type"].as_str().map(str::to_string))
        .filter(|s| s != "progress")
        .collect();
    assert_eq!(events, ["planned", "pack", "map", "tag", "result"]);
    // pushing again sends no block
    let again = result(&ok(&a, &["push", "app:v2", "--json"]));
    assert_eq!(
        (
            again["new_blocks"].as_u64(),
            again["packs_uploaded"].as_u64()
        ),
        (Some(0), Some(0))
    );

    let ls = result(&ok(&a, &["remote", "ls", "--json"]));
    let tags: HashSet<String> = ls["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}:{}",
                t["image"].as_str().unwrap(),
                t["tag"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        tags,
        HashSet::from(["app:v1".to_string(), "app:v2".to_string()])
    );
    assert_eq!(ls["tags"][0]["size"], (384 * BS) as u64);

    // Store B pulls v1, then v2: only the blocks it lacks.
    let b = store_with_remote(tmp.path(), "b", &g, "10s");
    let r1 = result(&ok(&b, &["pull", "app:v1", "--json"]));
    assert_eq!(r1["blocks_fetched"], distinct_blocks(&i1));
    let r2 = result(&ok(&b, &["pull", "app:v2", "--json"]));
    eprintln!(
        "remote: pull v1 fetched {} bytes in {} requests; pull v2 fetched {} bytes in {} requests",
        r1["bytes_fetched"], r1["requests"], r2["bytes_fetched"], r2["requests"]
    );
    assert_eq!(r2["blocks_fetched"], changed.len() as u64, "{r2}");
    assert_eq!(r2["bytes_fetched"], (changed.len() * BS) as u64, "{r2}");
    // blocks 7, 8, 9 and 300 lie side by side in v2's pack: one ranged read
    assert_eq!(r2["requests"], 1, "{r2}");
    for (tag, want) in [("app:v1", &i1), ("app:v2", &i2)] {
        let out = tmp.path().join(format!("{tag}.out"));
        ok(&b, &["export", tag, out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == **want,
            "{tag} differs after the pull"
        );
    }

    // A tag the remote does not hold: exit 3, one line.
    let out = run(&b, &["pull", "app:nope"]);
    assert_eq!(code(&out), 3, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    // Someone with the bucket's keys overwrites v1's pack with other bytes (through S3, not
    // Garage's data dir): a pull is exit 5 and store C keeps nothing of it.
    let s3 = g.client("fleet", Duration::from_secs(10));
    let (pack, size) = s3
        .list("packs/")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.ends_with(".pack"))
        .max_by_key(|(_, s)| *s)
        .unwrap();
    let mut bytes = s3.get(&pack).unwrap();
    assert_eq!(bytes.len() as u64, size);
    let at = bytes.len() / 2 + 17;
    bytes[at] ^= 0x5a;
    s3.put(&pack, bytes).unwrap();
    let c = store_with_remote(tmp.path(), "c", &g, "10s");
    let out = run(&c, &["pull", "app:v1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 5, "{err}");
    assert!(
        err.contains("integrity") && err.contains("does not match its blake3"),
        "{err}"
    );
    let ls = result(&ok(&c, &["ls", "--json"]));
    assert_eq!(ls["versions"].as_array().unwrap().len(), 0, "{ls}");
    assert_eq!(code(&run(&c, &["export", "app:v1", "/dev/null"])), 3);
    ok(&c, &["fsck"]);
}

#[test]
fn a_killed_push_resumes_without_resending_finished_objects_and_no_tag_shows_early() {
    if !garage_or_skip() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = Garage::start("images");
    let a = store_with_remote(tmp.path(), "a", &g, "10s");
    let f = tmp.path().join("big.img");
    let img = make_image(&f, 512, &[], "big");
    ok(&a, &["import", f.to_str().unwrap(), "app:v1"]);
    let s3 = g.client("fleet", Duration::from_secs(10));

    // 512 KiB packs: 8 blocks each; kill -9 after a quarter of them.
    let total = distinct_blocks(&img).div_ceil(8) as usize;
    let args = [
        "push",
        "app:v1",
        "--json",
        "--pack-size",
        "512K",
        "--jobs",
        "2",
    ];
    let mut child = imagefs(&a, &args).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut finished = HashSet::new();
    for line in BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["type"] == "pack" {
            finished.insert(v["pack"].as_str().unwrap().to_string());
            if finished.len() == 16 {
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
        assert_ne!(
            v["type"], "result",
            "the push finished before it could be killed"
        );
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the push was not killed");
    // a PUT whose body was all sent may still land: let the server settle before looking
    std::thread::sleep(Duration::from_secs(1));
    // No tag without all its blocks: the remote shows none, and a pull finds nothing.
    assert_eq!(s3.head("tags/app/v1.json").unwrap(), None);
    let b = store_with_remote(tmp.path(), "b", &g, "10s");
    assert_eq!(code(&run(&b, &["pull", "app:v1"])), 3);
    // Every pack object complete in the bucket now, and those whose index is there too.
    let listed = s3.list("packs/").unwrap();
    let names = |ext: &str| -> HashSet<String> {
        listed
            .iter()
            .filter_map(|(k, _)| {
                k.strip_prefix("packs/")?
                    .strip_suffix(ext)
                    .map(str::to_string)
            })
            .collect()
    };
    let (complete, indexed) = (names(".pack"), names(".idx"));
    assert!(
        indexed.is_subset(&complete),
        "an index was uploaded before its pack"
    );
    assert!(finished.is_subset(&complete));
    assert!(
        complete.len() < total,
        "the kill came too late to test a resume"
    );

    // Watch for the tag while the push runs again: when it appears, every pack must be there.
    let watcher = {
        let s3 = g.client("fleet", Duration::from_secs(10));
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) {
                if s3.head("tags/app/v1.json").unwrap().is_some() {
                    let packs = s3.list("packs/").unwrap();
                    let n = packs.iter().filter(|(k, _)| k.ends_with(".pack")).count();
                    let i = packs.iter().filter(|(k, _)| k.ends_with(".idx")).count();
                    return Some((n, i));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
    };
    let out = ok(&a, &args);
    let mut uploaded = HashSet::new();
    let mut present = 0;
    for v in lines(&out) {
        if v["type"] == "pack" {
            let p = v["pack"].as_str().unwrap().to_string();
            if v["uploaded"] == true {
                uploaded.insert(p);
            } else {
                present += 1;
            }
        }
    }
    let r = result(&out);
    eprintln!(
        "remote: killed after {} pack events; {} packs complete ({} indexed) of {total}; the rerun \
         uploaded {} and found {present} whole without an index",
        finished.len(),
        complete.len(),
        indexed.len(),
        uploaded.len()
    );
    assert!(
        uploaded.is_disjoint(&complete),
        "the resumed push uploaded again a pack that was complete"
    );
    assert_eq!(uploaded.len() + complete.len(), total, "{r}");
    // a pack found whole without its index is reported present, not sent again
    assert_eq!(present, complete.len() - indexed.len(), "{r}");
    assert_eq!(
        watcher.join().unwrap(),
        Some((total, total)),
        "tag seen before all its packs"
    );

    let r = result(&ok(&b, &["pull", "app:v1", "--json"]));
    assert_eq!(r["blocks_fetched"], distinct_blocks(&img));
    let out = tmp.path().join("out.img");
    ok(&b, &["export", "app:v1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == img);
}

#[test]
fn no_remote_is_exit_2_and_a_stopped_garage_is_exit_1_within_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let lone = tmp.path().join("lone");
    ok(&lone, &["init"]);
    for args in [
        &["remote", "ls"][..],
        &["push", "app:v1"],
        &["pull", "app:v1"],
        &["remote", "rm", "x"],
    ] {
        let out = run(&lone, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("no remote"), "{err}");
    }
    if !garage_or_skip() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let mut g = Garage::start("images");
    let a = store_with_remote(tmp.path(), "a", &g, "3s");
    let f = tmp.path().join("v1.img");
    make_image(&f, 16, &[], "small");
    ok(&a, &["import", f.to_str().unwrap(), "app:v1"]);
    ok(&a, &["push", "app:v1"]);
    let b = store_with_remote(tmp.path(), "b", &g, "3s");
    g.stop();
    for (store, args) in [(&b, ["pull", "app:v1"]), (&a, ["push", "app:v1"])] {
        let start = Instant::now();
        let out = run(store, &args);
        let took = start.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        eprintln!("remote: {args:?} with garage stopped: exit 1 after {took:?}");
        assert!(
            took < Duration::from_secs(6),
            "{args:?} took {took:?} (deadline 3 s)"
        );
    }
    assert_eq!(code(&run(&b, &["export", "app:v1", "/dev/null"])), 3);
}
