//! Store-level unit tests against real files in a temp dir: round trips, dedup, holes, tails,
//! Merkle diff, corruption, index rebuild and the writer lock.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::*;

fn image_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        // leave every third 4 KiB page zero so there are holes
        if (i / 4096) % 3 != 1 {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8;
        }
    }
    v
}

fn import_bytes(store: &Store, name: &str, bytes: &[u8], bs: Option<u32>) -> ImportReport {
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
}

fn read_all(store: &Store, id: &VersionId) -> Vec<u8> {
    let v = store.version(id).unwrap();
    let mut out = vec![0u8; v.size() as usize + 100];
    let n = v.read_at(store, 0, &mut out).unwrap();
    out.truncate(n);
    out
}

fn packs_len(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn import_round_trips_with_holes_and_a_partial_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let bytes = image_bytes(3 * 4096 * 100 + 1234, 1);
    let r = import_bytes(&store, "web", &bytes, Some(4096));
    assert_eq!(r.size, bytes.len() as u64);
    assert!(r.stats.holes >= 99);
    assert_eq!(read_all(&store, &r.id), bytes);
    // unaligned reads in the middle
    let v = store.version(&r.id).unwrap();
    let mut buf = vec![0u8; 10000];
    assert_eq!(v.read_at(&store, 5000, &mut buf).unwrap(), 10000);
    assert_eq!(buf, bytes[5000..15000]);
    assert_eq!(v.block_hash(1).unwrap(), None);
    assert!(v.block_hash(0).unwrap().is_some());
}

#[test]
fn reimport_dedups_and_gives_the_same_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let bytes = image_bytes(1 << 20, 2);
    let a = import_bytes(&store, "web", &bytes, None);
    let before = packs_len(&s);
    let b = import_bytes(&store, "web", &bytes, None);
    assert_eq!(a.id, b.id);
    assert_eq!(b.stats.new_blocks, 0);
    assert_eq!(packs_len(&s), before);
}

#[test]
fn create_version_and_merkle_diff_touch_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    // 70000 blocks of 4 KiB: a 3-level tree, mostly holes
    let size = 70_000u64 * 4096;
    let web = ImageName::new("web").unwrap();
    let block = vec![7u8; 4096];
    let h = store.put_block(&block).unwrap();
    assert_eq!(store.put_block(&[0u8; 4096]).unwrap(), None);
    let ids: Vec<u64> = vec![3, 300, 69_999];
    let changes: Vec<_> = ids.iter().map(|&i| (i, h)).collect();
    // the image must exist first: make it with an empty import of the same block size
    let base = import_bytes(&store, "web", &vec![0u8; size as usize], Some(4096)).id;
    let v2 = store
        .create_version(&web, Some(&base), size, &changes)
        .unwrap();
    assert_eq!(store.diff(&base, &v2).unwrap(), ids);
    assert_eq!(store.diff(&v2, &v2).unwrap(), Vec::<u64>::new());
    let preview = store
        .preview_version(&web, Some(&base), size, &changes)
        .unwrap();
    assert_eq!(preview, v2);
    let v = store.version(&v2).unwrap();
    let mut buf = vec![0u8; 4096];
    v.read_at(&store, 300 * 4096, &mut buf).unwrap();
    assert_eq!(buf, block);
    // going back: the same map gives the same id
    let back: Vec<_> = ids.iter().map(|&i| (i, None)).collect();
    assert_eq!(
        store.create_version(&web, Some(&v2), size, &back).unwrap(),
        base
    );
    assert!(store
        .create_version(&web, Some(&v2), size, &[(70_000, h)])
        .is_err());
}

#[test]
fn corrupt_block_is_an_integrity_error_not_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let bytes = vec![5u8; 65536 * 2];
    let id = import_bytes(&store, "web", &bytes, None).id;
    drop(store);
    let pack = std::fs::read_dir(s.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(&[6], 100).unwrap();
    let store = Store::open(&s).unwrap();
    let v = store.version(&id).unwrap();
    let mut buf = vec![0u8; 65536];
    let err = v.read_at(&store, 0, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn index_rebuild_restores_every_version_and_tag() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let a = image_bytes(500_000, 3);
    let b = image_bytes(600_000, 4);
    let ia = import_bytes(&store, "web", &a, None).id;
    let ib = import_bytes(&store, "db", &b, Some(8192)).id;
    let web = ImageName::new("web").unwrap();
    store.set_tag(&web, &Tag::new("v1").unwrap(), &ia).unwrap();
    drop(store);
    std::fs::remove_dir_all(s.join("index")).unwrap();
    std::fs::remove_file(s.join("objects.idx")).unwrap();
    let store = Store::open_rebuilding_index(&s).unwrap();
    assert_eq!(read_all(&store, &ia), a);
    assert_eq!(read_all(&store, &ib), b);
    assert_eq!(store.resolve("web:v1").unwrap(), ia);
    assert_eq!(store.resolve(&ib.to_hex()[..10]).unwrap(), ib);
    assert_eq!(store.versions().unwrap().len(), 2);
}

#[test]
fn second_writer_is_busy_and_bad_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let _store = Store::init(&s).unwrap();
    assert_eq!(Store::open(&s).unwrap_err().kind(), ErrorKind::Busy);
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::NotAStore(_))
    ));
    std::fs::write(dir.path().join("FORMAT"), "imagefs-store 99\n").unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::UnknownFormat { .. })
    ));
}

#[test]
fn resolve_refuses_malformed_and_unknown_specs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    assert_eq!(
        store.resolve("web").unwrap_err().kind(),
        ErrorKind::BadInput
    );
    assert_eq!(
        store.resolve("we b:v1").unwrap_err().kind(),
        ErrorKind::BadInput
    );
    assert_eq!(
        store.resolve("web:v1").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.resolve("abcdef0123").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn gc_frees_untagged_versions_and_keeps_tagged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let web = ImageName::new("web").unwrap();
    let a = image_bytes(2 << 20, 5);
    let b = image_bytes(2 << 20, 6);
    let ia = import_bytes(&store, "web", &a, None).id;
    let ib = import_bytes(&store, "web", &b, None).id;
    store
        .set_tag(&web, &Tag::new("keep").unwrap(), &ia)
        .unwrap();
    let before = packs_len(&s);
    let r = store.gc().unwrap();
    assert_eq!(r.versions_removed, vec![ib]);
    assert!(r.objects_freed > 0);
    assert!(
        packs_len(&s) < before * 2 / 3,
        "{} vs {before}",
        packs_len(&s)
    );
    assert_eq!(read_all(&store, &ia), a);
    assert!(store.version(&ib).is_err());
    assert!(store.fsck(&mut |_, _| {}).unwrap().problems.is_empty());
    // pinned versions survive too
    let ib = import_bytes(&store, "web", &b, None).id;
    store.pin("instance", "vm1", &ib).unwrap();
    assert!(store.gc().unwrap().versions_removed.is_empty());
    drop(store);
    let store = Store::open(&s).unwrap();
    assert_eq!(read_all(&store, &ib), b);
}

#[test]
fn bundle_carries_only_changes_and_rejects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::init(&dir.path().join("s")).unwrap();
    let t = Store::init(&dir.path().join("t")).unwrap();
    let web = ImageName::new("web").unwrap();
    let v1 = image_bytes(4 << 20, 7);
    let mut v2 = v1.clone();
    v2[100_000..100_010].copy_from_slice(b"0123456789");
    v2[3_000_000] ^= 0xff;
    let i1 = import_bytes(&s, "web", &v1, None).id;
    let i2 = import_bytes(&s, "web", &v2, None).id;
    assert_eq!(import_bytes(&t, "web", &v1, None).id, i1);
    let bundle = dir.path().join("fix.bundle");
    let r = s
        .write_bundle(&i1, "web:v1", &i2, Some(&Tag::new("v2").unwrap()), &bundle)
        .unwrap();
    assert_eq!(r.changes, 2);
    assert!(r.bytes < 3 * 65536);
    // tampered: flip a byte inside the block data
    let raw = std::fs::read(&bundle).unwrap();
    let mut bad = raw.clone();
    let at = raw.len() - 200;
    bad[at] ^= 1;
    let badp = dir.path().join("bad.bundle");
    std::fs::write(&badp, &bad).unwrap();
    assert_eq!(
        t.apply_bundle(&badp).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    std::fs::write(&badp, &raw[..raw.len() / 2]).unwrap();
    assert_eq!(
        t.apply_bundle(&badp).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert!(t.resolve("web:v2").is_err());
    let applied = t.apply_bundle(&bundle).unwrap();
    assert_eq!(applied.target, i2);
    assert_eq!(t.resolve("web:v2").unwrap(), i2);
    assert_eq!(read_all(&t, &i2), v2);
    // a store without the base refuses with NotFound
    let u = Store::init(&dir.path().join("u")).unwrap();
    assert_eq!(
        u.apply_bundle(&bundle).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let _ = web;
}

#[test]
fn fsck_names_the_corrupt_block_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let bytes = vec![9u8; 65536 * 3];
    let id = import_bytes(&store, "web", &bytes, None).id;
    let mut other = bytes.clone();
    other[65536 * 2] = 1;
    import_bytes(&store, "web", &other, None);
    drop(store);
    let pack = std::fs::read_dir(s.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(&[0], 60).unwrap();
    let store = Store::open(&s).unwrap();
    let r = store.fsck(&mut |_, _| {}).unwrap();
    // the one stored block of `bytes` is used at 3 indexes of version `id`, 2 of the other
    let mine: Vec<_> = r
        .problems
        .iter()
        .filter(|p| p.version == Some(id))
        .collect();
    assert_eq!(mine.len(), 3, "{:?}", r.problems);
    assert_eq!(mine[1].offset, Some(65536));
}

#[test]
fn qcow2_import_matches_raw() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    let bytes = image_bytes(3 << 20, 8);
    std::fs::write(&raw, &bytes).unwrap();
    let q = dir.path().join("a.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        loud_skip!("qemu-img not available");
    }
    let store = Store::init(&dir.path().join("s")).unwrap();
    let web = ImageName::new("web").unwrap();
    let mut src = open_image(&q).unwrap();
    assert_eq!(src.format(), "qcow2");
    let r = store.import(&web, None, src.as_mut(), &mut |_| {}).unwrap();
    assert_eq!(read_all(&store, &r.id), bytes);
    let mut src = open_image(&raw).unwrap();
    assert_eq!(
        store
            .import(&web, None, src.as_mut(), &mut |_| {})
            .unwrap()
            .id,
        r.id
    );
    // version 2 (compat=0.10) reads the same
    let q2 = dir.path().join("a2.qcow2");
    std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", "-o", "compat=0.10"])
        .arg(&raw)
        .arg(&q2)
        .status()
        .unwrap();
    let mut src = open_image(&q2).unwrap();
    assert_eq!(
        store
            .import(&web, None, src.as_mut(), &mut |_| {})
            .unwrap()
            .id,
        r.id
    );
    // compressed images are refused before anything is stored
    let c = dir.path().join("c.qcow2");
    std::process::Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw)
        .arg(&c)
        .status()
        .unwrap();
    assert_eq!(open_image(&c).err().unwrap().kind(), ErrorKind::BadInput);
}

#[test]
fn gc_keeps_what_instances_use() {
    use crate::instance::{InstanceId, Instances};
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let bytes = image_bytes(1 << 20, 9);
    // an untagged version: only the instance refers to it
    let base = import_bytes(&store, "web", &bytes, None).id;
    let instances = Instances::new(&store);
    let id = InstanceId::parse("vm1").unwrap();
    let inst = instances.create(&store, &id, &base, "web").unwrap();
    let written = vec![0x5au8; 65536];
    inst.write_at(&store, 0, &written).unwrap();
    inst.flush(&store).unwrap();
    drop(inst);
    drop(instances);
    let r = store.gc().unwrap();
    assert!(r.versions_removed.is_empty(), "{r:?}");
    assert_eq!(read_all(&store, &base), bytes);
    // the written block lives in the instance's data file, which gc leaves alone
    let instances = Instances::new(&store);
    let inst = instances.get(&store, &id).unwrap();
    let mut buf = vec![0u8; 65536];
    inst.read_at(&store, 0, &mut buf).unwrap();
    assert_eq!(buf, written);
}

#[test]
fn gc_keeps_unflushed_writes_of_registered_live_instances() {
    use crate::instance::{InstanceId, Instances};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let base = import_bytes(&store, "web", &image_bytes(1 << 20, 10), None).id;
    store
        .set_tag(
            &ImageName::new("web").unwrap(),
            &Tag::new("v1").unwrap(),
            &base,
        )
        .unwrap();
    let instances = std::sync::Arc::new(Instances::new(&store));
    let weak: std::sync::Weak<dyn GcRoots> = std::sync::Arc::downgrade(&instances) as _;
    store.add_gc_roots(weak);
    let inst = instances
        .create(&store, &InstanceId::parse("vm1").unwrap(), &base, "web:v1")
        .unwrap();
    let written = vec![0x77u8; 65536];
    inst.write_at(&store, 65536, &written).unwrap();
    // not flushed: only the live registry knows this block
    store.gc().unwrap();
    let mut buf = vec![0u8; 65536];
    let n = inst.read_at(&store, 65536, &mut buf).unwrap();
    assert_eq!(n, 65536);
    assert_eq!(buf, written);
    inst.flush(&store).unwrap();
}

#[test]
fn bundle_between_versions_of_different_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::init(&dir.path().join("s")).unwrap();
    let t = Store::init(&dir.path().join("t")).unwrap();
    let v1 = image_bytes(3 * 65536 + 100, 11);
    let mut v2 = image_bytes(300 * 65536 + 7, 11);
    v2[..v1.len()].copy_from_slice(&v1);
    v2[10] ^= 1;
    let i1 = import_bytes(&s, "web", &v1, None).id;
    let i2 = import_bytes(&s, "web", &v2, None).id;
    import_bytes(&t, "web", &v1, None);
    let b = dir.path().join("grow.bundle");
    s.write_bundle(&i1, "web:v1", &i2, None, &b).unwrap();
    assert_eq!(t.apply_bundle(&b).unwrap().target, i2);
    assert_eq!(read_all(&t, &i2), v2);
    // and back down
    let b = dir.path().join("shrink.bundle");
    s.write_bundle(&i2, "web:v2", &i1, None, &b).unwrap();
    assert_eq!(t.apply_bundle(&b).unwrap().target, i1);
    assert_eq!(read_all(&t, &i1), v1);
}

mod bundle_props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        // A damaged bundle is refused (never a panic, never a wrong version), or, when the
        // damage missed everything that matters, applies to exactly the right version.
        #[test]
        fn mutated_bundles_are_refused_or_exact(
            flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::init(&dir.path().join("s")).unwrap();
            let t = Store::init(&dir.path().join("t")).unwrap();
            let v1 = image_bytes(8 * 4096, 12);
            let mut v2 = v1.clone();
            v2[5000] ^= 1;
            v2[20_000] ^= 1;
            let i1 = import_bytes(&s, "web", &v1, Some(4096)).id;
            let i2 = import_bytes(&s, "web", &v2, Some(4096)).id;
            import_bytes(&t, "web", &v1, Some(4096));
            let b = dir.path().join("b");
            s.write_bundle(&i1, "web:v1", &i2, Some(&Tag::new("v2").unwrap()), &b).unwrap();
            let mut bytes = std::fs::read(&b).unwrap();
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c % bytes.len());
            }
            std::fs::write(&b, &bytes).unwrap();
            match t.apply_bundle(&b) {
                Ok(r) => {
                    prop_assert_eq!(r.target, i2);
                    prop_assert_eq!(read_all(&t, &i2), v2);
                }
                Err(_) => prop_assert!(t.resolve("web:v2").is_err()),
            }
        }
    }
}

#[test]
fn an_index_damaged_by_a_crash_is_rebuilt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let store = Store::init(&s).unwrap();
    let a = image_bytes(500_000, 5);
    let ia = import_bytes(&store, "web", &a, None).id;
    let web = ImageName::new("web").unwrap();
    store.set_tag(&web, &Tag::new("v1").unwrap(), &ia).unwrap();
    drop(store);
    // An index that has lost touch with the logs, as a torn sled can leave it: it claims more
    // of refs.log applied than the log holds.
    {
        let db = sled::open(s.join("index")).unwrap();
        db.insert(crate::store::REFS_STATE_KEY, &u64::MAX.to_le_bytes()[..])
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(&s).unwrap();
    assert_eq!(store.resolve("web:v1").unwrap(), ia);
    assert_eq!(read_all(&store, &ia), a);
}
