//! The remote block tier: versions pushed to an object store (S3 and the like) and pulled from
//! it by other hosts. This module holds the bucket format and the push and pull algorithms; the
//! store learns no HTTP: a remote is anything implementing the small [`Remote`] trait
//! (imagefs-remote implements it over S3 with the `object_store` crate).
//!
//! # Bucket layout (format "imagefs-remote 1", in [`FORMAT`])
//! Keys are relative to the remote's prefix. Every object but tags is immutable and named by a
//! hash of what it holds, so an upload is never wrong to repeat and never needs to be redone.
//! - `imagefs-remote.json`: `{"format": "imagefs-remote 1"}`, written by the first push.
//! - `packs/P.pack`: whole blocks (the image tail zero-padded, as in the store) back to back,
//!   no framing; `P` is the blake3 of the pack's bytes. A push groups the blocks the remote
//!   lacks into packs of about `--pack-size` (32 MiB by default; a small push makes a small pack).
//! - `packs/P.idx`: the pack's index, uploaded only after its pack: magic `IFSIDX1\0`, then
//!   per block 44 bytes: blake3 (32), offset (u64 LE), length (u32 LE).
//! - `maps/V.map`: the block map of version `V`: magic `IFSMAP1\0`, header length (u32 LE), a
//!   JSON header (image, size, block_size, packs: the packs holding its blocks), then 32 bytes
//!   per block (blake3, all zero for a hole). Its name is checked by recomputing the version id
//!   from its contents, so a map cannot lie about the version it names.
//! - `tags/IMAGE/TAG.json`: `{"format":1,"image","tag","version","size","block_size","pushed"}`,
//!   the only mutable objects, written last by a push: the commit point.
//!
//! # Trust
//! The remote is untrusted for bytes: every block fetched is checked against the blake3 its
//! verified map names, and every map against its version id, before anything is stored; a
//! mismatch is [`SyncError::Integrity`] (exit 5) and stores nothing wrong. Tags are trusted as
//! far as the bucket's credentials are; `NAME:TAG@VERSION_ID` pins a version by id.

mod gc;
pub(crate) mod lazy;
mod pull;
mod push;

use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::{ErrorKind, StoreError};
use crate::ids::{BlockHash, ImageName, Tag, VersionId};

pub use gc::{
    gc, read_state as read_gc_state, GcAction, GcOptions, GcPhase, GcReport, GcState,
    DEFAULT_GRACE, GC_STATE_KEY,
};
pub use lazy::{
    Counters, FetchReport, LazyStatus, RemoteCounters, RemoteSource, RemoteStats, READ_AHEAD,
};
pub use pull::{PullEvent, PullOptions, PullReport};
pub use push::{PushEvent, PushOptions, PushReport};

/// The bucket format this code reads and writes.
pub const FORMAT: &str = "imagefs-remote 1";
/// Key of the format marker.
pub const FORMAT_KEY: &str = "imagefs-remote.json";
/// Default target size of a pack object.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;
/// Parallel requests of a push or pull by default.
pub const DEFAULT_JOBS: usize = 4;
/// The largest single ranged read a pull makes (adjacent wanted blocks are coalesced up to it).
pub const MAX_RANGE: u64 = 8 << 20;

const IDX_MAGIC: &[u8; 8] = b"IFSIDX1\0";
const MAP_MAGIC: &[u8; 8] = b"IFSMAP1\0";
const IDX_ENTRY: usize = 44;
/// Bounds what a remote can make us allocate for one map header.
const MAX_MAP_HEADER: usize = 16 << 20;

/// Why a request to a remote failed. Implementations map their client's errors to these.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// The object does not exist.
    #[error("{key}: no such object in the remote")]
    NotFound { key: String },
    /// The remote could not be reached (connection refused, DNS, reset).
    #[error("remote unreachable: {0}")]
    Unreachable(String),
    /// No answer within the remote's deadline.
    #[error("remote did not answer within {0:?}")]
    Timeout(Duration),
    /// The remote refused our credentials or the request.
    #[error("remote refused the request: {0}")]
    Denied(String),
    /// The remote's configuration is unusable (bad URL, no credentials).
    #[error("remote configuration: {0}")]
    Config(String),
    /// Anything else the remote answered.
    #[error("remote: {0}")]
    Other(String),
}

/// An object store holding one remote's objects (keys relative to its prefix). Blocking; safe
/// to call from many threads at once (push and pull run bounded parallel requests).
pub trait Remote: Send + Sync {
    /// The object's size, `None` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<u64>, RemoteError>;
    /// The whole object (`NotFound` when it does not exist).
    fn get(&self, key: &str) -> Result<Vec<u8>, RemoteError>;
    /// Bytes `range` of the object (one ranged request).
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, RemoteError>;
    /// Writes the object whole, replacing any object of that name.
    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), RemoteError>;
    /// Writes the object unless one of that name exists; true when it wrote. Only for
    /// content-addressed keys: a racing writer writes the same bytes.
    fn put_if_absent(&self, key: &str, data: Vec<u8>) -> Result<bool, RemoteError> {
        if self.head(key)?.is_some() {
            return Ok(false);
        }
        self.put(key, data)?;
        Ok(true)
    }
    /// Every object whose key starts with `prefix`, as (key, size).
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError>;
    /// Deletes the object (no error when it is already gone).
    fn delete(&self, key: &str) -> Result<(), RemoteError>;
}

/// Errors of push, pull and listing a remote.
#[derive(Debug, Error)]
pub enum SyncError {
    /// The remote failed a request.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The remote holds no such tag (or pinned version).
    #[error("the remote holds no {0}")]
    NotInRemote(String),
    /// Bytes from the remote do not match their hash, or an object is malformed or missing.
    #[error("integrity error: {what} {key}: {why} (nothing from it was stored)")]
    Integrity {
        what: &'static str,
        key: String,
        why: String,
    },
    /// The bucket holds another format.
    #[error("the remote has format {found:?}, this imagefs understands {FORMAT:?}")]
    UnknownFormat { found: String },
    /// The request contradicts the local store.
    #[error("{0}")]
    Refused(String),
}

impl SyncError {
    /// The class of this error (the CLI's exit code): an unreachable remote or a timeout is
    /// `Io` (1), an unknown tag `NotFound` (3), an integrity error `Corrupt` (5).
    pub fn kind(&self) -> ErrorKind {
        match self {
            SyncError::Remote(RemoteError::NotFound { .. }) => ErrorKind::NotFound,
            SyncError::Remote(RemoteError::Config(_)) => ErrorKind::BadInput,
            SyncError::Remote(_) => ErrorKind::Io,
            SyncError::Store(e) => e.kind(),
            SyncError::NotInRemote(_) => ErrorKind::NotFound,
            SyncError::Integrity { .. } => ErrorKind::Corrupt,
            SyncError::UnknownFormat { .. } => ErrorKind::BadInput,
            SyncError::Refused(_) => ErrorKind::Conflict,
        }
    }
}

fn integrity(what: &'static str, key: &str, why: impl Into<String>) -> SyncError {
    SyncError::Integrity {
        what,
        key: key.to_string(),
        why: why.into(),
    }
}

/// The format marker's contents.
#[derive(Debug, Serialize, Deserialize)]
struct FormatMarker {
    format: String,
}

/// Checks the bucket's format marker; `false` when the remote has none yet (empty).
pub(crate) fn check_format(remote: &dyn Remote) -> Result<bool, SyncError> {
    match remote.get(FORMAT_KEY) {
        Ok(bytes) => {
            let m: FormatMarker =
                serde_json::from_slice(&bytes).map_err(|_| SyncError::UnknownFormat {
                    found: String::from_utf8_lossy(&bytes).chars().take(64).collect(),
                })?;
            if m.format != FORMAT {
                return Err(SyncError::UnknownFormat { found: m.format });
            }
            Ok(true)
        }
        Err(RemoteError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn pack_key(p: &str) -> String {
    format!("packs/{p}.pack")
}
pub(crate) fn idx_key(p: &str) -> String {
    format!("packs/{p}.idx")
}
pub(crate) fn map_key(v: &VersionId) -> String {
    format!("maps/{}.map", v.to_hex())
}
/// Key of the tag object of `image:tag`.
pub fn tag_key(image: &ImageName, tag: &Tag) -> String {
    format!("tags/{image}/{tag}.json")
}

/// Where a block lives in the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackLoc {
    pub offset: u64,
    pub len: u32,
}

/// Encodes a pack index.
pub(crate) fn encode_idx(entries: &[(BlockHash, PackLoc)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDX_MAGIC.len() + entries.len() * IDX_ENTRY);
    out.extend_from_slice(IDX_MAGIC);
    for (h, l) in entries {
        out.extend_from_slice(&h.0);
        out.extend_from_slice(&l.offset.to_le_bytes());
        out.extend_from_slice(&l.len.to_le_bytes());
    }
    out
}

/// Decodes a pack index (untrusted: a lie only makes the blocks it points at fail their hash).
pub(crate) fn decode_idx(key: &str, data: &[u8]) -> Result<Vec<(BlockHash, PackLoc)>, SyncError> {
    let body = data
        .strip_prefix(IDX_MAGIC.as_slice())
        .ok_or_else(|| integrity("pack index", key, "not a pack index"))?;
    if body.len() % IDX_ENTRY != 0 {
        return Err(integrity("pack index", key, "truncated"));
    }
    Ok(body
        .chunks_exact(IDX_ENTRY)
        .map(|e| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&e[..32]);
            let mut o = [0u8; 8];
            o.copy_from_slice(&e[32..40]);
            let mut l = [0u8; 4];
            l.copy_from_slice(&e[40..44]);
            (
                BlockHash(h),
                PackLoc {
                    offset: u64::from_le_bytes(o),
                    len: u32::from_le_bytes(l),
                },
            )
        })
        .collect())
}

/// The JSON header of a map object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct MapHeader {
    pub image: String,
    pub size: u64,
    pub block_size: u32,
    /// The packs holding this version's blocks (sorted).
    pub packs: Vec<String>,
}

/// A version's block map as kept in the remote.
#[derive(Debug, Clone)]
pub(crate) struct RemoteMap {
    pub header: MapHeader,
    pub hashes: Vec<Option<BlockHash>>,
}

pub(crate) fn encode_map(m: &RemoteMap) -> Vec<u8> {
    let head = serde_json::to_vec(&m.header).unwrap_or_default();
    let mut out = Vec::with_capacity(12 + head.len() + m.hashes.len() * 32);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    for h in &m.hashes {
        out.extend_from_slice(&h.map_or([0u8; 32], |h| h.0));
    }
    out
}

/// A map object's parsed header and the bytes after it (its hashes, unchecked). The map is
/// untrusted: its header is bounded before it is read.
pub(crate) fn split_map<'a>(key: &str, data: &'a [u8]) -> Result<(MapHeader, &'a [u8]), SyncError> {
    let bad = |why: &str| integrity("block map", key, why);
    let body = data
        .strip_prefix(MAP_MAGIC.as_slice())
        .ok_or_else(|| bad("not a block map"))?;
    let (len, body) = body.split_at_checked(4).ok_or_else(|| bad("truncated"))?;
    let mut l = [0u8; 4];
    l.copy_from_slice(len);
    let hlen = u32::from_le_bytes(l) as usize;
    if hlen > MAX_MAP_HEADER {
        return Err(bad("header too large"));
    }
    let (head, rest) = body
        .split_at_checked(hlen)
        .ok_or_else(|| bad("truncated"))?;
    let header = serde_json::from_slice(head).map_err(|e| bad(&format!("bad header: {e}")))?;
    Ok((header, rest))
}

/// Decodes a map and checks it is the version `id` (its id recomputed from its contents).
pub(crate) fn decode_map(
    store: &crate::Store,
    id: &VersionId,
    key: &str,
    data: &[u8],
) -> Result<RemoteMap, SyncError> {
    let bad = |why: &str| integrity("block map", key, why);
    let (header, hashes) = split_map(key, data)?;
    let bs = crate::store::check_block_size(u64::from(header.block_size))
        .map_err(|_| bad("bad block size"))?;
    if header.size > crate::source::MAX_IMAGE_SIZE {
        return Err(bad("image too large"));
    }
    let n = header.size.div_ceil(u64::from(bs));
    if hashes.len() as u64 != n.saturating_mul(32) {
        return Err(bad("block count does not match the size"));
    }
    let hashes: Vec<Option<BlockHash>> = hashes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            (h != [0u8; 32]).then_some(BlockHash(h))
        })
        .collect();
    let image = ImageName::new(&header.image).map_err(|_| bad("bad image name"))?;
    let got = store.block_map_id(&image, header.size, bs, &hashes)?;
    if got != *id {
        return Err(bad(&format!(
            "names version {} but holds version {}",
            id.short(),
            got.short()
        )));
    }
    Ok(RemoteMap { header, hashes })
}

/// A tag object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagObject {
    /// Tag format (1).
    pub format: u32,
    pub image: String,
    pub tag: String,
    /// The version id (hex).
    pub version: String,
    pub size: u64,
    pub block_size: u32,
    /// Unix seconds of the push.
    pub pushed: u64,
}

/// Every tag the remote holds, by key order.
pub fn list_tags(remote: &dyn Remote) -> Result<Vec<TagObject>, SyncError> {
    let mut out = Vec::new();
    for (key, _) in remote.list("tags/")? {
        if !key.ends_with(".json") {
            continue;
        }
        let bytes = match remote.get(&key) {
            Ok(b) => b,
            // deleted between the listing and the read
            Err(RemoteError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let t: TagObject = serde_json::from_slice(&bytes)
            .map_err(|e| integrity("tag", &key, format!("malformed: {e}")))?;
        out.push(t);
    }
    Ok(out)
}

/// The locations of every block in the remote's pack indexes (read through `cache`, a
/// directory of index copies: indexes are immutable, so a copy never goes stale).
pub(crate) struct RemoteIndex {
    pub blocks: std::collections::HashMap<BlockHash, (String, PackLoc)>,
}

/// Reads pack index `p` from `cache` or the remote (then keeps a copy in `cache`).
pub(crate) fn load_idx(
    remote: &dyn Remote,
    cache: Option<&std::path::Path>,
    p: &str,
) -> Result<Vec<(BlockHash, PackLoc)>, SyncError> {
    let key = idx_key(p);
    let cached = cache.map(|d| d.join(format!("{p}.idx")));
    if let Some(c) = &cached {
        if let Ok(bytes) = std::fs::read(c) {
            if let Ok(e) = decode_idx(&key, &bytes) {
                return Ok(e);
            }
        }
    }
    let bytes = remote.get(&key)?;
    let entries = decode_idx(&key, &bytes)?;
    if let Some(c) = &cached {
        // best effort: a cache that cannot be written only costs a fetch next time
        let tmp = c.with_extension(format!("tmp-{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() && std::fs::rename(&tmp, c).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(entries)
}

impl RemoteIndex {
    /// Lists the remote's packs and reads every pack index, leaving out the packs whose key is
    /// in `skip` (gc candidates: a push does not build on them).
    pub(crate) fn load(
        remote: &dyn Remote,
        cache: Option<&std::path::Path>,
        skip: &std::collections::HashSet<String>,
    ) -> Result<RemoteIndex, SyncError> {
        let mut idx = Vec::new();
        let mut packs = std::collections::HashSet::new();
        for (key, _) in remote.list("packs/")? {
            let Some(name) = key.strip_prefix("packs/") else {
                continue;
            };
            if let Some(p) = name.strip_suffix(".idx") {
                idx.push(p.to_string());
            } else if let Some(p) = name.strip_suffix(".pack") {
                packs.insert(p.to_string());
            }
        }
        idx.sort();
        let mut blocks = std::collections::HashMap::new();
        for p in idx {
            // an index whose pack is gone (gc) names nothing we can read
            if !packs.contains(&p) || skip.contains(&pack_key(&p)) {
                continue;
            }
            for (h, loc) in load_idx(remote, cache, &p)? {
                blocks.entry(h).or_insert_with(|| (p.clone(), loc));
            }
        }
        Ok(RemoteIndex { blocks })
    }
}

/// Runs `work` on each item on up to `jobs` threads, handing each success to `done` on the
/// calling thread as it comes (in any order); the first failure stops the threads taking new
/// items and is returned once the running ones have ended.
fn parallel_each<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> Result<R, SyncError> + Sync,
    mut done: impl FnMut(R),
) -> Result<(), SyncError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Result<R, SyncError>>();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(items.len()) {
            let tx = tx.clone();
            let (next, stop, work) = (&next, &stop, &work);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let r = work(item);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut first_err = None;
        for r in rx {
            match r {
                Ok(v) => done(v),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

#[cfg(test)]
mod tests;
