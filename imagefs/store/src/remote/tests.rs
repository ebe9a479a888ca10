//! The push/pull algorithms over a directory standing in for a bucket (the real S3 client is
//! tested against Garage in tests/e2e/remote.rs).

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::*;
use crate::{ImageName, Store, Tag};

/// A bucket as a directory: key = relative path.
struct DirRemote(PathBuf);

impl DirRemote {
    fn path(&self, key: &str) -> PathBuf {
        self.0.join(key)
    }
}

impl Remote for DirRemote {
    fn head(&self, key: &str) -> Result<Option<u64>, RemoteError> {
        Ok(std::fs::metadata(self.path(key)).ok().map(|m| m.len()))
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, RemoteError> {
        std::fs::read(self.path(key)).map_err(|_| RemoteError::NotFound {
            key: key.to_string(),
        })
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, RemoteError> {
        let all = self.get(key)?;
        Ok(all
            .get(range.start as usize..(range.end as usize).min(all.len()))
            .unwrap_or_default()
            .to_vec())
    }
    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), RemoteError> {
        let p = self.path(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).map_err(|e| RemoteError::Other(e.to_string()))
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let k = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
                    out.push((k, e.metadata().unwrap().len()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.0, &self.0, &mut out);
        out.retain(|(k, _)| k.starts_with(prefix));
        out.sort();
        Ok(out)
    }
    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        let _ = std::fs::remove_file(self.path(key));
        Ok(())
    }
}

const BS: usize = 4096;

fn image(seed: u8, blocks: usize, changed: &[usize]) -> Vec<u8> {
    let mut out = vec![0u8; blocks * BS];
    for (i, b) in out.chunks_mut(BS).enumerate() {
        if i % 7 == 3 {
            continue; // a hole
        }
        let s = if changed.contains(&i) { seed } else { 0 };
        blake3::Hasher::new()
            .update(&[s, (i & 255) as u8, (i >> 8) as u8])
            .finalize_xof()
            .fill(b);
    }
    out
}

fn import(store: &Store, name: &str, tag: &str, bytes: &[u8], dir: &Path) -> VersionId {
    let f = dir.join(format!("{tag}.img"));
    std::fs::write(&f, bytes).unwrap();
    let mut src = crate::open_image(&f).unwrap();
    let img = ImageName::new(name).unwrap();
    let r = store
        .import(&img, Some(BS as u32), src.as_mut(), &mut |_| {})
        .unwrap();
    store.set_tag(&img, &Tag::new(tag).unwrap(), &r.id).unwrap();
    r.id
}

fn read_all(store: &Store, id: &VersionId) -> Vec<u8> {
    let v = store.version(id).unwrap();
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(store, 0, &mut buf).unwrap();
    buf
}

struct Setup {
    _tmp: tempfile::TempDir,
    a: Store,
    b: Store,
    remote: DirRemote,
    v1: VersionId,
    v2: VersionId,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::init(&tmp.path().join("a")).unwrap();
    let b = Store::init(&tmp.path().join("b")).unwrap();
    let v1 = import(&a, "app", "v1", &image(0, 100, &[]), tmp.path());
    let v2 = import(&a, "app", "v2", &image(9, 100, &[5, 6, 7, 50]), tmp.path());
    let remote = DirRemote(tmp.path().join("bucket"));
    Setup {
        _tmp: tmp,
        a,
        b,
        remote,
        v1,
        v2,
    }
}

fn opts() -> PushOptions {
    PushOptions {
        pack_size: 16 * BS as u64,
        jobs: 3,
        cache: None,
    }
}

fn tag(s: &str) -> Tag {
    Tag::new(s).unwrap()
}

#[test]
fn push_uploads_only_what_the_remote_lacks_and_pull_fetches_only_what_is_missing() {
    let s = setup();
    let r1 =
        s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
            .unwrap();
    assert_eq!(r1.new_blocks, 86); // 100 blocks, 14 of them holes
    let r2 =
        s.a.push(&s.remote, &s.v2, &tag("v2"), &opts(), &mut |_| {})
            .unwrap();
    assert_eq!(r2.new_blocks, 4);
    assert_eq!(r2.block_bytes, 4 * BS as u64);
    // v2's metadata: its map (32 bytes a block, and the names of the 7 packs it uses), one
    // pack index (44 bytes a block), the tag
    let meta = r2.bytes_uploaded - r2.block_bytes;
    assert!(meta <= 100 * 32 + 7 * 67 + 4 * 44 + 400, "{meta}");
    let again =
        s.a.push(&s.remote, &s.v2, &tag("v2"), &opts(), &mut |_| {})
            .unwrap();
    assert_eq!((again.new_blocks, again.packs_uploaded), (0, 0));

    let app = ImageName::new("app").unwrap();
    let p1 =
        s.b.pull(
            &s.remote,
            &app,
            &tag("v1"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!((p1.id, p1.blocks_fetched), (s.v1, 86));
    let p2 =
        s.b.pull(
            &s.remote,
            &app,
            &tag("v2"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!((p2.id, p2.blocks_fetched), (s.v2, 4));
    // v2's four new blocks lie side by side in its pack: one ranged read
    assert_eq!(p2.requests, 1);
    assert_eq!(read_all(&s.b, &s.v2), read_all(&s.a, &s.v2));
    assert_eq!(s.b.resolve("app:v2").unwrap(), s.v2);
    let tags = list_tags(&s.remote).unwrap();
    assert_eq!(tags.len(), 2);
}

#[test]
fn a_wrong_byte_in_a_pack_is_an_integrity_error_and_nothing_is_committed() {
    let s = setup();
    s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    let (key, _) = s
        .remote
        .list("packs/")
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.ends_with(".pack"))
        .unwrap();
    let mut bytes = s.remote.get(&key).unwrap();
    bytes[BS + 10] ^= 1;
    let tampered = crate::BlockHash(*blake3::hash(&bytes[BS..2 * BS]).as_bytes());
    s.remote.put(&key, bytes).unwrap();
    let app = ImageName::new("app").unwrap();
    let e =
        s.b.pull(
            &s.remote,
            &app,
            &tag("v1"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, SyncError::Integrity { .. }), "{e}");
    assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
    assert!(s.b.resolve("app:v1").is_err());
    assert!(s.b.version(&s.v1).is_err());
    // the wrong bytes were not stored, under any name
    assert!(!s.b.has_block(&tampered).unwrap());
    let f = s.b.fsck(&mut |_, _| {}).unwrap();
    assert!(f.problems.is_empty(), "{:?}", f.problems);
}

#[test]
fn a_map_that_is_not_its_version_is_refused() {
    let s = setup();
    s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    s.a.push(&s.remote, &s.v2, &tag("v2"), &opts(), &mut |_| {})
        .unwrap();
    // v1's name, v2's contents
    let v2map = s.remote.get(&map_key(&s.v2)).unwrap();
    s.remote.put(&map_key(&s.v1), v2map).unwrap();
    let app = ImageName::new("app").unwrap();
    let e =
        s.b.pull(
            &s.remote,
            &app,
            &tag("v1"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            SyncError::Integrity {
                what: "block map",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_tags_and_pinned_versions() {
    let s = setup();
    let app = ImageName::new("app").unwrap();
    let e =
        s.b.pull(
            &s.remote,
            &app,
            &tag("v1"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    let e =
        s.b.pull(
            &s.remote,
            &app,
            &tag("nope"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    let p =
        s.b.pull(
            &s.remote,
            &app,
            &tag("pinned"),
            Some(s.v1),
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(p.id, s.v1);
    assert_eq!(s.b.resolve("app:pinned").unwrap(), s.v1);
    let e =
        s.b.pull(
            &s.remote,
            &app,
            &tag("x"),
            Some(s.v2),
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
}

#[test]
fn an_interrupted_push_resumes_without_resending_complete_packs() {
    let s = setup();
    // As a push killed after uploading a pack but before its index, and another whole.
    s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    let packs: Vec<String> = s
        .remote
        .list("packs/")
        .unwrap()
        .into_iter()
        .filter_map(|(k, _)| k.strip_suffix(".idx").map(str::to_string))
        .collect();
    assert!(packs.len() >= 3);
    s.remote.delete(&format!("{}.idx", packs[0])).unwrap();
    s.remote.delete(&format!("{}.pack", packs[1])).unwrap();
    s.remote.delete(&format!("{}.idx", packs[1])).unwrap();
    s.remote.delete("tags/app/v1.json").unwrap();
    let mut uploaded = Vec::new();
    let r =
        s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |e| {
            if let PushEvent::Pack {
                pack,
                uploaded: true,
                ..
            } = e
            {
                uploaded.push(pack.clone());
            }
        })
        .unwrap();
    // only the pack that was gone is sent again; the one without an index is found whole
    assert_eq!(
        uploaded,
        vec![packs[1].strip_prefix("packs/").unwrap().to_string()]
    );
    assert_eq!(r.packs_uploaded, 1);
    assert_eq!(r.packs_present, 1);
    let app = ImageName::new("app").unwrap();
    let p =
        s.b.pull(
            &s.remote,
            &app,
            &tag("v1"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(read_all(&s.b, &p.id), read_all(&s.a, &s.v1));
}

/// Hands out one bucket for any remote name (what the binary's client map does).
struct Source(std::sync::Arc<DirRemote>);

impl RemoteSource for Source {
    fn remote(
        &self,
        _: &str,
    ) -> Result<(std::sync::Arc<dyn Remote>, std::time::Duration), RemoteError> {
        Ok((self.0.clone(), std::time::Duration::from_secs(1)))
    }
}

#[test]
fn a_lazy_pull_fetches_no_block_and_reads_fetch_each_block_once_from_every_pack() {
    let s = setup();
    // 86 distinct blocks in packs of 43: the second pack's blocks must be found too
    let o = PushOptions {
        pack_size: 43 * BS as u64,
        ..opts()
    };
    s.a.push(&s.remote, &s.v1, &tag("v1"), &o, &mut |_| {})
        .unwrap();
    let app = ImageName::new("app").unwrap();
    let remote = std::sync::Arc::new(DirRemote(s.remote.0.clone()));
    let p =
        s.b.pull_lazy(
            &*remote,
            "r",
            &app,
            &tag("v1"),
            None,
            &PullOptions::default(),
        )
        .unwrap();
    assert_eq!(p.id, s.v1);
    assert_eq!(s.b.lazy_status(&s.v1).unwrap().unwrap().absent, 86);
    assert!(s.b.is_lazy(&s.v1).unwrap());
    // with no client, a read of an absent block is an error, never zeros
    let v = s.b.version(&s.v1).unwrap();
    let mut buf = vec![0u8; BS];
    assert!(v.read_at(&s.b, 0, &mut buf).is_err());
    s.b.set_remote_source(std::sync::Arc::new(Source(remote)));
    assert_eq!(read_all(&s.b, &s.v1), image(0, 100, &[]));
    assert_eq!(read_all(&s.b, &s.v1), image(0, 100, &[]));
    let st = s.b.remote_stats();
    assert_eq!(st.remotes["r"].versions[&s.v1.to_hex()].blocks_fetched, 86);
    assert!(!s.b.is_lazy(&s.v1).unwrap());
}

#[test]
fn lazy_read_ahead_grows_on_sequential_reads_and_scattered_reads_fetch_what_they_read() {
    let s = setup();
    s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    let app = ImageName::new("app").unwrap();
    let remote = std::sync::Arc::new(DirRemote(s.remote.0.clone()));
    s.b.pull_lazy(
        &*remote,
        "r",
        &app,
        &tag("v1"),
        None,
        &PullOptions::default(),
    )
    .unwrap();
    s.b.set_remote_source(std::sync::Arc::new(Source(remote)));
    let v = s.b.version(&s.v1).unwrap();
    let fetched = || s.b.remote_stats().remotes["r"].versions[&s.v1.to_hex()].blocks_fetched;
    let mut buf = vec![0u8; 4096];
    // 4 KiB reads far apart: one block each, no read-ahead
    for (n, block) in [50u64, 12, 90, 30].into_iter().enumerate() {
        v.read_at(&s.b, block * BS as u64, &mut buf).unwrap();
        assert_eq!(fetched(), n as u64 + 1, "read of block {block}");
    }
    // a sequential run from block 60: the read-ahead starts and grows
    let mut big = vec![0u8; BS];
    v.read_at(&s.b, 60 * BS as u64, &mut big).unwrap();
    assert_eq!(fetched(), 5, "the run's first read fetches just its block");
    v.read_at(&s.b, 61 * BS as u64, &mut big).unwrap();
    let after_second = fetched();
    assert!(
        after_second >= 5 + 1 + 4,
        "a second sequential read gets read-ahead: {after_second} blocks fetched"
    );
    assert_eq!(
        read_all(&s.b, &s.v1),
        image(0, 100, &[]),
        "the bytes are the image's"
    );
}

/// A remote whose block reads take a while (a slow link), so two pulls overlap.
struct SlowRemote(DirRemote);

impl Remote for SlowRemote {
    fn head(&self, key: &str) -> Result<Option<u64>, RemoteError> {
        self.0.head(key)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, RemoteError> {
        self.0.get(key)
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, RemoteError> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.0.get_range(key, range)
    }
    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), RemoteError> {
        self.0.put(key, data)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        self.0.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        self.0.delete(key)
    }
}

#[test]
fn two_pulls_of_one_version_at_once_fetch_its_blocks_once() {
    let s = setup();
    s.a.push(&s.remote, &s.v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    let slow = SlowRemote(DirRemote(s.remote.0.clone()));
    let app = ImageName::new("app").unwrap();
    let reports: Vec<PullReport> = std::thread::scope(|sc| {
        let pulls: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    s.b.pull(
                        &slow,
                        &app,
                        &tag("v1"),
                        None,
                        &PullOptions::default(),
                        &mut |_| {},
                    )
                    .unwrap()
                })
            })
            .collect();
        pulls.into_iter().map(|p| p.join().unwrap()).collect()
    });
    // the second waited for the first, then found every block here
    let fetched: u64 = reports.iter().map(|r| r.blocks_fetched).sum();
    assert_eq!(fetched, 86, "{reports:?}");
    assert_eq!(read_all(&s.b, &s.v1), image(0, 100, &[]));
}
