//! Scenario module: ext4. `imagefs diff --files` on real ext4 images run through the real
//! binary: a file patched in place is named alone with no metadata, a rename names the
//! directory and flags metadata, and an image that is not ext4 keeps its ranges only.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use imagefs_tests::{bin, missing_tools, noise, skip, tool_command};
use serde_json::Value;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn imagefs(store: &Path, args: &[&str]) -> String {
    run(Command::new(bin("imagefs"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("IMAGEFS_STORE"))
}

/// The result object of a `--json` run.
fn result(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn debugfs(img: &Path, write: bool, cmd: &str) -> String {
    let mut c = tool_command("debugfs");
    if write {
        c.arg("-w");
    }
    run(c
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .env("E2FSPROGS_FAKE_TIME", "1700000500"))
}

fn files(v: &Value) -> Vec<String> {
    v["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files in {v}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn diff_files_names_the_patched_file_and_the_renamed_directory() {
    if let Some(why) = missing_tools(&["mkfs.ext4", "debugfs"]) {
        skip!("{why}");
    }
    if !bin("imagefs").exists() {
        skip!("needs the imagefs binary (cargo build -p imagefs)");
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, store) = (dir.path().join("root"), dir.path().join("store"));
    for i in 0..10 {
        let p = root.join(format!("opt/app/bin/tool{i}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, noise(&format!("tool{i}"), 300_000)).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join(format!("etc/app{i}.conf")), format!("n = {i}\n")).unwrap();
    }
    let v1 = dir.path().join("v1.img");
    run(tool_command("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&v1)
        .arg("64M")
        .env("E2FSPROGS_FAKE_TIME", "1700000000"));

    // v2: tool4's bytes changed in place, at the blocks the filesystem gave it
    let v2 = dir.path().join("v2.img");
    std::fs::copy(&v1, &v2).unwrap();
    let blocks: Vec<u64> = debugfs(&v1, false, "blocks /opt/app/bin/tool4")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let f = std::fs::OpenOptions::new().write(true).open(&v2).unwrap();
    f.write_all_at(&noise("fix", 8192), blocks[20] * 4096)
        .unwrap();
    drop(f);
    // v3: a config renamed (directory entries and inodes change)
    let v3 = dir.path().join("v3.img");
    std::fs::copy(&v1, &v3).unwrap();
    debugfs(&v3, true, "ln /etc/app3.conf /etc/app3.conf.old");
    debugfs(&v3, true, "unlink /etc/app3.conf");
    // not ext4 at all
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, noise("raw", 4 << 20)).unwrap();
    let raw2 = dir.path().join("raw2.img");
    let mut bytes = noise("raw", 4 << 20);
    bytes[100_000] ^= 1;
    std::fs::write(&raw2, bytes).unwrap();

    imagefs(&store, &["init"]);
    for (img, nt) in [
        (&v1, "app:v1"),
        (&v2, "app:v2"),
        (&v3, "app:v3"),
        (&raw, "raw:a"),
        (&raw2, "raw:b"),
    ] {
        imagefs(&store, &["import", img.to_str().unwrap(), nt]);
    }

    let t = Instant::now();
    let r = result(&imagefs(
        &store,
        &["diff", "app:v1", "app:v2", "--files", "--json"],
    ));
    eprintln!("diff --files of a 64 MiB image: {:?}", t.elapsed());
    assert_eq!(files(&r), vec!["/opt/app/bin/tool4"]);
    assert_eq!(r["metadata_changed"], false);
    assert_eq!(r["fs"], "ext4");
    assert_eq!(r["changed_blocks"], 1);

    let r = result(&imagefs(
        &store,
        &["diff", "app:v1", "app:v3", "--files", "--json"],
    ));
    assert_eq!(r["metadata_changed"], true);
    let named = files(&r);
    assert!(named.contains(&"/etc".to_string()), "{named:?}");
    assert!(!named.iter().any(|f| f.starts_with("/opt")), "{named:?}");
    assert!(r["metadata"]
        .as_array()
        .unwrap()
        .contains(&Value::from("directory")));

    let text = imagefs(&store, &["diff", "app:v1", "app:v2", "--files"]);
    assert!(text.contains("  /opt/app/bin/tool4"), "{text}");

    let r = result(&imagefs(
        &store,
        &["diff", "raw:a", "raw:b", "--files", "--json"],
    ));
    assert_eq!(r["files"], Value::Null);
    assert_eq!(r["changed_blocks"], 1);
    assert_eq!(r["ranges"].as_array().unwrap().len(), 1);

    // without --files the output is what it always was
    let r = result(&imagefs(&store, &["diff", "app:v1", "app:v2", "--json"]));
    assert!(r.get("files").is_none());
}
