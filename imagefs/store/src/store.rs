//! The store handle: opening (format check, writer lock, index catch-up from the logs) and
//! the name-level queries (images, versions, tags, resolve). Objects and commits: objects.rs.
//! Invariant: every durable record of the logs is reflected in the index once `open` returns.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::StoreError;
use crate::ids::{BlockHash, ImageName, Tag, VersionId};
use crate::log::RecordLog;
use crate::pack::{self, Loc, ObjKind, PackReaders, PackWriter};
use crate::refs::{self, ImageMeta, RefRecord, VersionMeta, REF_KIND};
use crate::tree::Node;
use crate::version::Version;

/// The on-disk format this code reads and writes.
pub const FORMAT: &str = "imagefs-store 1";
/// Default block size of a new image.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Pack files roll over past this size.
pub(crate) const PACK_ROLL: u64 = 1 << 30;
/// Pending (unindexed) objects are made durable and indexed past this many objects (bounds
/// the pending map to ~20 MiB; a byte bound would stall the pipeline on fsync needlessly).
pub(crate) const SYNC_EVERY: u64 = 1 << 18;

/// Checks a block size: a power of two from 4 KiB to 1 MiB.
pub fn check_block_size(bs: u64) -> Result<u32, StoreError> {
    if bs.is_power_of_two() && (4096..=1 << 20).contains(&bs) {
        Ok(bs as u32)
    } else {
        Err(StoreError::BadBlockSize(bs))
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn obj_key(kind: ObjKind, hash: &[u8; 32]) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = kind.key_prefix();
    k[1..].copy_from_slice(hash);
    k
}

pub(crate) const REFS_STATE_KEY: &[u8] = b"s:refs";

fn u64_of(v: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(v.try_into().ok()?))
}

#[derive(Debug)]
pub(crate) struct Writer {
    pub pack: Option<PackWriter>,
    pub next_pack: u32,
    pub refs: RecordLog,
    /// Index entries of objects in the current pack not yet persisted (pack not fsynced).
    pub unsynced: Vec<(crate::objindex::Key, Loc)>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub dir: PathBuf,
    pub db: sled::Db,
    pub readers: PackReaders,
    /// Where every object lives.
    /// Loaded on first use, so name-only commands (ls, tag, rm) do not pay for it.
    pub objects: std::sync::OnceLock<crate::objindex::ObjIndex>,
    objects_init: Mutex<()>,
    pub writer: Mutex<Writer>,
    pub node_cache: RwLock<HashMap<[u8; 32], Arc<Node>>>,
    /// Verified blocks for reads smaller than a block.
    pub block_cache: crate::cache::BlockCache,
    /// Extra gc roots (live instances, rollouts), held weakly.
    pub gc_roots: Mutex<Vec<std::sync::Weak<dyn crate::maint::GcRoots>>>,
    /// Free space kept on the store's filesystem for metadata.
    pub reserve: crate::space::Reserve,
    /// Lazy versions: where their absent blocks are, the remotes' clients, fetch counters.
    pub lazy: crate::remote::lazy::Lazy,
    _lock: File,
}

/// A content-addressed block store. `Send + Sync`: share it as `Arc<Store>`; reads take no
/// global lock, writes serialize on one writer mutex. Holds the store's writer lock while open.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

/// An image: its block size and its tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: ImageName,
    pub block_size: u32,
    pub tags: Vec<(Tag, VersionId)>,
}

/// A version as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub id: VersionId,
    pub image: ImageName,
    pub size: u64,
    pub block_size: u32,
    /// Unix seconds of the first commit of this version.
    pub created: u64,
}

impl Inner {
    /// The object index, loaded (and caught up with the pack tails) on first use.
    pub(crate) fn objects(&self) -> Result<&crate::objindex::ObjIndex, StoreError> {
        if let Some(o) = self.objects.get() {
            return Ok(o);
        }
        let _init = self.objects_init.lock().unwrap_or_else(|p| p.into_inner());
        if self.objects.get().is_none() {
            let _ = self.objects.set(load_objects(&self.dir)?);
        }
        self.objects
            .get()
            .ok_or_else(|| StoreError::IndexInconsistent("object index".to_string()))
    }
}

/// Loads `objects.idx` and indexes whatever the packs hold past its marks.
fn load_objects(dir: &Path) -> Result<crate::objindex::ObjIndex, StoreError> {
    let packs_dir = dir.join("packs");
    let objects = crate::objindex::ObjIndex::open(&dir.join("objects.idx"))?;
    for id in pack::list_packs(&packs_dir)? {
        let path = pack::pack_path(&packs_dir, id);
        let flen = std::fs::metadata(&path)
            .map_err(StoreError::io("stat", &path))?
            .len();
        // a mark past the end cannot be trusted: index that pack again from its start
        let indexed = objects.mark(id).filter(|&m| m <= flen).unwrap_or(0);
        if flen > indexed || objects.mark(id).is_none() {
            let mut entries = Vec::new();
            let end = pack::scan(&path, id, indexed, |kind, hash, loc| {
                let k = obj_key(kind, &hash);
                objects.insert(k, loc);
                entries.push((k, loc));
                Ok(())
            })?;
            objects.persist(&entries, id, end)?;
        }
    }
    Ok(objects)
}

/// Takes every access from others off a store directory made before stores were 0700 (its
/// owner and group keep theirs).
fn tighten(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::metadata(dir) else {
        return;
    };
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        let tight = std::fs::Permissions::from_mode(mode & !0o007);
        if let Err(e) = std::fs::set_permissions(dir, tight) {
            tracing::warn!(error = %e, "store {} is open to all local users", dir.display());
        }
    }
}

impl Store {
    /// Creates a new, empty store in `dir` (created if missing; must be empty) and opens it.
    pub fn init(dir: &Path) -> Result<Store, StoreError> {
        Store::init_shared(dir, crate::access::Access::default())
    }

    /// `init`, with the store readable by `access`'s group too (0750 instead of 0700).
    pub fn init_shared(dir: &Path, access: crate::access::Access) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io("create", dir))?;
        let mut entries = std::fs::read_dir(dir).map_err(StoreError::io("read dir", dir))?;
        if entries.next().is_some() {
            return Err(StoreError::AlreadyExists(dir.to_path_buf()));
        }
        access.apply(dir)?;
        std::fs::create_dir(dir.join("packs")).map_err(StoreError::io("create", dir))?;
        let tmp = dir.join("FORMAT.tmp");
        std::fs::write(&tmp, format!("{FORMAT}\n")).map_err(StoreError::io("write", &tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(StoreError::io("fsync", &tmp))?;
        std::fs::rename(&tmp, dir.join("FORMAT")).map_err(StoreError::io("rename", &tmp))?;
        pack::fsync_dir(dir)?;
        Store::open(dir)
    }

    /// Opens the store in `dir`, taking its writer lock (`Busy` if another process holds it)
    /// and bringing the index up to date with the logs.
    ///
    /// The sled index is only a cache of the logs, and sled 0.34 can be left unreadable by a
    /// kill -9: an index that reads as corrupt or disagrees with the logs is rebuilt from them
    /// (as `fsck --repair` would), with a warning, rather than failing every command.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        tighten(dir);
        match Store::open_impl(dir, false) {
            Err(
                e @ (StoreError::Index(
                    sled::Error::Corruption { .. } | sled::Error::ReportableBug(_),
                )
                | StoreError::IndexInconsistent(_)),
            ) => {
                tracing::warn!("{}: {e}; rebuilding the index from the logs", dir.display());
                Store::open_impl(dir, true)
            }
            other => other,
        }
    }

    /// Opens the store after rebuilding the whole index from the pack files and refs log
    /// (what `fsck --repair` does; the old index is deleted first).
    pub fn open_rebuilding_index(dir: &Path) -> Result<Store, StoreError> {
        Store::open_impl(dir, true)
    }

    fn open_impl(dir: &Path, rebuild: bool) -> Result<Store, StoreError> {
        let format_path = dir.join("FORMAT");
        let found = match std::fs::read_to_string(&format_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore(dir.to_path_buf()))
            }
            Err(e) => return Err(StoreError::io("read", &format_path)(e)),
        };
        if found.trim_end() != FORMAT {
            return Err(StoreError::UnknownFormat {
                path: dir.to_path_buf(),
                found: found.trim_end().to_string(),
                expected: FORMAT,
            });
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::io("open", &lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StoreError::Busy(dir.to_path_buf()));
        }
        let index_dir = dir.join("index");
        if rebuild && index_dir.exists() {
            // rename first: a background thread of a just-dropped index may still write there
            let old = dir.join(format!("index.old-{}-{}", std::process::id(), now_secs()));
            std::fs::rename(&index_dir, &old).map_err(StoreError::io("rename", &index_dir))?;
        }
        // best effort: old indexes are garbage once renamed
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("index.old-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let db = sled::Config::new()
            .path(&index_dir)
            .cache_capacity(32 << 20)
            .open()?;
        let packs_dir = dir.join("packs");
        let pack_ids = pack::list_packs(&packs_dir)?;
        let idx_path = dir.join("objects.idx");
        if rebuild {
            match std::fs::remove_file(&idx_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &idx_path)(e)),
            }
        }
        let mut batch = sled::Batch::default();
        let mut changed = false;
        let (refs_log, records) = RecordLog::open(&dir.join("refs.log"))?;
        let applied = db
            .get(REFS_STATE_KEY)?
            .and_then(|v| u64_of(&v))
            .unwrap_or(0);
        if applied > refs_log.len() {
            return Err(StoreError::IndexInconsistent(
                "index is ahead of refs.log".to_string(),
            ));
        }
        for rec in records.iter().filter(|r| r.offset >= applied) {
            if rec.kind == REF_KIND {
                RefRecord::decode(&rec.payload)?.apply(&mut batch)?;
                changed = true;
            }
        }
        batch.insert(REFS_STATE_KEY, &refs_log.len().to_le_bytes()[..]);
        db.apply_batch(batch)?;
        if changed {
            db.flush()?;
        }
        let next_pack = pack_ids.last().map_or(1, |id| id + 1);
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                readers: PackReaders::new(packs_dir),
                objects: std::sync::OnceLock::new(),
                objects_init: Mutex::new(()),
                writer: Mutex::new(Writer {
                    pack: None,
                    next_pack,
                    refs: refs_log,
                    unsynced: Vec::new(),
                }),
                node_cache: RwLock::new(HashMap::new()),
                gc_roots: Mutex::new(Vec::new()),
                block_cache: crate::cache::BlockCache::new(),
                reserve: crate::space::Reserve::new(dir.to_path_buf()),
                lazy: crate::remote::lazy::Lazy::new(dir),
                _lock: lock,
            }),
        })
    }

    /// Keeps `bytes` free on the store's filesystem: below that, new data (instance writes,
    /// imports, applied bundles) is refused with [`StoreError::NoSpace`]; 0 turns it off.
    pub fn set_reserve(&self, bytes: u64) {
        self.inner.reserve.set(bytes);
    }

    /// The free-space reserve in bytes.
    pub fn reserve(&self) -> u64 {
        self.inner.reserve.bytes()
    }

    /// Fails with [`StoreError::NoSpace`] when `need` more bytes would cut into the reserve.
    pub fn ensure_space(&self, need: u64) -> Result<(), StoreError> {
        self.inner.reserve.check(need)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Every image with its block size and tags, by name.
    pub fn images(&self) -> Result<Vec<ImageInfo>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.db.scan_prefix(b"i") {
            let (k, v) = kv?;
            let name = ImageName::new(&String::from_utf8_lossy(&k[1..]))?;
            let meta: ImageMeta = serde_json::from_slice(&v)
                .map_err(|e| StoreError::IndexInconsistent(e.to_string()))?;
            let mut tags = Vec::new();
            let prefix = refs::tag_key(name.as_str(), "");
            for kv in self.inner.db.scan_prefix(&prefix) {
                let (k, v) = kv?;
                let tag = Tag::new(&String::from_utf8_lossy(&k[prefix.len()..]))?;
                tags.push((tag, id_of(&v)?));
            }
            out.push(ImageInfo {
                name,
                block_size: meta.block_size,
                tags,
            });
        }
        Ok(out)
    }

    /// Every version (tagged or not) the store holds.
    pub fn versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.db.scan_prefix(b"v") {
            let (k, v) = kv?;
            let id = id_of(&k[1..])?;
            out.push(info_of(id, &v)?);
        }
        out.sort_by_key(|v| (v.created, v.id));
        Ok(out)
    }

    /// Resolves `NAME:TAG`, a full hex id, or a unique hex prefix of 8 or more digits.
    pub fn resolve(&self, spec: &str) -> Result<VersionId, StoreError> {
        if spec.contains(':') {
            let (image, tag) = crate::ids::parse_name_tag(spec)?;
            let v = self
                .inner
                .db
                .get(refs::tag_key(image.as_str(), tag.as_str()))?;
            return match v {
                Some(v) => id_of(&v),
                None if self.image_meta(&image)?.is_none() => {
                    Err(StoreError::UnknownImage(image.to_string()))
                }
                None => Err(StoreError::UnknownTag(spec.to_string())),
            };
        }
        let lower = spec.to_ascii_lowercase();
        if lower.len() < 8 || lower.len() > 64 || !lower.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::BadSpec(spec.to_string()));
        }
        let mut found = None;
        for kv in self.inner.db.scan_prefix(b"v") {
            let (k, _) = kv?;
            let id = id_of(&k[1..])?;
            if id.to_hex().starts_with(&lower) {
                if found.is_some() {
                    return Err(StoreError::AmbiguousPrefix(spec.to_string()));
                }
                found = Some(id);
            }
        }
        found.ok_or_else(|| StoreError::UnknownVersion(spec.to_string()))
    }

    /// A handle to a version: immutable, cheap to clone, usable from many threads.
    pub fn version(&self, id: &VersionId) -> Result<Version, StoreError> {
        let v = self
            .inner
            .db
            .get(refs::version_key(id))?
            .ok_or_else(|| StoreError::UnknownVersion(id.to_string()))?;
        let meta: VersionMeta =
            serde_json::from_slice(&v).map_err(|e| StoreError::IndexInconsistent(e.to_string()))?;
        Version::new(self.inner.clone(), *id, meta)
    }

    /// Info about one version.
    pub fn version_info(&self, id: &VersionId) -> Result<VersionInfo, StoreError> {
        let v = self
            .inner
            .db
            .get(refs::version_key(id))?
            .ok_or_else(|| StoreError::UnknownVersion(id.to_string()))?;
        info_of(*id, &v)
    }

    /// The block size of an image, if it exists.
    pub fn image_block_size(&self, image: &ImageName) -> Result<Option<u32>, StoreError> {
        Ok(self.image_meta(image)?.map(|m| m.block_size))
    }

    fn image_meta(&self, image: &ImageName) -> Result<Option<ImageMeta>, StoreError> {
        match self.inner.db.get(refs::image_key(image.as_str()))? {
            None => Ok(None),
            Some(v) => {
                Ok(Some(serde_json::from_slice(&v).map_err(|e| {
                    StoreError::IndexInconsistent(e.to_string())
                })?))
            }
        }
    }

    /// Reads the block named `hash` into `buf` (its full length) and checks it against the
    /// hash: `Corrupt` if it does not match, `MissingObject` if the store lacks it.
    /// A lazy version's absent block is fetched from its remote first.
    pub fn read_block(&self, hash: &BlockHash, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_block_fetching(&hash.0, buf)
    }

    /// Copies part of the block `hash` (`out.len()` bytes at `offset` within it) after checking
    /// the whole block against its hash; recently read blocks are kept verified in memory, so
    /// a run of small reads of one block reads and hashes it once.
    pub fn read_block_part(
        &self,
        hash: &BlockHash,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let len =
            self.inner
                .block_len_fetching(&hash.0)?
                .ok_or_else(|| StoreError::MissingObject {
                    what: ObjKind::Block.name(),
                    hash: hash.to_hex(),
                })?;
        self.inner
            .read_block_part(&hash.0, len as usize, offset, out)
    }

    /// Stores a block (deduplicated); `None` for an all-zero block, which is a hole. Durable
    /// once a version using it is committed, or after [`Store::sync`].
    pub fn put_block(&self, data: &[u8]) -> Result<Option<BlockHash>, StoreError> {
        if is_zero(data) {
            return Ok(None);
        }
        let hash = *blake3::hash(data).as_bytes();
        self.inner.put_object(ObjKind::Block, &hash, data)?;
        Ok(Some(BlockHash(hash)))
    }

    /// True when the store holds the block.
    pub fn has_block(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        Ok(self.inner.locate(ObjKind::Block, &hash.0)?.is_some())
    }

    /// Points `image:tag` at `id` (moving the tag if it exists); durable on return.
    pub fn set_tag(&self, image: &ImageName, tag: &Tag, id: &VersionId) -> Result<(), StoreError> {
        let info = self.version_info(id)?;
        if info.image != *image {
            return Err(StoreError::Refused(format!(
                "version {} belongs to image {}, not {}",
                id.short(),
                info.image,
                image
            )));
        }
        self.inner.commit(&[RefRecord::Tag {
            image: image.to_string(),
            tag: tag.to_string(),
            id: id.to_string(),
        }])
    }

    /// Removes a tag; the version stays until `gc` finds nothing refers to it.
    pub fn remove_tag(&self, image: &ImageName, tag: &Tag) -> Result<VersionId, StoreError> {
        let spec = format!("{image}:{tag}");
        let id = self.resolve(&spec)?;
        self.inner.commit(&[RefRecord::Untag {
            image: image.to_string(),
            tag: tag.to_string(),
        }])?;
        Ok(id)
    }

    /// Makes every object written so far durable (one fsync of the current pack) and indexed.
    /// The index itself is not flushed: after a crash `open` re-indexes the pack's tail.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut w = self.inner.lock_writer();
        self.inner.sync_objects(&mut w)
    }
}

fn id_of(v: &[u8]) -> Result<VersionId, StoreError> {
    let a: [u8; 32] = v
        .try_into()
        .map_err(|_| StoreError::IndexInconsistent("bad version id".to_string()))?;
    Ok(VersionId(a))
}

fn info_of(id: VersionId, v: &[u8]) -> Result<VersionInfo, StoreError> {
    let meta: VersionMeta =
        serde_json::from_slice(v).map_err(|e| StoreError::IndexInconsistent(e.to_string()))?;
    Ok(VersionInfo {
        id,
        image: ImageName::new(&meta.image)?,
        size: meta.size,
        block_size: meta.block_size,
        created: meta.created,
    })
}

/// True when every byte is zero (folds 4 KiB at a time so it vectorizes).
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
