//! pull (full): fetches the version a remote tag names, taking only the blocks this store
//! lacks, in ranged reads that coalesce adjacent wanted blocks of a pack. Every map is checked
//! against its version id and every block against its blake3 before it is stored; the version
//! and its tag are committed only when every block is here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use super::lazy::Counters;
use super::{
    check_format, decode_map, integrity, load_idx, map_key, pack_key, parallel_each, tag_key,
    PackLoc, Remote, RemoteError, SyncError, TagObject, DEFAULT_JOBS, MAX_RANGE,
};
use crate::error::StoreError;
use crate::ids::{BlockHash, ImageName, Tag, VersionId};
use crate::tree::Builder;
use crate::Store;

/// How a pull runs.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Requests in flight at most.
    pub jobs: usize,
    /// A directory for copies of the remote's pack indexes.
    pub cache: Option<PathBuf>,
    /// The remote's name here, under which fetches are counted (`remote stats`).
    pub remote_name: String,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            jobs: DEFAULT_JOBS,
            cache: None,
            remote_name: String::new(),
        }
    }
}

/// Progress of a pull: one `Planned`, then one `Fetched` per ranged read.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// What the pull will fetch.
    Planned {
        id: VersionId,
        /// Distinct non-hole blocks of the version.
        blocks: u64,
        /// Of those, blocks this store lacks.
        wanted_blocks: u64,
        wanted_bytes: u64,
        /// Ranged reads planned.
        requests: u64,
    },
    /// One ranged read arrived, verified and stored.
    Fetched { blocks: u64, bytes: u64 },
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub id: VersionId,
    pub image: ImageName,
    pub size: u64,
    /// Distinct non-hole blocks of the version.
    pub blocks: u64,
    /// Blocks fetched from the remote.
    pub blocks_fetched: u64,
    /// Bytes of blocks fetched (range reads; maps and indexes are in `meta_bytes`).
    pub bytes_fetched: u64,
    /// Bytes of metadata fetched: tag, map, pack indexes.
    pub meta_bytes: u64,
    /// Ranged reads of packs made.
    pub requests: u64,
    /// The store held the version already.
    pub already_local: bool,
    /// Milliseconds spent per step (`pull --lazy`: map, plan, indexes, record, commit).
    pub times_ms: Vec<(&'static str, f64)>,
}

/// One ranged read: pack, byte range, and the blocks in it (hash, offset within the range).
struct Fetch {
    pack: String,
    start: u64,
    end: u64,
    blocks: Vec<(BlockHash, u64)>,
}

impl Store {
    /// The version id of the block map `hashes` of `image` (`size` bytes, blocks of `bs`),
    /// computed without writing anything: how a map from elsewhere is checked against its name.
    pub fn block_map_id(
        &self,
        image: &ImageName,
        size: u64,
        bs: u32,
        hashes: &[Option<BlockHash>],
    ) -> Result<VersionId, StoreError> {
        let root = self.build_map(size, bs, hashes, true)?;
        Ok(crate::refs::version_id(image, size, bs, &root))
    }

    /// Commits the version whose block map is `hashes` (every block must be in the store).
    pub fn commit_block_map(
        &self,
        image: &ImageName,
        size: u64,
        bs: u32,
        hashes: &[Option<BlockHash>],
    ) -> Result<VersionId, StoreError> {
        if let Some(existing) = self.image_block_size(image)? {
            if existing != bs {
                return Err(StoreError::BlockSizeMismatch {
                    image: image.to_string(),
                    existing,
                    requested: bs,
                });
            }
        }
        for h in hashes.iter().flatten() {
            if !self.has_block(h)? {
                return Err(StoreError::MissingObject {
                    what: "block",
                    hash: h.to_hex(),
                });
            }
        }
        let root = self.build_map(size, bs, hashes, false)?;
        self.inner.commit_version(image, size, bs, &root)
    }

    pub(crate) fn build_map(
        &self,
        size: u64,
        bs: u32,
        hashes: &[Option<BlockHash>],
        dry: bool,
    ) -> Result<[u8; 32], StoreError> {
        let n = size.div_ceil(u64::from(bs));
        if hashes.len() as u64 != n {
            return Err(StoreError::BlockOutOfRange {
                index: hashes.len() as u64,
                count: n,
            });
        }
        let mut b = Builder::new(&self.inner, n, dry);
        for h in hashes {
            b.push(h.map(|h| h.0))?;
        }
        b.finish()
    }

    /// The version `image:tag` names in `remote` (or `pinned`) and its block map, checked
    /// against the version id; also the bytes of metadata fetched.
    pub(crate) fn fetch_map(
        &self,
        remote: &dyn Remote,
        image: &ImageName,
        tag: &Tag,
        pinned: Option<VersionId>,
    ) -> Result<(VersionId, super::RemoteMap, u64), SyncError> {
        let name = format!("{image}:{tag}");
        if !check_format(remote)? {
            return Err(SyncError::NotInRemote(name));
        }
        let mut meta_bytes = 0u64;
        let id = match pinned {
            Some(id) => id,
            None => {
                let key = tag_key(image, tag);
                let bytes = match remote.get(&key) {
                    Ok(b) => b,
                    Err(RemoteError::NotFound { .. }) => return Err(SyncError::NotInRemote(name)),
                    Err(e) => return Err(e.into()),
                };
                meta_bytes += bytes.len() as u64;
                let t: TagObject = serde_json::from_slice(&bytes)
                    .map_err(|e| integrity("tag", &key, format!("malformed: {e}")))?;
                if t.image != image.as_str() || t.tag != tag.as_str() {
                    return Err(integrity("tag", &key, "names another image or tag"));
                }
                t.version
                    .parse::<VersionId>()
                    .map_err(|e| integrity("tag", &key, e.to_string()))?
            }
        };
        let key = map_key(&id);
        let bytes = match remote.get(&key) {
            Ok(b) => b,
            Err(RemoteError::NotFound { .. }) if pinned.is_some() => {
                return Err(SyncError::NotInRemote(format!("{name}@{}", id.to_hex())))
            }
            Err(RemoteError::NotFound { .. }) => {
                return Err(integrity("block map", &key, "missing, but a tag names it"))
            }
            Err(e) => return Err(e.into()),
        };
        meta_bytes += bytes.len() as u64;
        let map = decode_map(self, &id, &key, &bytes)?;
        if map.header.image != image.as_str() {
            return Err(SyncError::Refused(format!(
                "version {} belongs to image {}, not {image}",
                id.short(),
                map.header.image
            )));
        }
        let bs = map.header.block_size;
        if let Some(existing) = self.image_block_size(image)? {
            if existing != bs {
                return Err(StoreError::BlockSizeMismatch {
                    image: image.to_string(),
                    existing,
                    requested: bs,
                }
                .into());
            }
        }
        Ok((id, map, meta_bytes))
    }

    /// Pulls `image:tag` from `remote` (or, with `pinned`, that version id, tagged `image:tag`
    /// here) and tags it locally. Fetches only blocks this store lacks.
    /// What a pull of version `id` (its verified `map`) starts from: the distinct blocks this
    /// store lacks, and the report with nothing fetched yet. Shared by the full and lazy pulls.
    pub(crate) fn pull_start(
        &self,
        id: VersionId,
        image: &ImageName,
        map: &super::RemoteMap,
        meta_bytes: u64,
    ) -> Result<(HashSet<BlockHash>, PullReport), SyncError> {
        let mut distinct = HashSet::new();
        let mut wanted = HashSet::new();
        for h in map.hashes.iter().flatten() {
            if distinct.insert(*h) && !self.has_block(h)? {
                wanted.insert(*h);
            }
        }
        let report = PullReport {
            id,
            image: image.clone(),
            size: map.header.size,
            blocks: distinct.len() as u64,
            blocks_fetched: 0,
            bytes_fetched: 0,
            meta_bytes,
            requests: 0,
            // a lazy version is not local until its blocks are
            already_local: self.version(&id).is_ok() && !self.is_lazy(&id)?,
            times_ms: Vec::new(),
        };
        Ok((wanted, report))
    }

    pub fn pull(
        &self,
        remote: &dyn Remote,
        image: &ImageName,
        tag: &Tag,
        pinned: Option<VersionId>,
        opts: &PullOptions,
        on_event: &mut dyn FnMut(&PullEvent),
    ) -> Result<PullReport, SyncError> {
        let (id, map, meta_bytes) = self.fetch_map(remote, image, tag, pinned)?;
        // before looking at what is local: a pull of the same version still running lands first
        let one = self.pull_lock(&id);
        let _pulling = one.lock().unwrap_or_else(|p| p.into_inner());
        let key = map_key(&id);
        let bs = map.header.block_size;
        let (wanted, mut report) = self.pull_start(id, image, &map, meta_bytes)?;
        let already_local = report.already_local;
        if !already_local {
            let fetches = self.plan_fetches(remote, opts, &map.header.packs, &wanted, bs)?;
            report.meta_bytes += fetches.1;
            let fetches = fetches.0;
            on_event(&PullEvent::Planned {
                id,
                blocks: report.blocks,
                wanted_blocks: wanted.len() as u64,
                wanted_bytes: wanted.len() as u64 * u64::from(bs),
                requests: fetches.len() as u64,
            });
            let fetched = self.fetch_all(remote, &fetches, bs, opts.jobs.max(1), on_event);
            let (blocks, bytes) = match fetched {
                Ok(v) => v,
                Err(e) => {
                    if matches!(e, SyncError::Integrity { .. }) {
                        let c = Counters {
                            integrity_errors: 1,
                            ..Counters::default()
                        };
                        self.count_fetch(&opts.remote_name, Some(&id), c);
                    }
                    return Err(e);
                }
            };
            self.count_fetch(
                &opts.remote_name,
                Some(&id),
                Counters {
                    requests: fetches.len() as u64,
                    bytes_fetched: bytes,
                    blocks_fetched: blocks,
                    ..Counters::default()
                },
            );
            report.blocks_fetched = blocks;
            report.bytes_fetched = bytes;
            report.requests = fetches.len() as u64;
            self.sync()?;
            let got = self.commit_block_map(image, map.header.size, bs, &map.hashes)?;
            if got != id {
                return Err(integrity(
                    "block map",
                    &key,
                    "does not make the version it names",
                ));
            }
            // every block is here now: no longer lazy
            self.is_lazy(&id)?;
        }
        self.set_tag(image, tag, &id)?;
        Ok(report)
    }

    /// Where each wanted block is (from the indexes of the packs the map names), as ranged
    /// reads: per pack, by offset, adjacent blocks merged up to [`MAX_RANGE`]. Also returns the
    /// bytes of indexes fetched.
    fn plan_fetches(
        &self,
        remote: &dyn Remote,
        opts: &PullOptions,
        packs: &[String],
        wanted: &HashSet<BlockHash>,
        bs: u32,
    ) -> Result<(Vec<Fetch>, u64), SyncError> {
        if let Some(c) = &opts.cache {
            let _ = std::fs::create_dir_all(c);
        }
        let mut at: HashMap<BlockHash, (String, PackLoc)> = HashMap::new();
        let mut idx_bytes = 0u64;
        for p in packs {
            if wanted.len() == at.len() {
                break;
            }
            // pack names are hex hashes: anything else is not a key we should build
            if p.len() != 64 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(integrity("block map", p, "names a malformed pack"));
            }
            let cached = opts
                .cache
                .as_ref()
                .is_some_and(|c| c.join(format!("{p}.idx")).exists());
            let entries = match load_idx(remote, opts.cache.as_deref(), p) {
                Ok(e) => e,
                Err(SyncError::Remote(RemoteError::NotFound { key })) => {
                    return Err(integrity("pack index", &key, "missing, but a map names it"))
                }
                Err(e) => return Err(e),
            };
            if !cached {
                idx_bytes += 8 + entries.len() as u64 * 44;
            }
            for (h, loc) in entries {
                if wanted.contains(&h) {
                    at.entry(h).or_insert_with(|| (p.clone(), loc));
                }
            }
        }
        let mut by_pack: BTreeMap<String, Vec<(u64, BlockHash)>> = BTreeMap::new();
        for h in wanted {
            let (p, loc) = at
                .get(h)
                .ok_or_else(|| integrity("block", &h.to_hex(), "in no pack its map names"))?;
            if loc.len != bs {
                return Err(integrity(
                    "pack index",
                    p,
                    "gives a block of the wrong length",
                ));
            }
            by_pack.entry(p.clone()).or_default().push((loc.offset, *h));
        }
        let mut out: Vec<Fetch> = Vec::new();
        for (p, mut blocks) in by_pack {
            blocks.sort();
            for (off, h) in blocks {
                let end = off
                    .checked_add(u64::from(bs))
                    .ok_or_else(|| integrity("pack index", &p, "offset out of range"))?;
                match out.last_mut() {
                    Some(f) if f.pack == p && f.end == off && end - f.start <= MAX_RANGE => {
                        f.blocks.push((h, off - f.start));
                        f.end = end;
                    }
                    _ => out.push(Fetch {
                        pack: p.clone(),
                        start: off,
                        end,
                        blocks: vec![(h, 0)],
                    }),
                }
            }
        }
        Ok((out, idx_bytes))
    }

    /// Runs the ranged reads on `jobs` threads; each block is checked against its hash before
    /// it is stored, and the first failure stops the rest. Returns (blocks, bytes) fetched.
    fn fetch_all(
        &self,
        remote: &dyn Remote,
        fetches: &[Fetch],
        bs: u32,
        jobs: usize,
        on_event: &mut dyn FnMut(&PullEvent),
    ) -> Result<(u64, u64), SyncError> {
        let (mut blocks, mut bytes) = (0u64, 0u64);
        parallel_each(
            fetches,
            jobs,
            |f| self.fetch_one(remote, f, bs),
            |(b, n)| {
                blocks += b;
                bytes += n;
                on_event(&PullEvent::Fetched {
                    blocks: b,
                    bytes: n,
                });
            },
        )?;
        Ok((blocks, bytes))
    }

    fn fetch_one(&self, remote: &dyn Remote, f: &Fetch, bs: u32) -> Result<(u64, u64), SyncError> {
        let key = pack_key(&f.pack);
        let data = match remote.get_range(&key, f.start..f.end) {
            Ok(d) => d,
            Err(RemoteError::NotFound { .. }) => {
                return Err(integrity("pack", &key, "missing, but a map names it"))
            }
            Err(e) => return Err(e.into()),
        };
        if data.len() as u64 != f.end - f.start {
            return Err(integrity(
                "pack",
                &key,
                format!("range {}..{} returned {} bytes", f.start, f.end, data.len()),
            ));
        }
        // Check the whole range before storing any of it.
        let bsz = bs as usize;
        let mut blocks = Vec::with_capacity(f.blocks.len());
        for (h, off) in &f.blocks {
            let at = *off as usize;
            let block = data
                .get(at..at + bsz)
                .ok_or_else(|| integrity("pack", &key, "range too short"))?;
            if blake3::hash(block).as_bytes() != &h.0 {
                return Err(integrity(
                    "pack",
                    &key,
                    format!(
                        "block {} at offset {} does not match its blake3",
                        h.short(),
                        f.start + off
                    ),
                ));
            }
            blocks.push(block);
        }
        for b in &blocks {
            self.put_block(b)?;
        }
        Ok((blocks.len() as u64, data.len() as u64))
    }
}
