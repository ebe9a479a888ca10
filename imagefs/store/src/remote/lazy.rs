//! Lazy versions (issue 12): `pull --lazy` records a version's verified block map without its
//! blocks, plus where each absent block lies in the remote (`STORE/lazy/ID.loc`); reads of the
//! version fetch absent blocks on first use through a [`RemoteSource`] the binary hands in
//! (the store learns no HTTP), check each against its blake3 before anything is stored, and
//! keep them in the local store, so each block crosses the network once.
//!
//! `ID.loc`: magic `IFSLAZY1`, u32 LE header length, JSON header (version, remote, block_size,
//! blocks = the version's distinct non-hole blocks, packs), then 44 bytes per block absent at
//! pull time: blake3 (32), pack (u32 LE, index into `packs`), offset in the pack (u64 LE). It is
//! written (fsynced, renamed) before the version is committed, and removed once every block is
//! local (prefetch, a full pull), so "lazy" means "some block may be remote".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    integrity, load_idx, pack_key, PullOptions, PullReport, Remote, RemoteError, SyncError,
};
use crate::error::StoreError;
use crate::ids::{BlockHash, ImageName, Tag, VersionId};
use crate::pack::ObjKind;
use crate::store::Inner;
use crate::version::Version;
use crate::Store;

/// Read-ahead past a request that misses: at most this many bytes of the version.
pub const READ_AHEAD: u64 = 4 << 20;
/// The first read-ahead of a sequential run of reads; it doubles with each further read of
/// the run, up to [`READ_AHEAD`].
const READ_AHEAD_START: u64 = 256 << 10;
/// The largest ranged read of a lazy fetch (adjacent blocks of a pack coalesced up to it).
const MAX_FETCH: u64 = 8 << 20;
const LOC_MAGIC: &[u8; 8] = b"IFSLAZY1";
const LOC_ENTRY: usize = 44;
const DIR: &str = "lazy";
const STATS_FILE: &str = "remote-stats.json";
/// Counters are written out at most this often while fetching (and at exit).
const STATS_FLUSH: Duration = Duration::from_secs(1);

/// Hands the store a client for a remote by name, and the remote's deadline (how long a lazy
/// read retries an unreachable remote before it fails with EIO). Implemented by the binary.
pub trait RemoteSource: Send + Sync {
    /// The client of remote `name` and its deadline.
    fn remote(&self, name: &str) -> Result<(Arc<dyn Remote>, Duration), RemoteError>;
}

/// Fetch counters of one remote or version.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Ranged reads of packs that arrived.
    pub requests: u64,
    /// Bytes of blocks fetched.
    pub bytes_fetched: u64,
    /// Blocks fetched, verified and stored.
    pub blocks_fetched: u64,
    /// Blocks a read of a lazy version wanted that were already local.
    pub cache_hits: u64,
    /// Blocks (or maps) from the remote that failed their hash.
    pub integrity_errors: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.bytes_fetched += o.bytes_fetched;
        self.blocks_fetched += o.blocks_fetched;
        self.cache_hits += o.cache_hits;
        self.integrity_errors += o.integrity_errors;
    }
}

/// The counters of one remote: in total and per version (hex id).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteCounters {
    pub total: Counters,
    pub versions: BTreeMap<String, Counters>,
}

/// Every remote's counters, as kept in `STORE/remote-stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteStats {
    pub remotes: BTreeMap<String, RemoteCounters>,
}

/// How much of a lazy version is local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyStatus {
    /// The remote its blocks come from.
    pub remote: String,
    /// Distinct non-hole blocks of the version.
    pub blocks: u64,
    /// Of those, blocks not in the local store.
    pub absent: u64,
}

/// What a fetch of missing blocks did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchReport {
    pub requests: u64,
    pub blocks: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LocHeader {
    version: String,
    remote: String,
    block_size: u32,
    blocks: u64,
    packs: Vec<String>,
}

#[derive(Debug)]
struct LazyVersion {
    id: VersionId,
    remote: String,
    blocks: u64,
    packs: Vec<String>,
    block_size: u32,
    /// The blocks absent at pull time: hash, pack (index into `packs`), offset.
    absent: Vec<([u8; 32], u32, u64)>,
    /// Entries of `absent` before this one are known local: "is it still lazy?" asked on every
    /// instance read costs one lookup, not one per block.
    cursor: std::sync::atomic::AtomicUsize,
    /// Where the version's reads run on sequentially, for read-ahead.
    stream: Mutex<ReadStream>,
}

/// Read-ahead state of one lazy version, as the kernel's: a read that starts where the last
/// one ended (a sequential run) grows the read-ahead, doubling from [`READ_AHEAD_START`] to
/// [`READ_AHEAD`]; a read elsewhere fetches just what it reads. A boot's scattered reads so
/// fetch little beyond what they touch, and a copy or scan still fetches in large ranges.
#[derive(Debug, Default)]
struct ReadStream {
    /// The byte after the last read.
    next: u64,
    /// Bytes of read-ahead the last read of the run got.
    window: u64,
}

impl ReadStream {
    /// Read-ahead for a read of `offset..end`, and records it.
    fn advance(&mut self, offset: u64, end: u64) -> u64 {
        // near where the last read ended, either side (within the read-ahead or one read's
        // length): a guest's queue may deliver the reads of one run slightly out of order
        let near = self.window.max(end.saturating_sub(offset));
        let sequential = self.next > 0 && offset.abs_diff(self.next) <= near && end > offset;
        self.window = if sequential {
            (self.window * 2).clamp(READ_AHEAD_START, READ_AHEAD)
        } else {
            0
        };
        self.next = end;
        self.window
    }
}

#[derive(Debug, Clone)]
struct BlockAt {
    v: Arc<LazyVersion>,
    pack: u32,
    offset: u64,
}

#[derive(Debug, Default)]
struct Table {
    versions: HashMap<VersionId, Arc<LazyVersion>>,
    blocks: HashMap<[u8; 32], BlockAt>,
}

impl Table {
    fn insert(&mut self, v: Arc<LazyVersion>) {
        for &(h, pack, offset) in &v.absent {
            self.blocks.entry(h).or_insert_with(|| BlockAt {
                v: v.clone(),
                pack,
                offset,
            });
        }
        self.versions.insert(v.id, v);
    }

    fn remove(&mut self, id: &VersionId) {
        if self.versions.remove(id).is_some() {
            self.blocks.retain(|_, at| at.v.id != *id);
            // blocks another lazy version also lacks stay reachable through it
            let rest: Vec<Arc<LazyVersion>> = self.versions.values().cloned().collect();
            for v in rest {
                for &(h, pack, offset) in &v.absent {
                    self.blocks.entry(h).or_insert_with(|| BlockAt {
                        v: v.clone(),
                        pack,
                        offset,
                    });
                }
            }
        }
    }
}

#[derive(Debug)]
struct StatsState {
    loaded: bool,
    stats: RemoteStats,
    dirty: bool,
    flushed: Instant,
}

/// The store's lazy-version state (a field of the store's internals).
pub(crate) struct Lazy {
    dir: PathBuf,
    /// Some lazy version exists (or may): reads only look at the table when set.
    active: AtomicBool,
    table: OnceLock<RwLock<Table>>,
    init: Mutex<()>,
    source: RwLock<Option<Arc<dyn RemoteSource>>>,
    /// Blocks being fetched right now, so concurrent readers fetch each block once.
    inflight: Mutex<HashSet<[u8; 32]>>,
    landed: Condvar,
    stats: Mutex<StatsState>,
    /// Per remote: is it failing, and how many fetches are inside it.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    /// Per version being pulled: one pull of a version at a time, so a pull retried while the
    /// first still runs (a driver that gave up on a cut-off host) fetches only what the first
    /// did not.
    pulls: Mutex<HashMap<VersionId, Arc<Mutex<()>>>>,
}

/// While a remote fails, at most [`MAX_WAITING`] reads wait out its deadline; the others fail
/// at once. The daemon answers reads on a few session threads (8 by default): were they all
/// waiting on a dead remote, reads of local versions would wait too.
#[derive(Debug, Default)]
struct Gate {
    down: AtomicBool,
    /// Fetches waiting out the remote's deadline (retrying).
    waiting: std::sync::atomic::AtomicUsize,
}

/// Reads that may wait on a failing remote at once (half the daemon's default session threads).
const MAX_WAITING: usize = 4;

impl Gate {
    /// A place among the fetches that wait on this remote, if one is free.
    fn wait_slot(&self) -> Option<Waiting<'_>> {
        self.waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_WAITING).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(self))
    }
}

/// Holds a place among the fetches waiting on a failing remote.
struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lazy({})", self.dir.display())
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        self.flush_stats();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fetch_err(key: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::RemoteFetch {
        key: key.to_string(),
        why: why.to_string(),
    }
}

impl Lazy {
    pub(crate) fn new(store_dir: &Path) -> Lazy {
        let active = std::fs::read_dir(store_dir.join(DIR))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        Lazy {
            dir: store_dir.to_path_buf(),
            active: AtomicBool::new(active),
            table: OnceLock::new(),
            init: Mutex::new(()),
            source: RwLock::new(None),
            inflight: Mutex::new(HashSet::new()),
            gates: Mutex::new(HashMap::new()),
            pulls: Mutex::new(HashMap::new()),
            landed: Condvar::new(),
            stats: Mutex::new(StatsState {
                loaded: false,
                stats: RemoteStats::default(),
                dirty: false,
                flushed: Instant::now(),
            }),
        }
    }

    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn table(&self) -> &RwLock<Table> {
        if let Some(t) = self.table.get() {
            return t;
        }
        let _g = lock(&self.init);
        self.table
            .get_or_init(|| RwLock::new(load_table(&self.dir.join(DIR))))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table().read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table().write().unwrap_or_else(|p| p.into_inner())
    }

    fn has(&self, hash: &[u8; 32]) -> bool {
        self.active() && self.read().blocks.contains_key(hash)
    }

    /// Adds `c` to the counters of `remote` (and of `version`, if given).
    fn count(&self, remote: &str, version: Option<&VersionId>, c: Counters) {
        let mut st = lock(&self.stats);
        if !st.loaded {
            st.stats = load_stats(&self.dir);
            st.loaded = true;
        }
        let r = st.stats.remotes.entry(remote.to_string()).or_default();
        r.total.add(&c);
        if let Some(v) = version {
            r.versions.entry(v.to_hex()).or_default().add(&c);
        }
        st.dirty = true;
        if st.flushed.elapsed() >= STATS_FLUSH {
            write_stats(&self.dir, &st.stats);
            st.dirty = false;
            st.flushed = Instant::now();
        }
    }

    fn stats(&self) -> RemoteStats {
        let mut st = lock(&self.stats);
        if !st.loaded {
            st.stats = load_stats(&self.dir);
            st.loaded = true;
        }
        st.stats.clone()
    }

    fn flush_stats(&self) {
        let mut st = lock(&self.stats);
        if st.dirty {
            write_stats(&self.dir, &st.stats);
            st.dirty = false;
            st.flushed = Instant::now();
        }
    }
}

fn load_stats(dir: &Path) -> RemoteStats {
    std::fs::read(dir.join(STATS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Best effort: counters are diagnostics, and losing the last second of them is harmless.
fn write_stats(dir: &Path, s: &RemoteStats) {
    let path = dir.join(STATS_FILE);
    let tmp = dir.join(format!("{STATS_FILE}.tmp"));
    let Ok(bytes) = serde_json::to_vec(s) else {
        return;
    };
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn loc_path(dir: &Path, id: &VersionId) -> PathBuf {
    dir.join(DIR).join(format!("{}.loc", id.to_hex()))
}

fn encode_loc(v: &LazyVersion) -> Vec<u8> {
    let head = serde_json::to_vec(&LocHeader {
        version: v.id.to_hex(),
        remote: v.remote.clone(),
        block_size: v.block_size,
        blocks: v.blocks,
        packs: v.packs.clone(),
    })
    .unwrap_or_default();
    let mut out = Vec::with_capacity(12 + head.len() + v.absent.len() * LOC_ENTRY);
    out.extend_from_slice(LOC_MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    for (h, p, o) in &v.absent {
        out.extend_from_slice(h);
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&o.to_le_bytes());
    }
    out
}

fn decode_loc(data: &[u8]) -> Option<LazyVersion> {
    let body = data.strip_prefix(LOC_MAGIC.as_slice())?;
    let (len, body) = body.split_at_checked(4)?;
    let hlen = u32::from_le_bytes(len.try_into().ok()?) as usize;
    let (head, entries) = body.split_at_checked(hlen)?;
    let h: LocHeader = serde_json::from_slice(head).ok()?;
    if entries.len() % LOC_ENTRY != 0 {
        return None;
    }
    let mut absent = Vec::with_capacity(entries.len() / LOC_ENTRY);
    for e in entries.chunks_exact(LOC_ENTRY) {
        let hash: [u8; 32] = e[..32].try_into().ok()?;
        let pack = u32::from_le_bytes(e[32..36].try_into().ok()?);
        let offset = u64::from_le_bytes(e[36..44].try_into().ok()?);
        if pack as usize >= h.packs.len() {
            return None;
        }
        absent.push((hash, pack, offset));
    }
    Some(LazyVersion {
        id: h.version.parse().ok()?,
        remote: h.remote,
        blocks: h.blocks,
        packs: h.packs,
        block_size: h.block_size,
        absent,
        cursor: Default::default(),
        stream: Default::default(),
    })
}

fn load_table(dir: &Path) -> Table {
    let mut t = Table::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return t;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("loc") {
            continue;
        }
        match std::fs::read(&path).ok().as_deref().and_then(decode_loc) {
            Some(v) => t.insert(Arc::new(v)),
            // its blocks then read as missing (fsck says so), never as wrong bytes
            None => tracing::warn!(path = %path.display(), "unreadable lazy-version file ignored"),
        }
    }
    t
}

/// A block to fetch: offset in its pack, hash, the version counted, length.
type Wanted = (u64, [u8; 32], VersionId, u64);

/// One ranged read of a lazy fetch.
struct Range {
    remote: String,
    pack: String,
    start: u64,
    end: u64,
    /// (hash, offset within the range, the version it is counted for)
    blocks: Vec<([u8; 32], u64, VersionId)>,
}

/// Releases claimed in-flight blocks (also on error or panic) and wakes waiters.
struct Claim<'a> {
    lazy: &'a Lazy,
    blocks: Vec<[u8; 32]>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut f = lock(&self.lazy.inflight);
        for h in &self.blocks {
            f.remove(h);
        }
        drop(f);
        self.lazy.landed.notify_all();
    }
}

impl Inner {
    /// Reads block `hash` whole; a lazy version's absent block is fetched first.
    pub(crate) fn read_block_fetching(
        &self,
        hash: &[u8; 32],
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        match self.read_object(ObjKind::Block, hash, buf) {
            Err(StoreError::MissingObject { .. }) if self.lazy.has(hash) => {
                self.fetch_blocks(&[*hash], None, None, None, 1)?;
                self.read_object(ObjKind::Block, hash, buf)
            }
            r => r,
        }
    }

    /// The length of block `hash`, fetching it first when it is a lazy version's absent block.
    pub(crate) fn block_len_fetching(&self, hash: &[u8; 32]) -> Result<Option<u32>, StoreError> {
        match self.object_len(ObjKind::Block, hash)? {
            None if self.lazy.has(hash) => {
                self.fetch_blocks(&[*hash], None, None, None, 1)?;
                self.object_len(ObjKind::Block, hash)
            }
            r => Ok(r),
        }
    }

    /// Before a read of `len` bytes at `offset` of `v`: when `v` is lazy and the request
    /// touches an absent block, fetches the request's absent blocks and, when the read runs on
    /// from the last one, up to [`READ_AHEAD`] past it ([`ReadStream`]), coalesced into ranged
    /// reads. Counts cache hits.
    pub(crate) fn lazy_prepare(
        &self,
        v: &Version,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let bs = u64::from(v.block_size());
        let end = v.size().min(offset.saturating_add(len));
        if offset >= end || bs == 0 {
            return Ok(());
        }
        let t = self.lazy.read();
        let Some(lv) = t.versions.get(&v.id()).cloned() else {
            return Ok(());
        };
        let last_req = (end - 1) / bs;
        let ahead = lock(&lv.stream).advance(offset, end);
        let last = (end.saturating_add(ahead).div_ceil(bs))
            .saturating_sub(1)
            .min(v.block_count().saturating_sub(1));
        let (mut wanted, mut requested, mut hits) = (Vec::new(), Vec::new(), 0u64);
        for i in offset / bs..=last {
            let Some(h) = v.block_hash(i)? else { continue };
            if !t.blocks.contains_key(&h.0) {
                continue;
            }
            let local = self.locate(ObjKind::Block, &h.0)?.is_some();
            if i <= last_req {
                if local {
                    hits += 1;
                } else {
                    requested.push(h.0);
                }
            }
            if !local {
                wanted.push(h.0);
            }
        }
        drop(t);
        if hits > 0 {
            self.lazy.count(
                &lv.remote,
                Some(&lv.id),
                Counters {
                    cache_hits: hits,
                    ..Counters::default()
                },
            );
        }
        if !requested.is_empty() {
            // read-ahead is best effort: a failure there must not fail the request itself
            // (bad bytes in the read-ahead); an unreachable remote is not asked twice
            match self.fetch_blocks(&wanted, Some(&requested), Some(&lv.id), None, 1) {
                Err(StoreError::RemoteIntegrity { .. }) if wanted.len() > requested.len() => {
                    self.fetch_blocks(&requested, None, Some(&lv.id), None, 1)?;
                }
                r => {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Fetches the blocks of `wanted` that are absent and known to a lazy version, `jobs`
    /// ranged reads at a time; counted for `version` (else the version that named each block).
    /// A block another thread is fetching is waited for (only if in `needed`, when given), not
    /// fetched twice.
    pub(crate) fn fetch_blocks(
        &self,
        wanted: &[[u8; 32]],
        needed: Option<&[[u8; 32]]>,
        version: Option<&VersionId>,
        remote_override: Option<&str>,
        jobs: usize,
    ) -> Result<FetchReport, StoreError> {
        let lazy = &self.lazy;
        let source = lazy
            .source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (mut mine, mut others) = (Vec::new(), Vec::new());
        {
            let mut seen = HashSet::new();
            let mut f = lock(&lazy.inflight);
            for h in wanted {
                if !seen.insert(*h) {
                    continue;
                }
                if f.contains(h) {
                    others.push(*h);
                } else if self.locate(ObjKind::Block, h)?.is_none() {
                    f.insert(*h);
                    mine.push(*h);
                }
            }
        }
        let claim = Claim {
            lazy,
            blocks: mine.clone(),
        };
        let mut result = Ok(FetchReport::default());
        if !mine.is_empty() {
            result = match source {
                None => Err(fetch_err(
                    "",
                    "this process has no client for the version's remote",
                )),
                Some(src) => {
                    let ranges = self.plan_ranges(&mine, version, remote_override)?;
                    self.run_ranges(&*src, &ranges, jobs)
                }
            };
        }
        drop(claim);
        let report = result?;
        // blocks another read is fetching: wait only for those this read needs, and not at
        // all while a remote fails (that read is already waiting out the deadline for them;
        // a thread waiting here too is one fewer to serve reads of local data)
        if let Some(needed) = needed {
            others.retain(|h| needed.contains(h));
        }
        if others.is_empty() {
            return Ok(report);
        }
        if lock(&lazy.gates)
            .values()
            .any(|g| g.down.load(Ordering::Relaxed))
        {
            return Err(fetch_err(
                "",
                "the remote is failing and another read is already waiting for these blocks",
            ));
        }
        let mut f = lock(&lazy.inflight);
        while others.iter().any(|h| f.contains(h)) {
            f = lazy.landed.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        Ok(report)
    }

    fn plan_ranges(
        &self,
        blocks: &[[u8; 32]],
        version: Option<&VersionId>,
        remote_override: Option<&str>,
    ) -> Result<Vec<Range>, StoreError> {
        let t = self.lazy.read();
        let mut by_pack: BTreeMap<(String, String), Vec<Wanted>> = BTreeMap::new();
        for h in blocks {
            let Some(at) = t.blocks.get(h) else { continue };
            let pack =
                at.v.packs
                    .get(at.pack as usize)
                    .cloned()
                    .unwrap_or_default();
            let remote = remote_override.unwrap_or(&at.v.remote).to_string();
            by_pack.entry((remote, pack)).or_default().push((
                at.offset,
                *h,
                version.copied().unwrap_or(at.v.id),
                u64::from(at.v.block_size),
            ));
        }
        let mut out: Vec<Range> = Vec::new();
        for ((remote, pack), mut list) in by_pack {
            list.sort_by_key(|e| e.0);
            for (off, h, vid, bs) in list {
                let end = off.saturating_add(bs);
                match out.last_mut() {
                    Some(r)
                        if r.pack == pack
                            && r.remote == remote
                            && r.end == off
                            && end - r.start <= MAX_FETCH =>
                    {
                        r.blocks.push((h, off - r.start, vid));
                        r.end = end;
                    }
                    _ => out.push(Range {
                        remote: remote.clone(),
                        pack: pack.clone(),
                        start: off,
                        end,
                        blocks: vec![(h, 0, vid)],
                    }),
                }
            }
        }
        Ok(out)
    }

    fn run_ranges(
        &self,
        src: &dyn RemoteSource,
        ranges: &[Range],
        jobs: usize,
    ) -> Result<FetchReport, StoreError> {
        use std::sync::atomic::AtomicUsize;
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let total = Mutex::new((FetchReport::default(), None::<StoreError>));
        std::thread::scope(|s| {
            let work = || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(r) = ranges.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let got = self.fetch_range(src, r);
                    let mut t = lock(&total);
                    match got {
                        Ok((blocks, bytes)) => {
                            t.0.requests += 1;
                            t.0.blocks += blocks;
                            t.0.bytes += bytes;
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            t.1.get_or_insert(e);
                        }
                    }
                }
            };
            for _ in 1..jobs.max(1).min(ranges.len()) {
                s.spawn(work);
            }
            work();
        });
        let (report, err) = total.into_inner().unwrap_or_else(|p| p.into_inner());
        match err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// One ranged read: retried with backoff while the remote cannot be reached, until the
    /// remote's deadline; every block checked before any of the range is stored.
    fn fetch_range(&self, src: &dyn RemoteSource, r: &Range) -> Result<(u64, u64), StoreError> {
        let key = pack_key(&r.pack);
        let (remote, deadline) = src.remote(&r.remote).map_err(|e| fetch_err(&key, e))?;
        let gate = lock(&self.lazy.gates)
            .entry(r.remote.clone())
            .or_default()
            .clone();
        let busy = || {
            fetch_err(
                &key,
                format!(
                    "remote {} is failing and {MAX_WAITING} reads already wait on it",
                    r.remote
                ),
            )
        };
        // while the remote fails, a read waits only in one of the places (else: EIO at once)
        let mut slot = None;
        if gate.down.load(Ordering::Relaxed) {
            slot = Some(gate.wait_slot().ok_or_else(busy)?);
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let data = loop {
            match remote.get_range(&key, r.start..r.end) {
                Ok(d) => {
                    gate.down.store(false, Ordering::Relaxed);
                    break d;
                }
                Err(
                    e @ (RemoteError::Unreachable(_)
                    | RemoteError::Timeout(_)
                    | RemoteError::Other(_)),
                ) => {
                    gate.down.store(true, Ordering::Relaxed);
                    if slot.is_none() {
                        slot = Some(gate.wait_slot().ok_or_else(busy)?);
                    }
                    if started.elapsed() + backoff >= deadline {
                        return Err(fetch_err(
                            &key,
                            format!("{e} (gave up after {:?})", started.elapsed()),
                        ));
                    }
                    tracing::warn!(key, "lazy fetch: {e}; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(fetch_err(&key, e)),
            }
        };
        let count_version = r.blocks.first().map(|b| b.2);
        let bad = |why: String| {
            self.lazy.count(
                &r.remote,
                count_version.as_ref(),
                Counters {
                    requests: 1,
                    integrity_errors: 1,
                    ..Counters::default()
                },
            );
            tracing::error!(key, "integrity error: {why}; nothing from it was stored");
            StoreError::RemoteIntegrity {
                key: key.clone(),
                why,
            }
        };
        if data.len() as u64 != r.end - r.start {
            return Err(bad(format!(
                "range {}..{} returned {} bytes",
                r.start,
                r.end,
                data.len()
            )));
        }
        let mut checked = Vec::with_capacity(r.blocks.len());
        for (i, (h, off, _)) in r.blocks.iter().enumerate() {
            let at = *off as usize;
            let next = r.blocks.get(i + 1).map_or(data.len(), |b| b.1 as usize);
            let block = data.get(at..next).unwrap_or_default();
            if blake3::hash(block).as_bytes() != h {
                return Err(bad(format!(
                    "block {} at offset {} does not match its blake3",
                    BlockHash(*h).short(),
                    r.start + off
                )));
            }
            checked.push((*h, block));
        }
        for (h, b) in &checked {
            self.put_object(ObjKind::Block, h, b)?;
        }
        // per version counted: blocks of one range may be counted for different versions
        let mut per: HashMap<VersionId, Counters> = HashMap::new();
        for (i, (_, off, vid)) in r.blocks.iter().enumerate() {
            let next = r.blocks.get(i + 1).map_or(data.len() as u64, |b| b.1);
            let c = per.entry(*vid).or_default();
            c.blocks_fetched += 1;
            c.bytes_fetched += next - off;
        }
        let mut first = true;
        for (vid, mut c) in per {
            c.requests = u64::from(first);
            first = false;
            self.lazy.count(&r.remote, Some(&vid), c);
        }
        Ok((checked.len() as u64, data.len() as u64))
    }

    /// Forgets the lazy record of `id` (its file too).
    pub(crate) fn lazy_forget(&self, id: &VersionId) {
        if !self.lazy.active() {
            return;
        }
        self.lazy.write().remove(id);
        match std::fs::remove_file(loc_path(&self.dir, id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(id = %id.short(), "removing a lazy-version file: {e}"),
        }
    }

    /// True while some block of `lv` is absent; amortized O(1) (see `LazyVersion::cursor`).
    fn lazy_incomplete(&self, lv: &LazyVersion) -> Result<bool, StoreError> {
        let mut at = lv.cursor.load(Ordering::Relaxed);
        while let Some((h, _, _)) = lv.absent.get(at) {
            if self.locate(ObjKind::Block, h)?.is_none() {
                lv.cursor.store(at, Ordering::Relaxed);
                return Ok(true);
            }
            at += 1;
        }
        lv.cursor.store(at, Ordering::Relaxed);
        Ok(false)
    }

    fn lazy_absent(&self, lv: &LazyVersion) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for (h, _, _) in &lv.absent {
            if self.locate(ObjKind::Block, h)?.is_none() {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Store {
    /// Hands the store the clients of its remotes (the binary builds them from the store's
    /// remotes configuration); lazy reads fail with EIO without one.
    pub fn set_remote_source(&self, source: Arc<dyn RemoteSource>) {
        *self
            .inner
            .lazy
            .source
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// How much of `id` is local, when it is a lazy version (None: all local).
    pub fn lazy_status(&self, id: &VersionId) -> Result<Option<LazyStatus>, StoreError> {
        if !self.inner.lazy.active() {
            return Ok(None);
        }
        let Some(lv) = self.inner.lazy.read().versions.get(id).cloned() else {
            return Ok(None);
        };
        let absent = self.inner.lazy_absent(&lv)?;
        Ok(Some(LazyStatus {
            remote: lv.remote.clone(),
            blocks: lv.blocks,
            absent,
        }))
    }

    /// True while some block of `id` is only in a remote. A lazy version found complete is
    /// recorded as local on the way (its `.loc` file removed).
    pub fn is_lazy(&self, id: &VersionId) -> Result<bool, StoreError> {
        if !self.inner.lazy.active() {
            return Ok(false);
        }
        let Some(lv) = self.inner.lazy.read().versions.get(id).cloned() else {
            return Ok(false);
        };
        if self.inner.lazy_incomplete(&lv)? {
            return Ok(true);
        }
        self.inner.lazy_forget(id);
        Ok(false)
    }

    /// True when `hash` is absent here but a lazy version says where it is in a remote.
    pub fn is_remote_block(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        Ok(self.inner.lazy.has(&hash.0) && !self.has_block(hash)?)
    }

    /// Fetches the absent blocks of lazy version `id` (all, or those at `indexes`), `jobs`
    /// ranged reads at a time; then, when every block is local, records the version as local.
    pub fn fetch_missing(
        &self,
        id: &VersionId,
        indexes: Option<&[u64]>,
        remote: Option<&str>,
        jobs: usize,
    ) -> Result<FetchReport, StoreError> {
        if self.lazy_status(id)?.is_none() {
            return Ok(FetchReport::default());
        }
        let v = self.version(id)?;
        let mut wanted = Vec::new();
        let mut add = |i: u64| -> Result<(), StoreError> {
            if let Some(h) = v.block_hash(i)? {
                if self.inner.lazy.has(&h.0) {
                    wanted.push(h.0);
                }
            }
            Ok(())
        };
        match indexes {
            Some(list) => list.iter().try_for_each(|&i| add(i))?,
            None => (0..v.block_count()).try_for_each(&mut add)?,
        }
        let r = self
            .inner
            .fetch_blocks(&wanted, None, Some(id), remote, jobs)?;
        self.sync()?;
        self.is_lazy(id)?;
        Ok(r)
    }

    /// Every remote's fetch counters (this process's, and what earlier ones wrote).
    pub fn remote_stats(&self) -> RemoteStats {
        self.inner.lazy.stats()
    }

    /// Writes the fetch counters out now (the daemon at exit; they also go every second).
    pub fn flush_remote_stats(&self) {
        self.inner.lazy.flush_stats();
    }

    /// The lock a full pull of `id` holds while it runs (one pull per version at a time).
    pub(crate) fn pull_lock(&self, id: &VersionId) -> Arc<Mutex<()>> {
        let mut m = lock(&self.inner.lazy.pulls);
        // forget locks no pull holds any more
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(*id).or_default().clone()
    }

    /// Adds counters for `remote` and `version` (a full pull counts what it fetched).
    pub(crate) fn count_fetch(&self, remote: &str, version: Option<&VersionId>, c: Counters) {
        if !remote.is_empty() {
            self.inner.lazy.count(remote, version, c);
        }
    }

    /// `pull --lazy`: records `image:tag` (or the pinned id) from `remote` (named
    /// `remote_name` here) with its verified block map and where each absent block is, and
    /// fetches no block. The version is readable at once; its blocks come on first read.
    pub fn pull_lazy(
        &self,
        remote: &dyn Remote,
        remote_name: &str,
        image: &ImageName,
        tag: &Tag,
        pinned: Option<VersionId>,
        opts: &PullOptions,
    ) -> Result<PullReport, SyncError> {
        let mut clock = Instant::now();
        let mut times_ms = Vec::new();
        let mut lap = |step: &'static str| {
            times_ms.push((step, clock.elapsed().as_secs_f64() * 1e3));
            clock = Instant::now();
        };
        let (id, map, meta_bytes) = self.fetch_map(remote, image, tag, pinned)?;
        lap("map");
        let bs = map.header.block_size;
        let (mut wanted, mut report) = self.pull_start(id, image, &map, meta_bytes)?;
        lap("plan");
        if !report.already_local {
            if let Some(c) = &opts.cache {
                let _ = std::fs::create_dir_all(c);
            }
            let packs = &map.header.packs;
            for p in packs {
                // pack names are hex hashes: anything else is not a key we should build
                if p.len() != 64 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return Err(integrity("block map", p, "names a malformed pack"));
                }
            }
            // the packs' indexes, 4 x --jobs requests at a time (a 2 GiB version has ~64 packs)
            let numbered: Vec<(usize, &String)> = packs.iter().enumerate().collect();
            let mut indexes: Vec<Vec<(BlockHash, super::PackLoc)>> = vec![Vec::new(); packs.len()];
            super::parallel_each(
                &numbered,
                opts.jobs.max(1) * 4,
                |(pi, p)| match load_idx(remote, opts.cache.as_deref(), p) {
                    Ok(e) => Ok((*pi, e)),
                    Err(SyncError::Remote(RemoteError::NotFound { key })) => {
                        Err(integrity("pack index", &key, "missing, but a map names it"))
                    }
                    Err(e) => Err(e),
                },
                |(pi, e)| {
                    if let Some(slot) = indexes.get_mut(pi) {
                        *slot = e;
                    }
                },
            )?;
            lap("indexes");
            let mut absent = Vec::with_capacity(wanted.len());
            for (pi, entries) in indexes.into_iter().enumerate() {
                if wanted.is_empty() {
                    break;
                }
                for (h, loc) in entries {
                    if wanted.remove(&h) {
                        if loc.len != bs {
                            return Err(integrity(
                                "pack index",
                                &packs[pi],
                                "gives a block of the wrong length",
                            ));
                        }
                        absent.push((h.0, pi as u32, loc.offset));
                    }
                }
            }
            if let Some(h) = wanted.iter().next() {
                return Err(integrity("block", &h.to_hex(), "in no pack its map names"));
            }
            let lv = LazyVersion {
                id,
                remote: remote_name.to_string(),
                blocks: report.blocks,
                packs: packs.clone(),
                block_size: bs,
                absent,
                cursor: Default::default(),
                stream: Default::default(),
            };
            // the file first: a committed lazy version always knows where its blocks are
            write_loc(&self.inner.dir, &lv)?;
            lap("record");
            self.inner.lazy.active.store(true, Ordering::Relaxed);
            self.inner.lazy.write().insert(Arc::new(lv));
            let root = self.build_map(map.header.size, bs, &map.hashes, false)?;
            let got = self
                .inner
                .commit_version(image, map.header.size, bs, &root)?;
            if got != id {
                return Err(integrity(
                    "block map",
                    &super::map_key(&id),
                    "does not make the version it names",
                ));
            }
        }
        self.set_tag(image, tag, &id)?;
        lap("commit");
        report.times_ms = times_ms;
        Ok(report)
    }
}

fn write_loc(store_dir: &Path, lv: &LazyVersion) -> Result<(), StoreError> {
    let dir = store_dir.join(DIR);
    std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
    let path = loc_path(store_dir, &lv.id);
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_loc(lv))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(StoreError::io("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loc_round_trips_and_rejects_a_bad_pack_index() {
        let v = LazyVersion {
            id: VersionId([7; 32]),
            remote: "r".into(),
            blocks: 3,
            packs: vec!["a".repeat(64)],
            block_size: 4096,
            absent: vec![([1; 32], 0, 0), ([2; 32], 0, 4096)],
            cursor: Default::default(),
            stream: Default::default(),
        };
        let bytes = encode_loc(&v);
        let back = decode_loc(&bytes).unwrap();
        assert_eq!(back.absent, v.absent);
        assert_eq!(back.remote, "r");
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 12] = 9; // pack index 9 of 1 pack
        assert!(decode_loc(&bad).is_none());
        assert!(decode_loc(&bytes[..bytes.len() - 1]).is_none());
    }
}
