//! Copy-on-write instances: a base version plus an overlay of whole written blocks.
//! Invariants: shared blocks are never modified (a write puts a new block and points the overlay
//! at it); a reader sees one `View` (base + overlay) for a whole request, so a substitution
//! (which swaps the view) is all-or-nothing to it; the on-disk log only names blocks that were
//! synced before the record was written, so replay never points at a missing block.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use arc_swap::ArcSwap;

use crate::instance_log::{BlockChange, LogError, Record, RecordLog};
use crate::{BlockHash, ErrorKind, Store, StoreError, Version, VersionId};

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
            InstanceError::BadId(_)
            | InstanceError::PastEnd { .. }
            | InstanceError::SizeMismatch { .. }
            | InstanceError::BlockSizeMismatch { .. } => ErrorKind::BadInput,
            InstanceError::NotFound(_) => ErrorKind::NotFound,
            InstanceError::Exists(_) | InstanceError::Conflicts(_) => ErrorKind::Conflict,
            InstanceError::BadRecord(..) => ErrorKind::Corrupt,
        }
    }
}

/// What an instance shows at one moment: a base version and the blocks written over it.
#[derive(Debug)]
pub struct View {
    pub(crate) base: Version,
    /// Block index -> new full block (`None`: a hole). Written blocks only.
    pub(crate) overlay: RwLock<HashMap<u64, Option<BlockHash>>>,
}

impl View {
    /// The base version.
    pub fn base(&self) -> &Version {
        &self.base
    }

    /// The hash of block `index` as the instance shows it (`None`: a hole).
    pub fn block(&self, index: u64) -> Result<Option<BlockHash>, StoreError> {
        let over = self
            .overlay
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
            .copied();
        match over {
            Some(entry) => Ok(entry),
            None => self.base.block_hash(index),
        }
    }

    /// The blocks the instance has written: `(index, hash)`, `None` for a hole.
    pub fn overlay_entries(&self) -> Vec<(u64, Option<BlockHash>)> {
        self.overlay
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&i, &h)| (i, h))
            .collect()
    }

    /// Number of blocks the instance has written.
    pub fn written_blocks(&self) -> usize {
        self.overlay.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Serialized writer side: the log and the changes not yet made durable.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) log: RecordLog,
    pub(crate) pending: Vec<BlockChange>,
    /// Write records in the log since it was last compacted.
    pub(crate) write_records: usize,
}

/// A live copy-on-write instance.
#[derive(Debug)]
pub struct Instance {
    pub(crate) id: InstanceId,
    pub(crate) view: ArcSwap<View>,
    pub(crate) writer: Mutex<Writer>,
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

fn zero(buf: &mut [u8]) {
    buf.iter_mut().for_each(|b| *b = 0);
}

impl Instance {
    /// Opens an instance from its log, replaying every complete record.
    pub(crate) fn open(
        store: &Store,
        id: InstanceId,
        path: PathBuf,
    ) -> Result<Instance, InstanceError> {
        let (log, records) = RecordLog::open(&path)?;
        let mut base: Option<VersionId> = None;
        let mut overlay = HashMap::new();
        let mut write_records = 0;
        for r in records {
            match r {
                Record::Created { base: b, .. } => base = Some(parse_version(&id, &b)?),
                Record::Writes { changes } => {
                    write_records += 1;
                    for c in changes {
                        let hash = match c.hash {
                            Some(h) => Some(parse_hash(&id, &h)?),
                            None => None,
                        };
                        overlay.insert(c.index, hash);
                    }
                }
                Record::Rebased { to, dropped, .. } => {
                    base = Some(parse_version(&id, &to)?);
                    for i in dropped {
                        overlay.remove(&i);
                    }
                }
                Record::Committed { .. } => {}
            }
        }
        let base = base.ok_or_else(|| LogError::NoHeader(path.clone()))?;
        let base = store.version(&base)?;
        let inst = Instance {
            id,
            view: ArcSwap::from_pointee(View {
                base,
                overlay: RwLock::new(overlay),
            }),
            writer: Mutex::new(Writer {
                log,
                pending: Vec::new(),
                write_records,
            }),
        };
        if write_records > COMPACT_AFTER {
            inst.compact()?;
        }
        Ok(inst)
    }

    /// Rewrites the log as its events plus one record of the whole overlay (after making
    /// pending writes durable, so the record names only synced blocks).
    pub fn compact(&self) -> Result<(), InstanceError> {
        let mut writer = self.lock_writer();
        if !writer.pending.is_empty() {
            return Ok(()); // only right after a flush; the next flush retries
        }
        let path = writer.log.path().to_path_buf();
        let mut records: Vec<Record> = RecordLog::read(&path)?
            .into_iter()
            .filter(|r| !matches!(r, Record::Writes { .. }))
            .collect();
        let mut changes = self.view().overlay_entries();
        changes.sort_by_key(|&(i, _)| i);
        // Last, so that replay applies it after every rebase's dropped entries.
        records.push(Record::Writes {
            changes: changes
                .into_iter()
                .map(|(index, hash)| BlockChange {
                    index,
                    hash: hash.map(|h| h.to_string()),
                })
                .collect(),
        });
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
        read_view(store, &view, offset, buf)
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
        // Blocks are always stored whole; the tail past the disk's end stays zero.
        let mut block = vec![0u8; view.base.block_size() as usize];
        let mut changes = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let block_start = index * bs;
            let in_block = (pos - block_start) as usize;
            let n = (end - pos).min(bs - in_block as u64) as usize;
            let src_off = (pos - offset) as usize;
            let whole = in_block == 0 && (n as u64 == bs || block_start + n as u64 == size);
            if whole {
                zero(&mut block);
            } else {
                read_block_into(store, &view, index, &mut block)?;
            }
            let dst = block
                .get_mut(in_block..in_block + n)
                .ok_or(StoreError::BadBuffer {
                    expected: bs,
                    got: (in_block + n) as u64,
                })?;
            match data.and_then(|d| d.get(src_off..src_off + n)) {
                Some(d) => dst.copy_from_slice(d),
                None => zero(dst),
            }
            changes.push((index, store.put_block(&block)?));
            pos += n as u64;
        }
        {
            let mut overlay = view.overlay.write().unwrap_or_else(|p| p.into_inner());
            for &(index, hash) in &changes {
                overlay.insert(index, hash);
            }
        }
        writer
            .pending
            .extend(changes.into_iter().map(|(index, hash)| BlockChange {
                index,
                hash: hash.map(|h| h.to_string()),
            }));
        if writer.pending.len() >= AUTO_FLUSH_CHANGES {
            flush_writer(store, &mut writer)?;
        }
        Ok(())
    }

    /// Makes every write so far durable (blocks synced, then the log record fsynced).
    pub fn flush(&self, store: &Store) -> Result<(), InstanceError> {
        let mut writer = self.lock_writer();
        flush_writer(store, &mut writer)?;
        let compact = writer.write_records > COMPACT_AFTER;
        drop(writer);
        if compact {
            self.compact()?;
        }
        Ok(())
    }
}

/// Writes pending overlay changes to the log after the blocks they name are durable.
pub(crate) fn flush_writer(store: &Store, writer: &mut Writer) -> Result<(), InstanceError> {
    if writer.pending.is_empty() {
        return Ok(());
    }
    store.sync()?;
    let changes = std::mem::take(&mut writer.pending);
    if let Err(e) = writer.log.append_durable(&[Record::Writes {
        changes: changes.clone(),
    }]) {
        writer.pending = changes;
        return Err(e.into());
    }
    writer.write_records += 1;
    Ok(())
}

/// Reads block `index` of `view` whole into `block` (zeros for a hole).
fn read_block_into(
    store: &Store,
    view: &View,
    index: u64,
    block: &mut [u8],
) -> Result<(), InstanceError> {
    match view.block(index)? {
        None => zero(block),
        Some(hash) => store.read_block(&hash, block)?,
    }
    Ok(())
}

/// Reads from one view; short at the end of the disk.
pub fn read_view(
    store: &Store,
    view: &View,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, InstanceError> {
    let size = view.base.size();
    if offset >= size {
        return Ok(0);
    }
    let want = (buf.len() as u64).min(size - offset) as usize;
    let bs = u64::from(view.base.block_size());
    let mut scratch = Vec::new();
    let mut done = 0usize;
    while done < want {
        let pos = offset + done as u64;
        let index = pos / bs;
        let in_block = (pos % bs) as usize;
        let n = (want - done).min(bs as usize - in_block);
        let Some(dst) = buf.get_mut(done..done + n) else {
            break;
        };
        if in_block == 0 && n as u64 == bs {
            read_block_into(store, view, index, dst)?;
        } else {
            scratch.resize(bs as usize, 0);
            read_block_into(store, view, index, &mut scratch)?;
            if let Some(src) = scratch.get(in_block..in_block + n) {
                dst.copy_from_slice(src);
            }
        }
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

    fn path(&self, id: &InstanceId) -> PathBuf {
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
        match std::fs::remove_file(&path) {
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
            .filter(|r| !matches!(r, Record::Writes { .. }))
            .collect())
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
