//! Flat copies: a bounded cache of versions as sparse raw files in `STORE/flat/`, so the FUSE
//! mount can hand the kernel a backing file (passthrough) and reads run at local-disk speed.
//! Invariant: a `<hex>.raw` file is always a complete, verified copy (it is built as
//! `.<hex>.tmp`, fdatasynced, then renamed), and the allocated bytes of the copies held (plus
//! the builds under way) stay within the budget.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use crate::error::{ErrorKind, StoreError};
use crate::ids::VersionId;
use crate::store::{is_zero, now_secs, Store};
use crate::version::Version;

pub mod verity;

/// The directory of the copies, inside the store directory.
const DIR: &str = "flat";
/// Runs of consecutive data blocks are read and written in pieces of up to this size.
const RUN_MAX: u64 = 4 << 20;
/// A build is refused if it would leave less than this share of the filesystem free.
const MIN_FREE_PERCENT: u64 = 5;
/// How stale a copy's mtime (its persisted last use) may get before a use refreshes it.
const TOUCH_EVERY: u64 = 60;
/// Most threads one build uses to read, verify and write blocks.
const MAX_WORKERS: usize = 4;

/// One flat copy as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlatEntry {
    #[serde(serialize_with = "hex_id")]
    pub id: VersionId,
    /// Apparent size (the version's size).
    pub size: u64,
    /// Bytes allocated on disk (`st_blocks * 512`; holes take none).
    pub allocated: u64,
    /// Unix seconds of the last use (the file's mtime for copies not used since `open`).
    pub last_used: u64,
}

/// Serializes an id as its full hex (`VersionId` has no serde impl of its own).
fn hex_id<S: serde::Serializer>(id: &VersionId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

/// Errors of the flat-copy cache.
#[derive(Debug, thiserror::Error)]
pub enum FlatError {
    /// reading the version failed (a block that fails its hash is `Corrupt`)
    #[error(transparent)]
    Store(#[from] StoreError),
    /// I/O on the copies failed
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the version alone is larger than the budget
    #[error("a flat copy of {size} bytes does not fit the flat-copy budget of {budget} bytes")]
    TooLarge { size: u64, budget: u64 },
    /// building would leave less than 5% of the filesystem free
    #[error(
        "a flat copy needs {needed} bytes and only {free} are free; building it would leave \
         less than {MIN_FREE_PERCENT}% of the filesystem free"
    )]
    NoSpace { needed: u64, free: u64 },
    /// any other failure of a build (a panicking builder, say)
    #[error("{0}")]
    Failed(String),
}

impl FlatError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FlatError::Store(e) => e.kind(),
            FlatError::TooLarge { .. } => ErrorKind::Conflict,
            FlatError::Io { .. } | FlatError::NoSpace { .. } | FlatError::Failed(_) => {
                ErrorKind::Io
            }
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FlatError {
    let path = path.to_path_buf();
    move |source| FlatError::Io { op, path, source }
}

#[derive(Debug)]
struct Copy {
    file: Arc<File>,
    size: u64,
    allocated: u64,
    last_used: u64,
    /// When the mtime was last set to mark a use (unix secs).
    touched: u64,
    /// Order of last use; exact where `last_used` has one-second steps.
    tick: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Sent to the builder thread, not started.
    Queued,
    /// A thread is building it; others wait on `changed`.
    Building,
}

#[derive(Debug, Default)]
struct State {
    copies: HashMap<VersionId, Copy>,
    pending: HashMap<VersionId, Pending>,
    /// Ids whose last build failed (why), so `request` does not retry them.
    failed: HashMap<VersionId, String>,
    /// Bytes set aside for builds under way.
    reserved: u64,
    tick: u64,
}

impl State {
    fn held(&self) -> u64 {
        self.copies.values().map(|c| c.allocated).sum()
    }

    /// Marks `id` used and hands out its file; the bool says the mtime should be refreshed.
    fn use_copy(&mut self, id: &VersionId) -> Option<(Arc<File>, bool)> {
        self.tick += 1;
        let tick = self.tick;
        let c = self.copies.get_mut(id)?;
        let now = now_secs();
        c.tick = tick;
        c.last_used = now;
        let touch = now >= c.touched.saturating_add(TOUCH_EVERY);
        if touch {
            c.touched = now;
        }
        Some((c.file.clone(), touch))
    }
}

/// The flat copies of one store: complete copies are handed out as read-only files, missing
/// ones built on request by one background thread (or on the caller's thread by `ensure`).
/// `Send + Sync`; share it as `Arc<FlatCache>`.
#[derive(Debug)]
pub struct FlatCache {
    store: Arc<Store>,
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    /// Signalled when a build ends (its copy appears, it fails, its reservation is released).
    changed: Condvar,
    queue: Sender<VersionId>,
}

// The FUSE daemon shares the cache across its worker threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<FlatCache>();
};

impl FlatCache {
    /// Opens (creating) STORE_DIR/flat/, deletes leftover temporaries (a build killed midway)
    /// and copies of versions the store no longer has, learns existing copies (last use from
    /// mtime), and starts one background builder thread ("flat-builder").
    pub fn open(store: Arc<Store>, budget: u64) -> Result<Arc<FlatCache>, FlatError> {
        let dir = store.dir().join(DIR);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err("read dir", &dir))? {
            let entry = entry.map_err(io_err("read dir", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with('.') && name.ends_with(".tmp") {
                tracing::info!(path = %path.display(), "removing an unfinished flat copy");
                remove(&path)?;
                continue;
            }
            let Some(id) = name
                .strip_suffix(".raw")
                .and_then(|h| h.parse::<VersionId>().ok())
            else {
                continue;
            };
            let size = match store.version_info(&id) {
                Ok(info) => Some(info.size),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e.into()),
            };
            let file = File::open(&path).map_err(io_err("open", &path))?;
            let meta = file.metadata().map_err(io_err("stat", &path))?;
            if size != Some(meta.len()) {
                tracing::info!(path = %path.display(), "removing the flat copy of a version the store does not hold");
                remove(&path)?;
                continue;
            }
            found.push((meta.mtime().max(0) as u64, id, file, meta));
        }
        // ticks in mtime order, so the oldest use is evicted first
        found.sort_by_key(|f| (f.0, f.1));
        let mut state = State::default();
        for (mtime, id, file, meta) in found {
            state.tick += 1;
            state.copies.insert(
                id,
                Copy {
                    file: Arc::new(file),
                    size: meta.len(),
                    allocated: meta.blocks() * 512,
                    last_used: mtime,
                    touched: mtime,
                    tick: state.tick,
                },
            );
        }
        let (queue, rx) = channel();
        let cache = Arc::new(FlatCache {
            store,
            dir,
            budget,
            state: Mutex::new(state),
            changed: Condvar::new(),
            queue,
        });
        {
            // the budget may have shrunk since the copies were made
            let mut st = cache.lock();
            while st.held() > budget && cache.evict_one(&mut st, None)? {}
        }
        let weak = Arc::downgrade(&cache);
        std::thread::Builder::new()
            .name("flat-builder".to_string())
            .spawn(move || builder(weak, rx))
            .map_err(io_err("spawn the builder thread for", &cache.dir))?;
        Ok(cache)
    }

    /// The complete flat copy of `id`, opened read-only, if one exists; marks it used. Never
    /// blocks on a build.
    pub fn ready(&self, id: &VersionId) -> Option<Arc<File>> {
        let (file, touch) = self.lock().use_copy(id)?;
        if touch {
            self.touch(&file);
        }
        Some(file)
    }

    /// Queues a background build of `id` unless it is ready, queued, building, or failed (or
    /// was too large) before. Never blocks.
    pub fn request(&self, id: &VersionId) {
        let mut st = self.lock();
        if st.copies.contains_key(id) || st.pending.contains_key(id) || st.failed.contains_key(id) {
            return;
        }
        // building would fetch every block of a lazy version in the background: wait until
        // its blocks are local (prefetch, or reads)
        if !matches!(self.store.is_lazy(id), Ok(false)) {
            return;
        }
        if self.queue.send(*id).is_ok() {
            st.pending.insert(*id, Pending::Queued);
        } else {
            tracing::error!(id = %id.short(), "the flat-copy builder thread is gone");
        }
    }

    /// Builds `id` now on the caller's thread, or waits for the build already running, and
    /// returns the copy. Takes over a queued build; retries an id whose build failed.
    pub fn ensure(&self, id: &VersionId) -> Result<Arc<File>, FlatError> {
        let mut st = self.lock();
        loop {
            if let Some((file, touch)) = st.use_copy(id) {
                drop(st);
                if touch {
                    self.touch(&file);
                }
                return Ok(file);
            }
            match st.pending.get(id) {
                Some(Pending::Building) => {
                    // when it fails, the loop comes back here and builds it again (a retry)
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                Some(Pending::Queued) | None => {
                    // the builder thread skips a queued id it finds taken over
                    st.failed.remove(id);
                    st.pending.insert(*id, Pending::Building);
                    break;
                }
            }
        }
        drop(st);
        self.run_build(id)
    }

    /// The copies held, sorted by id.
    pub fn list(&self) -> Vec<FlatEntry> {
        let st = self.lock();
        let mut out: Vec<FlatEntry> = st
            .copies
            .iter()
            .map(|(id, c)| FlatEntry {
                id: *id,
                size: c.size,
                allocated: c.allocated,
                last_used: c.last_used,
            })
            .collect();
        out.sort_by_key(|e| e.id);
        out
    }

    /// Whether this machine gives flat copies fs-verity, and how many copies have it.
    pub fn verity_status(&self) -> Result<(verity::Verity, usize), FlatError> {
        let status = verity::probe(&self.dir).map_err(io_err("fs-verity probe", &self.dir))?;
        let ids: Vec<VersionId> = self.lock().copies.keys().copied().collect();
        let with = ids
            .iter()
            .filter(|id| File::open(self.final_path(id)).is_ok_and(|f| verity::is_enabled(&f)))
            .count();
        Ok((status, with))
    }

    /// Deletes copies of versions the store no longer has (call it after gc); returns how many.
    /// Also forgets failures of such versions.
    pub fn prune(&self) -> Result<usize, FlatError> {
        let ids: Vec<VersionId> = {
            let st = self.lock();
            st.copies.keys().chain(st.failed.keys()).copied().collect()
        };
        let mut gone = Vec::new();
        for id in ids {
            match self.store.version_info(&id) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => gone.push(id),
                Err(e) => return Err(e.into()),
            }
        }
        let mut st = self.lock();
        let mut removed = 0;
        for id in gone {
            st.failed.remove(&id);
            if st.copies.contains_key(&id) {
                remove(&self.final_path(&id))?;
                st.copies.remove(&id);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The budget in bytes (allocated bytes of all copies stay at or under it).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn final_path(&self, id: &VersionId) -> PathBuf {
        self.dir.join(format!("{}.raw", id.to_hex()))
    }

    fn temp_path(&self, id: &VersionId) -> PathBuf {
        self.dir.join(format!(".{}.tmp", id.to_hex()))
    }

    /// Persists a use in the mtime, so `open` after a restart evicts in the right order.
    fn touch(&self, file: &File) {
        if let Err(e) = file.set_modified(SystemTime::now()) {
            tracing::debug!("marking a flat copy used: {e}");
        }
    }

    /// Unlinks the least recently used copy other than `keep`; false when there is none.
    /// A reader holding the file keeps reading the unlinked inode.
    fn evict_one(&self, st: &mut State, keep: Option<&VersionId>) -> Result<bool, FlatError> {
        let Some(id) = st
            .copies
            .iter()
            .filter(|(id, _)| Some(*id) != keep)
            .min_by_key(|(_, c)| c.tick)
            .map(|(id, _)| *id)
        else {
            return Ok(false);
        };
        remove(&self.final_path(&id))?;
        if let Some(c) = st.copies.remove(&id) {
            tracing::info!(id = %id.short(), allocated = c.allocated, "evicted a flat copy");
        }
        Ok(true)
    }

    /// Takes over a queued id for the builder thread; false if someone else took it.
    fn claim(&self, id: &VersionId) -> bool {
        let mut st = self.lock();
        if st.pending.get(id) == Some(&Pending::Queued) {
            st.pending.insert(*id, Pending::Building);
            true
        } else {
            false
        }
    }

    /// Builds `id` (marked `Building` by the caller), records the outcome and wakes waiters.
    fn run_build(&self, id: &VersionId) -> Result<Arc<File>, FlatError> {
        let start = std::time::Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build(id)))
            .unwrap_or_else(|_| {
                Err(FlatError::Failed(format!(
                    "building the flat copy of {} panicked",
                    id.short()
                )))
            });
        let mut st = self.lock();
        st.pending.remove(id);
        match &result {
            Ok(_) => {
                tracing::info!(id = %id.short(), secs = start.elapsed().as_secs_f64(), "built a flat copy");
            }
            Err(e) => {
                if e.kind() == ErrorKind::Corrupt {
                    tracing::error!(id = %id.short(), "building a flat copy: {e}");
                } else {
                    tracing::warn!(id = %id.short(), "building a flat copy: {e}");
                }
                st.failed.insert(*id, e.to_string());
            }
        }
        drop(st);
        self.changed.notify_all();
        result
    }

    fn build(&self, id: &VersionId) -> Result<Arc<File>, FlatError> {
        if self.store.is_lazy(id)? {
            return Err(FlatError::Failed(format!(
                "version {} is lazy: some of its blocks are only in its remote (imagefs prefetch fetches them)",
                id.short()
            )));
        }
        let version = self.store.version(id)?;
        let size = version.size();
        // at most this much gets allocated (the tail block is allocated whole)
        let need = size.div_ceil(4096) * 4096;
        if need > self.budget {
            return Err(FlatError::TooLarge {
                size,
                budget: self.budget,
            });
        }
        self.reserve(need)?;
        let written = self.write_copy(&version);
        let mut st = self.lock();
        st.reserved = st.reserved.saturating_sub(need);
        let (file, allocated) = written?;
        st.tick += 1;
        let tick = st.tick;
        let now = now_secs();
        let file = Arc::new(file);
        st.copies.insert(
            *id,
            Copy {
                file: file.clone(),
                size,
                allocated,
                last_used: now,
                touched: now,
                tick,
            },
        );
        // metadata blocks can push a copy past its reservation
        while st.held() + st.reserved > self.budget && self.evict_one(&mut st, Some(id))? {}
        Ok(file)
    }

    /// Sets `need` bytes of the budget aside, evicting least recently used copies first and
    /// waiting for other builds when only their reservations are in the way.
    fn reserve(&self, need: u64) -> Result<(), FlatError> {
        let mut st = self.lock();
        while st.held() + st.reserved + need > self.budget {
            if !self.evict_one(&mut st, None)? {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        let (free, total) = fs_space(&self.dir)?;
        // builds under way have not written their bytes yet
        let free = free.saturating_sub(st.reserved);
        if free.saturating_sub(need) < total / 100 * MIN_FREE_PERCENT {
            return Err(FlatError::NoSpace { needed: need, free });
        }
        st.reserved += need;
        Ok(())
    }

    /// Writes the copy of `version` to its temporary, makes it durable and renames it into
    /// place; returns the final file (read-only) and its allocated bytes.
    fn write_copy(&self, version: &Version) -> Result<(File, u64), FlatError> {
        let id = version.id();
        let tmp = self.temp_path(&id);
        let path = self.final_path(&id);
        let written = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            // holes are never written, so they stay unallocated
            f.set_len(version.size())
                .map_err(io_err("truncate", &tmp))?;
            self.fill(version, &f, &tmp)?;
            f.sync_data().map_err(io_err("fdatasync", &tmp))?;
            drop(f);
            std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync dir", &self.dir))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let opened = File::open(&path)
            .map_err(io_err("open", &path))
            .and_then(|f| {
                let meta = f.metadata().map_err(io_err("stat", &path))?;
                Ok((f, meta.blocks() * 512))
            });
        let Ok((file, allocated)) = opened else {
            let _ = std::fs::remove_file(&path);
            return opened;
        };
        // Where the kernel offers it, every later read of the copy is checked by the kernel
        // too; where not, the scrubber's rounds are the only re-check (said once, at info).
        if let Err(e) = verity::enable(&file) {
            tracing::warn!(path = %path.display(), "enabling fs-verity: {e}");
        }
        // Pages left by write() are order-0 folios on this kernel; dropping them lets reads
        // refill the cache through readahead in large folios (they are clean after fdatasync).
        // SAFETY: posix_fadvise takes a descriptor we own and plain integers; no memory.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            tracing::warn!(path = %path.display(), "posix_fadvise(DONTNEED): {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok((file, allocated))
    }

    /// Copies every data block of `version` into `file` at its offset: runs of consecutive
    /// data blocks in pieces of up to `RUN_MAX`, spread over a few threads (verifying blocks
    /// costs about as much as copying them).
    fn fill(&self, version: &Version, file: &File, path: &Path) -> Result<(), FlatError> {
        let bs = u64::from(version.block_size());
        let per_run = (RUN_MAX / bs).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut cur: Option<(u64, u64)> = None;
        for i in 0..version.block_count() {
            if version.block_hash(i)?.is_none() {
                runs.extend(cur.take());
                continue;
            }
            cur = match cur {
                Some((first, n)) if n < per_run => Some((first, n + 1)),
                done => {
                    runs.extend(done);
                    Some((i, 1))
                }
            };
        }
        runs.extend(cur);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let work = || self.copy_runs(version, file, path, &runs, &next, &stop);
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS)
            .min(runs.len().max(1));
        std::thread::scope(|s| {
            // a helper that fails to start leaves its share to the others
            let helpers: Vec<_> = (1..workers)
                .filter_map(|_| std::thread::Builder::new().spawn_scoped(s, work).ok())
                .collect();
            let mut result = work();
            for h in helpers {
                let r = h.join().unwrap_or_else(|_| {
                    Err(FlatError::Failed("a flat-copy worker panicked".to_string()))
                });
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    fn copy_runs(
        &self,
        version: &Version,
        file: &File,
        path: &Path,
        runs: &[(u64, u64)],
        next: &AtomicUsize,
        stop: &AtomicBool,
    ) -> Result<(), FlatError> {
        let bs = u64::from(version.block_size());
        let size = version.size();
        let mut buf = vec![0u8; RUN_MAX.max(bs) as usize];
        while !stop.load(Ordering::Relaxed) {
            let Some(&(first, count)) = runs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let offset = first * bs;
            let len = (count * bs).min(size.saturating_sub(offset)) as usize;
            let r = match buf.get_mut(..len) {
                None => Err(FlatError::Failed(format!("a run of {len} bytes"))),
                Some(b) => copy_run(&self.store, version, file, path, offset, b),
            };
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
                return r;
            }
        }
        Ok(())
    }
}

fn copy_run(
    store: &Store,
    version: &Version,
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), FlatError> {
    let n = version.read_at(store, offset, buf)?;
    if n != buf.len() {
        return Err(FlatError::Failed(format!(
            "version {} read {n} of {} bytes at {offset}",
            version.id().short(),
            buf.len()
        )));
    }
    file.write_all_at(buf, offset)
        .map_err(io_err("write", path))
}

/// The builder thread: builds queued ids until the cache is dropped (its sender closes).
fn builder(cache: Weak<FlatCache>, rx: Receiver<VersionId>) {
    while let Ok(id) = rx.recv() {
        let Some(cache) = cache.upgrade() else { return };
        if cache.claim(&id) {
            // failures are logged and remembered by run_build
            let _ = cache.run_build(&id);
        }
    }
}

/// One flat copy that does not match its version, as [`check_copies`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadCopy {
    pub id: VersionId,
    /// The version's image, when the store holds the version.
    pub image: Option<String>,
    /// The first block that differs and the version's block size; `None` when the copy is
    /// wrong as a whole (its size, a version the store lacks, a file that cannot be opened).
    pub block: Option<(u64, u64)>,
    pub path: PathBuf,
    pub detail: String,
}

/// What [`check_copies`] looked at and found.
#[derive(Debug, Default)]
pub(crate) struct CopiesChecked {
    pub copies: u64,
    pub bytes: u64,
    pub bad: Vec<BadCopy>,
}

/// Checks every complete copy (`<hex>.raw`) in STORE/flat against its version: the version
/// exists, the sizes agree, every data block hashes to the version's block hash (zero-padded
/// tail, as blocks are named) and every hole reads as zeros. Passthrough reads bypass the
/// per-block verification, so this is what catches a copy damaged after it was built. Only
/// reads; at most one `BadCopy` per copy (its first bad block). Builds under way (`.tmp`) and
/// copies evicted meanwhile are skipped.
pub(crate) fn check_copies(store: &Store) -> Result<CopiesChecked, StoreError> {
    let dir = store.dir().join(DIR);
    let mut out = CopiesChecked::default();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io("read dir", &dir)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let name = entry.map_err(StoreError::io("read dir", &dir))?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_suffix(".raw"))
            .and_then(|h| h.parse::<VersionId>().ok());
        ids.extend(id);
    }
    ids.sort();
    for id in ids {
        let path = dir.join(format!("{}.raw", id.to_hex()));
        match check_copy(store, &id, &path, None) {
            Checked::Gone => {}
            Checked::Good(bytes) => {
                out.copies += 1;
                out.bytes += bytes;
            }
            Checked::Bad(bad) => {
                out.copies += 1;
                out.bad.push(*bad);
            }
        }
    }
    Ok(out)
}

/// Deletes the copy of `id` in STORE_DIR/flat, if any. Only for a store no `FlatCache` has
/// open (fsck --repair, gc): an open cache would keep handing out the unlinked file.
pub(crate) fn remove_copy(store_dir: &Path, id: &VersionId) -> Result<(), FlatError> {
    remove(&store_dir.join(DIR).join(format!("{}.raw", id.to_hex())))
}

enum Checked {
    /// Unlinked since the directory was listed (an eviction): nothing to check.
    Gone,
    /// Matches; this many bytes read.
    Good(u64),
    Bad(Box<BadCopy>),
}

fn check_copy(store: &Store, id: &VersionId, path: &Path, pace: Option<&Pace>) -> Checked {
    let bad = |image: Option<String>, block: Option<(u64, u64)>, detail: String| {
        Checked::Bad(Box::new(BadCopy {
            id: *id,
            image,
            block,
            path: path.to_path_buf(),
            detail,
        }))
    };
    let shown = path.display();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Checked::Gone,
        Err(e) => return bad(None, None, format!("flat copy {shown}: open: {e}")),
    };
    let version = match store.version(id) {
        Ok(v) => v,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let detail = format!("flat copy {shown} is of a version the store does not hold");
            return bad(None, None, detail);
        }
        Err(e) => {
            let detail = format!("flat copy {shown} cannot be checked: {e}");
            return bad(None, None, detail);
        }
    };
    let image = Some(version.image().to_string());
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return bad(image, None, format!("flat copy {shown}: stat: {e}")),
    };
    if len != version.size() {
        let detail = format!(
            "flat copy {shown} is {len} bytes, the version {}",
            version.size()
        );
        return bad(image, None, detail);
    }
    let bytes = AtomicU64::new(0);
    match first_bad_block(&version, &file, &bytes, pace) {
        None => Checked::Good(bytes.into_inner()),
        Some((block, why)) => {
            let bs = u64::from(version.block_size());
            let detail =
                format!("flat copy {shown} differs from the version at block {block}: {why}");
            bad(image, Some((block, bs)), detail)
        }
    }
}

/// The first block of `file` that does not match `version` and why, reading pieces of
/// `RUN_MAX` on a few threads (hashing costs about as much as reading). Pieces are handed
/// out in order and a worker stops past a bad block already found, so the lowest bad block
/// is found without reading the rest of a bad copy.
fn first_bad_block(
    version: &Version,
    file: &File,
    bytes: &AtomicU64,
    pace: Option<&Pace>,
) -> Option<(u64, String)> {
    let bs = u64::from(version.block_size());
    let size = version.size();
    let per_piece = (RUN_MAX / bs).max(1);
    let pieces = version.block_count().div_ceil(per_piece);
    let next = AtomicU64::new(0);
    let first_bad = AtomicU64::new(u64::MAX);
    let work = || {
        let mut found: Option<(u64, String)> = None;
        let mut record = |block: u64, why: String| {
            if found.as_ref().is_none_or(|f| block < f.0) {
                found = Some((block, why));
            }
            first_bad.fetch_min(block, Ordering::Relaxed);
        };
        let mut buf = vec![0u8; (per_piece * bs) as usize];
        let mut padded = vec![0u8; bs as usize];
        loop {
            let piece = next.fetch_add(1, Ordering::Relaxed);
            let first = piece.saturating_mul(per_piece);
            if piece >= pieces || first > first_bad.load(Ordering::Relaxed) {
                break;
            }
            let offset = first * bs;
            let len = (per_piece * bs).min(size - offset) as usize;
            let Some(data) = buf.get_mut(..len) else {
                record(first, format!("a piece of {len} bytes"));
                break;
            };
            if let Err(e) = file.read_exact_at(data, offset) {
                record(first, format!("reading at offset {offset}: {e}"));
                continue;
            }
            bytes.fetch_add(len as u64, Ordering::Relaxed);
            if let Some(p) = pace {
                p.take(len as u64);
            }
            for (i, block) in (first..).zip(data.chunks(bs as usize)) {
                let why = match version.block_hash(i) {
                    Err(e) => Some(format!("its block map is unreadable: {e}")),
                    Ok(None) => (!is_zero(block))
                        .then_some("nonzero bytes where the version has a hole")
                        .map(str::to_string),
                    Ok(Some(h)) => {
                        // blocks are named by the hash of the whole block, the tail zero-padded
                        let whole = if block.len() == padded.len() {
                            block
                        } else {
                            padded.fill(0);
                            padded[..block.len()].copy_from_slice(block);
                            &padded[..]
                        };
                        (*blake3::hash(whole).as_bytes() != h.0)
                            .then(|| "the bytes do not match the block's hash".to_string())
                    }
                };
                if let Some(why) = why {
                    record(i, why);
                    break;
                }
            }
        }
        found
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS)
        .min(usize::try_from(pieces).unwrap_or(usize::MAX).max(1));
    std::thread::scope(|s| {
        // a helper that fails to start leaves its share to the others
        let helpers: Vec<_> = (1..workers)
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(s, work).ok())
            .collect();
        let mut found = work();
        for h in helpers {
            let r = h
                .join()
                .unwrap_or_else(|_| Some((0, "a checking thread panicked".to_string())));
            if let Some(r) = r {
                if found.as_ref().is_none_or(|f| r.0 < f.0) {
                    found = Some(r);
                }
            }
        }
        found
    })
}

/// Holds readers to a rate: each `take` of n bytes sleeps until the bytes taken so far fit
/// the rate since the start.
#[derive(Debug)]
pub(crate) struct Pace {
    bytes_per_sec: u64,
    start: std::time::Instant,
    taken: AtomicU64,
}

impl Pace {
    pub(crate) fn new(bytes_per_sec: u64) -> Pace {
        Pace {
            bytes_per_sec: bytes_per_sec.max(1),
            start: std::time::Instant::now(),
            taken: AtomicU64::new(0),
        }
    }

    fn take(&self, n: u64) {
        let taken = self.taken.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        let due = std::time::Duration::from_secs_f64(taken as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// A flat copy `scrub` found damaged and removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scrubbed {
    /// The version the copy was of.
    pub id: VersionId,
    /// The offset of the first bad block, when a block is bad (else the copy as a whole).
    pub offset: Option<u64>,
    /// What was wrong.
    pub detail: String,
}

impl FlatCache {
    /// Re-verifies every complete copy against its version's block hashes (at most
    /// `bytes_per_sec`, or at full speed), and removes each bad one: later opens are served,
    /// and verified, by the daemon; files already open keep the old copy until closed.
    pub fn scrub(&self, bytes_per_sec: Option<u64>) -> Result<Vec<Scrubbed>, FlatError> {
        let pace = bytes_per_sec.map(Pace::new);
        let ids: Vec<VersionId> = {
            let mut ids: Vec<VersionId> = self.lock().copies.keys().copied().collect();
            ids.sort();
            ids
        };
        let mut out = Vec::new();
        for id in ids {
            let path = self.final_path(&id);
            let Checked::Bad(bad) = check_copy(&self.store, &id, &path, pace.as_ref()) else {
                continue;
            };
            let mut st = self.lock();
            remove(&path)?;
            st.copies.remove(&id);
            tracing::error!(id = %id.short(), "{}: removed", bad.detail);
            out.push(Scrubbed {
                id,
                offset: bad.block.map(|(b, bs)| b.saturating_mul(bs)),
                detail: bad.detail,
            });
        }
        Ok(out)
    }
}

fn remove(path: &Path) -> Result<(), FlatError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Free bytes (for unprivileged users) and total bytes of the filesystem holding `dir`.
// the statvfs fields are c_ulong or u64 depending on the target
#[allow(clippy::unnecessary_cast)]
fn fs_space(dir: &Path) -> Result<(u64, u64), FlatError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| FlatError::Failed(format!("{}: path holds a NUL byte", dir.display())))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `s` is writable memory of
    // the type statvfs fills in.
    let rc = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_err("statvfs", dir)(std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it filled `s` (which was zeroed besides).
    let s = unsafe { s.assume_init() };
    let frsize = s.f_frsize as u64;
    Ok((
        (s.f_bavail as u64).saturating_mul(frsize),
        (s.f_blocks as u64).saturating_mul(frsize),
    ))
}

#[cfg(test)]
#[path = "flat_tests.rs"]
mod tests;
