//! Streaming import of an image file into a new version: bounded memory (one chunk buffer and
//! one partial node per tree level), holes skipped without reading, blocks hashed on 2 threads.
//! Invariant: the version becomes visible only after every block and node it needs is durable.

use std::sync::mpsc;

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

/// One chunk read and hashed: `data` is `None` for a chunk known to be a hole.
struct Chunk {
    data: Option<Vec<u8>>,
    hashes: Vec<Option<[u8; 32]>>,
    blocks: usize,
    /// Image offset just past this chunk.
    end: u64,
}

/// Reads `src` chunk by chunk into buffers from `free`, hashes each block (2 threads), and
/// sends the chunks to `full` in order. Stops at the first error (sent) or when the receiver
/// hangs up.
fn read_chunks(
    src: &mut dyn ImageSource,
    size: u64,
    bsz: usize,
    chunk: usize,
    free: mpsc::Receiver<Vec<u8>>,
    full: mpsc::SyncSender<Result<Chunk, StoreError>>,
) {
    let mut off = 0u64;
    while off < size {
        let want = (chunk as u64).min(size - off) as usize;
        let blocks = want.div_ceil(bsz);
        let end = off + want as u64;
        let msg = (|| -> Result<Chunk, StoreError> {
            let ranges = src.data_ranges(off, want as u64)?;
            if ranges.is_empty() {
                return Ok(Chunk {
                    data: None,
                    hashes: Vec::new(),
                    blocks,
                    end,
                });
            }
            let mut buf = free.recv().unwrap_or_else(|_| vec![0u8; chunk]);
            // which blocks may hold data; the others are holes, never read or hashed
            let mut maybe = vec![false; blocks];
            for &(a, b) in &ranges {
                let first = (a.saturating_sub(off) / bsz as u64) as usize;
                let last = ((b.saturating_sub(off)).div_ceil(bsz as u64) as usize).min(blocks);
                for m in maybe.iter_mut().take(last).skip(first) {
                    *m = true;
                }
            }
            // read each run of data blocks in one call; the image tail is zero-padded
            let mut i = 0;
            while i < blocks {
                if !maybe[i] {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < blocks && maybe[j] {
                    j += 1;
                }
                let (a, b) = (i * bsz, (j * bsz).min(want));
                buf[b..j * bsz].fill(0);
                src.read_at(off + a as u64, &mut buf[a..b])?;
                i = j;
            }
            let mut hashes = vec![None; blocks];
            let half = blocks / 2;
            let (h1, h2) = hashes.split_at_mut(half);
            let (m1, m2) = maybe.split_at(half);
            let (d1, d2) = buf[..blocks * bsz].split_at(half * bsz);
            std::thread::scope(|s| {
                s.spawn(|| hash_blocks(d1, bsz, m1, h1));
                hash_blocks(d2, bsz, m2, h2);
            });
            Ok(Chunk {
                data: Some(buf),
                hashes,
                blocks,
                end,
            })
        })();
        let failed = msg.is_err();
        if full.send(msg).is_err() || failed {
            return;
        }
        off = end;
    }
}

fn hash_blocks(data: &[u8], bs: usize, maybe: &[bool], out: &mut [Option<[u8; 32]>]) {
    for ((block, slot), &m) in data.chunks(bs).zip(out.iter_mut()).zip(maybe) {
        *slot = (m && !is_zero(block)).then(|| *blake3::hash(block).as_bytes());
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
        let mut builder = Builder::new(&self.inner, n, false);
        let mut stats = ImportProgress {
            total: size,
            ..Default::default()
        };
        let format = src.format();
        // A reader thread reads and hashes chunks while this one writes them: disk writes
        // and page-cache copies overlap hashing. Two buffers circulate, so memory is bounded.
        let (full_tx, full_rx) = mpsc::sync_channel::<Result<Chunk, StoreError>>(1);
        let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(2);
        for _ in 0..2 {
            let _ = free_tx.send(vec![0u8; chunk]);
        }
        std::thread::scope(|scope| -> Result<(), StoreError> {
            // owned by this body, so an early error return unblocks a reader waiting for a buffer
            let free_tx = free_tx;
            scope.spawn(move || read_chunks(src, size, bsz, chunk, free_rx, full_tx));
            for msg in full_rx {
                let c = msg?;
                match &c.data {
                    None => {
                        for _ in 0..c.blocks {
                            builder.push(None)?;
                        }
                        stats.holes += c.blocks as u64;
                    }
                    Some(buf) => {
                        for (i, h) in c.hashes.iter().enumerate() {
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
                }
                stats.done = c.end;
                progress(&stats);
                if let Some(buf) = c.data {
                    // the reader may have stopped already; then the buffer is simply dropped
                    let _ = free_tx.send(buf);
                }
            }
            Ok(())
        })?;
        if stats.done != size {
            return Err(StoreError::BadSource {
                path: "import".into(),
                why: "reader stopped early".to_string(),
            });
        }
        let root = builder.finish()?;
        crate::fault::point("import.blocks_stored");
        let id = self.inner.commit_version(image, size, bs, &root)?;
        Ok(ImportReport {
            id,
            size,
            block_size: bs,
            format,
            stats,
        })
    }
}
