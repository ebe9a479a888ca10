//! Copy-on-write instances: a base version plus an overlay of written 4 KiB sub-blocks whose
//! bytes live in the instance's own data file (`overlay`).
//! Invariants: shared blocks are never modified; a reader sees one `View` (base + overlay) for
//! a whole request, so a substitution (which swaps the view) is all-or-nothing to it; the log
//! only names data slots that were synced before the record was written, and a slot a durable
//! record names is never overwritten, so replay never points at missing or changed bytes.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::instance_log::{LogError, Record, RecordLog};
use crate::overlay::{checksum, DataFile, Op, Overlay, OverlayError, Slots, Sub, SUB};
use crate::{is_zero, BlockHash, ErrorKind, Store, StoreError, Version, VersionId};

pub use crate::instance_sub::{
    ConflictPolicy, Range, SubstituteOutcome, SubstituteRequest, SubstituteTimes,
};

/// Pending (not yet durable) overlay changes are flushed once there are this many, so an idle
/// guest that never flushes still has its writes on disk eventually.
const AUTO_FLUSH_CHANGES: usize = 4096;

/// After this many write records the log is compacted (events kept, the overlay written as
/// one record), so replay stays proportional to the overlay, not to the guest's history.
const COMPACT_AFTER: usize = 1024;

/// The name of an instance: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(String);

impl InstanceId {
    /// Parses and validates an instance name.
    pub fn parse(s: &str) -> Result<InstanceId, InstanceError> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        let ok_start = !s.starts_with('.') && !s.starts_with('-');
        if s.is_empty() || s.len() > 64 || !ok_chars || !ok_start {
            return Err(InstanceError::BadId(s.to_string()));
        }
        Ok(InstanceId(s.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Errors of instance operations.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// A block store operation failed
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The instance log failed
    #[error(transparent)]
    Log(#[from] LogError),
    /// The overlay's data file failed, or a slot does not match its checksum
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// Not a valid instance name (1-64 of A-Za-z0-9._-, not starting with . or -)
    #[error("invalid instance name {0:?} (use 1-64 of A-Za-z0-9._-)")]
    BadId(String),
    /// No such instance
    #[error("no instance named {0}")]
    NotFound(InstanceId),
    /// The instance already exists
    #[error("instance {0} already exists")]
    Exists(InstanceId),
    /// The instance log names a hash or version that does not parse
    #[error("instance {0}: log record names an invalid id {1:?}")]
    BadRecord(InstanceId, String),
    /// A write or discard reaches past the end of the disk
    #[error("instance {id}: I/O at {offset}+{len} is past the end ({size} bytes)")]
    PastEnd {
        /// The instance.
        id: InstanceId,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// Live disks do not change size
    #[error(
        "target is {target} bytes but instance {id} is {size} bytes: live disks do not change size"
    )]
    SizeMismatch {
        /// The instance.
        id: InstanceId,
        /// Instance size.
        size: u64,
        /// Target size.
        target: u64,
    },
    /// A write would take the instance's data past its limit (`--max-bytes`)
    #[error("instance {id}: writing would hold {would} bytes on the host, past its limit of {max} (--max-bytes)")]
    NoSpace {
        /// The instance.
        id: InstanceId,
        /// Bytes the write would have held.
        would: u64,
        /// The limit.
        max: u64,
    },
    /// Substitution refused: blocks written by the instance are also changed by the target
    #[error("{} conflicting block(s) (written by the instance and changed by the target); use --force or --keep-local", .0.len())]
    Conflicts(Vec<Range>),
    /// The target uses another block size
    #[error("target block size {target} differs from the instance's {size}")]
    BlockSizeMismatch {
        /// Instance block size.
        size: u64,
        /// Target block size.
        target: u64,
    },
}

impl InstanceError {
    /// The kind the CLI maps to an exit code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            InstanceError::Store(e) => e.kind(),
            InstanceError::Log(_) => ErrorKind::Io,
            InstanceError::Overlay(OverlayError::Corrupt { .. }) => ErrorKind::Corrupt,
            InstanceError::Overlay(OverlayError::BadRecord(_)) => ErrorKind::Corrupt,
            InstanceError::Overlay(OverlayError::Io { .. }) => ErrorKind::Io,
            InstanceError::BadId(_)
            | InstanceError::PastEnd { .. }
            | InstanceError::SizeMismatch { .. }
            | InstanceError::BlockSizeMismatch { .. } => ErrorKind::BadInput,
            InstanceError::NotFound(_) => ErrorKind::NotFound,
            InstanceError::Exists(_)
            | InstanceError::Conflicts(_)
            | InstanceError::NoSpace { .. } => ErrorKind::Conflict,
            InstanceError::BadRecord(..) => ErrorKind::Corrupt,
        }
    }
}

/// What an instance shows at one moment: a base version and what was written over it.
#[derive(Debug)]
pub struct View {
    pub(crate) base: Version,
    /// Written blocks, at sub-block grain (see `overlay`).
    pub(crate) overlay: RwLock<Overlay>,
    /// A flat copy of `base` (verified when built), read instead of the packs once there.
    base_copy: ArcSwapOption<File>,
}

impl View {
    pub(crate) fn new(base: Version, overlay: Overlay) -> View {
        View {
            base,
            overlay: RwLock::new(overlay),
            base_copy: ArcSwapOption::empty(),
        }
    }

    /// The base version.
    pub fn base(&self) -> &Version {
        &self.base
    }

    /// Serves unwritten blocks from `copy`, a complete flat copy of the base version.
    pub fn set_base_copy(&self, copy: Arc<File>) {
        self.base_copy.store(Some(copy));
    }

    /// Stops reading from the flat copy (it was found damaged): the store's verified path
    /// serves unwritten blocks again.
    pub fn clear_base_copy(&self) {
        self.base_copy.store(None);
    }

    /// Whether unwritten blocks are read from a flat copy.
    pub fn has_base_copy(&self) -> bool {
        self.base_copy.load().is_some()
    }

    pub(crate) fn read_overlay(&self) -> RwLockReadGuard<'_, Overlay> {
        self.overlay.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The hash of block `index` when it is one whole stored block (`Some(None)`: a hole);
    /// `None` when sub-blocks are written in it (its bytes then live in the data file).
    pub fn block(&self, index: u64) -> Result<Option<Option<BlockHash>>, StoreError> {
        match self.read_overlay().get(index) {
            None => Ok(Some(self.base.block_hash(index)?)),
            Some(e) => Ok(e.whole()),
        }
    }

    /// Pack blocks the overlay names (whole blocks written by older versions of imagefs).
    pub fn pack_blocks(&self) -> Vec<BlockHash> {
        self.read_overlay()
            .iter()
            .filter_map(|(_, e)| e.under.flatten())
            .collect()
    }

    /// Written blocks: `(index, whether the host holds bytes for it)`; a block discarded
    /// whole, or written only with zeros over a discard, holds none.
    pub fn written(&self) -> Vec<(u64, bool)> {
        self.read_overlay()
            .iter()
            .map(|(&i, e)| {
                let data = e.subs.iter().any(|s| matches!(s, Some(Sub::Data { .. })));
                (i, data || e.under != Some(None))
            })
            .collect()
    }

    /// Number of blocks the instance has written.
    pub fn written_blocks(&self) -> usize {
        self.read_overlay().len()
    }
}

/// Serialized writer side: the log, the data file's allocation, the changes not yet durable.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) log: RecordLog,
    pub(crate) pending: Vec<Op>,
    /// Write records in the log since it was last compacted.
    pub(crate) write_records: usize,
    /// The data file's slots: free, taken this epoch, superseded.
    pub(crate) slots: Slots,
    /// Slots written since the data file was last synced.
    pub(crate) dirty: bool,
}

/// A live copy-on-write instance.
#[derive(Debug)]
pub struct Instance {
    pub(crate) id: InstanceId,
    pub(crate) view: ArcSwap<View>,
    pub(crate) writer: Mutex<Writer>,
    pub(crate) data: DataFile,
    /// The most bytes the data file may hold (`Limits` record; default twice the disk).
    max_bytes: std::sync::atomic::AtomicU64,
}

/// The default limit of an instance's data on the host: twice its disk.
pub fn default_max_bytes(disk_size: u64) -> u64 {
    disk_size.saturating_mul(2)
}

fn parse_hash(id: &InstanceId, s: &str) -> Result<BlockHash, InstanceError> {
    s.parse()
        .map_err(|_| InstanceError::BadRecord(id.clone(), s.to_string()))
}

pub(crate) fn parse_version(id: &InstanceId, s: &str) -> Result<VersionId, InstanceError> {
    s.parse()
        .map_err(|_| InstanceError::BadRecord(id.clone(), s.to_string()))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The path of an instance's data file beside its log.
pub(crate) fn data_path(log: &std::path::Path) -> PathBuf {
    log.with_extension("data")
}

/// Sub-blocks per block of `v`.
fn per_block(v: &Version) -> usize {
    (u64::from(v.block_size()) / SUB).max(1) as usize
}

/// Replays an instance's records: its base version, its overlay and how many write records
/// the log holds.
fn replay(
    store: &Store,
    id: &InstanceId,
    path: &std::path::Path,
    records: Vec<Record>,
) -> Result<(Version, Overlay, usize), InstanceError> {
    let mut base: Option<VersionId> = None;
    let mut ops: Vec<Op> = Vec::new();
    let mut dropped_after: Vec<(usize, Vec<u64>)> = Vec::new();
    let mut write_records = 0;
    for r in records {
        match r {
            Record::Created { base: b, .. } => base = Some(parse_version(id, &b)?),
            Record::Writes { changes } => {
                write_records += 1;
                for c in changes {
                    let hash = match c.hash {
                        Some(h) => Some(parse_hash(id, &h)?),
                        None => None,
                    };
                    ops.push(Op::Whole {
                        index: c.index,
                        hash,
                    });
                }
            }
            Record::Overlay { ops: more } => {
                write_records += 1;
                ops.extend(more);
            }
            Record::Rebased { to, dropped, .. } => {
                base = Some(parse_version(id, &to)?);
                dropped_after.push((ops.len(), dropped));
            }
            Record::Committed { .. } | Record::Limits { .. } => {}
        }
    }
    let base = base.ok_or_else(|| LogError::NoHeader(path.to_path_buf()))?;
    let base = store.version(&base)?;
    let mut overlay = Overlay::new(per_block(&base));
    let mut drops = dropped_after.into_iter().peekable();
    for (n, op) in ops.iter().enumerate() {
        while let Some((_, dropped)) = drops.next_if(|(at, _)| *at == n) {
            for i in dropped {
                overlay.remove(i);
            }
        }
        overlay
            .apply(op)
            .map_err(|e| InstanceError::BadRecord(id.clone(), e.to_string()))?;
    }
    for (_, dropped) in drops {
        for i in dropped {
            overlay.remove(i);
        }
    }
    Ok((base, overlay, write_records))
}

/// One damaged instance found by [`check_instances`].
#[derive(Debug, Clone)]
pub struct InstanceProblem {
    /// The instance.
    pub instance: String,
    /// Disk offset of the damaged sub-block, when one is.
    pub offset: Option<u64>,
    /// What is wrong.
    pub detail: String,
}

/// Checks every instance of `store` read-only (for fsck): its log replays and every data
/// slot it names matches its checksum. Returns the problems and the bytes checked.
pub fn check_instances(store: &Store) -> Result<(Vec<InstanceProblem>, u64), StoreError> {
    let instances = Instances::new(store);
    let ids = instances
        .list()
        .map_err(|e| StoreError::IndexInconsistent(format!("instances: {e}")))?;
    let mut problems = Vec::new();
    let mut bytes = 0u64;
    for id in ids {
        let path = instances.path(&id);
        let problem = |offset, detail: String| InstanceProblem {
            instance: id.to_string(),
            offset,
            detail,
        };
        let replayed = RecordLog::read(&path)
            .map_err(InstanceError::from)
            .and_then(|records| replay(store, &id, &path, records));
        let (base, overlay, _) = match replayed {
            Ok(r) => r,
            Err(e) => {
                problems.push(problem(None, e.to_string()));
                continue;
            }
        };
        if overlay.live_slots() == 0 {
            continue;
        }
        let data = match DataFile::open_read_only(&data_path(&path)) {
            Ok(d) => d,
            Err(e) => {
                problems.push(problem(None, e.to_string()));
                continue;
            }
        };
        let bs = u64::from(base.block_size());
        let mut buf = vec![0u8; SUB as usize];
        let mut entries: Vec<(&u64, &crate::overlay::Entry)> = overlay.iter().collect();
        entries.sort_by_key(|(i, _)| **i);
        for (&index, entry) in entries {
            for (sub, s) in entry.subs.iter().enumerate() {
                if let Some(Sub::Data { slot, sum }) = s {
                    let offset = index.saturating_mul(bs).saturating_add(sub as u64 * SUB);
                    match data.read(*slot, sum, &mut buf) {
                        Ok(()) => bytes += SUB,
                        Err(e) => problems.push(problem(Some(offset), e.to_string())),
                    }
                }
            }
        }
    }
    Ok((problems, bytes))
}

/// Most overlay ops in one compaction record (keeps records well under the log's limit).
const OPS_PER_RECORD: usize = 1 << 16;

impl Instance {
    /// Opens an instance from its log, replaying every complete record.
    pub(crate) fn open(
        store: &Store,
        id: InstanceId,
        path: PathBuf,
    ) -> Result<Instance, InstanceError> {
        let (log, records) = RecordLog::open(&path)?;
        let max_bytes = records.iter().rev().find_map(|r| match r {
            Record::Limits { max_bytes } => Some(*max_bytes),
            _ => None,
        });
        let (base, overlay, write_records) = replay(store, &id, &path, records)?;
        let max_bytes = max_bytes.unwrap_or_else(|| default_max_bytes(base.size()));
        let data = DataFile::open(&data_path(&path))?;
        // Slots past the last one a durable record names were written but never flushed.
        let mut slots = Slots::recover(overlay.live_slot_numbers());
        // Slots past the last one a durable record names were written but never flushed; free
        // ones below it go back to the filesystem.
        let (runs, end) = slots.reclaimable();
        if data.slots()? > end {
            data.truncate(end)?;
        }
        for (first, n) in runs {
            data.punch(first, n)?;
        }
        let inst = Instance {
            id,
            view: ArcSwap::from_pointee(View::new(base, overlay)),
            writer: Mutex::new(Writer {
                log,
                pending: Vec::new(),
                write_records,
                slots,
                dirty: false,
            }),
            data,
            max_bytes: std::sync::atomic::AtomicU64::new(max_bytes),
        };
        if write_records > COMPACT_AFTER {
            inst.compact()?;
        }
        Ok(inst)
    }

    /// Rewrites the log as its events plus the whole overlay as ops (only when no write is
    /// pending, so the records name only synced slots).
    pub fn compact(&self) -> Result<(), InstanceError> {
        let mut writer = self.lock_writer();
        if !writer.pending.is_empty() {
            return Ok(()); // only right after a flush; the next flush retries
        }
        let path = writer.log.path().to_path_buf();
        let mut records: Vec<Record> = RecordLog::read(&path)?
            .into_iter()
            .filter(|r| !matches!(r, Record::Writes { .. } | Record::Overlay { .. }))
            .collect();
        let ops = self.view().read_overlay().to_ops();
        // Last, so that replay applies them after every rebase's dropped entries.
        for chunk in ops.chunks(OPS_PER_RECORD) {
            records.push(Record::Overlay {
                ops: chunk.to_vec(),
            });
        }
        writer.log = RecordLog::rewrite(&path, &records)?;
        writer.write_records = 1;
        Ok(())
    }

    /// The instance's name.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }

    /// The current view (base + overlay); hold it for a whole request.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Disk size in bytes (never changes).
    pub fn size(&self) -> u64 {
        self.view.load().base.size()
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        u64::from(self.view.load().base.block_size())
    }

    /// Bytes the instance's data file holds on the host (live slots, and replaced ones not yet
    /// reclaimed).
    pub fn data_bytes(&self) -> u64 {
        self.lock_writer().slots.held().saturating_mul(SUB)
    }

    /// The most bytes the instance's data may hold on the host.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the most bytes the instance's data may hold on the host (durable on return).
    /// Data already held over a lowered limit stays; writes that need more space fail.
    pub fn set_max_bytes(&self, max_bytes: u64) -> Result<(), InstanceError> {
        let mut writer = self.lock_writer();
        writer.log.append_durable(&[Record::Limits { max_bytes }])?;
        self.max_bytes
            .store(max_bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of the data file no sub-block names any more (replaced by later writes), not
    /// yet reclaimed.
    pub fn dead_bytes(&self) -> u64 {
        let held = self.lock_writer().slots.held();
        held.saturating_sub(self.view().read_overlay().live_slots())
            .saturating_mul(SUB)
    }

    /// Gives the disk of replaced slots back to the filesystem (after making pending writes
    /// durable, so every replaced slot is safe to drop); returns the bytes reclaimed.
    pub fn reclaim(&self) -> Result<u64, InstanceError> {
        let mut writer = self.lock_writer();
        self.flush_locked(&mut writer)?;
        let before = writer.slots.held();
        let (runs, end) = writer.slots.reclaimable();
        if self.data.slots()? > end {
            self.data.truncate(end)?;
        }
        for (first, n) in runs {
            self.data.punch(first, n)?;
        }
        Ok(before
            .saturating_sub(writer.slots.held())
            .saturating_mul(SUB))
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads at `offset` into `buf` from one view; returns the bytes read (short at the end).
    pub fn read_at(
        &self,
        store: &Store,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, InstanceError> {
        let view = self.view();
        match read_view(store, &view, &self.data, offset, buf) {
            Err(InstanceError::Overlay(OverlayError::Corrupt { .. })) => {
                // A slot not yet durable may have been rewritten in place while it was read:
                // read again with writes held off; a mismatch now is real damage.
                let _writer = self.lock_writer();
                read_view(store, &self.view(), &self.data, offset, buf)
            }
            other => other,
        }
    }

    /// Writes `data` at `offset`, copy-on-write. Durable after `flush`.
    pub fn write_at(
        &self,
        store: &Store,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, InstanceError> {
        self.modify(store, offset, data.len() as u64, Some(data))?;
        Ok(data.len())
    }

    /// Makes `offset..offset+len` read as zeros, turning whole blocks into holes.
    pub fn punch_hole(&self, store: &Store, offset: u64, len: u64) -> Result<(), InstanceError> {
        let size = self.size();
        let len = len.min(size.saturating_sub(offset));
        self.modify(store, offset, len, None)
    }

    /// Shared write path: `data` None means zeros (discard).
    fn modify(
        &self,
        store: &Store,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), InstanceError> {
        let size = self.size();
        let end = offset.checked_add(len).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(InstanceError::PastEnd {
                id: self.id.clone(),
                offset,
                len,
                size,
            });
        };
        if len == 0 {
            return Ok(());
        }
        let mut writer = self.lock_writer();
        // The writer lock keeps substitution out, so this view stays current throughout.
        let view = self.view();
        let bs = u64::from(view.base.block_size());
        let mut ops: Vec<Op> = Vec::new();
        // Bytes to write, by slot; slots taken and released here are committed to the
        // allocator only once the bytes are written.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut taken: Vec<u64> = Vec::new();
        let held_before = writer.slots.held().saturating_mul(SUB);
        let mut released: Vec<u64> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let block_start = index * bs;
            if data.is_none() && pos == block_start && (end - pos >= bs || end == size) {
                // A discard of a whole block: a hole, nothing stored.
                if let Some(e) = view.read_overlay().get(index) {
                    released.extend(e.subs.iter().filter_map(|s| match s {
                        Some(Sub::Data { slot, .. }) => Some(*slot),
                        _ => None,
                    }));
                }
                ops.push(Op::Whole { index, hash: None });
                pos = (block_start + bs).min(end);
                continue;
            }
            let sub_start = pos - pos % SUB;
            let sub = ((sub_start - block_start) / SUB) as u16;
            let in_sub = (pos - sub_start) as usize;
            let n = (end - pos).min(SUB - in_sub as u64) as usize;
            let src_off = (pos - offset) as usize;
            // The sub-block's new bytes: whole when the write covers it (or reaches the end
            // of the disk), else read, modified, written.
            let mut bytes = vec![0u8; SUB as usize];
            let covers = in_sub == 0 && (n as u64 == SUB || sub_start + n as u64 == size);
            if !covers {
                let visible = (size - sub_start).min(SUB) as usize;
                let ov = view.read_overlay();
                read_block_range(
                    store,
                    &view,
                    &ov,
                    &self.data,
                    sub_start,
                    &mut bytes[..visible],
                )?;
            }
            let dst = &mut bytes[in_sub..in_sub + n];
            match data.and_then(|d| d.get(src_off..src_off + n)) {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
            let current = match view
                .read_overlay()
                .get(index)
                .and_then(|e| e.sub(sub.into()))
            {
                Some(Sub::Data { slot, .. }) => Some(slot),
                _ => None,
            };
            let to = if is_zero(&bytes) {
                released.extend(current);
                Sub::Zero
            } else {
                let sum = checksum(&bytes);
                let slot = match current {
                    // Named by no durable record yet: rewritten in place.
                    Some(slot) if writer.slots.is_fresh(slot) => slot,
                    _ => {
                        released.extend(current);
                        let slot = writer.slots.take();
                        taken.push(slot);
                        slot
                    }
                };
                writes.push((slot, bytes));
                Sub::Data { slot, sum }
            };
            ops.push(Op::Sub { index, sub, to });
            pos += n as u64;
        }
        let held = writer.slots.held().saturating_mul(SUB);
        let grows = held.saturating_sub(held_before);
        if grows > 0 {
            if let Err(e) = store.ensure_space(grows) {
                writer.slots.untake_all();
                return Err(e.into());
            }
        }
        let max = self.max_bytes();
        if !taken.is_empty() && held > max {
            // Refused whole: nothing stored, the overlay unchanged.
            writer.slots.untake_all();
            return Err(InstanceError::NoSpace {
                id: self.id.clone(),
                would: held,
                max,
            });
        }
        if let Err(e) = self.write_slots(&mut writes) {
            writer.slots.untake_all();
            return Err(e.into());
        }
        crate::fault::point("instance.data_written");
        writer.slots.keep_taken();
        writer.dirty |= !writes.is_empty();
        for slot in released {
            writer.slots.release(slot);
        }
        {
            let mut overlay = view.overlay.write().unwrap_or_else(|p| p.into_inner());
            for op in &ops {
                overlay
                    .apply(op)
                    .map_err(|e| InstanceError::BadRecord(self.id.clone(), e.to_string()))?;
            }
        }
        writer.pending.extend(ops);
        if writer.pending.len() >= AUTO_FLUSH_CHANGES {
            self.flush_locked(&mut writer)?;
        }
        Ok(())
    }

    /// Writes slots, one write per run of consecutive slots.
    fn write_slots(&self, writes: &mut [(u64, Vec<u8>)]) -> Result<(), OverlayError> {
        writes.sort_unstable_by_key(|(slot, _)| *slot);
        let mut i = 0;
        while i < writes.len() {
            let first = writes[i].0;
            let mut j = i + 1;
            while j < writes.len() && writes[j].0 == first + (j - i) as u64 {
                j += 1;
            }
            if j - i == 1 {
                self.data.write(first, &writes[i].1)?;
            } else {
                let run: Vec<u8> = writes[i..j]
                    .iter()
                    .flat_map(|(_, b)| b.iter().copied())
                    .collect();
                self.data.write(first, &run)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Makes every write so far durable (slots synced, then the log record fsynced).
    pub fn flush(&self, _store: &Store) -> Result<(), InstanceError> {
        let mut writer = self.lock_writer();
        self.flush_locked(&mut writer)?;
        let compact = writer.write_records > COMPACT_AFTER;
        drop(writer);
        if compact {
            self.compact()?;
        }
        Ok(())
    }

    /// Syncs the data file if slots were written; pending ops stay pending.
    pub(crate) fn sync_data(&self, writer: &mut Writer) -> Result<(), InstanceError> {
        if writer.dirty {
            self.data.sync()?;
            writer.dirty = false;
        }
        Ok(())
    }

    /// Writes pending overlay changes to the log after the slots they name are durable.
    pub(crate) fn flush_locked(&self, writer: &mut Writer) -> Result<(), InstanceError> {
        if writer.pending.is_empty() {
            return Ok(());
        }
        self.sync_data(writer)?;
        crate::fault::point("instance.flush.data_synced");
        let ops = std::mem::take(&mut writer.pending);
        let records: Vec<Record> = ops
            .chunks(OPS_PER_RECORD)
            .map(|c| Record::Overlay { ops: c.to_vec() })
            .collect();
        if let Err(e) = writer.log.append_durable(&records) {
            writer.pending = ops;
            return Err(e.into());
        }
        writer.write_records += 1;
        writer.slots.durable();
        crate::fault::point("instance.flush.synced");
        Ok(())
    }
}

/// Reads `buf.len()` bytes at disk offset `pos` that lie inside one block, from what the
/// overlay `ov` of `view` shows there.
fn read_block_range(
    store: &Store,
    view: &View,
    ov: &Overlay,
    data: &DataFile,
    pos: u64,
    buf: &mut [u8],
) -> Result<(), InstanceError> {
    let bs = u64::from(view.base.block_size());
    let index = pos / bs;
    let Some(entry) = ov.get(index) else {
        return read_base(store, view, pos, buf);
    };
    let block_start = index * bs;
    let mut done = 0usize;
    let mut scratch: Option<Vec<u8>> = None;
    while done < buf.len() {
        let at = pos + done as u64;
        let sub_start = at - at % SUB;
        let in_sub = (at - sub_start) as usize;
        let sub = ((sub_start - block_start) / SUB) as usize;
        // The run of sub-blocks with the same source goes in one read.
        let mut n = (buf.len() - done).min(SUB as usize - in_sub);
        let out = &mut buf[done..];
        match entry.sub(sub) {
            Some(Sub::Zero) => out[..n].fill(0),
            Some(Sub::Data { slot, sum }) => {
                let s = scratch.get_or_insert_with(|| vec![0u8; SUB as usize]);
                data.read(slot, &sum, s)?;
                out[..n].copy_from_slice(&s[in_sub..in_sub + n]);
            }
            None => {
                let mut next = sub + 1;
                while n < out.len() && entry.sub(next).is_none() && next < ov.per_block() {
                    n = (n + SUB as usize).min(out.len());
                    next += 1;
                }
                match entry.under {
                    None => read_base(store, view, at, &mut out[..n])?,
                    Some(None) => out[..n].fill(0),
                    Some(Some(h)) => {
                        store.read_block_part(&h, (at - block_start) as usize, &mut out[..n])?
                    }
                }
            }
        }
        done += n;
    }
    Ok(())
}

/// Reads base-version bytes inside one block: from the flat copy when there is one (built from
/// verified blocks), else through the store (verified per block).
fn read_base(store: &Store, view: &View, pos: u64, buf: &mut [u8]) -> Result<(), InstanceError> {
    if let Some(copy) = view.base_copy.load().as_ref() {
        if copy.read_exact_at(buf, pos).is_ok() {
            return Ok(());
        }
        // A copy shorter than the version cannot be trusted: go to the store.
    }
    let n = view.base.read_at(store, pos, buf)?;
    buf[n..].fill(0);
    Ok(())
}

/// Reads `buf` at `offset` of the base from its flat copy, filling the base's holes with
/// zeros without a read: a VM's disk is mostly holes, and each read saved is a syscall off the
/// request's path. False if the copy could not be read (the caller goes to the store).
fn read_copy_skipping_holes(view: &View, copy: &File, offset: u64, buf: &mut [u8]) -> bool {
    let bs = u64::from(view.base.block_size());
    let end = offset + buf.len() as u64;
    // Start of the pending run of data bytes not yet read from the copy.
    let mut run = offset;
    let mut pos = offset;
    while pos < end {
        let next = ((pos / bs + 1) * bs).min(end);
        // A block whose map cannot be loaded is read from the copy like data.
        if let Ok(None) = view.base.block_hash(pos / bs) {
            let (from, to) = ((run - offset) as usize, (pos - offset) as usize);
            if to > from && copy.read_exact_at(&mut buf[from..to], run).is_err() {
                return false;
            }
            buf[to..(next - offset) as usize].fill(0);
            run = next;
        }
        pos = next;
    }
    let from = (run - offset) as usize;
    from == buf.len() || copy.read_exact_at(&mut buf[from..], run).is_ok()
}

/// Reads from one view; short at the end of the disk.
pub fn read_view(
    store: &Store,
    view: &View,
    data: &DataFile,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, InstanceError> {
    let size = view.base.size();
    if offset >= size {
        return Ok(0);
    }
    let want = (buf.len() as u64).min(size - offset) as usize;
    let bs = u64::from(view.base.block_size());
    let ov = view.read_overlay();
    if ov.is_empty() {
        if let Some(copy) = view.base_copy.load().as_ref() {
            if read_copy_skipping_holes(view, copy, offset, &mut buf[..want]) {
                return Ok(want);
            }
        }
    }
    let mut done = 0usize;
    while done < want {
        let pos = offset + done as u64;
        let n = (want - done).min((bs - pos % bs) as usize);
        read_block_range(store, view, &ov, data, pos, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(want)
}

/// The instances of a store: their logs live in `STORE/instances/ID.log`; open ones are shared
/// so that the mount and control commands act on the same live state.
#[derive(Debug)]
pub struct Instances {
    dir: PathBuf,
    live: Mutex<HashMap<InstanceId, Arc<Instance>>>,
}

impl Instances {
    /// The instance registry of `store`.
    pub fn new(store: &Store) -> Instances {
        Instances {
            dir: store.dir().join("instances"),
            live: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn path(&self, id: &InstanceId) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn live(&self) -> MutexGuard<'_, HashMap<InstanceId, Arc<Instance>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of all instances, sorted.
    pub fn list(&self) -> Result<Vec<InstanceId>, InstanceError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(LogError::Io {
                    path: self.dir.clone(),
                    source,
                }
                .into())
            }
        };
        let mut ids: Vec<InstanceId> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                InstanceId::parse(name.strip_suffix(".log")?).ok()
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Whether the instance exists.
    pub fn exists(&self, id: &InstanceId) -> bool {
        self.path(id).exists()
    }

    /// Creates an instance on `base`; `source` is what the user named (for the event log).
    pub fn create(
        &self,
        store: &Store,
        id: &InstanceId,
        base: &VersionId,
        source: &str,
    ) -> Result<Arc<Instance>, InstanceError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| LogError::Io {
            path: self.dir.clone(),
            source,
        })?;
        store.version(base)?;
        let path = self.path(id);
        if !path.exists() {
            // A data file without a log is left from an instance removed mid-way: not ours.
            let _ = std::fs::remove_file(data_path(&path));
        }
        let first = Record::Created {
            base: base.to_string(),
            source: source.to_string(),
            at: now_secs(),
        };
        match RecordLog::create(&path, &first) {
            Err(LogError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                return Err(InstanceError::Exists(id.clone()))
            }
            other => drop(other?),
        }
        self.get(store, id)
    }

    /// The live instance `id`, opened (and replayed) on first use.
    pub fn get(&self, store: &Store, id: &InstanceId) -> Result<Arc<Instance>, InstanceError> {
        let mut live = self.live();
        if let Some(i) = live.get(id) {
            return Ok(i.clone());
        }
        let path = self.path(id);
        if !path.exists() {
            return Err(InstanceError::NotFound(id.clone()));
        }
        let inst = Arc::new(Instance::open(store, id.clone(), path)?);
        live.insert(id.clone(), inst.clone());
        Ok(inst)
    }

    /// The `Version` a live instance already has as its base, if any: substituting another
    /// instance onto it (a rollout) then reuses the leaves that one has loaded.
    pub fn live_version(&self, id: &VersionId) -> Option<Version> {
        self.live()
            .values()
            .map(|i| i.view().base.clone())
            .find(|v| v.id() == *id)
    }

    /// Deletes an instance (its log); open handles keep their in-memory state.
    pub fn remove(&self, id: &InstanceId) -> Result<(), InstanceError> {
        let path = self.path(id);
        let removed = std::fs::remove_file(&path);
        if removed.is_ok() {
            match std::fs::remove_file(data_path(&path)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(error = %e, "instance {id}: its data file was not removed")
                }
                _ => {}
            }
        }
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(InstanceError::NotFound(id.clone()))
            }
            Err(source) => return Err(LogError::Io { path, source }.into()),
        }
        self.live().remove(id);
        crate::instance_log::sync_dir(&path)?;
        Ok(())
    }

    /// The event log of an instance: creation, substitutions, commits (writes are omitted).
    pub fn events(&self, id: &InstanceId) -> Result<Vec<Record>, InstanceError> {
        let path = self.path(id);
        if !path.exists() {
            return Err(InstanceError::NotFound(id.clone()));
        }
        Ok(RecordLog::read(&path)?
            .into_iter()
            .filter(|r| !matches!(r, Record::Writes { .. } | Record::Overlay { .. }))
            .collect())
    }

    /// The instances open now.
    pub fn open_instances(&self) -> Vec<Arc<Instance>> {
        self.live().values().cloned().collect()
    }

    /// Reclaims the replaced data of each open instance whose dead bytes exceed a quarter of
    /// what it holds (the daemon's periodic step); returns the bytes given back.
    pub fn reclaim_open(&self) -> Result<u64, InstanceError> {
        let open: Vec<Arc<Instance>> = self.live().values().cloned().collect();
        let mut total = 0u64;
        for inst in open {
            if inst.dead_bytes() > inst.data_bytes() / 4 {
                total = total.saturating_add(inst.reclaim()?);
            }
        }
        Ok(total)
    }

    /// Reclaims the replaced data of every instance (gc); returns the bytes given back.
    pub fn reclaim_all(&self, store: &Store) -> Result<u64, InstanceError> {
        let mut total = 0u64;
        for id in self.list()? {
            total = total.saturating_add(self.get(store, &id)?.reclaim()?);
        }
        Ok(total)
    }

    /// Flushes every open instance (on daemon shutdown).
    pub fn flush_all(&self, store: &Store) -> Result<(), InstanceError> {
        let all: Vec<Arc<Instance>> = self.live().values().cloned().collect();
        for i in all {
            i.flush(store)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "instance_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "overlay_model_tests.rs"]
mod overlay_model_tests;
