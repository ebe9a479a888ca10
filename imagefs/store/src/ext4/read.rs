//! Reading files by path: resolve a path from the root directory (following symlinks as open(2)
//! does, at most 40 of them) and stream a regular file's bytes: extents of any depth, old-style
//! block maps and inline data, with holes and uninitialized extents read as zeros.
//! Invariant: exactly `i_size` bytes are streamed; every block read is inside the filesystem,
//! every tree block is read once per file, and the walk stops at its time and read budgets.

use std::collections::HashSet;

use super::dir::{self, Entry};
use super::error::Ext4Error;
use super::index::Limits;
use super::inode::{Inode, Run};
use super::layout::Layout;
use super::partition::{self, Offset};
use super::source::{Cached, ReadAt};

const ROOT_INO: u32 = 2;
/// Linux's limit on symlinks followed in one lookup (ELOOP past it).
const MAX_SYMLINKS: u32 = 40;
/// Most path components walked in one lookup, symlink targets included.
const MAX_COMPONENTS: usize = 4096;
/// Longest symlink target read (PATH_MAX).
const MAX_LINK_LEN: u64 = 4096;
/// Largest piece of file data read at once.
const IO_CHUNK: u64 = 1 << 20;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    /// A device, fifo or socket.
    Other,
}

impl FileKind {
    fn name(self) -> &'static str {
        match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symbolic link",
            FileKind::Other => "special file",
        }
    }
}

/// A resolved path (symlinks followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub ino: u32,
    pub kind: FileKind,
    pub size: u64,
}

/// A filesystem opened for reading files by path.
pub struct Reader<'a> {
    c: Cached<'a>,
    layout: Layout,
}

impl<'a> Reader<'a> {
    /// Opens the filesystem that starts at offset 0 of `src` (see [`with_image`] for images
    /// that may be partitioned). `Ok(None)`: no ext2/3/4 superblock.
    pub fn open(src: &'a dyn ReadAt, limits: Limits) -> Result<Option<Reader<'a>>, Ext4Error> {
        let mut c = Cached::new(src, limits.time, 1 << 20);
        let Some(layout) = Layout::read(&mut c)? else {
            return Ok(None);
        };
        // each inode and metadata block is read at most once per lookup, and lookups are few
        c.set_reads_left(
            u64::from(layout.sb.inodes_count)
                .saturating_add(layout.sb.blocks_count)
                .saturating_add(64),
        );
        Ok(Some(Reader { c, layout }))
    }

    /// What `path` names, symlinks followed; `None` when it does not exist.
    pub fn stat(&mut self, path: &str) -> Result<Option<FileInfo>, Ext4Error> {
        Ok(self.resolve(path)?.map(|i| FileInfo {
            ino: i.ino,
            kind: kind(&i),
            size: i.size,
        }))
    }

    /// Streams the regular file at `path` into `sink` in order; its size, or `None` when the
    /// path does not exist. A directory or special file is `NotAFile`.
    pub fn read(
        &mut self,
        path: &str,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<u64>, Ext4Error> {
        let Some(inode) = self.resolve(path)? else {
            return Ok(None);
        };
        let k = kind(&inode);
        if k != FileKind::Regular {
            return Err(Ext4Error::NotAFile {
                path: path.to_string(),
                kind: k.name(),
            });
        }
        self.stream(&inode, inode.size, sink).map(Some)
    }

    /// blake3 of the regular file at `path`; `None` when the path does not exist.
    pub fn hash(&mut self, path: &str) -> Result<Option<blake3::Hash>, Ext4Error> {
        let mut h = blake3::Hasher::new();
        Ok(self
            .read(path, &mut |b| {
                h.update(b);
            })?
            .map(|_| h.finalize()))
    }

    fn inode(&mut self, ino: u32) -> Result<Inode, Ext4Error> {
        Inode::read(&mut self.c, &self.layout, ino)
    }

    /// The inode `path` names (from the root, symlinks followed); `None` if a component is
    /// missing or is not a directory.
    fn resolve(&mut self, path: &str) -> Result<Option<Inode>, Ext4Error> {
        let root = self.inode(ROOT_INO)?;
        if !root.is_dir() || !root.in_use() {
            return Err(Ext4Error::BadInode {
                ino: u64::from(ROOT_INO),
                why: "the root is not a directory",
            });
        }
        // components still to walk, the next one last
        let mut pending: Vec<Vec<u8>> = components(path.as_bytes());
        // the directories entered, the current one last (".." pops)
        let mut dirs: Vec<Inode> = vec![root];
        let (mut hops, mut steps) = (0u32, 0usize);
        while let Some(name) = pending.pop() {
            steps += 1;
            if steps > MAX_COMPONENTS {
                return Err(Ext4Error::Budget("path components"));
            }
            self.c.check_time()?;
            if name == b".." {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                continue;
            }
            let Some(dir) = dirs.last() else {
                return Ok(None);
            };
            let Some(ino) = self.find(dir, &name)? else {
                return Ok(None);
            };
            let child = self.inode(ino)?;
            if !child.in_use() {
                return Ok(None); // a stale entry naming a free inode
            }
            if child.is_symlink() {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(Ext4Error::SymlinkLoop {
                        path: path.to_string(),
                    });
                }
                let target = self.link_target(&child)?;
                if target.first() == Some(&b'/') {
                    dirs.truncate(1);
                }
                pending.extend(components(&target));
                continue;
            }
            if child.is_dir() {
                dirs.push(child);
                continue;
            }
            // a file: the last component, or ENOTDIR (treated as "no such path")
            return Ok(pending.is_empty().then_some(child));
        }
        Ok(dirs.pop())
    }

    /// The inode number `name` has in directory `dir`.
    fn find(&mut self, dir: &Inode, name: &[u8]) -> Result<Option<u32>, Ext4Error> {
        let sb = &self.layout.sb;
        let (bs, inodes_count) = (sb.block_size, sb.inodes_count);
        let mut entries: Vec<Entry> = Vec::new();
        let pick = |entries: &[Entry]| entries.iter().find(|e| e.name == name).map(|e| e.ino);
        if dir.is_inline() {
            dir::parse_inline(dir, bs, inodes_count, &mut entries)?;
            return Ok(pick(&entries));
        }
        let mut block = vec![0u8; bs as usize];
        for (_, start, len, _) in self.data_runs(dir)? {
            for b in start..start.saturating_add(len) {
                entries.clear();
                self.c.read(b * bs, &mut block)?;
                dir::parse_block(dir.ino, &block, bs, inodes_count, &mut entries)?;
                if let Some(ino) = pick(&entries) {
                    return Ok(Some(ino));
                }
            }
        }
        Ok(None)
    }

    /// A symlink's target (at most PATH_MAX bytes).
    fn link_target(&mut self, link: &Inode) -> Result<Vec<u8>, Ext4Error> {
        if link.size > MAX_LINK_LEN || link.size == 0 {
            return Err(Ext4Error::BadInode {
                ino: u64::from(link.ino),
                why: "symlink target length out of range",
            });
        }
        let mut out = Vec::new();
        self.stream(link, link.size, &mut |b| out.extend_from_slice(b))?;
        Ok(out)
    }

    /// Data runs `(logical, start, len, uninit)` of `inode`, sorted by logical block.
    fn data_runs(&mut self, inode: &Inode) -> Result<Vec<(u64, u64, u64, bool)>, Ext4Error> {
        let mut runs = Vec::new();
        let mut visited = HashSet::new();
        inode.runs(&mut self.c, &self.layout, &mut visited, &mut |r| {
            if let Run::Data {
                logical,
                start,
                len,
                uninit,
            } = r
            {
                runs.push((logical, start, len, uninit));
            }
        })?;
        runs.sort_unstable_by_key(|r| r.0);
        // block maps give one run per block: merge contiguous ones so data is read in big pieces
        let mut merged: Vec<(u64, u64, u64, bool)> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(m)
                    if m.3 == r.3
                        && m.0.checked_add(m.2) == Some(r.0)
                        && m.1.checked_add(m.2) == Some(r.1) =>
                {
                    m.2 = m.2.saturating_add(r.2);
                }
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// Streams the first `size` bytes of `inode`'s content (a file or a symlink target).
    fn stream(
        &mut self,
        inode: &Inode,
        size: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64, Ext4Error> {
        let bad = |why| Ext4Error::BadInode {
            ino: u64::from(inode.ino),
            why,
        };
        let bs = self.layout.sb.block_size;
        // logical block numbers are 32 bits wide
        if size > (1u64 << 32).saturating_mul(bs) {
            return Err(bad("size beyond the largest file"));
        }
        if inode.is_inline() || inode.is_fast_symlink() {
            let mut data = inode.i_block().to_vec();
            if inode.is_inline() {
                data.extend_from_slice(dir::inline_xattr(&inode.raw).unwrap_or(&[]));
            }
            let bytes = data
                .get(..size as usize)
                .ok_or(bad("inline data shorter than the size"))?;
            sink(bytes);
            return Ok(size);
        }
        let overlap = if inode.uses_extents() {
            Ext4Error::BadExtents {
                ino: inode.ino,
                why: "extents overlap",
            }
        } else {
            Ext4Error::BadBlockMap {
                ino: inode.ino,
                why: "blocks overlap",
            }
        };
        let mut pos = 0u64;
        let mut buf = Vec::new();
        for (logical, start, len, uninit) in self.data_runs(inode)? {
            let at = logical.saturating_mul(bs);
            if at >= size {
                break; // preallocated past the end of the file
            }
            if at < pos {
                return Err(overlap);
            }
            self.zeros(at - pos, sink)?;
            let n = len.saturating_mul(bs).min(size - at);
            if uninit {
                self.zeros(n, sink)?;
            } else {
                let mut done = 0u64;
                while done < n {
                    let take = (n - done).min(IO_CHUNK);
                    buf.resize(take as usize, 0);
                    let at = start.saturating_mul(bs).saturating_add(done);
                    self.c.read_uncached(at, &mut buf)?;
                    sink(&buf);
                    done += take;
                }
            }
            pos = at + n;
        }
        self.zeros(size - pos, sink)?;
        Ok(size)
    }

    /// Streams `n` zero bytes (a hole or an unwritten extent).
    fn zeros(&mut self, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> Result<(), Ext4Error> {
        while n > 0 {
            self.c.check_time()?;
            let take = n.min(ZEROS.len() as u64);
            sink(ZEROS.get(..take as usize).unwrap_or(&[]));
            n -= take;
        }
        Ok(())
    }
}

fn kind(i: &Inode) -> FileKind {
    if i.is_regular() {
        FileKind::Regular
    } else if i.is_dir() {
        FileKind::Directory
    } else if i.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    }
}

/// The non-empty, non-"." components of `path`, last first (a stack).
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .rev()
        .map(<[u8]>::to_vec)
        .collect()
}

/// Runs `f` on the filesystem in `src`, bare or in its first ext partition (MBR or GPT).
pub fn with_image<T>(
    src: &dyn ReadAt,
    limits: Limits,
    f: impl FnOnce(&mut Reader<'_>) -> T,
) -> Result<T, Ext4Error> {
    let (start, len) = partition::locate(src)?.ok_or(Ext4Error::NoFilesystem)?;
    let view = Offset::new(src, start, len);
    let mut r = Reader::open(&view, limits)?.ok_or(Ext4Error::NoFilesystem)?;
    Ok(f(&mut r))
}

/// blake3 of the regular file at guest path `path` (symlinks followed) in image `src`;
/// `None` when the path does not exist.
pub fn file_hash(src: &dyn ReadAt, path: &str) -> Result<Option<blake3::Hash>, Ext4Error> {
    with_image(src, Limits::default(), |r| r.hash(path))?
}
