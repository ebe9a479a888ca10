//! Corrupt filesystems: targeted damage (loops, bad depths, impossible geometry, bad dirents)
//! must give the matching typed error, and random mutations of real images must end in `Ok`
//! or an error, never a panic or a walk that outlives its budget.

#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::{blocks_of, have_e2fsprogs, mkfs, noise, tagged_blocks, tree};
use super::*;

/// An image in memory.
pub(super) struct Mem(pub Vec<u8>);

impl ReadAt for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?));
        match src {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(Ext4Error::OutOfImage {
                offset,
                len: buf.len() as u64,
                size: self.size(),
            }),
        }
    }
}

pub(super) struct Fixture {
    /// ext4, 1 KiB blocks: a depth > 0 extent tree, an htree directory, nested dirs.
    pub ext4: Vec<u8>,
    /// ext2, 1 KiB blocks: indirect and double-indirect maps.
    pub ext2: Vec<u8>,
    /// The extent tree blocks of /frag in `ext4`.
    pub etb: Vec<u64>,
    /// A data block of /dir (many entries) in `ext4`.
    pub dir_block: u64,
    /// The double-indirect block of /bin/big in `ext2`.
    pub dind: u64,
}

pub(super) fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        if !have_e2fsprogs() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let mut files = vec![("bin/big".to_string(), noise("big", 300_000))];
        for i in 0..120 {
            files.push((format!("dir/entry-with-a-long-name-{i}"), vec![b'x'; 100]));
        }
        files.push(("a/b/c/d".to_string(), b"deep".to_vec()));
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
        tree(&root, &refs);
        let f = std::fs::File::create(root.join("frag")).unwrap();
        use std::os::unix::fs::FileExt;
        for i in 0..40u64 {
            f.write_all_at(&noise(&format!("f{i}"), 1024), i * 2048)
                .unwrap();
        }
        drop(f);
        let e4 = dir.path().join("e4.img");
        let e2 = dir.path().join("e2.img");
        mkfs("mkfs.ext4", &["-b", "1024", "-N", "256"], &root, &e4, "2M");
        mkfs("mkfs.ext2", &["-b", "1024", "-N", "256"], &root, &e2, "2M");
        let etb = tagged_blocks(&e4, "/frag", "ETB0");
        // `blocks` lists extent tree blocks too: skip them
        let dir_etb = tagged_blocks(&e4, "/dir", "ETB0");
        let dir_block = blocks_of(&e4, "/dir")
            .into_iter()
            .find(|b| !dir_etb.contains(b))
            .unwrap();
        let dind = tagged_blocks(&e2, "/bin/big", "DIND")[0];
        Some(Fixture {
            ext4: std::fs::read(&e4).unwrap(),
            ext2: std::fs::read(&e2).unwrap(),
            etb,
            dir_block,
            dind,
        })
    })
    .as_ref()
}

fn build(img: Vec<u8>) -> Result<Option<FsIndex>, Ext4Error> {
    FsIndex::build(&Mem(img), Limits::default())
}

fn put(img: &mut [u8], at: u64, bytes: &[u8]) {
    let at = at as usize;
    img[at..at + bytes.len()].copy_from_slice(bytes);
}

#[test]
fn the_fixtures_are_whole() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    assert!(build(f.ext4.clone()).unwrap().unwrap().named_inodes() > 120);
    assert!(build(f.ext2.clone()).unwrap().unwrap().named_inodes() > 120);
    assert!(!f.etb.is_empty(), "/frag has no index node");
}

#[test]
fn an_indirect_block_reached_twice_is_a_loop() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    let mut img = f.ext2.clone();
    // the double-indirect block's second pointer repeats its first: one block, two parents
    let first = u32::from_le_bytes(img[(f.dind * 1024) as usize..][..4].try_into().unwrap());
    put(&mut img, f.dind * 1024 + 4, &first.to_le_bytes());
    let e = build(img).unwrap_err();
    assert!(
        matches!(e, Ext4Error::Loop { block, .. } if block == u64::from(first)),
        "{e}"
    );
}

#[test]
fn a_wrong_depth_and_a_bad_magic_are_refused() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    let mut img = f.ext4.clone();
    put(&mut img, f.etb[0] * 1024 + 6, &3u16.to_le_bytes());
    assert!(matches!(
        build(img).unwrap_err(),
        Ext4Error::BadExtents {
            why: "depth out of place",
            ..
        }
    ));
    let mut img = f.ext4.clone();
    put(&mut img, f.etb[0] * 1024, &[0, 0]);
    assert!(matches!(
        build(img).unwrap_err(),
        Ext4Error::BadExtents {
            why: "bad node magic",
            ..
        }
    ));
}

#[test]
fn impossible_geometry_is_refused() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    let mut img = f.ext4.clone();
    put(&mut img, 1024 + 0x18, &10u32.to_le_bytes());
    assert!(matches!(
        build(img).unwrap_err(),
        Ext4Error::BadSuperblock(_)
    ));
    let mut img = f.ext4.clone();
    img.truncate(img.len() / 2);
    assert!(matches!(
        build(img).unwrap_err(),
        Ext4Error::BadSuperblock(_)
    ));
    let mut img = f.ext4.clone();
    let incompat = u32::from_le_bytes(img[1024 + 0x60..1024 + 0x64].try_into().unwrap());
    put(&mut img, 1024 + 0x60, &(incompat | 0x10).to_le_bytes());
    assert!(matches!(
        build(img).unwrap_err(),
        Ext4Error::Unsupported("meta_bg")
    ));
    let mut img = f.ext4.clone();
    put(&mut img, 1024 + 0x28, &0u32.to_le_bytes());
    assert!(matches!(
        build(img).unwrap_err(),
        Ext4Error::BadSuperblock(_)
    ));
}

#[test]
fn a_broken_directory_entry_is_refused() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    let mut img = f.ext4.clone();
    // the first entry of /dir's first block: rec_len 0 cannot advance
    put(&mut img, f.dir_block * 1024 + 4, &0u16.to_le_bytes());
    let e = build(img).unwrap_err();
    assert!(matches!(e, Ext4Error::BadDirectory { .. }), "{e}");
    let mut img = f.ext4.clone();
    put(&mut img, f.dir_block * 1024, &u32::MAX.to_le_bytes());
    let e = build(img).unwrap_err();
    assert!(matches!(e, Ext4Error::BadDirectory { .. }), "{e}");
}

#[test]
fn the_time_budget_stops_the_walk() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    let limits = Limits {
        time: Duration::ZERO,
    };
    let e = FsIndex::build(&Mem(f.ext4.clone()), limits).unwrap_err();
    assert!(matches!(e, Ext4Error::Budget("time")), "{e}");
}

/// Byte offsets worth damaging: the superblock, descriptors, the first inode tables, and the
/// tree and directory blocks.
fn hot_offset(f: &Fixture) -> impl Strategy<Value = u64> {
    let etb = f.etb[0] * 1024;
    let dir = f.dir_block * 1024;
    prop_oneof![
        (1024u64..2048),
        (2048u64..4096),
        (4096u64..80_000),
        (etb..etb + 1024),
        (dir..dir + 1024),
        (0u64..2 * 1024 * 1024),
    ]
}

fn ext4_edits() -> BoxedStrategy<Vec<(u64, u8)>> {
    match fixture() {
        Some(f) => prop::collection::vec((hot_offset(f), any::<u8>()), 1..8).boxed(),
        None => Just(Vec::new()).boxed(),
    }
}

fn mutate_and_walk(base: &[u8], edits: &[(u64, u8)]) {
    let mut img = base.to_vec();
    for &(at, byte) in edits {
        if let Some(b) = img.get_mut(at as usize) {
            *b = byte;
        }
    }
    let t = Instant::now();
    let limits = Limits {
        time: Duration::from_secs(10),
    };
    let r = FsIndex::build(&Mem(img), limits);
    assert!(t.elapsed() < Duration::from_secs(12));
    // whatever was built must answer lookups without panicking either
    if let Ok(Some(ix)) = r {
        let _ = ix.lookup(4096, &[0, 1, 5, 100, 511, 10_000], None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_ext4_never_panics(edits in ext4_edits()) {
        if let Some(f) = fixture() {
            mutate_and_walk(&f.ext4, &edits);
        }
    }

    #[test]
    fn mutated_partition_tables_never_panic(
        edits in prop::collection::vec((0u64..2048, any::<u8>()), 1..16),
        gpt in any::<bool>(),
    ) {
        if let Some(f) = fixture() {
            let mut img = vec![0u8; 1 << 20];
            img[510] = 0x55;
            img[511] = 0xAA;
            if gpt {
                img[446 + 4] = 0xEE;
                img[512..520].copy_from_slice(b"EFI PART");
                img[512 + 72] = 2;
                img[512 + 80] = 128;
                img[512 + 84] = 128;
                img[1024] = 1;
                img[1024 + 32..1024 + 34].copy_from_slice(&2048u16.to_le_bytes());
                img[1024 + 40..1024 + 42].copy_from_slice(&(2048u16 + 4095).to_le_bytes());
            } else {
                img[446 + 4] = 0x83;
                img[446 + 9] = 8; // LBA 2048
                img[446 + 13] = 16; // 4096 sectors
            }
            img.extend_from_slice(&f.ext4);
            for &(at, byte) in &edits {
                img[at as usize] = byte;
            }
            let src = Mem(img);
            if let Ok(Some(m)) = map_blocks(&src, 65536, &[0, 16, 17, 1000]) {
                prop_assert_eq!(m.blocks.len(), 4);
            }
        }
    }

    #[test]
    fn mutated_ext2_never_panics(edits in prop::collection::vec((0u64..300_000, any::<u8>()), 1..8)) {
        if let Some(f) = fixture() {
            mutate_and_walk(&f.ext2, &edits);
        }
    }
}
