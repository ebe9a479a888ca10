//! Scenario module: a remote on a 3-node Garage cluster (replication factor 3, every node an
//! `--endpoint`) keeps serving when a node dies: kill -9 of the first endpoint's node in the
//! middle of a 64 MiB pull, and the pull completes with every block verified; pushes and pulls
//! go on with that node down, and so do a lazy pull and reads through a mount that fetch on
//! first read.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use imagefs_store::remote::Remote;
use imagefs_tests::garage::{self, GarageCluster};
use imagefs_tests::{noise, skip};
use serde_json::Value;

use crate::remote_cli::{imagefs, ok, result, store_with_endpoints, BS};
use crate::remote_lazy::{read_direct, Mount};

/// A store whose remote `g` lists all three nodes, the first node first.
fn store_on_cluster(dir: &Path, name: &str, c: &GarageCluster) -> PathBuf {
    store_with_endpoints(
        dir,
        name,
        &c.bucket,
        &c.endpoints,
        |p| c.credentials_file(p),
        "10s",
    )
}

fn export_is(store: &Path, name_tag: &str, want: &[u8]) {
    let out = store.with_extension("export.img");
    ok(store, &["export", name_tag, out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "{name_tag} reads other bytes"
    );
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn a_killed_node_mid_pull_is_no_error_and_the_cluster_serves_on() {
    if garage::binary().is_none() {
        skip!("needs garage 2.5.0 (make garage)");
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mut c = GarageCluster::start(3, "images");
    let up = t0.elapsed();
    let a = store_on_cluster(tmp.path(), "a", &c);
    // 64 MiB of noise: 1024 blocks, 2 MiB packs, fetched in 8 MiB ranged reads.
    let f1 = tmp.path().join("v1.img");
    let i1 = noise("cluster-v1", 1024 * BS);
    std::fs::write(&f1, &i1).unwrap();
    ok(&a, &["import", f1.to_str().unwrap(), "app:v1"]);
    ok(&a, &["push", "app:v1", "--pack-size", "2M"]);

    // Pull into B with one request in flight; kill -9 node 0 (the first endpoint, the one the
    // client is using) once the first range has arrived.
    let b = store_on_cluster(tmp.path(), "b", &c);
    let mut child = imagefs(&b, &["pull", "app:v1", "--json", "--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut planned = 0u64;
    let mut done_at_kill = 0u64;
    let node0 = c.pid(0).unwrap();
    for l in lines.by_ref() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        assert_ne!(v["type"], "result", "the pull ended before the kill");
        if v["type"] == "planned" {
            planned = v["wanted_bytes"].as_u64().unwrap();
        }
        if v["type"] == "progress" && v["done"].as_u64().unwrap_or(0) > 0 {
            done_at_kill = v["done"].as_u64().unwrap();
            c.kill(0);
            break;
        }
    }
    let killed_at = t0.elapsed();
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the pull failed after node 0 (pid {node0}) was killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = rest.last().unwrap();
    assert_eq!(r["type"], "result", "{rest:?}");
    assert!(
        done_at_kill < planned,
        "node 0 was killed after the pull had everything"
    );
    eprintln!(
        "remote cluster: node 0 killed with {done_at_kill} of {planned} bytes fetched; the pull \
         completed: {r}; its stderr: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    export_is(&b, "app:v1", &i1);

    // With node 0 down: a push of v2 (a few blocks changed) and pulls of it and of v1.
    let f2 = tmp.path().join("v2.img");
    let mut i2 = i1.clone();
    for i in [3usize, 500, 1000] {
        i2[i * BS..(i + 1) * BS].copy_from_slice(&noise(&format!("cluster-v2-{i}"), BS));
    }
    std::fs::write(&f2, &i2).unwrap();
    ok(&a, &["import", f2.to_str().unwrap(), "app:v2"]);
    let p2 = result(&ok(&a, &["push", "app:v2", "--json"]));
    assert_eq!(p2["new_blocks"], 3, "{p2}");
    let r2 = result(&ok(&b, &["pull", "app:v2", "--json"]));
    assert_eq!(r2["blocks_fetched"], 3, "{r2}");
    export_is(&b, "app:v2", &i2);
    let d = store_on_cluster(tmp.path(), "d", &c);
    ok(&d, &["pull", "app:v1"]);
    export_is(&d, "app:v1", &i1);
    // A lazy pull, and reads through a mount that fetch on first read, with node 0 still down.
    let e = store_on_cluster(tmp.path(), "e", &c);
    ok(&e, &["pull", "app:v2", "--lazy"]);
    let mut m = Mount::start(&e, &tmp.path().join("mnt-e"));
    let read = read_direct(&m.mnt.join("images/app/v2.raw"), 0, i2.len());
    assert!(
        read.as_deref() == Ok(i2.as_slice()),
        "a lazy read through the mount with node 0 down: {:?}",
        read.err()
    );
    m.stop();
    let fetched = result(&ok(&e, &["remote", "stats", "--json"]));
    eprintln!("remote cluster: lazy reads with node 0 down: {fetched}");
    // the bucket as seen from node 2 alone holds both tags
    let s3 = c.client_on(&[2], "fleet", Duration::from_secs(5));
    assert_eq!(s3.list("tags/").unwrap().len(), 2);
    eprintln!(
        "remote cluster: up in {:.1} s, node killed at {:.1} s, all done in {:.1} s",
        up.as_secs_f64(),
        killed_at.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
