//! Reading files by path from real filesystems (mkfs.ext4/mkfs.ext2 -d of a generated tree):
//! every file's blake3 must equal the host's blake3 of the source file, whatever its layout
//! (extent trees of depth > 0, block maps, holes, unwritten extents, inline data, symlinks),
//! and mutated images must end in `Ok` or a typed error, never a panic.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::{debugfs, have_e2fsprogs, mkfs, noise, partitioned, tagged_blocks, tree};
use super::tests_corrupt::{fixture, Mem};
use super::*;

/// A sparse file of `len` bytes with `pieces` of data at the given offsets (holes elsewhere).
fn sparse(path: &Path, len: u64, pieces: &[(u64, usize)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = File::create(path).unwrap();
    for (i, &(at, n)) in pieces.iter().enumerate() {
        f.write_all_at(&noise(&format!("{}{i}", path.display()), n), at)
            .unwrap();
    }
    f.set_len(len).unwrap();
}

/// Every regular file under `root` (guest path, host blake3).
fn host_hashes(root: &Path) -> Vec<(String, blake3::Hash)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let t = std::fs::symlink_metadata(&p).unwrap().file_type();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let guest = format!("/{}", p.strip_prefix(root).unwrap().display());
                out.push((guest, blake3::hash(&std::fs::read(&p).unwrap())));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Asserts every file of `root` reads back from `img` with the host's hash.
fn assert_all_match(img: &Path, root: &Path) -> usize {
    let f = File::open(img).unwrap();
    let files = host_hashes(root);
    with_image(&f, Limits::default(), |r| {
        for (path, want) in &files {
            assert_eq!(r.hash(path).unwrap(), Some(*want), "{path} in {img:?}");
        }
    })
    .unwrap();
    files.len()
}

/// Files of many sizes and layouts under `root`.
fn varied_tree(root: &Path) {
    let sizes = [
        0usize,
        1,
        59,
        60,
        61,
        1023,
        1024,
        1025,
        4095,
        4096,
        4097,
        70_000,
        1 << 20,
    ];
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .map(|&n| (format!("sizes/f{n}"), noise(&format!("s{n}"), n)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    tree(root, &refs);
    sparse(&root.join("sparse/hole-first"), 300_000, &[(200_000, 5000)]);
    sparse(&root.join("sparse/hole-last"), 1 << 20, &[(0, 10_000)]);
    sparse(
        &root.join("sparse/holes"),
        3 << 20,
        &[(0, 100), (1 << 20, 8192), (2 << 20, 1)],
    );
    sparse(&root.join("sparse/all-hole"), 123_457, &[]);
    tree(root, &[("a/b/c/d/e/deep", b"deep\n".to_vec())]);
}

#[test]
fn ext4_files_of_every_size_and_sparseness_read_back_exactly() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    varied_tree(&root);
    // 1500 separate extents: more than fit in the inode, so the tree is two levels deep
    let f = File::create(root.join("frag")).unwrap();
    for i in 0..1500u64 {
        f.write_all_at(&noise(&format!("frag{i}"), 4096), i * 8192)
            .unwrap();
    }
    drop(f);
    let img = dir.path().join("a.img");
    mkfs("mkfs.ext4", &["-b", "4096"], &root, &img, "64M");
    assert!(
        !tagged_blocks(&img, "/frag", "ETB1").is_empty(),
        "not a deep tree"
    );
    let t = Instant::now();
    let n = assert_all_match(&img, &root);
    eprintln!("{n} files hashed in {:?}", t.elapsed());
    assert!(n >= 18);
    // 1 KiB blocks make the same files span more blocks and deeper trees
    let img1k = dir.path().join("b.img");
    mkfs("mkfs.ext4", &["-b", "1024"], &root, &img1k, "64M");
    assert_all_match(&img1k, &root);
}

#[test]
fn ext2_block_maps_with_holes_read_back_exactly() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    varied_tree(&root);
    // 1 KiB blocks: 12 direct, 256 single, 65536 double indirect; past that, triple indirect
    sparse(
        &root.join("sparse/triple"),
        70 << 20,
        &[(0, 10), (300 << 10, 2000), (69 << 20, 3000)],
    );
    let img = dir.path().join("a.img");
    mkfs("mkfs.ext2", &["-b", "1024"], &root, &img, "32M");
    assert!(
        !tagged_blocks(&img, "/sparse/triple", "TIND").is_empty(),
        "no triple indirect"
    );
    assert_all_match(&img, &root);
    // ext4 without the extents feature uses the same maps
    let img4 = dir.path().join("b.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096", "-O", "^extents,^64bit"],
        &root,
        &img4,
        "32M",
    );
    assert_all_match(&img4, &root);
}

#[test]
fn inline_data_files_read_back_exactly() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // 12 bytes fit in i_block; 100 bytes spill into the in-inode "system.data" attribute
    tree(
        &root,
        &[
            ("tiny/t", b"inline bytes".to_vec()),
            ("tiny/spill", noise("spill", 100)),
            ("tiny/empty", Vec::new()),
            ("big", noise("big", 9000)),
        ],
    );
    let img = dir.path().join("a.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096", "-I", "256", "-O", "inline_data"],
        &root,
        &img,
        "16M",
    );
    for p in ["/tiny/t", "/tiny/spill"] {
        let out = debugfs(&img, false, &[&format!("stat {p}")]);
        assert!(out.contains("Size of inline data"), "{p} not inline: {out}");
    }
    assert_eq!(assert_all_match(&img, &root), 4);
}

#[test]
fn unwritten_extents_read_as_zeros_not_as_their_blocks() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    sparse(&root.join("pre"), 40_960, &[(0, 4096)]);
    let img = dir.path().join("a.img");
    mkfs("mkfs.ext4", &["-b", "4096"], &root, &img, "8M");
    debugfs(&img, true, &["fallocate /pre 2 5"]);
    let stat = debugfs(&img, false, &["stat /pre"]);
    let phys: u64 = stat
        .split_whitespace()
        .find_map(|w| w.strip_prefix("(2-5[u]):"))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unwritten extent: {stat}"));
    // stale bytes in the unwritten blocks must not show through
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&noise("stale", 4 * 4096), phys * 4096)
        .unwrap();
    assert_all_match(&img, &root);
}

#[test]
fn symlinks_are_followed_and_missing_paths_are_none() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = noise("target", 5000);
    tree(
        &root,
        &[
            ("usr/lib/libx.so.1", data.clone()),
            ("etc/conf", b"c".to_vec()),
        ],
    );
    let long = "../usr/lib/../lib/libx.so.1";
    std::os::unix::fs::symlink("libx.so.1", root.join("usr/lib/libx.so")).unwrap();
    std::os::unix::fs::symlink("/usr/lib/libx.so", root.join("etc/abs")).unwrap();
    std::os::unix::fs::symlink(long, root.join("etc/rel")).unwrap();
    // a slow symlink: the target does not fit in the inode's 60 bytes
    let slow = format!("/{}/../usr/lib/libx.so", "./".repeat(40));
    std::os::unix::fs::symlink(&slow, root.join("etc/slow")).unwrap();
    std::os::unix::fs::symlink("lib", root.join("usr/libdir")).unwrap();
    std::os::unix::fs::symlink("loop2", root.join("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", root.join("loop2")).unwrap();
    std::os::unix::fs::symlink("/nowhere", root.join("dangling")).unwrap();
    let img = dir.path().join("a.img");
    mkfs("mkfs.ext4", &["-b", "1024"], &root, &img, "8M");
    let want = blake3::hash(&data);
    let f = File::open(&img).unwrap();
    for p in [
        "/usr/lib/libx.so.1",
        "usr/lib/libx.so",
        "/etc/abs",
        "/etc/rel",
        "/etc/slow",
        "/usr/libdir/libx.so",
        "//usr/./lib/../lib/libx.so.1",
    ] {
        assert_eq!(file_hash(&f, p).unwrap(), Some(want), "{p}");
    }
    for p in ["/nope", "/etc/conf/x", "/dangling", "/usr/lib/libx.so.2"] {
        assert_eq!(file_hash(&f, p).unwrap(), None, "{p}");
    }
    let e = file_hash(&f, "/loop1").unwrap_err();
    assert!(matches!(e, Ext4Error::SymlinkLoop { .. }), "{e}");
    let e = file_hash(&f, "/usr/libdir").unwrap_err();
    assert!(
        matches!(
            e,
            Ext4Error::NotAFile {
                kind: "directory",
                ..
            }
        ),
        "{e}"
    );
    let info = with_image(&f, Limits::default(), |r| r.stat("/etc/abs"))
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((info.kind, info.size), (FileKind::Regular, 5000));
    // a partitioned image (MBR and GPT) gives the same bytes
    for gpt in [false, true] {
        let p = dir.path().join(format!("p{gpt}.img"));
        partitioned(&img, &p, gpt);
        assert_eq!(
            file_hash(&File::open(&p).unwrap(), "/etc/abs").unwrap(),
            Some(want)
        );
    }
    let not = dir.path().join("zeros.img");
    std::fs::write(&not, vec![0u8; 1 << 20]).unwrap();
    let e = file_hash(&File::open(&not).unwrap(), "/x").unwrap_err();
    assert!(matches!(e, Ext4Error::NoFilesystem), "{e}");
}

#[test]
fn the_fixture_files_read_back_and_time_is_bounded() {
    let Some(f) = fixture() else {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing")
    };
    let m = Mem(f.ext4.clone());
    assert_eq!(
        file_hash(&m, "/bin/big").unwrap(),
        Some(blake3::hash(&noise("big", 300_000)))
    );
    assert_eq!(
        file_hash(&m, "/a/b/c/d").unwrap(),
        Some(blake3::hash(b"deep"))
    );
    let m2 = Mem(f.ext2.clone());
    assert_eq!(
        file_hash(&m2, "/bin/big").unwrap(),
        Some(blake3::hash(&noise("big", 300_000)))
    );
    let none = Limits {
        time: Duration::ZERO,
    };
    let e = match with_image(&m, none, |r| r.hash("/bin/big")) {
        Err(e) | Ok(Err(e)) => e,
        Ok(Ok(h)) => panic!("read with no time left: {h:?}"),
    };
    assert!(matches!(e, Ext4Error::Budget("time")), "{e}");
}

fn mutate_and_read(base: &[u8], edits: &[(u64, u8)]) {
    let mut img = base.to_vec();
    for &(at, byte) in edits {
        if let Some(b) = img.get_mut(at as usize) {
            *b = byte;
        }
    }
    let t = Instant::now();
    let limits = Limits {
        time: Duration::from_secs(5),
    };
    let _ = with_image(&Mem(img), limits, |r| {
        for p in [
            "/bin/big",
            "/frag",
            "/a/b/c/d",
            "/dir/entry-with-a-long-name-77",
            "/nope",
        ] {
            let _ = r.hash(p);
        }
    });
    assert!(t.elapsed() < Duration::from_secs(12));
}

/// Offsets worth damaging: superblock, descriptors, inode tables, tree and directory blocks.
fn hot(f: &super::tests_corrupt::Fixture) -> BoxedStrategy<u64> {
    let etb = f.etb[0] * 1024;
    let dir = f.dir_block * 1024;
    prop_oneof![
        (1024u64..4096),
        (4096u64..80_000),
        (etb..etb + 1024),
        (dir..dir + 1024),
        (0u64..2 * 1024 * 1024),
    ]
    .boxed()
}

fn edits() -> BoxedStrategy<Vec<(u64, u8)>> {
    match fixture() {
        Some(f) => prop::collection::vec((hot(f), any::<u8>()), 1..8).boxed(),
        None => Just(Vec::new()).boxed(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn mutated_ext4_reads_never_panic(e in edits()) {
        if let Some(f) = fixture() {
            mutate_and_read(&f.ext4, &e);
        }
    }

    #[test]
    fn mutated_ext2_reads_never_panic(e in prop::collection::vec((0u64..400_000, any::<u8>()), 1..8)) {
        if let Some(f) = fixture() {
            mutate_and_read(&f.ext2, &e);
        }
    }
}

#[test]
fn files_read_back_from_a_store_version() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    varied_tree(&root);
    tree(&root, &[("opt/big", noise("big", 8 << 20))]);
    let img = dir.path().join("a.img");
    mkfs("mkfs.ext4", &["-b", "4096"], &root, &img, "48M");
    let store = crate::Store::init(&dir.path().join("store")).unwrap();
    let mut src = crate::open_image(&img).unwrap();
    let name = crate::ImageName::new("web").unwrap();
    let rep = store
        .import(&name, Some(65536), src.as_mut(), &mut |_| {})
        .unwrap();
    let version = store.version(&rep.id).unwrap();
    let v = VersionReader {
        store: &store,
        version: &version,
    };
    let t = Instant::now();
    let got = file_hash(&v, "/opt/big").unwrap();
    eprintln!(
        "8 MiB file hashed from a store version in {:?}",
        t.elapsed()
    );
    assert_eq!(got, Some(blake3::hash(&noise("big", 8 << 20))));
    for (path, want) in host_hashes(&root) {
        assert_eq!(file_hash(&v, &path).unwrap(), Some(want), "{path}");
    }
}
