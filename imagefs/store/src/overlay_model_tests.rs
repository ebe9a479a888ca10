//! Shadow-model property test of the overlay: an instance driven through random reads, writes
//! (any offset and length, so partial sub-blocks, partial blocks and the short tail), discards,
//! flushes, substitutions (`--force` and `--keep-local`) and crashes (the instance dropped with
//! unflushed writes, garbage past the data file's end, then reopened) must always read as a
//! plain byte array kept beside it.

use std::collections::HashSet;

use proptest::prelude::*;

use crate::instance::{ConflictPolicy, InstanceId, Instances, SubstituteRequest};
use crate::{open_image, ImageName, Store, Version};

/// Block size of the test images: 4 sub-blocks per block.
const BS: usize = 16384;
const SUB: usize = 4096;
/// 6 blocks and a short tail that ends inside a sub-block.
const SIZE: usize = 6 * BS + 3000;

#[derive(Debug, Clone)]
enum Step {
    Write { offset: usize, len: usize, seed: u8 },
    Discard { offset: usize, len: usize },
    Read { offset: usize, len: usize },
    Flush,
    Substitute { force: bool },
    Crash { garbage: bool },
    Reclaim,
}

fn step() -> impl Strategy<Value = Step> {
    let span = (0..SIZE, 1..3 * SUB + 700);
    prop_oneof![
        4 => (span.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Step::Write { offset, len, seed }),
        // 512-byte sector writes, as a guest's virtio-blk sends them
        2 => (0..SIZE / 512, 1..9usize, any::<u8>()).prop_map(|(s, n, seed)| Step::Write { offset: s * 512, len: n * 512, seed }),
        1 => span.clone().prop_map(|(offset, len)| Step::Discard { offset, len: len * 3 }),
        3 => span.prop_map(|(offset, len)| Step::Read { offset, len }),
        1 => Just(Step::Flush),
        1 => any::<bool>().prop_map(|force| Step::Substitute { force }),
        1 => any::<bool>().prop_map(|garbage| Step::Crash { garbage }),
        1 => Just(Step::Reclaim),
    ]
}

fn image(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

/// The second version: blocks 1, 3 and the tail differ from the first.
fn image2() -> Vec<u8> {
    let mut b = image(0);
    for (i, byte) in b.iter_mut().enumerate() {
        if i / BS == 1 || i / BS == 3 || i / BS == 6 {
            *byte ^= 0x40;
        }
    }
    b
}

/// What the instance must show, and what survives a crash.
#[derive(Clone)]
struct Model {
    bytes: Vec<u8>,
    /// Sub-blocks the guest wrote (they keep their bytes through a keep-local substitution).
    written: HashSet<usize>,
    /// Blocks discarded whole (they keep their zeros through a keep-local substitution).
    replaced: HashSet<usize>,
}

impl Model {
    fn write(&mut self, offset: usize, data: Option<&[u8]>, len: usize) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / BS;
            if data.is_none() && pos.is_multiple_of(BS) && (end - pos >= BS || end == SIZE) {
                self.replaced.insert(block);
                self.written.retain(|s| s * SUB / BS != block);
                let stop = (pos + BS).min(end);
                self.bytes[pos..stop].fill(0);
                pos = stop;
                continue;
            }
            let stop = (pos - pos % SUB + SUB).min(end);
            self.written.insert(pos / SUB);
            match data {
                Some(d) => self.bytes[pos..stop].copy_from_slice(&d[pos - offset..stop - offset]),
                None => self.bytes[pos..stop].fill(0),
            }
            pos = stop;
        }
    }

    /// Substitution from `from` to `to`: changed blocks take `to`'s bytes, except what the
    /// guest wrote under keep-local.
    fn substitute(&mut self, from: &[u8], to: &[u8], force: bool) {
        for block in 0..SIZE.div_ceil(BS) {
            let r = block * BS..((block + 1) * BS).min(SIZE);
            if from[r.clone()] == to[r.clone()] {
                continue;
            }
            let touched = self.replaced.contains(&block)
                || self.written.iter().any(|s| s * SUB / BS == block);
            if force || !touched {
                self.bytes[r.clone()].copy_from_slice(&to[r.clone()]);
                self.replaced.remove(&block);
                self.written.retain(|s| s * SUB / BS != block);
            } else if !self.replaced.contains(&block) {
                for s in r.start / SUB..r.end.div_ceil(SUB) {
                    if !self.written.contains(&s) {
                        let sr = s * SUB..((s + 1) * SUB).min(SIZE);
                        self.bytes[sr.clone()].copy_from_slice(&to[sr]);
                    }
                }
            }
        }
    }
}

fn import(store: &Store, dir: &std::path::Path, bytes: &[u8], name: &str) -> Version {
    let path = dir.join(format!("{name}.img"));
    std::fs::write(&path, bytes).unwrap();
    let mut src = open_image(&path).unwrap();
    let r = store
        .import(
            &ImageName::new("web").unwrap(),
            Some(BS as u32),
            src.as_mut(),
            &mut |_| {},
        )
        .unwrap();
    store.version(&r.id).unwrap()
}

fn run(steps: Vec<Step>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let images = [image(0), image2()];
    let versions = [
        import(&store, dir.path(), &images[0], "v1"),
        import(&store, dir.path(), &images[1], "v2"),
    ];
    let id = InstanceId::parse("vm").unwrap();
    let mut instances = Instances::new(&store);
    let mut inst = instances
        .create(&store, &id, &versions[0].id(), "web:v1")
        .unwrap();
    let mut on = 0usize;
    let mut model = Model {
        bytes: images[0].clone(),
        written: HashSet::new(),
        replaced: HashSet::new(),
    };
    let mut durable = (model.clone(), on);
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Write { offset, len, seed } => {
                let len = len.min(SIZE - offset);
                let data: Vec<u8> = (0..len)
                    .map(|i| if seed % 5 == 0 { 0 } else { (i as u8) ^ seed })
                    .collect();
                inst.write_at(&store, offset as u64, &data).unwrap();
                model.write(offset, Some(&data), len);
            }
            Step::Discard { offset, len } => {
                let len = len.min(SIZE - offset);
                inst.punch_hole(&store, offset as u64, len as u64).unwrap();
                model.write(offset, None, len);
            }
            Step::Read { offset, len } => {
                let mut buf = vec![0u8; len];
                let got = inst.read_at(&store, offset as u64, &mut buf).unwrap();
                let want = len.min(SIZE - offset);
                assert_eq!(got, want, "step {n}: read length");
                assert!(
                    buf[..got] == model.bytes[offset..offset + want],
                    "step {n}: read {offset}+{len} differs from the model"
                );
            }
            Step::Flush => {
                inst.flush(&store).unwrap();
                durable = (model.clone(), on);
            }
            Step::Substitute { force } => {
                let to = 1 - on;
                let policy = if force {
                    ConflictPolicy::Force
                } else {
                    ConflictPolicy::KeepLocal
                };
                let req = SubstituteRequest {
                    target: &versions[to],
                    label: "web:other",
                    policy,
                    dry_run: false,
                };
                let outcome = inst.substitute(&store, &req).unwrap();
                let before = model.bytes.clone();
                model.substitute(&images[on], &images[to], force);
                // every byte that changed must be in a range the page cache is told about
                for (i, (a, b)) in before.iter().zip(&model.bytes).enumerate() {
                    let told = outcome
                        .changed
                        .iter()
                        .any(|r| (r.offset..r.offset + r.len).contains(&(i as u64)));
                    assert!(
                        a == b || told,
                        "step {n}: byte {i} changed but is not reported"
                    );
                }
                on = to;
                durable = (model.clone(), on);
            }
            Step::Reclaim => {
                inst.reclaim().unwrap();
                durable = (model.clone(), on);
                assert_eq!(inst.dead_bytes(), 0, "step {n}: dead bytes after reclaim");
                let path = store.dir().join("instances/vm.data");
                std::fs::File::open(&path).unwrap().sync_all().unwrap();
                let on_disk = std::fs::metadata(&path)
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                    .unwrap();
                // ext4 counts an extent-tree block once holes split the file in more than
                // four extents
                assert!(
                    on_disk <= inst.data_bytes() + 2 * 4096,
                    "step {n}: the data file holds {on_disk} bytes, the instance counts {}",
                    inst.data_bytes()
                );
            }
            Step::Crash { garbage } => {
                drop(inst);
                drop(instances);
                if garbage {
                    // a write that reached the data file but no record: past the last slot
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(store.dir().join("instances/vm.data"))
                        .unwrap();
                    f.write_all(&[0xEE; 5000]).unwrap();
                }
                instances = Instances::new(&store);
                inst = instances.get(&store, &id).unwrap();
                model = durable.0.clone();
                on = durable.1;
                assert_eq!(
                    inst.dead_bytes(),
                    0,
                    "step {n}: a reopened instance holds dead slots"
                );
                assert_eq!(inst.view().base().id(), versions[on].id(), "step {n}: base");
            }
        }
    }
    let mut all = vec![0u8; SIZE];
    inst.read_at(&store, 0, &mut all).unwrap();
    assert!(all == model.bytes, "final contents differ from the model");
    // a commit stores whole blocks that read back as the instance does
    let (base, changes) = inst.snapshot_changes(&store).unwrap();
    let committed = store
        .create_version(
            &ImageName::new("web").unwrap(),
            Some(&base.id()),
            SIZE as u64,
            &changes,
        )
        .unwrap();
    let v = store.version(&committed).unwrap();
    let mut back = vec![0u8; SIZE];
    v.read_at(&store, 0, &mut back).unwrap();
    assert!(back == model.bytes, "the committed version differs");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn overlay_matches_a_plain_byte_array(steps in proptest::collection::vec(step(), 1..60)) {
        run(steps);
    }
}

/// Blocks 1, 2 and 4 of this image are holes; the rest is data.
fn image_with_holes() -> Vec<u8> {
    let mut b = image(7);
    for (i, byte) in b.iter_mut().enumerate() {
        if matches!(i / BS, 1 | 2 | 4) {
            *byte = 0;
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// An unwritten instance reads through its base's flat copy, its holes from the block map
    /// (no read of the copy); every range reads as the image. The copy here holds garbage where
    /// the base has holes, so a hole read from the copy, or a data run read at a wrong offset,
    /// shows.
    #[test]
    fn reads_through_a_base_copy_skip_holes_and_match_the_image(
        reads in proptest::collection::vec((0..SIZE, 1..3 * BS), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s")).unwrap();
        let image = image_with_holes();
        let v = import(&store, dir.path(), &image, "holes");
        let mut copy_bytes = image.clone();
        for (i, byte) in copy_bytes.iter_mut().enumerate() {
            if matches!(i / BS, 1 | 2 | 4) {
                *byte = 0xAA;
            }
        }
        let copy = dir.path().join("copy.raw");
        std::fs::write(&copy, &copy_bytes).unwrap();
        let id = InstanceId::parse("vm").unwrap();
        let instances = Instances::new(&store);
        let inst = instances.create(&store, &id, &v.id(), "web:holes").unwrap();
        inst.view().set_base_copy(std::sync::Arc::new(std::fs::File::open(&copy).unwrap()));
        for (offset, len) in reads {
            let mut buf = vec![0x55u8; len];
            let n = inst.read_at(&store, offset as u64, &mut buf).unwrap();
            let end = (offset + len).min(SIZE);
            prop_assert_eq!(n, end - offset);
            prop_assert!(buf[..n] == image[offset..end], "read of {} at {}", len, offset);
        }
    }
}
