//! An instance's overlay: what its guest wrote over the base version, tracked per 4 KiB
//! sub-block as qcow2's extended L2 tracks subclusters, so a small write stores only what it
//! wrote. The bytes live in the instance's private data file (`instances/ID.data`), one 4 KiB
//! slot per written sub-block, each checked on read against a checksum kept here.
//! Invariants: an entry exists for every block the guest has written; a sub-block that is not
//! written shows what lies under it (the base's block, or a whole block that replaced it); a
//! slot named by a durable record is never overwritten (new data goes to a new slot), so a
//! crash leaves every flushed sub-block intact and checkable.
//!
//! Record format (instance log record kind 2, format byte 1), all integers little-endian, a
//! sequence of ops after the format byte:
//! - `1 | index u64`: block `index` is replaced whole by zeros (its sub-blocks dropped)
//! - `2 | index u64 | hash [32]`: block `index` is replaced whole by the pack block `hash`
//! - `3 | index u64 | sub u8`: sub-block `sub` of block `index` is zeros
//! - `4 | index u64 | sub u8 | slot u64 | sum [8]`: sub-block `sub` of block `index` is the
//!   data file's slot `slot` (bytes `slot * 4096 ..`), whose blake3 starts with `sum`

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::BlockHash;

/// Bytes per sub-block: the overlay's grain and the data file's slot size.
pub const SUB: u64 = 4096;
/// Bytes of a sub-block's blake3 kept as its checksum.
pub const SUM: usize = 8;
/// Most sub-blocks in one block (the largest block size, 1 MiB, over `SUB`).
pub const MAX_SUBS: usize = 256;
/// Format byte of an overlay record.
const FORMAT: u8 = 1;

/// Errors of the overlay and its data file.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// An overlay record does not parse
    #[error("overlay record: {0}")]
    BadRecord(String),
    /// The data file could not be read or written
    #[error("instance data file {path}: {source}")]
    Io {
        /// The data file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A sub-block's bytes do not match their checksum
    #[error("instance data file {path}: slot {slot} does not match its checksum")]
    Corrupt {
        /// The data file.
        path: PathBuf,
        /// The slot.
        slot: u64,
    },
}

/// Where a written sub-block's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// All zeros; nothing stored.
    Zero,
    /// A slot of the data file and the first bytes of its blake3.
    Data {
        /// Slot number (byte offset `slot * SUB`).
        slot: u64,
        /// Checksum of the slot's 4 KiB.
        sum: [u8; SUM],
    },
}

/// A written block: what lies under it and the sub-blocks written over that.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// `None`: the base version's block (so it follows substitutions); `Some(h)`: a whole
    /// block that replaced it (`Some(None)`: zeros).
    pub under: Option<Option<BlockHash>>,
    /// Written sub-blocks, by position in the block; empty when none is written.
    pub subs: Vec<Option<Sub>>,
}

impl Entry {
    /// The block as one whole-block hash, when no sub-block is written over a replaced block.
    pub fn whole(&self) -> Option<Option<BlockHash>> {
        if self.subs.iter().any(Option::is_some) {
            return None;
        }
        self.under
    }

    /// Whether every sub-block of the block is written (nothing of what lies under shows).
    pub fn covers_all(&self, per_block: usize) -> bool {
        self.subs.len() == per_block && self.subs.iter().all(Option::is_some)
    }

    /// The written sub-block at `sub`, if any.
    pub fn sub(&self, sub: usize) -> Option<Sub> {
        self.subs.get(sub).copied().flatten()
    }
}

/// One change to the overlay, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Block `index` is replaced whole (`None`: zeros); its sub-blocks are dropped.
    Whole {
        /// Block index.
        index: u64,
        /// The pack block, or zeros.
        hash: Option<BlockHash>,
    },
    /// Sub-block `sub` of block `index` is written.
    Sub {
        /// Block index.
        index: u64,
        /// Position in the block.
        sub: u16,
        /// Its bytes.
        to: Sub,
    },
}

/// The overlay map with its slot accounting.
#[derive(Debug, Clone)]
pub struct Overlay {
    per_block: usize,
    map: HashMap<u64, Entry>,
    /// Sub-blocks that name a data slot.
    live_slots: u64,
}

impl Overlay {
    /// An empty overlay for blocks of `per_block` sub-blocks (1..=`MAX_SUBS`).
    pub fn new(per_block: usize) -> Overlay {
        Overlay {
            per_block: per_block.clamp(1, MAX_SUBS),
            map: HashMap::new(),
            live_slots: 0,
        }
    }

    /// Sub-blocks per block.
    pub fn per_block(&self) -> usize {
        self.per_block
    }

    /// The entry of block `index`, if the guest wrote it.
    pub fn get(&self, index: u64) -> Option<&Entry> {
        self.map.get(&index)
    }

    /// Number of written blocks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is written.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Written blocks and their entries, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Entry)> {
        self.map.iter()
    }

    /// Sub-blocks whose bytes are in a data slot.
    pub fn live_slots(&self) -> u64 {
        self.live_slots
    }

    /// Every slot named.
    pub fn live_slot_numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.map
            .values()
            .flat_map(|e| e.subs.iter())
            .filter_map(|s| match s {
                Some(Sub::Data { slot, .. }) => Some(*slot),
                _ => None,
            })
    }

    fn count(sub: Option<Sub>) -> u64 {
        u64::from(matches!(sub, Some(Sub::Data { .. })))
    }

    /// Applies one change (a sub-block position past the block is a bad record).
    pub fn apply(&mut self, op: &Op) -> Result<(), OverlayError> {
        match *op {
            Op::Whole { index, hash } => {
                let entry = self.map.entry(index).or_default();
                let freed: u64 = entry.subs.iter().map(|s| Self::count(*s)).sum();
                entry.under = Some(hash);
                entry.subs = Vec::new();
                self.live_slots -= freed;
            }
            Op::Sub { index, sub, to } => {
                let pos = usize::from(sub);
                if pos >= self.per_block {
                    return Err(OverlayError::BadRecord(format!(
                        "sub-block {sub} of block {index} is past the block ({} sub-blocks)",
                        self.per_block
                    )));
                }
                let per_block = self.per_block;
                let entry = self.map.entry(index).or_default();
                if entry.subs.is_empty() {
                    entry.subs = vec![None; per_block];
                }
                let old = entry.subs.get_mut(pos).and_then(|s| s.replace(to));
                self.live_slots = self.live_slots - Self::count(old) + Self::count(Some(to));
            }
        }
        Ok(())
    }

    /// Removes block `index`'s entry (the base's block shows again).
    pub fn remove(&mut self, index: u64) -> Option<Entry> {
        let e = self.map.remove(&index)?;
        self.live_slots -= e.subs.iter().map(|s| Self::count(*s)).sum::<u64>();
        Some(e)
    }

    /// The whole overlay as ops, by block index: replaying them on an empty overlay gives
    /// this one.
    pub fn to_ops(&self) -> Vec<Op> {
        let mut indices: Vec<u64> = self.map.keys().copied().collect();
        indices.sort_unstable();
        let mut ops = Vec::new();
        for index in indices {
            let Some(e) = self.map.get(&index) else {
                continue;
            };
            if let Some(hash) = e.under {
                ops.push(Op::Whole { index, hash });
            }
            for (sub, s) in e.subs.iter().enumerate() {
                if let Some(to) = s {
                    ops.push(Op::Sub {
                        index,
                        sub: sub as u16,
                        to: *to,
                    });
                }
            }
        }
        ops
    }
}

/// Which slots of a data file are free, in use, or safe to overwrite. A slot a durable record
/// names is never overwritten: a superseded slot becomes reusable only once the change that
/// superseded it is durable (`durable`), and only slots taken since the last flush are
/// rewritten in place.
#[derive(Debug, Default)]
pub struct Slots {
    /// Slots the file spans.
    end: u64,
    /// Reusable slots that still hold disk space.
    free: BTreeSet<u64>,
    /// Reusable slots that are holes in the file (reclaimed).
    punched: BTreeSet<u64>,
    /// Taken since the last flush: no durable record names them.
    fresh: HashSet<u64>,
    /// Superseded since the last flush: reusable once that flush is durable.
    dying: Vec<u64>,
    /// Slots taken by the write in progress and where each came from, so a write that
    /// fails (or is refused) gives them back exactly.
    journal: Vec<(u64, Origin)>,
}

/// Where a taken slot came from.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Free,
    Punched,
    End,
}

impl Slots {
    /// The slots of a file after replay: `live` are named by the overlay; every other slot
    /// below the highest live one is reusable (and reported by `reclaimable`), and slots past
    /// it are cut off by the caller.
    pub fn recover(live: impl Iterator<Item = u64>) -> Slots {
        let live: HashSet<u64> = live.collect();
        let end = live.iter().max().map_or(0, |m| m + 1);
        let free = (0..end).filter(|s| !live.contains(s)).collect();
        Slots {
            end,
            free,
            ..Slots::default()
        }
    }

    /// Slots the file spans.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Slots that hold disk space (everything the file spans but reclaimed holes).
    pub fn held(&self) -> u64 {
        self.end - self.punched.len() as u64
    }

    /// How many more slots of disk `n` takes would cost (reusing held free slots first).
    pub fn cost_of(&self, n: u64) -> u64 {
        n.saturating_sub(self.free.len() as u64)
    }

    /// A slot to write new bytes to: a free one that holds disk first, then a reclaimed hole,
    /// then one past the end.
    pub fn take(&mut self) -> u64 {
        let (slot, origin) = if let Some(s) = self.free.pop_first() {
            (s, Origin::Free)
        } else if let Some(s) = self.punched.pop_first() {
            (s, Origin::Punched)
        } else {
            self.end += 1;
            (self.end - 1, Origin::End)
        };
        self.fresh.insert(slot);
        self.journal.push((slot, origin));
        slot
    }

    /// The slots taken since the last `keep_taken` stay taken.
    pub fn keep_taken(&mut self) {
        self.journal.clear();
    }

    /// Gives back every slot taken since the last `keep_taken` (the write failed or was
    /// refused; they are named nowhere), as they were.
    pub fn untake_all(&mut self) {
        while let Some((slot, origin)) = self.journal.pop() {
            self.fresh.remove(&slot);
            match origin {
                Origin::Free => drop(self.free.insert(slot)),
                Origin::Punched => drop(self.punched.insert(slot)),
                Origin::End => self.end -= 1,
            }
        }
    }

    /// Whether `slot` may be rewritten in place (taken since the last flush).
    pub fn is_fresh(&self, slot: u64) -> bool {
        self.fresh.contains(&slot)
    }

    /// `slot` is no longer named by the overlay.
    pub fn release(&mut self, slot: u64) {
        if self.fresh.remove(&slot) {
            self.free.insert(slot);
        } else {
            self.dying.push(slot);
        }
    }

    /// Everything so far is durable: superseded slots become reusable, taken ones durable.
    pub fn durable(&mut self) {
        self.fresh.clear();
        self.free.extend(self.dying.drain(..));
    }

    /// Free slots holding disk, as `(first, count)` runs, now counted as reclaimed (the caller
    /// punches them), and the new end when free slots reach it (the caller truncates).
    pub fn reclaimable(&mut self) -> (Vec<(u64, u64)>, u64) {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &s in &self.free {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == s => *n += 1,
                _ => runs.push((s, 1)),
            }
        }
        self.punched.append(&mut self.free);
        while self.end > 0 && self.punched.remove(&(self.end - 1)) {
            self.end -= 1;
        }
        let end = self.end;
        runs.retain(|&(first, _)| first < end);
        for (first, n) in &mut runs {
            *n = (*n).min(end - *first);
        }
        (runs, end)
    }
}

/// A sub-block position as its one logged byte (positions are below `MAX_SUBS`, 256).
fn sub_byte(sub: u16) -> u8 {
    u8::try_from(sub).unwrap_or(u8::MAX)
}

/// Encodes ops as one overlay record payload.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + ops.len() * 26);
    out.push(FORMAT);
    for op in ops {
        match *op {
            Op::Whole { index, hash: None } => {
                out.push(1);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Op::Whole {
                index,
                hash: Some(h),
            } => {
                out.push(2);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&h.0);
            }
            Op::Sub {
                index,
                sub,
                to: Sub::Zero,
            } => {
                out.push(3);
                out.extend_from_slice(&index.to_le_bytes());
                out.push(sub_byte(sub));
            }
            Op::Sub {
                index,
                sub,
                to: Sub::Data { slot, sum },
            } => {
                out.push(4);
                out.extend_from_slice(&index.to_le_bytes());
                out.push(sub_byte(sub));
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&sum);
            }
        }
    }
    out
}

/// A cursor over an untrusted payload: every read is bounds-checked.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OverlayError> {
        if self.rest.len() < n {
            return Err(OverlayError::BadRecord("truncated op".into()));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], OverlayError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64, OverlayError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u8(&mut self) -> Result<u8, OverlayError> {
        Ok(self.array::<1>()?[0])
    }
}

/// Decodes an overlay record payload (untrusted: a bad byte is an error, never a panic).
pub fn decode(payload: &[u8]) -> Result<Vec<Op>, OverlayError> {
    let Some((&format, body)) = payload.split_first() else {
        return Err(OverlayError::BadRecord("empty record".into()));
    };
    if format != FORMAT {
        return Err(OverlayError::BadRecord(format!(
            "unknown overlay format {format}"
        )));
    }
    let mut c = Cursor { rest: body };
    let mut ops = Vec::with_capacity(body.len() / 26 + 1);
    while let Some(&tag) = c.rest.first() {
        c.rest = &c.rest[1..];
        let index = c.u64()?;
        let op = match tag {
            1 => Op::Whole { index, hash: None },
            2 => Op::Whole {
                index,
                hash: Some(BlockHash(c.array()?)),
            },
            3 | 4 => {
                let sub = u16::from(c.u8()?);
                let to = if tag == 3 {
                    Sub::Zero
                } else {
                    Sub::Data {
                        slot: c.u64()?,
                        sum: c.array()?,
                    }
                };
                Op::Sub { index, sub, to }
            }
            t => return Err(OverlayError::BadRecord(format!("unknown op {t}"))),
        };
        ops.push(op);
    }
    Ok(ops)
}

/// The checksum of a sub-block's bytes.
pub fn checksum(data: &[u8]) -> [u8; SUM] {
    let mut sum = [0u8; SUM];
    sum.copy_from_slice(&blake3::hash(data).as_bytes()[..SUM]);
    sum
}

/// The instance's private data file: 4 KiB slots, read with a checksum check.
#[derive(Debug)]
pub struct DataFile {
    path: PathBuf,
    file: File,
}

impl DataFile {
    /// Opens (creating, mode 0600) the data file at `path`.
    pub fn open(path: &Path) -> Result<DataFile, OverlayError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path);
        let data = DataFile::opened(path, file)?;
        if !existed {
            // Records will name slots in this file: its name must be as durable as they are.
            crate::log::sync_parent(path).map_err(data.io())?;
        }
        Ok(data)
    }

    /// Opens an existing data file read-only (fsck).
    pub fn open_read_only(path: &Path) -> Result<DataFile, OverlayError> {
        DataFile::opened(path, File::open(path))
    }

    fn opened(path: &Path, file: std::io::Result<File>) -> Result<DataFile, OverlayError> {
        let file = file.map_err(|source| OverlayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(DataFile {
            path: path.to_path_buf(),
            file,
        })
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> OverlayError + '_ {
        move |source| OverlayError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Slots the file spans (its length in slots, rounded up).
    pub fn slots(&self) -> Result<u64, OverlayError> {
        let len = self.file.metadata().map_err(self.io())?.len();
        Ok(len.div_ceil(SUB))
    }

    /// Cuts the file to `slots` slots (after a crash: unflushed slots past the last durable
    /// one are garbage).
    pub fn truncate(&self, slots: u64) -> Result<(), OverlayError> {
        self.file
            .set_len(slots.saturating_mul(SUB))
            .map_err(self.io())
    }

    /// Reads slot `slot` whole into `buf` (`SUB` bytes) and checks it against `sum`.
    pub fn read(&self, slot: u64, sum: &[u8; SUM], buf: &mut [u8]) -> Result<(), OverlayError> {
        let at = slot.checked_mul(SUB).ok_or(OverlayError::Corrupt {
            path: self.path.clone(),
            slot,
        })?;
        match self.file.read_exact_at(buf, at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(OverlayError::Corrupt {
                    path: self.path.clone(),
                    slot,
                })
            }
            Err(e) => return Err(self.io()(e)),
        }
        if checksum(buf) != *sum {
            return Err(OverlayError::Corrupt {
                path: self.path.clone(),
                slot,
            });
        }
        Ok(())
    }

    /// Writes whole slots starting at `slot` (`data` is a multiple of `SUB` bytes).
    pub fn write(&self, slot: u64, data: &[u8]) -> Result<(), OverlayError> {
        let at = slot.saturating_mul(SUB);
        self.file.write_all_at(data, at).map_err(self.io())
    }

    /// Gives the disk of `count` slots from `first` back to the filesystem (they read as
    /// zeros, and may be written again).
    pub fn punch(&self, first: u64, count: u64) -> Result<(), OverlayError> {
        let (Ok(off), Ok(len)) = (
            i64::try_from(first.saturating_mul(SUB)),
            i64::try_from(count.saturating_mul(SUB)),
        ) else {
            return Ok(());
        };
        // SAFETY: fallocate on a descriptor this struct owns; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc != 0 {
            return Err(self.io()(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes written slots durable.
    pub fn sync(&self) -> Result<(), OverlayError> {
        self.file.sync_data().map_err(self.io())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Whole {
                index: 7,
                hash: None,
            },
            Op::Whole {
                index: 8,
                hash: Some(BlockHash([9; 32])),
            },
            Op::Sub {
                index: 8,
                sub: 3,
                to: Sub::Zero,
            },
            Op::Sub {
                index: u64::MAX,
                sub: 15,
                to: Sub::Data {
                    slot: 42,
                    sum: [5; SUM],
                },
            },
        ]
    }

    #[test]
    fn ops_round_trip() {
        assert_eq!(decode(&encode(&ops())).unwrap(), ops());
    }

    #[test]
    fn every_truncation_and_bad_byte_is_an_error_not_a_panic() {
        let bytes = encode(&ops());
        for cut in 0..bytes.len() {
            // every proper prefix that ends inside an op fails; prefixes at op ends decode
            let _ = decode(&bytes[..cut]);
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        bad[1] = 9;
        assert!(decode(&bad).is_err());
        bad = bytes;
        bad[0] = 2;
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn apply_counts_live_slots_and_to_ops_replays() {
        let mut o = Overlay::new(16);
        for op in ops() {
            o.apply(&op).unwrap();
        }
        let data = |slot| Op::Sub {
            index: 8,
            sub: 4,
            to: Sub::Data {
                slot,
                sum: [0; SUM],
            },
        };
        o.apply(&data(1)).unwrap();
        o.apply(&data(2)).unwrap();
        assert_eq!(o.live_slots(), 2);
        assert_eq!(o.live_slot_numbers().max(), Some(42));
        let mut again = Overlay::new(16);
        for op in o.to_ops() {
            again.apply(&op).unwrap();
        }
        assert_eq!(again.map, o.map);
        assert_eq!(again.live_slots(), 2);
        o.apply(&Op::Whole {
            index: 8,
            hash: None,
        })
        .unwrap();
        assert_eq!(o.live_slots(), 1);
        o.remove(u64::MAX);
        assert_eq!(o.live_slots(), 0);
        assert!(o
            .apply(&Op::Sub {
                index: 1,
                sub: 16,
                to: Sub::Zero
            })
            .is_err());
    }

    #[test]
    fn slots_are_reused_only_once_their_successor_is_durable() {
        let mut s = Slots::recover([0u64, 2, 5].into_iter());
        assert_eq!(s.end(), 6);
        assert_eq!(s.held(), 6);
        // 1, 3, 4 are free after replay
        assert_eq!(s.take(), 1);
        s.release(0); // a durable slot superseded: not reusable yet
        assert_eq!(s.take(), 3);
        s.release(3); // taken this epoch: reusable at once
        assert_eq!(s.take(), 3);
        assert!(s.is_fresh(3) && !s.is_fresh(2));
        assert_eq!(s.take(), 4);
        assert_eq!(s.take(), 6);
        s.durable();
        assert!(!s.is_fresh(3));
        assert_eq!(s.take(), 0);
        s.release(6);
        s.release(5);
        s.durable();
        let (runs, end) = s.reclaimable();
        assert_eq!(runs, vec![]);
        assert_eq!(end, 5);
        assert_eq!(s.held(), 5);
        s.release(2);
        s.durable();
        assert_eq!(s.reclaimable(), (vec![(2, 1)], 5));
        assert_eq!(s.held(), 4);
        assert_eq!(s.cost_of(1), 1);
        s.keep_taken();
        assert_eq!(s.take(), 2); // a reclaimed hole is written again
        assert_eq!(s.held(), 5);
        assert_eq!(s.take(), 5);
        assert_eq!(s.held(), 6);
        s.untake_all();
        assert_eq!((s.held(), s.end()), (4, 5), "a refused write holds nothing");
        assert_eq!(s.take(), 2);
    }

    #[test]
    fn data_file_detects_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let f = DataFile::open(&dir.path().join("i.data")).unwrap();
        let block = vec![7u8; SUB as usize];
        f.write(3, &block).unwrap();
        let sum = checksum(&block);
        let mut buf = vec![0u8; SUB as usize];
        f.read(3, &sum, &mut buf).unwrap();
        assert_eq!(buf, block);
        assert!(matches!(
            f.read(4, &sum, &mut buf),
            Err(OverlayError::Corrupt { slot: 4, .. })
        ));
        f.write(3, &vec![8u8; SUB as usize]).unwrap();
        assert!(matches!(
            f.read(3, &sum, &mut buf),
            Err(OverlayError::Corrupt { slot: 3, .. })
        ));
    }
}
