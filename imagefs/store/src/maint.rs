//! Maintenance: pins (references from instances and rollouts), garbage collection and fsck.
//! Invariant: gc deletes a pack only after every live object in it has a durable copy that the
//! flushed index points at, and drops a version only when no tag or pin refers to it.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::StoreError;
use crate::flat;
use crate::ids::{BlockHash, ImageName, VersionId};
use crate::log::RecordLog;
use crate::objindex::Key;
use crate::pack::{self, Loc, ObjKind};
use crate::refs::{RefRecord, REF_KIND};
use crate::store::Store;
use crate::tree;

/// What gc did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Versions no tag or pin referred to, now gone.
    pub versions_removed: Vec<VersionId>,
    /// Blocks and nodes freed.
    pub objects_freed: u64,
    /// Pack bytes freed.
    pub bytes_freed: u64,
    /// Pack files rewritten without their dead objects.
    pub packs_rewritten: u64,
}

/// One integrity problem found by fsck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Image and version concerned (empty when it is about the store itself).
    pub image: String,
    pub version: Option<VersionId>,
    /// Block index and byte offset in the image, for a block problem.
    pub block: Option<u64>,
    pub offset: Option<u64>,
    /// What is wrong, one line.
    pub detail: String,
}

/// What fsck checked and found.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    pub versions: u64,
    pub nodes: u64,
    pub blocks: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
    /// Flat copies (STORE/flat) checked, and the bytes read from those that matched.
    pub flat_copies: u64,
    pub flat_bytes_checked: u64,
    /// Bad flat copies [`Store::fsck_repair`] deleted; not in `problems`, since a flat copy
    /// is only a cache that the next bulk read or `imagefs prefetch` rebuilds.
    pub flat_removed: Vec<Problem>,
    /// Bytes of instance data slots checked against their checksums.
    pub instance_bytes_checked: u64,
    /// Blocks of lazy versions that are only in their remote (not missing: a read fetches
    /// them), counted once each.
    pub remote_blocks: u64,
}

/// Per pack: live objects to keep, dead keys to drop, bytes the index accounts for.
type PackUse = (Vec<(Key, Loc)>, Vec<Key>, u64);

fn key(kind: ObjKind, h: &[u8; 32]) -> Key {
    let mut k = [0u8; 33];
    k[0] = kind.key_prefix();
    k[1..].copy_from_slice(h);
    k
}

/// Something outside the refs log that still uses versions or blocks: live instances with
/// writes not yet in their log, running rollouts. Register with [`Store::add_gc_roots`].
pub trait GcRoots: Send + Sync {
    /// Versions and blocks gc must keep.
    fn gc_roots(&self, store: &Store) -> Result<(Vec<VersionId>, Vec<BlockHash>), StoreError>;
}

/// Live instances keep their current base and every overlay block, flushed or not. Register
/// the daemon's registry: `store.add_gc_roots(Arc::downgrade(&instances) as Weak<dyn GcRoots>)`.
impl GcRoots for crate::instance::Instances {
    fn gc_roots(&self, store: &Store) -> Result<(Vec<VersionId>, Vec<BlockHash>), StoreError> {
        let mut versions = Vec::new();
        let mut blocks = Vec::new();
        let ids = self
            .list()
            .map_err(|e| StoreError::IndexInconsistent(format!("instances: {e}")))?;
        for id in ids {
            let Ok(inst) = self.get(store, &id) else {
                // unreadable instance: its log roots were already taken from disk
                continue;
            };
            let view = inst.view();
            versions.push(view.base().id());
            blocks.extend(view.pack_blocks());
        }
        Ok((versions, blocks))
    }
}

/// Versions and blocks the instance logs under `dir/instances` refer to. Read-only and
/// conservative: every base an instance ever had and every block it ever wrote is kept.
fn instance_log_roots(
    dir: &std::path::Path,
) -> Result<(Vec<VersionId>, Vec<BlockHash>), StoreError> {
    use crate::instance_log::{Record, RecordLog as InstanceLog};
    let mut versions = Vec::new();
    let mut blocks = Vec::new();
    let idir = dir.join("instances");
    let entries = match std::fs::read_dir(&idir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((versions, blocks)),
        Err(e) => return Err(StoreError::io("read dir", &idir)(e)),
    };
    let bad = |path: &std::path::Path, why: String| {
        StoreError::IndexInconsistent(format!(
            "instance log {}: {why}; gc stopped so nothing it uses is freed",
            path.display()
        ))
    };
    for entry in entries {
        let path = entry.map_err(StoreError::io("read dir", &idir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        let records = InstanceLog::read(&path).map_err(|e| bad(&path, e.to_string()))?;
        let id = |s: &str| {
            s.parse::<VersionId>()
                .map_err(|e| bad(&path, e.to_string()))
        };
        for r in records {
            match r {
                Record::Created { base, .. } => versions.push(id(&base)?),
                Record::Rebased { from, to, .. } => {
                    versions.push(id(&from)?);
                    versions.push(id(&to)?);
                }
                Record::Committed { version, .. } => versions.push(id(&version)?),
                Record::Limits { .. } => {}
                Record::Writes { changes } => {
                    for c in changes {
                        if let Some(h) = c.hash {
                            blocks.push(BlockHash(id(&h)?.0));
                        }
                    }
                }
                Record::Overlay { ops } => {
                    blocks.extend(ops.into_iter().filter_map(|op| match op {
                        crate::overlay::Op::Whole { hash, .. } => hash,
                        crate::overlay::Op::Sub { .. } => None,
                    }));
                }
            }
        }
    }
    Ok((versions, blocks))
}

impl Store {
    /// Registers extra gc roots (held weakly: dropping the provider unregisters it).
    pub fn add_gc_roots(&self, roots: std::sync::Weak<dyn GcRoots>) {
        self.inner
            .gc_roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(roots);
    }

    /// Every root outside tags and pins: instance logs on disk and registered providers.
    fn extra_roots(&self) -> Result<(Vec<VersionId>, Vec<BlockHash>), StoreError> {
        let (mut versions, mut blocks) = instance_log_roots(&self.inner.dir)?;
        let providers: Vec<_> = {
            let mut list = self
                .inner
                .gc_roots
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(|w| w.upgrade()).collect()
        };
        for p in providers {
            let (v, b) = p.gc_roots(self)?;
            versions.extend(v);
            blocks.extend(b);
        }
        Ok((versions, blocks))
    }

    /// Keeps version `id` (and its blocks) from gc under `owner`/`key` (e.g. an instance id).
    pub fn pin(&self, owner: &str, key: &str, id: &VersionId) -> Result<(), StoreError> {
        ImageName::new(owner)?;
        ImageName::new(key)?;
        self.version_info(id)?;
        self.inner.commit(&[RefRecord::Pin {
            owner: owner.to_string(),
            key: key.to_string(),
            id: id.to_string(),
        }])
    }

    /// Removes a pin (no-op if absent).
    pub fn unpin(&self, owner: &str, key: &str) -> Result<(), StoreError> {
        ImageName::new(owner)?;
        ImageName::new(key)?;
        self.inner.commit(&[RefRecord::Unpin {
            owner: owner.to_string(),
            key: key.to_string(),
        }])
    }

    /// Every pin: (owner, key, version).
    pub fn pins(&self) -> Result<Vec<(String, String, VersionId)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.db.scan_prefix(b"p") {
            let (k, v) = kv?;
            let text = String::from_utf8_lossy(&k[1..]).to_string();
            let (owner, key) = text.split_once('\0').unwrap_or((&text, ""));
            let id: [u8; 32] = v[..]
                .try_into()
                .map_err(|_| StoreError::IndexInconsistent("bad pin".to_string()))?;
            out.push((owner.to_string(), key.to_string(), VersionId(id)));
        }
        Ok(out)
    }

    fn live_versions(&self) -> Result<HashSet<VersionId>, StoreError> {
        let mut live: HashSet<VersionId> = self.pins()?.into_iter().map(|p| p.2).collect();
        for img in self.images()? {
            live.extend(img.tags.into_iter().map(|t| t.1));
        }
        Ok(live)
    }

    /// Removes versions nothing refers to, then rewrites the packs holding objects no
    /// remaining version uses. Safe to kill at any point; re-running finishes the job.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let inner = &self.inner;
        let mut w = inner.lock_writer();
        inner.sync_objects(&mut w)?;
        w.pack = None;
        let mut report = GcReport::default();
        let (extra_versions, extra_blocks) = self.extra_roots()?;
        let mut live = self.live_versions()?;
        // a root naming a version this store lacks keeps nothing (and must not stop gc)
        live.extend(extra_versions);
        let mut drops = Vec::new();
        for v in self.versions()? {
            if !live.contains(&v.id) {
                report.versions_removed.push(v.id);
                drops.push(RefRecord::Drop {
                    id: v.id.to_string(),
                });
            }
        }
        if !drops.is_empty() {
            inner.commit_locked(&mut w, &drops)?;
            crate::fault::point("gc.dropped");
        }
        for id in &report.versions_removed {
            inner.lazy_forget(id);
            // with no mount to prune it, fsck would report the copy of a dropped version; a
            // mount's cache (which prunes after gc) keeps reading a file unlinked under it
            if let Err(e) = flat::remove_copy(&inner.dir, id) {
                tracing::warn!(id = %id.short(), "removing the flat copy of a dropped version: {e}");
            }
        }
        let mut live_objs: HashSet<Key> = extra_blocks
            .iter()
            .map(|h| key(ObjKind::Block, &h.0))
            .collect();
        for id in &live {
            let Ok(v) = self.version(id) else { continue };
            let mut blocks: Vec<Key> = Vec::new();
            tree::walk(
                inner,
                v.block_count(),
                v.root(),
                &mut |h| {
                    live_objs.insert(key(ObjKind::Node, h));
                },
                &mut |_, h| blocks.push(key(ObjKind::Block, h)),
                &mut |_, e| Err(e),
            )?;
            live_objs.extend(blocks);
        }
        // per pack: live objects to keep, dead keys to drop, bytes the index accounts for
        let mut packs: HashMap<u32, PackUse> = HashMap::new();
        for (k, loc) in inner.objects()?.entries() {
            let e = packs.entry(loc.pack).or_default();
            e.2 += pack::HEADER + u64::from(loc.len);
            if live_objs.contains(&k) {
                e.0.push((k, loc));
            } else {
                e.1.push(k);
            }
        }
        let packs_dir = inner.dir.join("packs");
        let mut doomed = Vec::new();
        let mut dead_keys = Vec::new();
        let existing = pack::list_packs(&packs_dir)?;
        for &id in &existing {
            let path = pack::pack_path(&packs_dir, id);
            let flen = std::fs::metadata(&path)
                .map_err(StoreError::io("stat", &path))?
                .len();
            let (keep, dead, accounted) = packs.remove(&id).unwrap_or_default();
            if dead.is_empty() && accounted >= flen {
                continue;
            }
            let mut buf = Vec::new();
            let mut kept = 0u64;
            for (k, loc) in &keep {
                let kind = if k[0] == b'n' {
                    ObjKind::Node
                } else {
                    ObjKind::Block
                };
                let mut h = [0u8; 32];
                h.copy_from_slice(&k[1..]);
                buf.resize(loc.len as usize, 0);
                inner.read_object(kind, &h, &mut buf)?;
                inner.append_locked(&mut w, kind, &h, &buf)?;
                kept += pack::HEADER + u64::from(loc.len);
            }
            report.objects_freed += dead.len() as u64;
            report.bytes_freed += flen.saturating_sub(kept);
            report.packs_rewritten += 1;
            dead_keys.extend(dead);
            doomed.push(id);
        }
        if doomed.is_empty() {
            return Ok(report);
        }
        // the copies are durable, then the index forgets the old packs, then they go
        inner.sync_objects(&mut w)?;
        crate::fault::point("gc.copied");
        for k in &dead_keys {
            inner.objects()?.remove(k);
        }
        let mut marks: HashMap<u32, u64> = HashMap::new();
        for id in existing.iter().filter(|id| !doomed.contains(id)) {
            if let Some(m) = inner.objects()?.mark(*id) {
                marks.insert(*id, m);
            }
        }
        if let Some(p) = w.pack.as_ref() {
            marks.insert(p.id, p.len);
        }
        inner.objects()?.rewrite(&marks)?;
        crate::fault::point("gc.index_rewritten");
        for id in doomed {
            inner.readers.forget(id);
            let path = pack::pack_path(&packs_dir, id);
            std::fs::remove_file(&path).map_err(StoreError::io("remove", &path))?;
            crate::fault::point("gc.deleting");
        }
        pack::fsync_dir(&packs_dir)?;
        Ok(report)
    }

    /// Checks every version: each node and block read back and verified against its hash,
    /// the index against the refs log, and every flat copy against its version (see
    /// [`Store::fsck_repair`]). Reports every problem found instead of stopping; changes
    /// nothing, so it may run beside a mount.
    pub fn fsck(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<FsckReport, StoreError> {
        let mut report = self.fsck_versions(progress)?;
        self.fsck_flat(false, &mut report)?;
        self.fsck_instances(&mut report)?;
        Ok(report)
    }

    /// `fsck`, and deletes the flat copies that do not match their versions (reported in
    /// `flat_removed` instead of `problems`). Only with the store to itself (`fsck --repair`,
    /// after `open_rebuilding_index`): a mount's `FlatCache` would keep serving the
    /// unlinked files.
    pub fn fsck_repair(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FsckReport, StoreError> {
        let mut report = self.fsck_versions(progress)?;
        self.fsck_flat(true, &mut report)?;
        self.fsck_instances(&mut report)?;
        Ok(report)
    }

    /// Checks every instance's log and the data slots it names (a bad slot is reported, never
    /// repaired: it holds a guest's only copy of what it wrote).
    fn fsck_instances(&self, report: &mut FsckReport) -> Result<(), StoreError> {
        let (problems, bytes) = crate::instance::check_instances(self)?;
        report.instance_bytes_checked += bytes;
        for p in problems {
            report.problems.push(Problem {
                image: String::new(),
                version: None,
                block: None,
                offset: p.offset,
                detail: format!("instance {}: {}", p.instance, p.detail),
            });
        }
        Ok(())
    }

    /// Checks the flat copies; with `repair`, deletes the bad ones.
    fn fsck_flat(&self, repair: bool, report: &mut FsckReport) -> Result<(), StoreError> {
        let checked = flat::check_copies(self)?;
        report.flat_copies += checked.copies;
        report.flat_bytes_checked += checked.bytes;
        for bad in checked.bad {
            let mut p = Problem {
                image: bad.image.unwrap_or_default(),
                version: Some(bad.id),
                block: bad.block.map(|b| b.0),
                offset: bad.block.map(|(b, bs)| b.saturating_mul(bs)),
                detail: bad.detail,
            };
            if !repair {
                report.problems.push(p);
                continue;
            }
            match flat::remove_copy(&self.inner.dir, &bad.id) {
                Ok(()) => {
                    p.detail
                        .push_str("; deleted (rebuilt on the next bulk read or prefetch)");
                    report.flat_removed.push(p);
                }
                Err(e) => {
                    p.detail.push_str(&format!("; deleting it failed: {e}"));
                    report.problems.push(p);
                }
            }
        }
        Ok(())
    }

    /// The version, block and index part of fsck.
    fn fsck_versions(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<FsckReport, StoreError> {
        let inner = &self.inner;
        let mut report = FsckReport::default();
        self.check_index(&mut report)?;
        let versions = self.versions()?;
        let total = versions.len() as u64;
        let mut seen: HashMap<[u8; 32], Option<String>> = HashMap::new();
        for (i, info) in versions.iter().enumerate() {
            report.versions += 1;
            let v = match self.version(&info.id) {
                Ok(v) => v,
                Err(e) => {
                    report.problems.push(Problem {
                        image: info.image.to_string(),
                        version: Some(info.id),
                        block: None,
                        offset: None,
                        detail: e.to_string(),
                    });
                    continue;
                }
            };
            let bs = v.block_size() as usize;
            let mut blocks = Vec::new();
            let mut bad_nodes = Vec::new();
            let mut nodes = 0u64;
            tree::walk(
                inner,
                v.block_count(),
                v.root(),
                &mut |_| nodes += 1,
                &mut |idx, h| blocks.push((idx, *h)),
                &mut |first, e| {
                    bad_nodes.push((first, e.to_string()));
                    Ok(())
                },
            )?;
            report.nodes += nodes;
            for (first, detail) in bad_nodes {
                report.problems.push(Problem {
                    image: info.image.to_string(),
                    version: Some(info.id),
                    block: Some(first),
                    offset: Some(first * bs as u64),
                    detail: format!("block map from block {first} unreadable: {detail}"),
                });
            }
            let mut buf = vec![0u8; bs];
            for (idx, h) in blocks {
                report.blocks += 1;
                let status = seen.entry(h).or_insert_with(|| {
                    match inner.read_object(ObjKind::Block, &h, &mut buf) {
                        Ok(()) => {
                            report.bytes_checked += bs as u64;
                            None
                        }
                        // a lazy version's block the remote holds: "remote", not missing
                        Err(StoreError::MissingObject { .. })
                            if inner.lazy.active() && {
                                let b = BlockHash(h);
                                self.is_remote_block(&b).unwrap_or(false)
                            } =>
                        {
                            report.remote_blocks += 1;
                            None
                        }
                        Err(e) => {
                            report.bytes_checked += bs as u64;
                            Some(e.to_string())
                        }
                    }
                });
                if let Some(detail) = status {
                    report.problems.push(Problem {
                        image: info.image.to_string(),
                        version: Some(info.id),
                        block: Some(idx),
                        offset: Some(idx * bs as u64),
                        detail: detail.clone(),
                    });
                }
            }
            progress(i as u64 + 1, total);
        }
        Ok(report)
    }

    /// Compares the index's names with a replay of the refs log.
    fn check_index(&self, report: &mut FsckReport) -> Result<(), StoreError> {
        let path = self.inner.dir.join("refs.log");
        let problem = |detail: String| Problem {
            image: String::new(),
            version: None,
            block: None,
            offset: None,
            detail,
        };
        let records = match RecordLog::read(&path) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(problem(e.to_string()));
                return Ok(());
            }
        };
        let mut want: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for rec in records.iter().filter(|r| r.kind == REF_KIND) {
            let ops = match RefRecord::decode(&rec.payload).and_then(|r| r.ops()) {
                Ok(ops) => ops,
                Err(e) => {
                    report
                        .problems
                        .push(problem(format!("refs.log record at {}: {e}", rec.offset)));
                    continue;
                }
            };
            for (k, v) in ops {
                match v {
                    Some(v) => want.insert(k, v),
                    None => want.remove(&k),
                };
            }
        }
        let mut have: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for prefix in [b"i", b"t", b"v", b"p"] {
            for kv in self.inner.db.scan_prefix(prefix) {
                let (k, v) = kv?;
                have.insert(k.to_vec(), v.to_vec());
            }
        }
        if want != have {
            let missing = want.keys().filter(|k| !have.contains_key(*k)).count();
            let extra = have.keys().filter(|k| !want.contains_key(*k)).count();
            report.problems.push(problem(format!(
                "index disagrees with refs.log ({missing} entries missing, {extra} extra); \
                 run `imagefs fsck --repair`"
            )));
        }
        Ok(())
    }
}
