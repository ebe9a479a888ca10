//! Flat-copy cache tests against real files in a temp dir: exact sparse copies, reuse,
//! background builds, the budget, corruption, cleanup at open and after gc.

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::*;

/// Bytes where every third 4 KiB page is zero (holes at block size 4096).
fn image_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 4096) % 3 != 1 {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8;
        }
    }
    v
}

/// Bytes with no zero page at all (allocated == size in a copy).
fn dense_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
        .collect()
}

fn import(store: &Store, name: &str, bytes: &[u8], bs: Option<u32>) -> VersionId {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    let mut src = open_image(&p).unwrap();
    store
        .import(
            &ImageName::new(name).unwrap(),
            bs,
            src.as_mut(),
            &mut |_| {},
        )
        .unwrap()
        .id
}

fn version_bytes(store: &Store, id: &VersionId) -> Vec<u8> {
    let v = store.version(id).unwrap();
    let mut out = vec![0u8; v.size() as usize];
    assert_eq!(v.read_at(store, 0, &mut out).unwrap(), out.len());
    out
}

fn file_bytes(f: &std::fs::File) -> Vec<u8> {
    let mut out = vec![0u8; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut out, 0).unwrap();
    out
}

fn flat_files(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.dir().join("flat"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn new_store(dir: &Path) -> Arc<Store> {
    Arc::new(Store::init(&dir.join("s")).unwrap())
}

#[test]
fn ensure_builds_an_exact_sparse_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    // 4 KiB blocks with holes and a partial tail
    let a = import(
        &store,
        "a",
        &image_bytes(3 * 4096 * 200 + 1234, 1),
        Some(4096),
    );
    // 64 KiB blocks: runs longer than one 4 MiB piece, a 1 MiB hole, a partial tail
    let mut big = dense_bytes(10 << 20, 2);
    big[(3 << 20)..(4 << 20)].fill(0);
    big.extend_from_slice(&[9u8; 777]);
    let b = import(&store, "b", &big, None);
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    assert!(cache.ready(&a).is_none());
    for id in [a, b] {
        let f = cache.ensure(&id).unwrap();
        let want = version_bytes(&store, &id);
        assert_eq!(file_bytes(&f), want);
        let meta = f.metadata().unwrap();
        assert_eq!(meta.len(), want.len() as u64);
        assert!(
            meta.blocks() * 512 < meta.len(),
            "holes are allocated: {} of {}",
            meta.blocks() * 512,
            meta.len()
        );
    }
    assert_eq!(
        std::fs::read(store.dir().join(format!("flat/{}.raw", a.to_hex()))).unwrap(),
        image_bytes(3 * 4096 * 200 + 1234, 1)
    );
    let list = cache.list();
    let mut ids = vec![a, b];
    ids.sort();
    assert_eq!(list.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    for e in &list {
        assert!(e.allocated > 0 && e.allocated < e.size, "{e:?}");
        assert!(e.last_used > 0);
    }
    // only the final files: no temporaries left
    assert!(flat_files(&store).iter().all(|n| n.ends_with(".raw")));
    let json = serde_json::to_string(&list[0]).unwrap();
    assert!(json.contains(&list[0].id.to_hex()), "{json}");
}

#[test]
fn a_copy_is_reused_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(1 << 20, 3), Some(4096));
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    let f1 = cache.ensure(&a).unwrap();
    let ino = f1.metadata().unwrap().ino();
    let f2 = cache.ensure(&a).unwrap();
    let f3 = cache.ready(&a).unwrap();
    // the same open file, not a rebuild (a rebuild would rename a new inode into place)
    assert!(Arc::ptr_eq(&f1, &f2) && Arc::ptr_eq(&f1, &f3));
    let path = store.dir().join(format!("flat/{}.raw", a.to_hex()));
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
    drop(cache);
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    let f4 = cache.ready(&a).expect("learned at open");
    assert_eq!(f4.metadata().unwrap().ino(), ino);
    assert_eq!(cache.ensure(&a).unwrap().metadata().unwrap().ino(), ino);
}

#[test]
fn request_builds_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let bytes = image_bytes(4 << 20, 4);
    let a = import(&store, "a", &bytes, None);
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    assert!(cache.ready(&a).is_none());
    cache.request(&a);
    let start = Instant::now();
    let f = loop {
        if let Some(f) = cache.ready(&a) {
            break f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no background build"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(file_bytes(&f), bytes);
    // requesting a ready id does nothing
    cache.request(&a);
    assert!(cache.lock().pending.is_empty());
}

#[test]
fn concurrent_ensures_and_a_request_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let bytes = dense_bytes(8 << 20, 5);
    let a = import(&store, "a", &bytes, None);
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.request(&a);
    let files: Vec<Arc<std::fs::File>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| cache.ensure(&a))).collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    // a second build would have renamed another inode into place
    let ino = files[0].metadata().unwrap().ino();
    assert!(files.iter().all(|f| Arc::ptr_eq(f, &files[0])));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cache.ready(&a).unwrap().metadata().unwrap().ino(), ino);
    assert_eq!(file_bytes(&files[0]), bytes);
}

#[test]
fn the_budget_evicts_the_least_recently_used_and_refuses_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let mib = 1u64 << 20;
    let ids: Vec<VersionId> = (0..3)
        .map(|i| import(&store, "a", &dense_bytes(mib as usize, 10 + i), None))
        .collect();
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let big = import(&store, "a", &dense_bytes(3 * mib as usize, 20), None);

    // room for 1.5 copies: the second evicts the first
    let cache = FlatCache::open(store.clone(), mib * 3 / 2).unwrap();
    let fa = cache.ensure(&a).unwrap();
    cache.ensure(&b).unwrap();
    assert_eq!(cache.list().iter().map(|e| e.id).collect::<Vec<_>>(), [b]);
    assert!(!store
        .dir()
        .join(format!("flat/{}.raw", a.to_hex()))
        .exists());
    // a reader holding the evicted copy still reads it
    assert_eq!(file_bytes(&fa), dense_bytes(mib as usize, 10));
    drop(cache);

    // room for 2.5 copies: the least recently used goes, not the oldest built
    let cache = FlatCache::open(store.clone(), mib * 5 / 2).unwrap();
    assert_eq!(cache.list().len(), 1, "b is still held");
    cache.ensure(&a).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert!(cache.ready(&b).is_some());
    cache.ensure(&c).unwrap();
    let held: Vec<VersionId> = cache.list().iter().map(|e| e.id).collect();
    assert!(
        held.contains(&b) && held.contains(&c) && !held.contains(&a),
        "{held:?}"
    );
    assert!(cache.list().iter().map(|e| e.allocated).sum::<u64>() <= cache.budget());

    // larger than the whole budget
    let err = cache.ensure(&big).unwrap_err();
    assert!(matches!(err, FlatError::TooLarge { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(cache.ready(&big).is_none());
    // remembered: request does not queue it again
    cache.request(&big);
    assert!(cache.lock().pending.is_empty());
    assert_eq!(
        cache.list().len(),
        2,
        "nothing evicted for a copy that cannot fit"
    );
}

#[test]
fn a_corrupt_block_fails_the_build_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let id = import(&store, "web", &vec![5u8; 65536 * 2], None);
    drop(store);
    let pack = std::fs::read_dir(s.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(&[6], 100).unwrap();
    let store = Arc::new(Store::open(&s).unwrap());
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    let err = cache.ensure(&id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(cache.ready(&id).is_none());
    assert!(flat_files(&store).is_empty(), "{:?}", flat_files(&store));
    // remembered for request, retried by ensure
    cache.request(&id);
    assert!(cache.lock().pending.is_empty());
    assert_eq!(cache.ensure(&id).unwrap_err().kind(), ErrorKind::Corrupt);
    assert!(flat_files(&store).is_empty());
    // an unknown id is NotFound
    let unknown = VersionId([7; 32]);
    assert_eq!(
        cache.ensure(&unknown).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn open_and_prune_remove_leftovers_and_copies_of_gone_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "web", &image_bytes(1 << 20, 30), None);
    let b = import(&store, "web", &image_bytes(1 << 20, 31), None);
    store
        .set_tag(
            &ImageName::new("web").unwrap(),
            &Tag::new("keep").unwrap(),
            &a,
        )
        .unwrap();
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    cache.ensure(&b).unwrap();
    drop(cache);
    let flat = store.dir().join("flat");
    let gone = VersionId([0xab; 32]);
    std::fs::write(flat.join(format!("{}.raw", gone.to_hex())), b"stale").unwrap();
    std::fs::write(flat.join(format!(".{}.tmp", a.to_hex())), b"half").unwrap();
    std::fs::write(flat.join("notes.txt"), b"not ours").unwrap();

    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    let mut want = vec![format!("{}.raw", a.to_hex()), format!("{}.raw", b.to_hex())];
    want.push("notes.txt".to_string());
    want.sort();
    assert_eq!(flat_files(&store), want);
    assert_eq!(cache.list().len(), 2);

    // gc drops the untagged version; prune drops its copy
    assert_eq!(store.gc().unwrap().versions_removed, vec![b]);
    assert_eq!(cache.prune().unwrap(), 1);
    assert_eq!(cache.list().iter().map(|e| e.id).collect::<Vec<_>>(), [a]);
    assert!(!flat.join(format!("{}.raw", b.to_hex())).exists());
    assert_eq!(cache.prune().unwrap(), 0);
}

/// Build throughput of a large version (FLAT_BENCH_MIB, default 2048; in FLAT_BENCH_DIR or
/// the temp dir):
/// `cargo test --release -p imagefs-store flat_build_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn flat_build_throughput() {
    let mib: u64 = std::env::var("FLAT_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let dir = match std::env::var_os("FLAT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let store = new_store(dir.path());
    let web = ImageName::new("web").unwrap();
    import(&store, "web", &dense_bytes(65536, 1), None);
    let bs = 65536u64;
    let count = (mib << 20) / bs;
    let mut block = vec![0u8; bs as usize];
    let t = Instant::now();
    let mut changes = Vec::new();
    for i in 0..count {
        // every 10th block a hole, the rest distinct
        if i % 10 == 9 {
            continue;
        }
        for (j, w) in block.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(i * 8192 + j as u64 + 1).to_le_bytes());
        }
        changes.push((i, store.put_block(&block).unwrap()));
    }
    let id = store
        .create_version(&web, None, count * bs, &changes)
        .unwrap();
    eprintln!("made a {mib} MiB version in {:?}", t.elapsed());
    let copy = store.dir().join(format!("flat/{}.raw", id.to_hex()));
    for run in [
        "packs in the page cache",
        "again",
        "packs dropped from the page cache",
    ] {
        if run.starts_with("packs dropped") {
            for e in std::fs::read_dir(store.dir().join("packs")).unwrap() {
                let p = std::fs::File::open(e.unwrap().path()).unwrap();
                p.sync_all().unwrap();
                // SAFETY: plain integers and a descriptor we own.
                unsafe { libc::posix_fadvise(p.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
        let _ = std::fs::remove_file(&copy);
        let cache = FlatCache::open(store.clone(), 1 << 40).unwrap();
        let t = Instant::now();
        let f = cache.ensure(&id).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "built the flat copy in {secs:.2} s, {:.0} MiB/s ({run})",
            mib as f64 / secs
        );
        let mut buf = vec![0u8; bs as usize];
        f.read_exact_at(&mut buf, 5 * bs).unwrap();
        assert_eq!(&buf[..8], &(5 * 8192 + 1u64).to_le_bytes());
        f.read_exact_at(&mut buf, 9 * bs).unwrap();
        assert!(is_zero(&buf));
    }
}

/// Overwrites bytes of `id`'s copy on disk (the copy files are opened read-only by the cache).
fn damage_copy(store: &Store, id: &VersionId, offset: u64, bytes: &[u8]) {
    let path = store.dir().join(format!("flat/{}.raw", id.to_hex()));
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn copy_exists(store: &Store, id: &VersionId) -> bool {
    store
        .dir()
        .join(format!("flat/{}.raw", id.to_hex()))
        .exists()
}

/// 4 KiB blocks, every third a hole, a partial tail, three 4 MiB pieces: block 1 is a hole,
/// blocks 0 and 2 hold data.
const CHECKED_LEN: usize = 3 * 4096 * 1000 + 1234;

#[test]
fn fsck_checks_flat_copies_and_finds_them_clean() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(CHECKED_LEN, 40), Some(4096));
    let b = import(&store, "b", &dense_bytes(3 << 20, 41), None);
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    cache.ensure(&b).unwrap();
    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.flat_copies, 2);
    // every byte of both copies was read (the padded tail hashed right, or it would differ)
    assert_eq!(r.flat_bytes_checked, CHECKED_LEN as u64 + (3 << 20));
    assert!(r.flat_removed.is_empty());
}

#[test]
fn fsck_reports_the_first_bad_block_of_a_damaged_copy_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(CHECKED_LEN, 42), Some(4096));
    let b = import(&store, "b", &image_bytes(CHECKED_LEN, 43), Some(4096));
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    cache.ensure(&b).unwrap();
    // two bad data blocks in different pieces: one problem, naming the first
    let f = cache.ready(&a).unwrap();
    let mut byte = [0u8; 1];
    for block in [2001u64, 2700] {
        let off = block * 4096 + 17;
        f.read_exact_at(&mut byte, off).unwrap();
        damage_copy(&store, &a, off, &[byte[0] ^ 0x40]);
    }
    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    let p = &r.problems[0];
    assert_eq!(p.version, Some(a));
    assert_eq!(p.image, "a");
    assert_eq!(p.block, Some(2001));
    assert_eq!(p.offset, Some(2001 * 4096));
    assert!(
        p.detail.contains("flat copy") && p.detail.contains("block 2001"),
        "{p:?}"
    );
    assert_eq!(r.flat_copies, 2);
    // a plain fsck deletes nothing
    assert!(copy_exists(&store, &a));
    assert!(r.flat_removed.is_empty());
}

#[test]
fn fsck_reports_a_damaged_partial_tail_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(CHECKED_LEN, 44), Some(4096));
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    let last = (CHECKED_LEN as u64).div_ceil(4096) - 1;
    let mut byte = [0u8; 1];
    let off = CHECKED_LEN as u64 - 1;
    cache
        .ready(&a)
        .unwrap()
        .read_exact_at(&mut byte, off)
        .unwrap();
    damage_copy(&store, &a, off, &[byte[0] ^ 0xff]);
    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].block, Some(last));
}

#[test]
fn fsck_reports_nonzero_bytes_in_a_hole_of_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(CHECKED_LEN, 45), Some(4096));
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    assert_eq!(store.version(&a).unwrap().block_hash(1).unwrap(), None);
    damage_copy(&store, &a, 4096 + 100, &[1]);
    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].block, Some(1));
    assert!(r.problems[0].detail.contains("hole"), "{:?}", r.problems[0]);
}

#[test]
fn fsck_reports_a_copy_of_the_wrong_size_or_of_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(1 << 20, 46), None);
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    let path = store.dir().join(format!("flat/{}.raw", a.to_hex()));
    // one zero byte more: every block still matches, only the size is wrong
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len((1 << 20) + 1)
        .unwrap();
    let gone = VersionId([0xab; 32]);
    std::fs::write(
        store.dir().join(format!("flat/{}.raw", gone.to_hex())),
        b"stale",
    )
    .unwrap();
    // builds under way and foreign files are not copies
    std::fs::write(store.dir().join("flat/.x.tmp"), b"half").unwrap();
    std::fs::write(store.dir().join("flat/notes.txt"), b"x").unwrap();
    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    let mut by_id: Vec<_> = r.problems.iter().map(|p| (p.version, p.block)).collect();
    by_id.sort();
    let mut want = vec![(Some(a), None), (Some(gone), None)];
    want.sort();
    assert_eq!(by_id, want);
    assert!(r
        .problems
        .iter()
        .any(|p| p.detail.contains("bytes, the version")));
}

#[test]
fn fsck_repair_deletes_only_bad_copies_and_then_fsck_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "a", &image_bytes(CHECKED_LEN, 47), Some(4096));
    let b = import(&store, "b", &image_bytes(CHECKED_LEN, 48), Some(4096));
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    cache.ensure(&b).unwrap();
    drop(cache);
    damage_copy(&store, &a, 0, &[0xee, 0xee]);
    assert_eq!(store.fsck(&mut |_, _| {}).unwrap().problems.len(), 1);

    let r = store.fsck_repair(&mut |_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.flat_removed.len(), 1);
    assert_eq!(r.flat_removed[0].version, Some(a));
    assert_eq!(r.flat_removed[0].block, Some(0));
    assert!(r.flat_removed[0].detail.contains("deleted"));
    assert!(!copy_exists(&store, &a));
    assert!(copy_exists(&store, &b));

    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.flat_copies, 1);
    // the cache rebuilds the deleted copy
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    assert!(cache.ready(&a).is_none());
    assert_eq!(
        file_bytes(&cache.ensure(&a).unwrap()),
        image_bytes(CHECKED_LEN, 47)
    );
    assert!(store.fsck(&mut |_, _| {}).unwrap().problems.is_empty());
}

#[test]
fn gc_deletes_the_copies_of_the_versions_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let a = import(&store, "web", &image_bytes(1 << 20, 49), None);
    let b = import(&store, "web", &image_bytes(1 << 20, 50), None);
    store
        .set_tag(
            &ImageName::new("web").unwrap(),
            &Tag::new("keep").unwrap(),
            &a,
        )
        .unwrap();
    let cache = FlatCache::open(store.clone(), 1 << 30).unwrap();
    cache.ensure(&a).unwrap();
    cache.ensure(&b).unwrap();
    drop(cache);
    // no cache open to prune after gc, as with `imagefs gc` and no mount
    assert_eq!(store.gc().unwrap().versions_removed, vec![b]);
    assert!(!copy_exists(&store, &b));
    assert!(copy_exists(&store, &a));
    let r = store.fsck(&mut |_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.flat_copies, 1);
}

/// fsck throughput on a large flat copy (FLAT_BENCH_MIB, default 2048; in FLAT_BENCH_DIR or
/// the temp dir):
/// `cargo test --release -p imagefs-store fsck_flat_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn fsck_flat_throughput() {
    let mib: u64 = std::env::var("FLAT_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let dir = match std::env::var_os("FLAT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let store = new_store(dir.path());
    let web = ImageName::new("web").unwrap();
    import(&store, "web", &dense_bytes(65536, 1), None);
    let bs = 65536u64;
    let count = (mib << 20) / bs;
    let mut block = vec![0u8; bs as usize];
    let mut changes = Vec::new();
    for i in 0..count {
        // every 10th block a hole, the rest distinct
        if i % 10 == 9 {
            continue;
        }
        for (j, w) in block.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(i * 8192 + j as u64 + 1).to_le_bytes());
        }
        changes.push((i, store.put_block(&block).unwrap()));
    }
    let id = store
        .create_version(&web, None, count * bs, &changes)
        .unwrap();
    let cache = FlatCache::open(store.clone(), 1 << 40).unwrap();
    cache.ensure(&id).unwrap();
    let t = Instant::now();
    let r = store.fsck(&mut |_, _| {}).unwrap();
    eprintln!("whole fsck: {:.2} s", t.elapsed().as_secs_f64());
    assert!(r.problems.is_empty());
    let t = Instant::now();
    let c = check_copies(&store).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(c.bad.is_empty());
    eprintln!(
        "checked a {mib} MiB flat copy in {secs:.2} s, {:.0} MiB/s",
        mib as f64 / secs
    );
}
