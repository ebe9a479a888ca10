//! Directory entries: linear dirent blocks (htree leaves and the htree root are plain dirent
//! blocks too, their index data hides in entries with inode 0) and inline directories.
//! Invariant: an entry is returned only when its record lies wholly inside the buffer and its
//! inode number is within the filesystem's inode count.

use super::error::Ext4Error;
use super::inode::Inode;
use super::source::{le16, le32};

/// One directory entry (not "." or "..").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub ino: u32,
    pub name: Vec<u8>,
}

/// Parses the dirents of one directory block (or inline region) `b`.
pub(crate) fn parse_block(
    dir: u32,
    b: &[u8],
    block_size: u64,
    inodes_count: u32,
    out: &mut Vec<Entry>,
) -> Result<(), Ext4Error> {
    let bad = |why| Ext4Error::BadDirectory { ino: dir, why };
    let mut pos = 0usize;
    while pos < b.len() {
        let rest = b.get(pos..).unwrap_or(&[]);
        if rest.len() < 8 {
            return Err(bad("truncated entry"));
        }
        let ino = le32(rest, 0);
        let mut rec_len = usize::from(le16(rest, 4));
        if block_size >= 65536 && (rec_len == 65535 || rec_len == 0) {
            rec_len = 65536; // how 64 KiB blocks encode a whole-block record
        }
        let name_len = usize::from(rest.get(6).copied().unwrap_or(0));
        if rec_len < 8 || rec_len % 4 != 0 || rec_len > rest.len() || 8 + name_len > rec_len {
            return Err(bad("entry length out of range"));
        }
        if ino != 0 {
            if ino > inodes_count {
                return Err(bad("entry names an inode past the inode count"));
            }
            let name = rest
                .get(8..8 + name_len)
                .ok_or(bad("name past the entry"))?;
            if name.is_empty() {
                return Err(bad("empty name"));
            }
            if name != b"." && name != b".." {
                out.push(Entry {
                    ino,
                    name: name.to_vec(),
                });
            }
        }
        pos += rec_len;
    }
    Ok(())
}

/// The entries of an inline directory: in `i_block` after the parent's inode number, and in
/// the "system.data" extended attribute inside the inode when the directory outgrew 56 bytes.
pub(crate) fn parse_inline(
    inode: &Inode,
    block_size: u64,
    inodes_count: u32,
    out: &mut Vec<Entry>,
) -> Result<(), Ext4Error> {
    let ib = inode.i_block();
    parse_block(
        inode.ino,
        ib.get(4..).unwrap_or(&[]),
        block_size,
        inodes_count,
        out,
    )?;
    if let Some(extra) = inline_xattr(&inode.raw) {
        if !extra.is_empty() {
            parse_block(inode.ino, extra, block_size, inodes_count, out)?;
        }
    }
    Ok(())
}

/// The value of the in-inode "system.data" attribute, if any (bounds-checked; a malformed
/// attribute area yields `None`, inline data then covers only `i_block`).
pub(crate) fn inline_xattr(raw: &[u8]) -> Option<&[u8]> {
    let extra = usize::from(le16(raw, 0x80));
    let base = 128usize.checked_add(extra)?;
    if raw.len() <= 128 || le32(raw, base) != 0xEA02_0000 {
        return None;
    }
    let first = base + 4;
    let area = raw.get(first..)?;
    let mut pos = 0usize;
    while pos + 16 <= area.len() && le32(area, pos) != 0 {
        let e = area.get(pos..)?;
        let name_len = usize::from(*e.first()?);
        let index = *e.get(1)?;
        let value_offs = usize::from(le16(e, 2));
        let value_size = le32(e, 8) as usize;
        let name = e.get(16..16 + name_len)?;
        if index == 7 && name == b"data" {
            return area.get(value_offs..value_offs.checked_add(value_size)?);
        }
        pos += (16 + name_len + 3) & !3;
    }
    None
}
