//! Tests of copy-on-write instances against a real store in a temp dir: reads and writes,
//! durability across reopen, discard, substitution policies and commit.

use std::sync::Arc;

use crate::instance::{
    ConflictPolicy, Instance, InstanceError, InstanceId, Instances, Range, SubstituteRequest,
};
use crate::{open_image, ImageName, Store, Version};

const BS: usize = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    instances: Instances,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let instances = Instances::new(&store);
    Fixture {
        _dir: dir,
        store,
        instances,
    }
}

/// A deterministic, non-zero image of `blocks` blocks plus a 100-byte tail.
fn image(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS + 100)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

impl Fixture {
    fn import(&self, bytes: &[u8], name: &str) -> Version {
        let path = self._dir.path().join(format!("{name}.img"));
        std::fs::write(&path, bytes).unwrap();
        let mut src = open_image(&path).unwrap();
        let image = ImageName::new("web").unwrap();
        let r = self
            .store
            .import(&image, Some(BS as u32), src.as_mut(), &mut |_| {})
            .unwrap();
        self.store.version(&r.id).unwrap()
    }

    fn create(&self, base: &Version, id: &str) -> Arc<Instance> {
        let id = InstanceId::parse(id).unwrap();
        self.instances
            .create(&self.store, &id, &base.id(), "web:v1")
            .unwrap()
    }

    fn read_all(&self, inst: &Instance) -> Vec<u8> {
        let mut buf = vec![0u8; inst.size() as usize + 1000];
        let n = inst.read_at(&self.store, 0, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn reopen(&self, id: &str) -> Arc<Instance> {
        Instances::new(&self.store)
            .get(&self.store, &InstanceId::parse(id).unwrap())
            .unwrap()
    }
}

#[test]
fn writes_are_copy_on_write_partial_and_durable_after_flush() {
    let f = fixture();
    let v1 = f.import(&image(8, 0), "v1");
    let inst = f.create(&v1, "vm1");
    let mut want = image(8, 0);
    assert_eq!(f.read_all(&inst), want);
    // A partial write inside a block, one across a block boundary, one into the short tail.
    for (off, len) in [(100usize, 10usize), (BS - 5, 10), (8 * BS + 50, 50)] {
        let data: Vec<u8> = (0..len).map(|i| 0xA0 ^ i as u8).collect();
        inst.write_at(&f.store, off as u64, &data).unwrap();
        want[off..off + len].copy_from_slice(&data);
    }
    assert_eq!(f.read_all(&inst), want);
    // The version underneath is untouched.
    let mut base = vec![0u8; want.len()];
    v1.read_at(&f.store, 0, &mut base).unwrap();
    assert_eq!(base, image(8, 0));
    // Past the end: writes refused, reads short.
    assert!(matches!(
        inst.write_at(&f.store, want.len() as u64 - 1, b"xy"),
        Err(InstanceError::PastEnd { .. })
    ));
    let mut tail = [0u8; 10];
    assert_eq!(
        inst.read_at(&f.store, want.len() as u64 - 3, &mut tail)
            .unwrap(),
        3
    );
    inst.flush(&f.store).unwrap();
    assert_eq!(f.read_all(&f.reopen("vm1")), want);
}

#[test]
fn punch_hole_reads_zeros_and_survives_reopen() {
    let f = fixture();
    let v1 = f.import(&image(8, 0), "v1");
    let inst = f.create(&v1, "vm1");
    let mut want = image(8, 0);
    inst.punch_hole(&f.store, BS as u64 + 10, 2 * BS as u64)
        .unwrap();
    want[BS + 10..3 * BS + 10].fill(0);
    assert_eq!(f.read_all(&inst), want);
    assert_eq!(
        inst.view().block(2).unwrap(),
        Some(None),
        "a whole block became a hole"
    );
    inst.flush(&f.store).unwrap();
    assert_eq!(f.read_all(&f.reopen("vm1")), want);
}

fn sub(
    f: &Fixture,
    inst: &Instance,
    target: &Version,
    policy: ConflictPolicy,
    dry_run: bool,
) -> Result<crate::instance::SubstituteOutcome, InstanceError> {
    inst.substitute(
        &f.store,
        &SubstituteRequest {
            target,
            label: "web:v2",
            policy,
            dry_run,
        },
    )
}

#[test]
fn substitution_policies_change_exactly_what_they_say() {
    let f = fixture();
    let v1_bytes = image(8, 0);
    let v1 = f.import(&v1_bytes, "v1");
    let mut v2_bytes = v1_bytes.clone();
    // The patch changes blocks 2 and 3 and 6.
    for b in [2, 3, 6] {
        v2_bytes[b * BS..(b + 1) * BS].fill(0x77);
    }
    let v2 = f.import(&v2_bytes, "v2");
    let inst = f.create(&v1, "vm1");
    // The guest wrote block 3 (conflict) and block 5 (no conflict).
    inst.write_at(&f.store, 3 * BS as u64, &[0x11; BS]).unwrap();
    inst.write_at(&f.store, 5 * BS as u64, &[0x22; BS]).unwrap();
    let before = f.read_all(&inst);

    let dry = sub(&f, &inst, &v2, ConflictPolicy::Refuse, true).unwrap();
    let conflict = vec![Range {
        offset: 3 * BS as u64,
        len: BS as u64,
    }];
    assert_eq!(dry.conflicts, conflict);
    assert_eq!(f.read_all(&inst), before, "a dry run changes nothing");
    match sub(&f, &inst, &v2, ConflictPolicy::Refuse, false) {
        Err(InstanceError::Conflicts(c)) => assert_eq!(c, conflict),
        other => panic!("want a refusal, got {other:?}"),
    }
    assert_eq!(f.read_all(&inst), before, "a refusal changes nothing");

    let kept = sub(&f, &inst, &v2, ConflictPolicy::KeepLocal, false).unwrap();
    let mut want = v2_bytes.clone();
    want[3 * BS..4 * BS].fill(0x11);
    want[5 * BS..6 * BS].fill(0x22);
    assert_eq!(f.read_all(&inst), want);
    assert_eq!(
        kept.changed,
        vec![
            Range {
                offset: 2 * BS as u64,
                len: BS as u64
            },
            Range {
                offset: 6 * BS as u64,
                len: BS as u64
            }
        ]
    );
    // Back to v1 (rollback), then forward with --force: the patch's block wins.
    sub(&f, &inst, &v1, ConflictPolicy::KeepLocal, false).unwrap();
    assert_eq!(f.read_all(&inst), before);
    let forced = sub(&f, &inst, &v2, ConflictPolicy::Force, false).unwrap();
    want[3 * BS..4 * BS].fill(0x77);
    assert_eq!(f.read_all(&inst), want);
    assert_eq!(forced.changed_blocks, 3);
    // The substitution is durable: a reopened instance shows the same bytes.
    assert_eq!(f.read_all(&f.reopen("vm1")), want);
    let events = f
        .instances
        .events(&InstanceId::parse("vm1").unwrap())
        .unwrap();
    assert_eq!(events.len(), 4, "created + three substitutions: {events:?}");
}

#[test]
fn the_substitution_diff_matches_the_store_diff_with_the_target_hashes() {
    let f = fixture();
    // 2,200 blocks: a three-level map with a partial last leaf.
    let blocks = 2200;
    let v1_bytes = image(blocks, 0);
    let v1 = f.import(&v1_bytes, "v1");
    let mut v2_bytes = v1_bytes.clone();
    // Changed blocks, whole leaves turned into holes (a zero subtree), and the tail.
    // A block in each of ~70 leaves (past PREFETCH_MIN: the leaves load on several threads).
    let changed: Vec<usize> = [0, 1, 31, 32, 500, 1023, 1024, 2199]
        .into_iter()
        .chain((40..blocks).step_by(31))
        .collect();
    for &b in &changed {
        v2_bytes[b * BS..(b + 1) * BS].fill(0x5a);
    }
    v2_bytes[64 * BS..128 * BS].fill(0);
    let end = v2_bytes.len();
    v2_bytes[end - 10..].fill(0x33);
    let v2 = f.import(&v2_bytes, "v2");
    for (a, b) in [(&v1, &v2), (&v2, &v1), (&v1, &v1)] {
        // Fresh versions (cold leaf caches) and warm ones give the same answer.
        for _ in 0..2 {
            let got = crate::instance_sub::changed_blocks(&f.store, a, b).unwrap();
            let want = f.store.diff(&a.id(), &b.id()).unwrap();
            assert_eq!(got.iter().map(|&(i, _)| i).collect::<Vec<_>>(), want);
            for (i, h) in got {
                assert_eq!(h, b.block_hash(i).unwrap());
            }
        }
    }
    // The changed blocks, a leaf-aligned run of 64 holes (two of them were changed too), the
    // partial tail block.
    let n = f.store.diff(&v1.id(), &v2.id()).unwrap().len();
    assert_eq!(n, changed.len() + 64 - 2 + 1);
}

#[test]
fn a_target_of_another_size_is_refused() {
    let f = fixture();
    let v1 = f.import(&image(8, 0), "v1");
    let v2 = f.import(&image(9, 0), "v2");
    let inst = f.create(&v1, "vm1");
    assert!(matches!(
        sub(&f, &inst, &v2, ConflictPolicy::Force, false),
        Err(InstanceError::SizeMismatch { .. })
    ));
}

#[test]
fn commit_makes_a_version_with_the_instance_bytes() {
    let f = fixture();
    let v1 = f.import(&image(8, 0), "v1");
    let inst = f.create(&v1, "vm1");
    inst.write_at(&f.store, 7, b"committed").unwrap();
    inst.punch_hole(&f.store, 4 * BS as u64, BS as u64).unwrap();
    let (base, changes) = inst.snapshot_changes(&f.store).unwrap();
    assert_eq!(changes.len(), 2);
    let id = f
        .store
        .create_version(base.image(), Some(&base.id()), base.size(), &changes)
        .unwrap();
    let v = f.store.version(&id).unwrap();
    let mut got = vec![0u8; v.size() as usize];
    v.read_at(&f.store, 0, &mut got).unwrap();
    assert_eq!(got, f.read_all(&inst));
}

#[test]
fn names_are_validated_and_duplicates_refused() {
    let f = fixture();
    let v1 = f.import(&image(2, 0), "v1");
    for bad in ["", ".x", "-x", "a/b", &"a".repeat(65)] {
        assert!(InstanceId::parse(bad).is_err(), "{bad:?}");
    }
    f.create(&v1, "vm1");
    let again = f.instances.create(
        &f.store,
        &InstanceId::parse("vm1").unwrap(),
        &v1.id(),
        "web:v1",
    );
    assert!(matches!(again, Err(InstanceError::Exists(_))));
    assert_eq!(f.instances.list().unwrap().len(), 1);
    f.instances
        .remove(&InstanceId::parse("vm1").unwrap())
        .unwrap();
    assert!(f.instances.list().unwrap().is_empty());
}

#[test]
fn compaction_keeps_contents_and_events() {
    let f = fixture();
    let v1_bytes = image(8, 0);
    let v1 = f.import(&v1_bytes, "v1");
    let mut v2_bytes = v1_bytes.clone();
    v2_bytes[..BS].fill(0x55);
    let v2 = f.import(&v2_bytes, "v2");
    let inst = f.create(&v1, "vm1");
    for i in 0..6u64 {
        inst.write_at(&f.store, i * BS as u64 + 1, &[i as u8 + 1; 3])
            .unwrap();
        inst.flush(&f.store).unwrap();
    }
    inst.punch_hole(&f.store, 7 * BS as u64, BS as u64).unwrap();
    sub(&f, &inst, &v2, ConflictPolicy::Force, false).unwrap();
    inst.write_at(&f.store, 2 * BS as u64, &[9; 10]).unwrap();
    inst.flush(&f.store).unwrap();
    let before = f.read_all(&inst);
    let path = f.store.dir().join("instances/vm1.log");
    let len_before = std::fs::metadata(&path).unwrap().len();
    inst.compact().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() < len_before);
    assert_eq!(f.read_all(&f.reopen("vm1")), before);
    let events = f
        .instances
        .events(&InstanceId::parse("vm1").unwrap())
        .unwrap();
    assert_eq!(
        events.len(),
        2,
        "created + the substitution survive: {events:?}"
    );
}

#[test]
fn fsck_finds_a_flipped_byte_in_an_instance_data_file_and_reads_fail_with_corrupt() {
    let f = fixture();
    let v1 = f.import(&image(8, 0), "v1");
    let inst = f.create(&v1, "vm1");
    inst.write_at(&f.store, 3 * BS as u64 + 512, &[0x77; 1024])
        .unwrap();
    inst.flush(&f.store).unwrap();
    let clean = f.store.fsck(&mut |_, _| {}).unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!(clean.instance_bytes_checked, 4096);
    drop(inst);
    let data = f.store.dir().join("instances/vm1.data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let r = f.store.fsck(&mut |_, _| {}).unwrap();
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].offset, Some(3 * BS as u64));
    assert!(
        r.problems[0].detail.contains("vm1"),
        "{}",
        r.problems[0].detail
    );
    let inst = f.reopen("vm1");
    let mut buf = vec![0u8; 100];
    let err = inst
        .read_at(&f.store, 3 * BS as u64 + 500, &mut buf)
        .unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    // the other blocks still read
    inst.read_at(&f.store, 0, &mut buf).unwrap();
}
