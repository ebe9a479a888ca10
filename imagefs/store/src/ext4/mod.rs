//! A read-only ext2/3/4 reader that maps changed image blocks to the guest files, directories
//! and filesystem metadata living in them (for `imagefs diff --files` and the agent's notice).
//! Invariant: everything read from the image is untrusted; a corrupt or unsupported filesystem
//! gives an `Ext4Error`, never a panic or an unbounded walk, and an image without an ext
//! superblock gives `Ok(None)` so callers fall back to block ranges.

mod dir;
mod error;
mod index;
mod inode;
mod layout;
mod partition;
mod read;
mod source;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_corrupt;
#[cfg(test)]
mod tests_read;

use std::collections::BTreeSet;

use serde::Serialize;

pub use error::Ext4Error;
pub use index::{FsIndex, Limits};
pub use partition::{locate, Offset};
pub use read::{file_hash, with_image, FileInfo, FileKind, Reader};
pub use source::{ReadAt, VersionReader};

/// A kind of filesystem metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metadata {
    /// A superblock (or a backup copy, or the boot block before it).
    Superblock,
    /// A group descriptor table (or a backup copy).
    GroupDescriptors,
    /// Blocks reserved for growing the group descriptor table.
    ReservedGdt,
    /// A block allocation bitmap.
    BlockBitmap,
    /// An inode allocation bitmap.
    InodeBitmap,
    /// An inode table.
    InodeTable,
    /// Directory entries.
    Directory,
    /// Extent tree nodes or indirect blocks.
    ExtentTree,
    /// An extended-attribute block.
    Xattr,
    /// The journal.
    Journal,
    /// Quota files or the orphan file.
    SpecialInode,
}

/// What lives in one changed image block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BlockFiles {
    /// The image block's index.
    pub block: u64,
    /// Files whose data (or extent tree, or xattr block) lives here.
    pub files: BTreeSet<String>,
    /// Directories whose entries live here.
    pub directories: BTreeSet<String>,
    /// Files whose inode records live here (and changed, when compared against another version).
    pub inodes: BTreeSet<String>,
    /// Kinds of metadata living here.
    pub metadata: BTreeSet<Metadata>,
    /// Fs blocks here that neither a reachable file nor known metadata owns (free space,
    /// unlinked inodes' data, or space past the filesystem).
    pub unowned_fs_blocks: u64,
}

/// Owners of a set of changed image blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileMap {
    /// The filesystem's block size.
    pub fs_block_size: u64,
    /// Where the filesystem starts in the image (0, or its partition's offset).
    pub fs_offset: u64,
    /// One entry per changed image block, in the order asked.
    pub blocks: Vec<BlockFiles>,
}

impl FileMap {
    /// Every guest path named: files, directories and files whose inodes changed.
    pub fn files(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for b in &self.blocks {
            out.extend(b.files.iter().cloned());
            out.extend(b.directories.iter().cloned());
            out.extend(b.inodes.iter().cloned());
        }
        out
    }

    /// Every kind of metadata touched.
    pub fn metadata(&self) -> BTreeSet<Metadata> {
        self.blocks
            .iter()
            .flat_map(|b| b.metadata.iter().copied())
            .collect()
    }

    /// Whether any changed block holds filesystem metadata.
    pub fn metadata_changed(&self) -> bool {
        self.blocks.iter().any(|b| !b.metadata.is_empty())
    }

    /// Adds `other`'s owners of the same blocks (both maps list the same blocks in order).
    pub fn merge(&mut self, other: FileMap) {
        for (x, y) in self.blocks.iter_mut().zip(other.blocks) {
            x.files.extend(y.files);
            x.directories.extend(y.directories);
            x.inodes.extend(y.inodes);
            x.metadata.extend(y.metadata);
            x.unowned_fs_blocks = x.unowned_fs_blocks.min(y.unowned_fs_blocks);
        }
    }
}

/// A filesystem found in an image: its window of the image and its index.
struct Found<'a> {
    view: Offset<'a>,
    start: u64,
    len: u64,
    index: FsIndex,
}

impl<'a> Found<'a> {
    fn find(src: &'a dyn ReadAt) -> Result<Option<Found<'a>>, Ext4Error> {
        let Some((start, len)) = partition::locate(src)? else {
            return Ok(None);
        };
        let view = Offset::new(src, start, len);
        Ok(
            FsIndex::build(&view, Limits::default())?.map(|index| Found {
                view,
                start,
                len,
                index,
            }),
        )
    }

    /// The fs blocks `[lo, hi)` that image block `blk` overlaps, if any.
    fn fs_range(&self, blk: u64, ibs: u64) -> Option<(u64, u64)> {
        let fbs = self.index.fs_block_size();
        let s = blk.saturating_mul(ibs).max(self.start);
        let e = blk
            .saturating_mul(ibs)
            .saturating_add(ibs)
            .min(self.start.saturating_add(self.len));
        (s < e).then(|| ((s - self.start) / fbs, (e - self.start).div_ceil(fbs)))
    }

    fn lookup(&self, ibs: u64, changed: &[u64]) -> Result<FileMap, Ext4Error> {
        let mut out = FileMap {
            fs_block_size: self.index.fs_block_size(),
            fs_offset: self.start,
            blocks: Vec::with_capacity(changed.len()),
        };
        for &blk in changed {
            let ranges: Vec<(u64, u64)> = self.fs_range(blk, ibs).into_iter().collect();
            out.blocks.push(self.index.owners(blk, &ranges, None)?);
        }
        Ok(out)
    }
}

/// Maps each changed image block (of `image_block_size` bytes) of `src` to what lives there.
/// The filesystem may start at offset 0 or inside an MBR/GPT partition. `Ok(None)` when
/// `src` holds no ext2/3/4 filesystem.
pub fn map_blocks(
    src: &dyn ReadAt,
    image_block_size: u64,
    changed: &[u64],
) -> Result<Option<FileMap>, Ext4Error> {
    match Found::find(src)? {
        Some(f) => f.lookup(image_block_size, changed).map(Some),
        None => Ok(None),
    }
}

/// Maps the blocks that differ between images `a` and `b`: what lived there in `a` (deleted or
/// moved files) and what lives there in `b` (new files, new names). Only the fs blocks whose
/// bytes differ inside each changed image block are attributed, and changed inode-table blocks
/// name only the inodes whose records differ. `Ok(None)` when neither is ext2/3/4.
pub fn map_diff(
    a: &dyn ReadAt,
    b: &dyn ReadAt,
    image_block_size: u64,
    changed: &[u64],
) -> Result<Option<FileMap>, Ext4Error> {
    let (x, y) = match (Found::find(a)?, Found::find(b)?) {
        (None, None) => return Ok(None),
        (Some(x), None) => return x.lookup(image_block_size, changed).map(Some),
        (None, Some(y)) => return y.lookup(image_block_size, changed).map(Some),
        (Some(x), Some(y)) => (x, y),
    };
    if !x.index.same_geometry(&y.index) || x.start != y.start {
        let mut m = y.lookup(image_block_size, changed)?;
        m.merge(x.lookup(image_block_size, changed)?);
        return Ok(Some(m));
    }
    let mut out = FileMap {
        fs_block_size: y.index.fs_block_size(),
        fs_offset: y.start,
        blocks: Vec::with_capacity(changed.len()),
    };
    let len = usize::try_from(image_block_size).map_err(|_| Ext4Error::Budget("block size"))?;
    let (mut p, mut q) = (vec![0u8; len], vec![0u8; len]);
    for &blk in changed {
        let ranges = differing_fs_blocks(&y, a, b, blk, image_block_size, &mut p, &mut q);
        let mut bf = y.index.owners(blk, &ranges, Some((&y.view, &x.view)))?;
        let old = x.index.owners(blk, &ranges, Some((&x.view, &y.view)))?;
        bf.files.extend(old.files);
        bf.directories.extend(old.directories);
        bf.inodes.extend(old.inodes);
        bf.metadata.extend(old.metadata);
        bf.unowned_fs_blocks = bf.unowned_fs_blocks.min(old.unowned_fs_blocks);
        out.blocks.push(bf);
    }
    Ok(Some(out))
}

/// The fs-block ranges `[lo, hi)` inside image block `blk` whose bytes differ between `a` and
/// `b` (whole images); all of the block's fs blocks when either cannot be read in full.
fn differing_fs_blocks(
    f: &Found<'_>,
    a: &dyn ReadAt,
    b: &dyn ReadAt,
    blk: u64,
    ibs: u64,
    p: &mut [u8],
    q: &mut [u8],
) -> Vec<(u64, u64)> {
    let Some((lo, hi)) = f.fs_range(blk, ibs) else {
        return Vec::new();
    };
    let s = blk.saturating_mul(ibs);
    if a.read_exact_at(s, p).is_err() || b.read_exact_at(s, q).is_err() {
        return vec![(lo, hi)];
    }
    let fbs = f.index.fs_block_size();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for k in lo..hi {
        // image bytes of fs block k, clipped to this image block
        let x0 = f.start.saturating_add(k.saturating_mul(fbs)).max(s);
        let x1 = f
            .start
            .saturating_add(k.saturating_add(1).saturating_mul(fbs))
            .min(s.saturating_add(ibs));
        let (i0, i1) = ((x0 - s) as usize, (x1.max(x0) - s) as usize);
        if p.get(i0..i1) == q.get(i0..i1) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == k => last.1 += 1,
            _ => out.push((k, k + 1)),
        }
    }
    out
}
