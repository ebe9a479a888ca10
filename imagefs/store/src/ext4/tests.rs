//! Tests against real filesystems made by mkfs.ext4/mkfs.ext2 (-d from a generated tree) and
//! patched the way operators patch images: data overwritten in place at the blocks debugfs
//! reports, or files renamed/added/touched with debugfs -w.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::*;

pub(super) fn have_e2fsprogs() -> bool {
    Path::new("/usr/sbin/mkfs.ext4").exists() && Path::new("/usr/sbin/debugfs").exists()
}

/// Deterministic pseudo-random bytes.
pub(super) fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes `(path, bytes)` files under `root`.
pub(super) fn tree(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (p, data) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
}

/// Runs `mkfs` (e.g. "mkfs.ext4") with `opts` on `root` into `img` of `size` ("64M").
pub(super) fn mkfs(mkfs: &str, opts: &[&str], root: &Path, img: &Path, size: &str) {
    let out = Command::new(format!("/usr/sbin/{mkfs}"))
        .args(["-q", "-F", "-E", "root_owner=0:0"])
        .args(opts)
        .arg("-d")
        .arg(root)
        .arg(img)
        .arg(size)
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mkfs}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs debugfs commands on `img` (one -R takes one command, so a script file is used).
pub(super) fn debugfs(img: &Path, write: bool, cmds: &[&str]) -> String {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), cmds.join("\n") + "\n").unwrap();
    let mut c = Command::new("/usr/sbin/debugfs");
    if write {
        c.arg("-w");
    }
    let out = c
        .arg("-f")
        .arg(script.path())
        .arg(img)
        .env("E2FSPROGS_FAKE_TIME", "1700000500")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The data blocks of `path` as debugfs lists them.
pub(super) fn blocks_of(img: &Path, path: &str) -> Vec<u64> {
    debugfs(img, false, &[&format!("blocks {path}")])
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The tree blocks debugfs's `stat` names with `tag` (e.g. "ETB0", "IND", "DIND").
pub(super) fn tagged_blocks(img: &Path, path: &str, tag: &str) -> Vec<u64> {
    let s = debugfs(img, false, &[&format!("stat {path}")]);
    let pat = format!("({tag}):");
    s.split(", ")
        .flat_map(|p| p.split_whitespace())
        .filter_map(|w| w.strip_prefix(&pat).and_then(|n| n.parse().ok()))
        .collect()
}

fn copy(a: &Path, name: &str) -> PathBuf {
    let b = a.with_file_name(name);
    std::fs::copy(a, &b).unwrap();
    b
}

fn overwrite_block(img: &Path, fs_block: u64, bs: u64, seed: &str) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&noise(seed, bs as usize), fs_block * bs)
        .unwrap();
}

/// Indexes of the `ibs`-byte blocks that differ between two files of equal size.
pub(super) fn changed_blocks(a: &Path, b: &Path, ibs: u64) -> Vec<u64> {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.chunks(ibs as usize)
        .zip(y.chunks(ibs as usize))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i as u64)
        .collect()
}

fn diff(a: &Path, b: &Path, ibs: u64) -> FileMap {
    let changed = changed_blocks(a, b, ibs);
    assert!(!changed.is_empty(), "the patch changed nothing");
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    map_diff(&fa, &fb, ibs, &changed).unwrap().unwrap()
}

fn set(paths: &[&str]) -> BTreeSet<String> {
    paths.iter().map(|s| s.to_string()).collect()
}

/// A small system-like tree: configs, binaries, a nested directory.
fn base_tree(root: &Path) {
    let mut files = Vec::new();
    for i in 0..20 {
        files.push((
            format!("etc/conf{i}"),
            format!("setting{i} = 1\n").repeat(40).into_bytes(),
        ));
        files.push((
            format!("usr/bin/tool{i}"),
            noise(&format!("tool{i}"), 200_000 + i * 1000),
        ));
    }
    files.push(("opt/app/lib/deep/x.so".into(), noise("x.so", 300_000)));
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    tree(root, &refs);
}

/// A fs block of `path` whose whole 64 KiB image block holds only that file's data.
fn lone_block(img: &Path, path: &str) -> u64 {
    let blocks: BTreeSet<u64> = blocks_of(img, path).into_iter().collect();
    *blocks
        .iter()
        .find(|&&b| b % 16 == 0 && (b..b + 16).all(|x| blocks.contains(&x)))
        .expect("a file spanning a whole image block")
}

#[test]
fn data_only_change_names_exactly_that_file_and_no_metadata() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    base_tree(&dir.path().join("root"));
    let a = dir.path().join("a.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096"],
        &dir.path().join("root"),
        &a,
        "64M",
    );
    let b = copy(&a, "b.img");
    let fb = lone_block(&a, "/usr/bin/tool3");
    overwrite_block(&b, fb + 3, 4096, "patch");

    let m = diff(&a, &b, 65536);
    assert_eq!(m.files(), set(&["/usr/bin/tool3"]));
    assert!(!m.metadata_changed(), "{:?}", m.metadata());
    assert_eq!(m.blocks.len(), 1);
    assert_eq!(m.blocks[0].unowned_fs_blocks, 0);

    // one version alone, at the store's granularity, says the same
    let changed = changed_blocks(&a, &b, 65536);
    let one = map_blocks(&File::open(&b).unwrap(), 65536, &changed)
        .unwrap()
        .unwrap();
    assert_eq!(one.files(), set(&["/usr/bin/tool3"]));
    assert!(!one.metadata_changed());

    // a data change in a deeply nested file names its full path
    let c = copy(&a, "c.img");
    let xb = blocks_of(&a, "/opt/app/lib/deep/x.so");
    overwrite_block(&c, xb[xb.len() / 2], 4096, "x");
    assert_eq!(
        diff(&a, &c, 65536).files(),
        set(&["/opt/app/lib/deep/x.so"])
    );
}

#[test]
fn rename_and_new_file_show_the_directory_and_metadata() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    base_tree(&dir.path().join("root"));
    let a = dir.path().join("a.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096"],
        &dir.path().join("root"),
        &a,
        "64M",
    );

    let b = copy(&a, "b.img");
    debugfs(
        &b,
        true,
        &["ln /etc/conf1 /etc/renamed", "unlink /etc/conf1"],
    );
    let m = diff(&a, &b, 65536);
    assert!(m.metadata_changed());
    assert!(
        m.metadata().contains(&Metadata::Directory),
        "{:?}",
        m.metadata()
    );
    assert!(m.files().contains("/etc"), "{:?}", m.files());
    assert!(
        !m.files().iter().any(|f| f.starts_with("/usr")),
        "{:?}",
        m.files()
    );

    let c = copy(&a, "c.img");
    let host = dir.path().join("new.conf");
    std::fs::write(&host, noise("new", 50_000)).unwrap();
    debugfs(
        &c,
        true,
        &[&format!("write {} /etc/new.conf", host.display())],
    );
    let m = diff(&a, &c, 65536);
    assert!(m.metadata_changed());
    let files = m.files();
    assert!(files.contains("/etc"), "{files:?}");
    assert!(files.contains("/etc/new.conf"), "{files:?}");
    assert!(
        m.metadata().contains(&Metadata::BlockBitmap),
        "{:?}",
        m.metadata()
    );
    assert!(!files.iter().any(|f| f.starts_with("/usr")), "{files:?}");
}

#[test]
fn a_changed_inode_names_only_that_file() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    base_tree(&dir.path().join("root"));
    let a = dir.path().join("a.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096"],
        &dir.path().join("root"),
        &a,
        "64M",
    );
    let b = copy(&a, "b.img");
    debugfs(&b, true, &["sif /usr/bin/tool7 mtime 20200101000000"]);
    let m = diff(&a, &b, 65536);
    assert_eq!(m.files(), set(&["/usr/bin/tool7"]));
    assert_eq!(m.metadata(), [Metadata::InodeTable].into_iter().collect());

    // without a comparison, the inode-table block names every file with an inode there
    let changed = changed_blocks(&a, &b, 65536);
    let one = map_blocks(&File::open(&b).unwrap(), 65536, &changed)
        .unwrap()
        .unwrap();
    assert!(one.files().contains("/usr/bin/tool7"));
    assert!(one.files().len() > 10, "{:?}", one.files());
}

#[test]
fn fixed_metadata_and_the_journal_are_recognised() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    base_tree(&dir.path().join("root"));
    let a = dir.path().join("a.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096"],
        &dir.path().join("root"),
        &a,
        "64M",
    );
    let f = File::open(&a).unwrap();
    let ix = FsIndex::build(&f, Limits::default()).unwrap().unwrap();
    let m = ix.lookup(65536, &[0], None).unwrap();
    assert!(m.blocks[0].metadata.contains(&Metadata::Superblock));
    assert!(m.blocks[0].metadata.contains(&Metadata::GroupDescriptors));
    let journal = blocks_of(&a, "<8>");
    assert!(journal.len() > 100);
    let jb = journal[journal.len() / 2];
    let o = ix.owners(0, &[(jb, jb + 1)], None).unwrap();
    assert_eq!(o.metadata, [Metadata::Journal].into_iter().collect());
    assert!(o.files.is_empty());
    assert_eq!(ix.paths(2), vec!["/".to_string()]);
    assert!(ix.named_inodes() >= 40);
}

#[test]
fn not_ext4_gives_none() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("random.img");
    std::fs::write(&p, noise("random", 1 << 20)).unwrap();
    let f = File::open(&p).unwrap();
    assert!(map_blocks(&f, 65536, &[0, 3]).unwrap().is_none());
    assert!(map_diff(&f, &f, 65536, &[0]).unwrap().is_none());
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, b"short").unwrap();
    assert!(map_blocks(&File::open(&tiny).unwrap(), 4096, &[0])
        .unwrap()
        .is_none());
}

#[test]
fn old_style_block_maps_ext2_and_ext4_without_extents() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // 1 MiB on 1 KiB blocks needs a double-indirect block
    tree(
        &root,
        &[
            ("bin/big", noise("big", 1 << 20)),
            ("etc/motd", b"hi\n".to_vec()),
        ],
    );
    for (mk, opts) in [
        ("mkfs.ext2", vec!["-b", "1024"]),
        ("mkfs.ext4", vec!["-b", "4096", "-O", "^extent,^64bit"]),
    ] {
        let a = dir.path().join(format!("{mk}.img"));
        mkfs(mk, &opts, &root, &a, "16M");
        let bs = if mk == "mkfs.ext2" { 1024 } else { 4096 };
        let data = blocks_of(&a, "/bin/big");
        let b = copy(&a, "b.img");
        overwrite_block(&b, data[data.len() - 2], bs, "tail");
        let m = diff(&a, &b, 4096);
        assert_eq!(m.files(), set(&["/bin/big"]), "{mk}");
        assert!(!m.metadata_changed(), "{mk}");

        let ind = tagged_blocks(&a, "/bin/big", if bs == 1024 { "DIND" } else { "IND" });
        assert!(!ind.is_empty(), "{mk}: no indirect block");
        let c = copy(&a, "c.img");
        // zero the indirect block's first pointer (a hole now): a change of the tree alone
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&c)
            .unwrap();
        f.write_all_at(&[0u8; 4], ind[0] * bs).unwrap();
        let m = diff(&a, &c, 4096);
        assert!(
            m.metadata().contains(&Metadata::ExtentTree),
            "{mk}: {:?}",
            m.metadata()
        );
        assert!(m.files().contains("/bin/big"), "{mk}");
    }
}

#[test]
fn deep_extent_trees_are_walked() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    // 1500 separate extents: more than 4 leaves, so the tree is two levels deep
    let f = File::create(root.join("frag")).unwrap();
    for i in 0..1500u64 {
        f.write_all_at(&noise(&format!("frag{i}"), 4096), i * 8192)
            .unwrap();
    }
    drop(f);
    let a = dir.path().join("a.img");
    mkfs("mkfs.ext4", &["-b", "4096"], &root, &a, "64M");
    let top = tagged_blocks(&a, "/frag", "ETB0");
    let leaves = tagged_blocks(&a, "/frag", "ETB1");
    assert!(!top.is_empty() && leaves.len() >= 4, "not a depth-2 tree");

    let data: Vec<u64> = blocks_of(&a, "/frag")
        .into_iter()
        .filter(|b| !top.contains(b) && !leaves.contains(b))
        .collect();
    assert_eq!(data.len(), 1500);
    let b = copy(&a, "b.img");
    overwrite_block(&b, data[1499], 4096, "last");
    let m = diff(&a, &b, 65536);
    assert_eq!(m.files(), set(&["/frag"]));
    assert!(!m.metadata_changed());

    let c = copy(&a, "c.img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&c)
        .unwrap();
    f.write_all_at(&[0xAB; 4], leaves[2] * 4096 + 4092).unwrap(); // slack after the entries
    let m = diff(&a, &c, 65536);
    assert_eq!(m.files(), set(&["/frag"]));
    assert_eq!(m.metadata(), [Metadata::ExtentTree].into_iter().collect());
}

#[test]
fn inline_directories_are_read() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let names: Vec<String> = (1..=4).map(|i| format!("mid/f{i}")).collect();
    let files: Vec<(&str, Vec<u8>)> = names.iter().map(|n| (n.as_str(), noise(n, 8192))).collect();
    tree(&root, &files);
    tree(&root, &[("tiny/t", b"inline bytes".to_vec())]);
    let a = dir.path().join("a.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096", "-O", "inline_data"],
        &root,
        &a,
        "32M",
    );
    let stat = debugfs(&a, false, &["stat /mid"]);
    assert!(
        stat.contains("Flags: 0x10000000"),
        "/mid is not inline: {stat}"
    );
    let ix = FsIndex::build(&File::open(&a).unwrap(), Limits::default())
        .unwrap()
        .unwrap();
    for n in &names {
        let b = blocks_of(&a, &format!("/{n}"))[0];
        let o = ix.owners(0, &[(b, b + 1)], None).unwrap();
        assert_eq!(o.files, set(&[&format!("/{n}")]));
    }
    // inline data has no blocks, but its inode does
    let out = debugfs(&a, false, &["stat /tiny/t"]);
    assert!(out.contains("Size of inline data"), "{out}");
}

#[test]
fn walking_many_files_is_fast() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in 0..100 {
        let p = root.join(format!("d{d}"));
        std::fs::create_dir_all(&p).unwrap();
        for i in 0..100 {
            std::fs::write(p.join(format!("file-{i}")), [d as u8; 3000]).unwrap();
        }
    }
    tree(&root, &[("big", noise("big", 64 << 20))]);
    let a = dir.path().join("a.img");
    mkfs("mkfs.ext4", &["-b", "4096"], &root, &a, "256M");
    let f = File::open(&a).unwrap();
    let t = Instant::now();
    let ix = FsIndex::build(&f, Limits::default()).unwrap().unwrap();
    let took = t.elapsed();
    eprintln!("indexed {} named inodes in {took:?}", ix.named_inodes());
    assert!(ix.named_inodes() >= 10_100);
    assert!(took.as_secs_f64() < 5.0, "{took:?}");
    let b = blocks_of(&a, "/d57/file-9")[0];
    let o = ix.owners(0, &[(b, b + 1)], None).unwrap();
    assert_eq!(o.files, set(&["/d57/file-9"]));
}

/// `fs` placed at 1 MiB behind an MBR (`gpt` false) or a GPT (`gpt` true) partition table.
pub(super) fn partitioned(fs: &Path, out: &Path, gpt: bool) {
    let body = std::fs::read(fs).unwrap();
    let mut img = vec![0u8; 1 << 20];
    let sectors = (body.len() / 512) as u64;
    img[510] = 0x55;
    img[511] = 0xAA;
    if gpt {
        img[446 + 4] = 0xEE;
        img[512..520].copy_from_slice(b"EFI PART");
        img[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        img[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        img[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        // entry 0 (at LBA 2): an EFI system partition first, with no filesystem of ours
        img[1024..1040].copy_from_slice(&[0x28; 16]);
        img[1024 + 32..1024 + 40].copy_from_slice(&40u64.to_le_bytes());
        img[1024 + 40..1024 + 48].copy_from_slice(&100u64.to_le_bytes());
        // entry 1: the Linux root filesystem
        img[1152..1168].copy_from_slice(&[0xAF; 16]);
        img[1152 + 32..1152 + 40].copy_from_slice(&2048u64.to_le_bytes());
        img[1152 + 40..1152 + 48].copy_from_slice(&(2048 + sectors - 1).to_le_bytes());
    } else {
        img[446 + 4] = 0x83;
        img[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        img[446 + 12..446 + 16].copy_from_slice(&(sectors as u32).to_le_bytes());
    }
    img.extend_from_slice(&body);
    std::fs::write(out, img).unwrap();
}

#[test]
fn filesystems_inside_mbr_and_gpt_partitions_are_found() {
    if !have_e2fsprogs() {
        loud_skip!("e2fsprogs (mkfs.ext4, debugfs) missing");
    }
    let dir = tempfile::tempdir().unwrap();
    base_tree(&dir.path().join("root"));
    let bare = dir.path().join("bare.img");
    mkfs(
        "mkfs.ext4",
        &["-b", "4096"],
        &dir.path().join("root"),
        &bare,
        "32M",
    );
    let fb = lone_block(&bare, "/usr/bin/tool5");
    for gpt in [false, true] {
        let a = dir.path().join("a.img");
        partitioned(&bare, &a, gpt);
        assert_eq!(
            locate(&File::open(&a).unwrap()).unwrap(),
            Some((1 << 20, 32 << 20))
        );
        let b = copy(&a, "b.img");
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&noise("p", 4096), (1 << 20) + (fb + 5) * 4096)
            .unwrap();
        let m = diff(&a, &b, 65536);
        assert_eq!(m.files(), set(&["/usr/bin/tool5"]), "gpt {gpt}");
        assert_eq!(m.fs_offset, 1 << 20);
        assert!(!m.metadata_changed());
        // the image block holding the partition's superblock is metadata
        let one = map_blocks(&File::open(&a).unwrap(), 65536, &[0, 16])
            .unwrap()
            .unwrap();
        assert!(
            one.blocks[0].metadata.is_empty(),
            "the partition table is not ext4"
        );
        assert!(one.blocks[1].metadata.contains(&Metadata::Superblock));
    }
}
