//! The per-version index: one walk of the filesystem (fixed metadata, special inodes, then the
//! directory tree from the root) builds a sorted map of fs-block runs to owners and the names
//! of every reachable inode; lookups of changed image blocks are then binary searches.
//! Invariant: the walk reads each inode and tree block at most once and stops with a typed
//! error when the filesystem is corrupt or the time/read budget is spent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::dir::{self, Entry};
use super::error::Ext4Error;
use super::inode::{Inode, Run};
use super::layout::{Layout, Owner, Span};
use super::source::{Cached, ReadAt};
use super::{BlockFiles, FileMap, Metadata};

const ROOT_INO: u32 = 2;
const RESIZE_INO: u32 = 7;
/// Longest parent chain followed when naming a directory.
const MAX_PATH_DEPTH: usize = 4096;

/// inode -> (parent directory, name) for each of its links.
type Links = HashMap<u32, Vec<(u32, Box<[u8]>)>>;

/// Bounds of one walk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time the walk may take.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            time: Duration::from_secs(120),
        }
    }
}

/// Who owns every fs block of one filesystem, and every reachable inode's names.
#[derive(Debug)]
pub struct FsIndex {
    layout: Layout,
    /// Sorted by first block.
    spans: Vec<Span>,
    /// Longest span, so an overlap search can start early enough.
    max_len: u64,
    /// inode -> (parent directory, name) for each of its links.
    links: Links,
}

impl FsIndex {
    /// Walks the filesystem in `src`. `Ok(None)`: not ext2/3/4 (no superblock magic).
    pub fn build(src: &dyn ReadAt, limits: Limits) -> Result<Option<FsIndex>, Ext4Error> {
        // each inode, tree block and directory block is read once; the bound is set below
        let mut c = Cached::new(src, limits.time, 1 << 20);
        let Some(layout) = Layout::read(&mut c)? else {
            return Ok(None);
        };
        let sb = &layout.sb;
        c.set_reads_left(
            u64::from(sb.inodes_count)
                .saturating_add(sb.blocks_count)
                .saturating_add(64),
        );
        let mut w = Walk {
            c,
            layout: &layout,
            spans: layout.meta_spans(),
            max_spans: sb.blocks_count.saturating_mul(2).saturating_add(1 << 20),
            visited: HashSet::new(),
            links: HashMap::new(),
        };
        if sb.journal_ino != 0 {
            w.special(sb.journal_ino, Metadata::Journal)?;
        }
        for &ino in &sb.special_inodes {
            w.special(ino, Metadata::SpecialInode)?;
        }
        w.tree()?;
        let Walk {
            mut spans, links, ..
        } = w;
        spans.sort_unstable_by_key(|s| (s.0, s.1));
        let max_len = spans.iter().map(|s| s.1).max().unwrap_or(0);
        Ok(Some(FsIndex {
            layout,
            spans,
            max_len,
            links,
        }))
    }

    /// The filesystem's block size.
    pub fn fs_block_size(&self) -> u64 {
        self.layout.sb.block_size
    }

    /// Number of inodes reachable from the root (with at least one name).
    pub fn named_inodes(&self) -> usize {
        self.links.len()
    }

    /// Every path of inode `ino` ("/" for the root; empty when it has no name).
    pub fn paths(&self, ino: u32) -> Vec<String> {
        if ino == ROOT_INO {
            return vec!["/".to_string()];
        }
        let Some(links) = self.links.get(&ino) else {
            return Vec::new();
        };
        links
            .iter()
            .map(|(parent, name)| {
                format!(
                    "{}/{}",
                    self.dir_path(*parent),
                    String::from_utf8_lossy(name)
                )
            })
            .collect()
    }

    /// The path of directory `ino` without a trailing slash ("" for the root).
    fn dir_path(&self, mut ino: u32) -> String {
        let mut parts: Vec<&[u8]> = Vec::new();
        for _ in 0..MAX_PATH_DEPTH {
            if ino == ROOT_INO {
                parts.reverse();
                let mut s = String::new();
                for p in parts {
                    s.push('/');
                    s.push_str(&String::from_utf8_lossy(p));
                }
                return s;
            }
            match self.links.get(&ino).and_then(|l| l.first()) {
                Some((parent, name)) => {
                    parts.push(name);
                    ino = *parent;
                }
                None => break,
            }
        }
        format!("<inode {ino}>")
    }

    /// Owners of each changed image block (of `image_block_size` bytes). With `compare` (this
    /// version's image and the other version's, same geometry), a changed inode-table block
    /// names only the inodes whose records differ; otherwise every named inode in it.
    pub fn lookup(
        &self,
        image_block_size: u64,
        changed: &[u64],
        compare: Option<(&dyn ReadAt, &dyn ReadAt)>,
    ) -> Result<FileMap, Ext4Error> {
        let fbs = self.fs_block_size();
        let mut out = FileMap {
            fs_block_size: fbs,
            fs_offset: 0,
            blocks: Vec::with_capacity(changed.len()),
        };
        for &b in changed {
            let start = b.saturating_mul(image_block_size);
            let end = start.saturating_add(image_block_size);
            let range = (start / fbs, end.div_ceil(fbs));
            out.blocks.push(self.owners(b, &[range], compare)?);
        }
        Ok(out)
    }

    /// Owners of the fs blocks `ranges` (each `[lo, hi)`), reported as image block `block`.
    pub fn owners(
        &self,
        block: u64,
        ranges: &[(u64, u64)],
        compare: Option<(&dyn ReadAt, &dyn ReadAt)>,
    ) -> Result<BlockFiles, Ext4Error> {
        let total = self.layout.sb.blocks_count;
        let mut bf = BlockFiles {
            block,
            ..BlockFiles::default()
        };
        for &(lo, hi) in ranges {
            let (lo, hi) = (lo.min(total), hi.min(total));
            let first = self
                .spans
                .partition_point(|s| s.0.saturating_add(self.max_len) <= lo);
            let mut covered = 0u64;
            for &(s0, len, owner) in self.spans.get(first..).unwrap_or(&[]) {
                if s0 >= hi {
                    break;
                }
                let (a, z) = (s0.max(lo), s0.saturating_add(len).min(hi));
                if a >= z {
                    continue;
                }
                covered = covered.saturating_add(z - a);
                self.attribute(owner, a, z, compare, &mut bf)?;
            }
            bf.unowned_fs_blocks = bf
                .unowned_fs_blocks
                .saturating_add(hi.saturating_sub(lo).saturating_sub(covered));
        }
        Ok(bf)
    }

    fn attribute(
        &self,
        owner: Owner,
        a: u64,
        z: u64,
        compare: Option<(&dyn ReadAt, &dyn ReadAt)>,
        bf: &mut BlockFiles,
    ) -> Result<(), Ext4Error> {
        match owner {
            Owner::Meta(m) | Owner::Special(m) => {
                bf.metadata.insert(m);
            }
            Owner::File(i) => bf.files.extend(self.paths(i)),
            Owner::Dir(i) => {
                bf.metadata.insert(Metadata::Directory);
                bf.directories.extend(self.paths(i));
            }
            Owner::Tree(i) => {
                bf.metadata.insert(Metadata::ExtentTree);
                bf.files.extend(self.paths(i));
            }
            Owner::Xattr(i) => {
                bf.metadata.insert(Metadata::Xattr);
                bf.files.extend(self.paths(i));
            }
            Owner::InodeTable(g) => {
                bf.metadata.insert(Metadata::InodeTable);
                let range = self.layout.inodes_in(g, a, z);
                let differs = match compare {
                    Some((this, other)) => Some(self.changed_inodes(this, other, range.clone())?),
                    None => None,
                };
                for ino in range {
                    if differs.as_ref().is_none_or(|d| d.contains(&ino)) {
                        bf.inodes.extend(self.paths(ino));
                    }
                }
            }
        }
        Ok(())
    }

    /// The inodes of `range` whose records differ between the two images.
    fn changed_inodes(
        &self,
        this: &dyn ReadAt,
        other: &dyn ReadAt,
        range: std::ops::Range<u32>,
    ) -> Result<HashSet<u32>, Ext4Error> {
        let mut out = HashSet::new();
        if range.is_empty() {
            return Ok(out);
        }
        let isz = self.layout.sb.inode_size as usize;
        let off = self.layout.inode_offset(range.start)?;
        let len = range.len().saturating_mul(isz);
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        this.read_exact_at(off, &mut x)?;
        if other.read_exact_at(off, &mut y).is_err() {
            // the other image is shorter: every record here is new
            return Ok(range.collect());
        }
        for (i, (p, q)) in x.chunks(isz).zip(y.chunks(isz)).enumerate() {
            if p != q {
                out.insert(range.start + i as u32);
            }
        }
        Ok(out)
    }

    /// Whether `other` has the same inode tables (so inode records can be compared).
    pub fn same_geometry(&self, other: &FsIndex) -> bool {
        let (a, b) = (&self.layout, &other.layout);
        a.sb.inode_size == b.sb.inode_size
            && a.sb.inodes_per_group == b.sb.inodes_per_group
            && a.sb.block_size == b.sb.block_size
            && a.groups.len() == b.groups.len()
            && a.groups
                .iter()
                .zip(&b.groups)
                .all(|(g, h)| g.inode_table == h.inode_table)
    }
}

/// State of one walk.
struct Walk<'a, 'c> {
    c: Cached<'c>,
    layout: &'a Layout,
    spans: Vec<Span>,
    max_spans: u64,
    visited: HashSet<u64>,
    links: Links,
}

impl Walk<'_, '_> {
    /// Adds a run, merging it into the previous one when it continues it.
    fn push(&mut self, start: u64, len: u64, owner: Owner) -> Result<(), Ext4Error> {
        if let Some(last) = self.spans.last_mut() {
            if last.2 == owner && last.0.checked_add(last.1) == Some(start) {
                last.1 = last.1.saturating_add(len);
                return Ok(());
            }
        }
        if self.spans.len() as u64 >= self.max_spans {
            return Err(Ext4Error::Budget("too many block runs"));
        }
        self.spans.push((start, len, owner));
        Ok(())
    }

    /// Adds inode `ino`'s runs: data as `data`, tree nodes as `tree`; returns its data runs.
    fn runs(
        &mut self,
        inode: &Inode,
        data: Owner,
        tree: Owner,
    ) -> Result<Vec<(u64, u64)>, Ext4Error> {
        let mut got = Vec::new();
        inode.runs(&mut self.c, self.layout, &mut self.visited, &mut |r| {
            got.push(r)
        })?;
        let mut data_runs = Vec::new();
        for r in got {
            match r {
                Run::Data { start, len, .. } => {
                    data_runs.push((start, len));
                    self.push(start, len, data)?;
                }
                Run::Node(b) => self.push(b, 1, tree)?,
                Run::Xattr(b) => self.push(b, 1, Owner::Xattr(inode.ino))?,
            }
        }
        Ok(data_runs)
    }

    fn special(&mut self, ino: u32, kind: Metadata) -> Result<(), Ext4Error> {
        if ino == RESIZE_INO || ino == ROOT_INO {
            return Ok(()); // reserved GDT blocks come from the layout; the root is walked as a tree
        }
        let inode = Inode::read(&mut self.c, self.layout, ino)?;
        if inode.mode == 0 {
            return Ok(());
        }
        self.runs(&inode, Owner::Special(kind), Owner::Special(kind))?;
        Ok(())
    }

    /// Breadth-first walk of the directory tree from the root.
    fn tree(&mut self) -> Result<(), Ext4Error> {
        let sb = &self.layout.sb;
        let (bs, inodes_count) = (sb.block_size, sb.inodes_count);
        let root = Inode::read(&mut self.c, self.layout, ROOT_INO)?;
        if !root.is_dir() || !root.in_use() {
            return Err(Ext4Error::BadInode {
                ino: u64::from(ROOT_INO),
                why: "the root is not a directory",
            });
        }
        let mut walked: HashSet<u32> = HashSet::from([ROOT_INO]);
        let mut queue = VecDeque::from([root]);
        let mut block = vec![0u8; bs as usize];
        let mut entries: Vec<Entry> = Vec::new();
        while let Some(d) = queue.pop_front() {
            self.c.check_time()?;
            entries.clear();
            if d.is_inline() {
                dir::parse_inline(&d, bs, inodes_count, &mut entries)?;
                if d.file_acl != 0 {
                    self.runs(&d, Owner::Dir(d.ino), Owner::Tree(d.ino))?;
                }
            } else {
                for (start, len) in self.runs(&d, Owner::Dir(d.ino), Owner::Tree(d.ino))? {
                    for b in start..start.saturating_add(len) {
                        self.c.read(b * bs, &mut block)?;
                        dir::parse_block(d.ino, &block, bs, inodes_count, &mut entries)?;
                    }
                }
            }
            for e in entries.drain(..) {
                self.links
                    .entry(e.ino)
                    .or_default()
                    .push((d.ino, e.name.into_boxed_slice()));
                if !walked.insert(e.ino) {
                    continue; // a hard link (or a directory named twice): walked once
                }
                let child = Inode::read(&mut self.c, self.layout, e.ino)?;
                if !child.in_use() {
                    continue; // a stale entry pointing at a free inode owns nothing
                }
                if child.is_dir() {
                    queue.push_back(child);
                } else {
                    self.runs(&child, Owner::File(e.ino), Owner::Tree(e.ino))?;
                }
            }
        }
        Ok(())
    }
}
