//! Where the filesystem starts: at offset 0 (a bare filesystem image), or inside the first
//! MBR or GPT partition that holds an ext2/3/4 superblock (cloud images are partitioned).
//! Invariant: partition tables are untrusted; counts and sizes are bounded, every partition
//! lies inside the image, and CRCs are not relied upon (a bad table only means "not found").

use super::error::Ext4Error;
use super::layout::MAGIC;
use super::source::{le16, le32, ReadAt};

const SECTOR: u64 = 512;
/// Most GPT entries examined (the standard table has 128).
const MAX_GPT_ENTRIES: u64 = 256;

/// A window `[base, base + len)` of an image, read as an image of its own.
pub struct Offset<'a> {
    inner: &'a dyn ReadAt,
    base: u64,
    len: u64,
}

impl<'a> Offset<'a> {
    pub fn new(inner: &'a dyn ReadAt, base: u64, len: u64) -> Offset<'a> {
        let len = len.min(inner.size().saturating_sub(base));
        Offset { inner, base, len }
    }
}

impl ReadAt for Offset<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error> {
        let fits = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= self.len);
        let at = self.base.checked_add(offset).filter(|_| fits);
        match at {
            Some(at) => self.inner.read_exact_at(at, buf),
            None => Err(Ext4Error::OutOfImage {
                offset,
                len: buf.len() as u64,
                size: self.len,
            }),
        }
    }
}

/// The byte range `(start, len)` of the filesystem in `src`, if any: offset 0 first, then
/// the partitions in table order.
pub fn locate(src: &dyn ReadAt) -> Result<Option<(u64, u64)>, Ext4Error> {
    let size = src.size();
    if has_superblock(src, 0)? {
        return Ok(Some((0, size)));
    }
    for (start, len) in partitions(src)? {
        if has_superblock(src, start)? {
            return Ok(Some((start, len)));
        }
    }
    Ok(None)
}

fn has_superblock(src: &dyn ReadAt, base: u64) -> Result<bool, Ext4Error> {
    let mut b = [0u8; 2];
    let Some(at) = base.checked_add(1024 + 0x38) else {
        return Ok(false);
    };
    if at.saturating_add(2) > src.size() {
        return Ok(false);
    }
    src.read_exact_at(at, &mut b)?;
    Ok(u16::from_le_bytes(b) == MAGIC)
}

/// Partitions of an MBR or GPT table, each inside the image.
fn partitions(src: &dyn ReadAt) -> Result<Vec<(u64, u64)>, Ext4Error> {
    let size = src.size();
    let mut out = Vec::new();
    if size < 2 * SECTOR {
        return Ok(out);
    }
    let mut mbr = [0u8; 512];
    src.read_exact_at(0, &mut mbr)?;
    if le16(&mbr, 510) != 0xAA55 {
        return Ok(out);
    }
    let inside =
        |start: u64, len: u64| len > 0 && start.checked_add(len).is_some_and(|e| e <= size);
    let mut gpt = false;
    for i in 0..4 {
        let e = 446 + i * 16;
        let kind = mbr.get(e + 4).copied().unwrap_or(0);
        if kind == 0xEE {
            gpt = true;
            continue;
        }
        let start = u64::from(le32(&mbr, e + 8)) * SECTOR;
        let len = u64::from(le32(&mbr, e + 12)) * SECTOR;
        if kind != 0 && inside(start, len) {
            out.push((start, len));
        }
    }
    if !gpt {
        return Ok(out);
    }
    let mut h = [0u8; 92];
    src.read_exact_at(SECTOR, &mut h)?;
    if h.get(..8) != Some(b"EFI PART".as_slice()) {
        return Ok(out);
    }
    let lba = |b: &[u8], o: usize| u64::from(le32(b, o)) | u64::from(le32(b, o + 4)) << 32;
    let table = lba(&h, 72).saturating_mul(SECTOR);
    let count = u64::from(le32(&h, 80)).min(MAX_GPT_ENTRIES);
    let esize = u64::from(le32(&h, 84));
    if !(128..=1024).contains(&esize) || !inside(table, count * esize) {
        return Ok(out);
    }
    let mut raw = vec![0u8; (count * esize) as usize];
    src.read_exact_at(table, &mut raw)?;
    for e in raw.chunks_exact(esize as usize) {
        if e.get(..16).is_none_or(|t| t.iter().all(|&x| x == 0)) {
            continue; // unused entry
        }
        let (first, last) = (lba(e, 32), lba(e, 40));
        let start = first.saturating_mul(SECTOR);
        let len = last
            .checked_sub(first)
            .and_then(|n| n.checked_add(1))
            .map_or(0, |n| n.saturating_mul(SECTOR));
        if inside(start, len) {
            out.push((start, len));
        }
    }
    Ok(out)
}
