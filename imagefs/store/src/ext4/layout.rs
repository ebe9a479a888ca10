//! The superblock and group descriptors: what kind of ext2/3/4 this is, where each group's
//! bitmaps and inode table live, and which fs blocks hold fixed metadata.
//! Invariant: a `Layout` only exists for a filesystem whose geometry fits inside the image and
//! whose features this reader understands; every derived offset was computed with checked math.

use super::error::Ext4Error;
use super::source::{le16, le32, Cached};
use super::Metadata;

pub(crate) const MAGIC: u16 = 0xEF53;
const SB_OFFSET: u64 = 1024;
/// Largest descriptor table read (a 64 TiB filesystem of 4 KiB blocks needs 32 MiB).
const MAX_GDT_BYTES: u64 = 64 << 20;

// incompat features
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

/// The facts of the superblock this reader uses.
#[derive(Debug, Clone)]
pub(crate) struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub inodes_count: u32,
    pub first_data_block: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u32,
    pub inode_size: u64,
    pub desc_size: u64,
    pub reserved_gdt: u64,
    pub incompat: u32,
    pub ro_compat: u32,
    pub compat: u32,
    pub journal_ino: u32,
    pub backup_bgs: [u32; 2],
    /// Special inodes outside the tree (quota, orphan file), walked as metadata.
    pub special_inodes: Vec<u32>,
    pub groups: u64,
}

impl Superblock {
    /// `Ok(None)` when the image holds no ext2/3/4 superblock at all.
    pub fn read(c: &mut Cached<'_>) -> Result<Option<Superblock>, Ext4Error> {
        if c.size() < SB_OFFSET + 1024 {
            return Ok(None);
        }
        let mut b = vec![0u8; 1024];
        c.read(SB_OFFSET, &mut b)?;
        if le16(&b, 0x38) != MAGIC {
            return Ok(None);
        }
        Self::parse(&b, c.size()).map(Some)
    }

    /// Validates the superblock `b` (1024 bytes) of an image of `image_size` bytes.
    pub fn parse(b: &[u8], image_size: u64) -> Result<Superblock, Ext4Error> {
        let bad = Ext4Error::BadSuperblock;
        let log = le32(b, 0x18);
        if log > 6 {
            return Err(bad("block size above 64 KiB"));
        }
        let block_size = 1024u64 << log;
        let incompat = le32(b, 0x60);
        let ro_compat = le32(b, 0x64);
        let compat = le32(b, 0x5C);
        for (bit, name) in [
            (INCOMPAT_COMPRESSION, "compression"),
            (INCOMPAT_JOURNAL_DEV, "external journal device"),
            (INCOMPAT_META_BG, "meta_bg"),
            (INCOMPAT_DIRDATA, "dirdata"),
        ] {
            if incompat & bit != 0 {
                return Err(Ext4Error::Unsupported(name));
            }
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(Ext4Error::Unsupported("unknown incompatible feature"));
        }
        if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            return Err(Ext4Error::Unsupported("bigalloc"));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u64::from(le32(b, 0x4));
        if is64 {
            blocks_count |= u64::from(le32(b, 0x150)) << 32;
        }
        let inodes_count = le32(b, 0x0);
        let first_data_block = u64::from(le32(b, 0x14));
        let blocks_per_group = u64::from(le32(b, 0x20));
        let inodes_per_group = le32(b, 0x28);
        let rev = le32(b, 0x4C);
        let (inode_size, first_ino) = if rev == 0 {
            (128, 11)
        } else {
            (u64::from(le16(b, 0x58)), le32(b, 0x54))
        };
        let desc_size = if is64 { u64::from(le16(b, 0xFE)) } else { 32 };
        if first_data_block != u64::from(block_size == 1024) {
            return Err(bad("first data block does not match the block size"));
        }
        if blocks_per_group < 256 || blocks_per_group % 8 != 0 || blocks_per_group > block_size * 8
        {
            return Err(bad("blocks per group out of range"));
        }
        if inodes_per_group == 0 || u64::from(inodes_per_group) > block_size * 8 {
            return Err(bad("inodes per group out of range"));
        }
        if !inode_size.is_power_of_two() || inode_size < 128 || inode_size > block_size {
            return Err(bad("inode size out of range"));
        }
        if !desc_size.is_power_of_two() || !(32..=block_size.min(1024)).contains(&desc_size) {
            return Err(bad("group descriptor size out of range"));
        }
        if blocks_count <= first_data_block {
            return Err(bad("no blocks"));
        }
        let fs_bytes = blocks_count
            .checked_mul(block_size)
            .ok_or(bad("size overflows"))?;
        if fs_bytes > image_size {
            return Err(bad("filesystem larger than the image"));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        let max_inodes = groups
            .checked_mul(u64::from(inodes_per_group))
            .ok_or(bad("inode count overflows"))?;
        if u64::from(inodes_count) > max_inodes || inodes_count == 0 {
            return Err(bad("inode count does not match the groups"));
        }
        if first_ino < 3 || first_ino > inodes_count {
            return Err(bad("first inode out of range"));
        }
        let in_range = |i: u32| i != 0 && i <= inodes_count;
        let journal_ino = Some(le32(b, 0xE0)).filter(|&i| in_range(i)).unwrap_or(0);
        let special_inodes = [0x240, 0x244, 0x26C, 0x280]
            .iter()
            .map(|&o| le32(b, o))
            .filter(|&i| in_range(i))
            .collect();
        Ok(Superblock {
            block_size,
            blocks_count,
            inodes_count,
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            desc_size,
            reserved_gdt: u64::from(le16(b, 0xCE)),
            incompat,
            ro_compat,
            compat,
            journal_ino,
            backup_bgs: [le32(b, 0x24C), le32(b, 0x250)],
            special_inodes,
            groups,
        })
    }

    /// Whether group `g` carries a superblock (and group descriptor) copy.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_bgs.iter().any(|&b| u64::from(b) == g);
        }
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        if g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x = x.saturating_mul(p);
            }
            x == g
        })
    }
}

/// Where one group's metadata lives (fs block numbers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Group {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
}

/// The filesystem's geometry.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub sb: Superblock,
    pub groups: Vec<Group>,
    /// Blocks of the inode table of one group.
    pub itable_blocks: u64,
    gdt_blocks: u64,
}

/// Who owns a run of fs blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Fixed metadata with no file attached.
    Meta(Metadata),
    /// Group `n`'s inode table.
    InodeTable(u32),
    /// Data of a file (regular, symlink).
    File(u32),
    /// Entries of a directory.
    Dir(u32),
    /// Extent tree nodes or indirect blocks of an inode.
    Tree(u32),
    /// The extended-attribute block of an inode.
    Xattr(u32),
    /// Blocks of a special inode (journal, quota, orphan file).
    Special(Metadata),
}

/// A run of fs blocks: (first block, count, owner).
pub(crate) type Span = (u64, u64, Owner);

impl Layout {
    pub fn read(c: &mut Cached<'_>) -> Result<Option<Layout>, Ext4Error> {
        let Some(sb) = Superblock::read(c)? else {
            return Ok(None);
        };
        let bs = sb.block_size;
        let table_bytes = sb
            .groups
            .checked_mul(sb.desc_size)
            .ok_or(Ext4Error::BadSuperblock("too many groups"))?;
        if table_bytes > MAX_GDT_BYTES {
            return Err(Ext4Error::Budget("group descriptor table size"));
        }
        let gdt_blocks = table_bytes.div_ceil(bs);
        let mut raw =
            vec![0u8; usize::try_from(table_bytes).map_err(|_| Ext4Error::Budget("groups"))?];
        // the descriptor table starts in the block after the superblock's
        c.read((sb.first_data_block + 1) * bs, &mut raw)?;
        let is64 = sb.desc_size >= 64 && sb.incompat & INCOMPAT_64BIT != 0;
        let itable_blocks = (u64::from(sb.inodes_per_group) * sb.inode_size).div_ceil(bs);
        let mut groups = Vec::with_capacity(raw.len() / sb.desc_size as usize);
        for (g, d) in raw.chunks_exact(sb.desc_size as usize).enumerate() {
            let lohi = |lo: usize, hi: usize| {
                let h = if is64 { u64::from(le32(d, hi)) } else { 0 };
                u64::from(le32(d, lo)) | h << 32
            };
            let group = Group {
                block_bitmap: lohi(0x0, 0x20),
                inode_bitmap: lohi(0x4, 0x24),
                inode_table: lohi(0x8, 0x28),
            };
            let inside = |b: u64, n: u64| {
                b >= sb.first_data_block && b.checked_add(n).is_some_and(|e| e <= sb.blocks_count)
            };
            let why = if !inside(group.block_bitmap, 1) {
                Some("block bitmap outside the filesystem")
            } else if !inside(group.inode_bitmap, 1) {
                Some("inode bitmap outside the filesystem")
            } else if !inside(group.inode_table, itable_blocks) {
                Some("inode table outside the filesystem")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Ext4Error::BadGroup {
                    group: g as u64,
                    why,
                });
            }
            groups.push(group);
        }
        Ok(Some(Layout {
            sb,
            groups,
            itable_blocks,
            gdt_blocks,
        }))
    }

    /// Every fixed metadata run: superblocks, descriptor tables, reserved GDT, bitmaps, tables.
    pub fn meta_spans(&self) -> Vec<Span> {
        let sb = &self.sb;
        let mut out = Vec::new();
        if sb.first_data_block == 1 {
            out.push((0, 1, Owner::Meta(Metadata::Superblock))); // boot block of 1 KiB filesystems
        }
        for (g, grp) in self.groups.iter().enumerate() {
            let g = g as u64;
            let first = sb.first_data_block + g * sb.blocks_per_group;
            if sb.has_super(g) {
                out.push((first, 1, Owner::Meta(Metadata::Superblock)));
                out.push((
                    first + 1,
                    self.gdt_blocks,
                    Owner::Meta(Metadata::GroupDescriptors),
                ));
                if sb.reserved_gdt > 0 {
                    out.push((
                        first + 1 + self.gdt_blocks,
                        sb.reserved_gdt,
                        Owner::Meta(Metadata::ReservedGdt),
                    ));
                }
            }
            out.push((grp.block_bitmap, 1, Owner::Meta(Metadata::BlockBitmap)));
            out.push((grp.inode_bitmap, 1, Owner::Meta(Metadata::InodeBitmap)));
            out.push((
                grp.inode_table,
                self.itable_blocks,
                Owner::InodeTable(g as u32),
            ));
        }
        out
    }

    /// Byte offset of inode `ino`'s record.
    pub fn inode_offset(&self, ino: u32) -> Result<u64, Ext4Error> {
        let sb = &self.sb;
        if ino == 0 || ino > sb.inodes_count {
            return Err(Ext4Error::BadInode {
                ino: u64::from(ino),
                why: "number out of range",
            });
        }
        let i = u64::from(ino - 1);
        let ipg = u64::from(sb.inodes_per_group);
        let grp = self
            .groups
            .get((i / ipg) as usize)
            .ok_or(Ext4Error::BadInode {
                ino: u64::from(ino),
                why: "group out of range",
            })?;
        // inode_table + itable_blocks <= blocks_count was checked, so this cannot overflow
        Ok(grp.inode_table * sb.block_size + (i % ipg) * sb.inode_size)
    }

    /// The inode numbers `lo..hi` whose records lie in fs blocks `[start, end)` of group `g`'s
    /// inode table.
    pub fn inodes_in(&self, g: u32, start: u64, end: u64) -> std::ops::Range<u32> {
        let sb = &self.sb;
        let Some(grp) = self.groups.get(g as usize) else {
            return 0..0;
        };
        let per_block = sb.block_size / sb.inode_size;
        let t0 = grp.inode_table;
        let t1 = t0 + self.itable_blocks;
        let (a, b) = (start.max(t0), end.min(t1));
        if a >= b {
            return 0..0;
        }
        let first = (a - t0) * per_block;
        let last = ((b - t0) * per_block).min(u64::from(sb.inodes_per_group));
        let base = u64::from(g) * u64::from(sb.inodes_per_group) + 1;
        let lo = base + first;
        let hi = (base + last).min(u64::from(sb.inodes_count) + 1);
        if lo >= hi {
            return 0..0;
        }
        lo as u32..hi as u32
    }
}
