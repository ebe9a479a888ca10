//! Inodes and the blocks they own: extent trees (any depth) and old-style direct/indirect
//! block maps. Invariant: every block number is checked against the filesystem's size before
//! it is read or reported, and every tree block is reached at most once per walk (a second
//! visit is a loop or a cross-link, reported as `Ext4Error::Loop`).

use std::collections::HashSet;

use super::error::Ext4Error;
use super::layout::Layout;
use super::source::{le16, le32, Cached};

const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const S_IFDIR: u16 = 0x4000;
const S_IFLNK: u16 = 0xA000;
const FL_EXTENTS: u32 = 0x80000;
const FL_INLINE_DATA: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// The kernel's limit; anything deeper is corrupt.
const MAX_EXTENT_DEPTH: u16 = 5;

/// The fields of an inode this reader uses, plus its raw record (for inline data).
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    pub ino: u32,
    pub mode: u16,
    pub links: u16,
    pub flags: u32,
    pub size: u64,
    pub file_acl: u64,
    pub raw: Vec<u8>,
}

/// One thing an inode owns on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// Data blocks `[start, start + len)`, holding the file's blocks from `logical` on
    /// (zeros when `uninit`: an allocated but unwritten extent).
    Data {
        logical: u64,
        start: u64,
        len: u64,
        uninit: bool,
    },
    /// An extent tree node or an indirect block.
    Node(u64),
    /// The extended-attribute block.
    Xattr(u64),
}

impl Inode {
    pub fn read(c: &mut Cached<'_>, l: &Layout, ino: u32) -> Result<Inode, Ext4Error> {
        let mut raw = vec![0u8; l.sb.inode_size as usize];
        c.read(l.inode_offset(ino)?, &mut raw)?;
        let is64 = l.sb.desc_size >= 64;
        let acl_hi = if is64 { u64::from(le16(&raw, 0x76)) } else { 0 };
        Ok(Inode {
            ino,
            mode: le16(&raw, 0x0),
            links: le16(&raw, 0x1A),
            flags: le32(&raw, 0x20),
            size: u64::from(le32(&raw, 0x4)) | u64::from(le32(&raw, 0x6C)) << 32,
            file_acl: u64::from(le32(&raw, 0x68)) | acl_hi << 32,
            raw,
        })
    }

    pub fn in_use(&self) -> bool {
        self.mode != 0 && self.links != 0
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_regular(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    /// A symlink whose target lies in `i_block` itself.
    pub fn is_fast_symlink(&self) -> bool {
        self.is_symlink() && !self.is_inline() && !self.maps_blocks()
    }
    pub fn uses_extents(&self) -> bool {
        self.flags & FL_EXTENTS != 0
    }
    pub fn is_inline(&self) -> bool {
        self.flags & FL_INLINE_DATA != 0
    }
    /// The 60 bytes of `i_block`: block map, extent root, inline data or a fast symlink.
    pub fn i_block(&self) -> &[u8] {
        self.raw.get(0x28..0x28 + 60).unwrap_or(&[])
    }

    /// Whether `i_block` describes blocks at all (not a device, inline data or fast symlink).
    fn maps_blocks(&self) -> bool {
        let kind = self.mode & S_IFMT;
        if self.is_inline() {
            return false;
        }
        match kind {
            S_IFREG | S_IFDIR => true,
            S_IFLNK => self.flags & FL_EXTENTS != 0 || self.size >= 60,
            _ => false,
        }
    }

    /// Reports every run this inode owns to `emit`. `visited` holds the tree blocks seen so far
    /// in the whole walk.
    pub fn runs(
        &self,
        c: &mut Cached<'_>,
        l: &Layout,
        visited: &mut HashSet<u64>,
        emit: &mut dyn FnMut(Run),
    ) -> Result<(), Ext4Error> {
        if self.file_acl != 0 {
            if self.file_acl >= l.sb.blocks_count {
                return Err(Ext4Error::BadInode {
                    ino: u64::from(self.ino),
                    why: "xattr block outside the filesystem",
                });
            }
            emit(Run::Xattr(self.file_acl));
        }
        if !self.maps_blocks() {
            return Ok(());
        }
        let mut w = TreeWalk {
            c,
            l,
            ino: self.ino,
            visited,
            emit,
        };
        if self.flags & FL_EXTENTS != 0 {
            w.extents(self.i_block(), None)
        } else {
            w.block_map(self.i_block())
        }
    }
}

struct TreeWalk<'a, 'c> {
    c: &'a mut Cached<'c>,
    l: &'a Layout,
    ino: u32,
    visited: &'a mut HashSet<u64>,
    emit: &'a mut dyn FnMut(Run),
}

impl TreeWalk<'_, '_> {
    fn inside(&self, start: u64, len: u64) -> bool {
        start >= self.l.sb.first_data_block
            && start
                .checked_add(len)
                .is_some_and(|e| e <= self.l.sb.blocks_count)
    }

    /// Reads tree block `b` once per walk.
    fn tree_block(&mut self, b: u64) -> Result<Vec<u8>, Ext4Error> {
        if !self.visited.insert(b) {
            return Err(Ext4Error::Loop {
                ino: self.ino,
                block: b,
            });
        }
        (self.emit)(Run::Node(b));
        let mut buf = vec![0u8; self.l.sb.block_size as usize];
        self.c.read(b * self.l.sb.block_size, &mut buf)?;
        Ok(buf)
    }

    fn extents(&mut self, node: &[u8], expect: Option<u16>) -> Result<(), Ext4Error> {
        let ino = self.ino;
        let bad = move |why| Ext4Error::BadExtents { ino, why };
        if le16(node, 0) != EXTENT_MAGIC {
            return Err(bad("bad node magic"));
        }
        let entries = usize::from(le16(node, 2));
        let max = usize::from(le16(node, 4));
        let depth = le16(node, 6);
        if entries > max || 12 + max * 12 > node.len() {
            return Err(bad("entry count exceeds the node"));
        }
        if depth > MAX_EXTENT_DEPTH || expect.is_some_and(|d| d != depth) {
            return Err(bad("depth out of place"));
        }
        for i in 0..entries {
            let e = node
                .get(12 + i * 12..24 + i * 12)
                .ok_or(bad("entry past the node"))?;
            if depth == 0 {
                let raw_len = u64::from(le16(e, 4));
                // lengths above 32768 mark uninitialized extents; their blocks are still owned
                let uninit = raw_len > 32768;
                let len = if uninit { raw_len - 32768 } else { raw_len };
                let logical = u64::from(le32(e, 0));
                let start = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                if len == 0 || !self.inside(start, len) {
                    return Err(bad("extent outside the filesystem"));
                }
                (self.emit)(Run::Data {
                    logical,
                    start,
                    len,
                    uninit,
                });
            } else {
                let child = u64::from(le32(e, 4)) | u64::from(le16(e, 8)) << 32;
                if !self.inside(child, 1) {
                    return Err(bad("index node outside the filesystem"));
                }
                let block = self.tree_block(child)?;
                self.extents(&block, Some(depth - 1))?;
            }
        }
        Ok(())
    }

    fn block_map(&mut self, i_block: &[u8]) -> Result<(), Ext4Error> {
        for i in 0..12 {
            let b = u64::from(le32(i_block, i * 4));
            self.map_entry(b, 0, i as u64)?;
        }
        // each indirect level covers `per` times the file blocks of the one below
        let per = self.l.sb.block_size / 4;
        let mut logical = 12u64;
        let mut span = per;
        for (slot, level) in [(12usize, 1u32), (13, 2), (14, 3)] {
            let b = u64::from(le32(i_block, slot * 4));
            self.map_entry(b, level, logical)?;
            logical = logical.saturating_add(span);
            span = span.saturating_mul(per);
        }
        Ok(())
    }

    /// Entry `b` of a block map at `level` (0: a data block, n: an n-fold indirect block),
    /// covering the file's blocks from `logical` on.
    fn map_entry(&mut self, b: u64, level: u32, logical: u64) -> Result<(), Ext4Error> {
        if b == 0 {
            return Ok(()); // a hole
        }
        if !self.inside(b, 1) {
            return Err(Ext4Error::BadBlockMap {
                ino: self.ino,
                why: "block outside the filesystem",
            });
        }
        if level == 0 {
            (self.emit)(Run::Data {
                logical,
                start: b,
                len: 1,
                uninit: false,
            });
            return Ok(());
        }
        let block = self.tree_block(b)?;
        let per = self.l.sb.block_size / 4;
        let child_span = per.saturating_pow(level - 1);
        for (k, e) in block.chunks_exact(4).enumerate() {
            let at = logical.saturating_add((k as u64).saturating_mul(child_span));
            self.map_entry(u64::from(le32(e, 0)), level - 1, at)?;
        }
        Ok(())
    }
}
