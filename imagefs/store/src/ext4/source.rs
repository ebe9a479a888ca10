//! Where the reader's bytes come from: a small positional-read trait (implemented for a store
//! version and a plain file), a chunk cache in front of it, and the walk's budget.
//! Invariant: every read is bounds-checked against the image size before it is issued.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::error::Ext4Error;
use crate::{Store, Version};

/// A read-only image: positional reads, exact length, within `size()`.
pub trait ReadAt {
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error if any byte is missing.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error> {
        FileExt::read_exact_at(self, buf, offset).map_err(|e| Ext4Error::Read {
            offset,
            source: Box::new(e),
        })
    }
}

/// A store version as a [`ReadAt`] source (every block verified by the store).
#[derive(Debug, Clone, Copy)]
pub struct VersionReader<'a> {
    pub store: &'a Store,
    pub version: &'a Version,
}

impl ReadAt for VersionReader<'_> {
    fn size(&self) -> u64 {
        self.version.size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error> {
        let got = self
            .version
            .read_at(self.store, offset, buf)
            .map_err(|e| Ext4Error::Read {
                offset,
                source: Box::new(e),
            })?;
        if got != buf.len() {
            return Err(Ext4Error::OutOfImage {
                offset,
                len: buf.len() as u64,
                size: self.version.size(),
            });
        }
        Ok(())
    }
}

/// Cache granule: big enough that neighbouring inodes and directory blocks share one read.
const CHUNK: u64 = 64 * 1024;
/// At most this many chunks are kept (16 MiB); the cache is simply emptied when full.
const MAX_CHUNKS: usize = 256;

/// A chunk cache over a [`ReadAt`], with the walk's budget of time and metadata reads.
pub(crate) struct Cached<'a> {
    src: &'a dyn ReadAt,
    size: u64,
    chunks: HashMap<u64, Vec<u8>>,
    deadline: Instant,
    reads_left: u64,
}

impl<'a> Cached<'a> {
    pub fn new(src: &'a dyn ReadAt, budget: Duration, max_reads: u64) -> Cached<'a> {
        Cached {
            src,
            size: src.size(),
            chunks: HashMap::new(),
            deadline: Instant::now() + budget,
            reads_left: max_reads,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sets how many more reads the walk may issue.
    pub fn set_reads_left(&mut self, n: u64) {
        self.reads_left = n;
    }

    /// Fails once the time budget is spent; called at every step of the walk.
    pub fn check_time(&self) -> Result<(), Ext4Error> {
        if Instant::now() > self.deadline {
            return Err(Ext4Error::Budget("time"));
        }
        Ok(())
    }

    /// Reads file data at `offset` straight from the source (bounds and time checked, not
    /// cached and not counted against the metadata reads: data is streamed once).
    pub fn read_uncached(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Ext4Error::OutOfImage {
                offset,
                len,
                size: self.size,
            });
        }
        self.check_time()?;
        self.src.read_exact_at(offset, buf)
    }

    /// Reads `buf.len()` bytes at `offset`, through the cache.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Ext4Error> {
        let len = buf.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return Err(Ext4Error::OutOfImage {
                offset,
                len,
                size: self.size,
            });
        };
        self.reads_left = self
            .reads_left
            .checked_sub(1)
            .ok_or(Ext4Error::Budget("metadata reads"))?;
        self.check_time()?;
        let mut pos = offset;
        while pos < end {
            let chunk = pos / CHUNK;
            let start = chunk * CHUNK;
            if !self.chunks.contains_key(&chunk) {
                if self.chunks.len() >= MAX_CHUNKS {
                    self.chunks.clear();
                }
                let clen = CHUNK.min(self.size - start) as usize;
                let mut data = vec![0u8; clen];
                self.src.read_exact_at(start, &mut data)?;
                self.chunks.insert(chunk, data);
            }
            let data = self.chunks.get(&chunk).map(Vec::as_slice).unwrap_or(&[]);
            let from = (pos - start) as usize;
            let take = ((end - pos) as usize).min(data.len().saturating_sub(from));
            let at = (pos - offset) as usize;
            match (buf.get_mut(at..at + take), data.get(from..from + take)) {
                (Some(dst), Some(s)) if take > 0 => dst.copy_from_slice(s),
                _ => {
                    return Err(Ext4Error::OutOfImage {
                        offset,
                        len,
                        size: self.size,
                    })
                }
            }
            pos += take as u64;
        }
        Ok(())
    }
}

/// Little-endian field readers over a byte slice; a field past the end reads as 0 (callers
/// check lengths of variable records themselves, fixed records are read whole first).
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    off.checked_add(2)
        .and_then(|e| b.get(off..e))
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0)
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    off.checked_add(4)
        .and_then(|e| b.get(off..e))
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}
