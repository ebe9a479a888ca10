//! Streaming import of an image file into a new version: bounded memory (one chunk buffer and
//! one partial node per tree level), holes skipped without reading, blocks hashed on 2 threads.
//! Invariant: the version becomes visible only after every block and node it needs is durable.

use crate::error::StoreError;
use crate::ids::{ImageName, VersionId};
use crate::pack::ObjKind;
use crate::source::ImageSource;
use crate::store::{is_zero, Store, DEFAULT_BLOCK_SIZE};
use crate::tree::Builder;

/// Bytes read and hashed per step.
const CHUNK: usize = 8 << 20;

/// Progress of an import, reported after each chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportProgress {
    /// Bytes of the image processed so far.
    pub done: u64,
    /// Image size in bytes.
    pub total: u64,
    /// Blocks written because the store did not hold them.
    pub new_blocks: u64,
    /// Blocks the store already held.
    pub dedup_blocks: u64,
    /// All-zero blocks (stored as holes).
    pub holes: u64,
}

/// What an import made.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub id: VersionId,
    pub size: u64,
    pub block_size: u32,
    pub format: &'static str,
    pub stats: ImportProgress,
}

fn hash_blocks(data: &[u8], bs: usize, out: &mut [Option<[u8; 32]>]) {
    for (block, slot) in data.chunks(bs).zip(out.iter_mut()) {
        *slot = (!is_zero(block)).then(|| *blake3::hash(block).as_bytes());
    }
}

impl Store {
    /// Imports `src` as a new version of `image` (created with `block_size`, default 64 KiB,
    /// if new). Re-importing stored bytes writes nothing and returns the same id.
    pub fn import(
        &self,
        image: &ImageName,
        block_size: Option<u32>,
        src: &mut dyn ImageSource,
        progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<ImportReport, StoreError> {
        let bs = match (self.image_block_size(image)?, block_size) {
            (Some(existing), Some(req)) if existing != req => {
                return Err(StoreError::BlockSizeMismatch {
                    image: image.to_string(),
                    existing,
                    requested: req,
                })
            }
            (Some(existing), _) => existing,
            (None, Some(req)) => crate::store::check_block_size(u64::from(req))?,
            (None, None) => DEFAULT_BLOCK_SIZE,
        };
        let size = src.size();
        let bsz = bs as usize;
        let n = size.div_ceil(u64::from(bs));
        let chunk = CHUNK.max(bsz);
        let mut buf = vec![0u8; chunk];
        let mut hashes: Vec<Option<[u8; 32]>> = vec![None; chunk / bsz];
        let mut builder = Builder::new(&self.inner, n, false);
        let mut stats = ImportProgress {
            total: size,
            ..Default::default()
        };
        let mut off = 0u64;
        while off < size {
            let want = (chunk as u64).min(size - off) as usize;
            let blocks = want.div_ceil(bsz);
            if src.is_hole(off, want as u64)? {
                for _ in 0..blocks {
                    builder.push(None)?;
                }
                stats.holes += blocks as u64;
            } else {
                let data = &mut buf[..blocks * bsz];
                // the image tail is zero-padded to a whole block
                data[want..].fill(0);
                src.read_at(off, &mut data[..want])?;
                let data = &buf[..blocks * bsz];
                let hs = &mut hashes[..blocks];
                let half = blocks / 2;
                let (h1, h2) = hs.split_at_mut(half);
                let (d1, d2) = data.split_at(half * bsz);
                std::thread::scope(|s| {
                    s.spawn(|| hash_blocks(d1, bsz, h1));
                    hash_blocks(d2, bsz, h2);
                });
                for (i, h) in hashes[..blocks].iter().enumerate() {
                    match h {
                        None => stats.holes += 1,
                        Some(h) => {
                            if self.inner.locate(ObjKind::Block, h)?.is_some() {
                                stats.dedup_blocks += 1;
                            } else {
                                let block = &buf[i * bsz..(i + 1) * bsz];
                                self.inner.put_object(ObjKind::Block, h, block)?;
                                stats.new_blocks += 1;
                            }
                        }
                    }
                    builder.push(*h)?;
                }
            }
            off += want as u64;
            stats.done = off;
            progress(&stats);
        }
        let root = builder.finish()?;
        let id = self.inner.commit_version(image, size, bs, &root)?;
        Ok(ImportReport {
            id,
            size,
            block_size: bs,
            format: src.format(),
            stats,
        })
    }
}
