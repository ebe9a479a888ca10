//! push: uploads what a remote lacks of one version, then its map, then (last, the commit
//! point) its tag. Idempotent and resumable: objects are named by content, and the blocks to
//! upload are grouped into packs deterministically (in order of first use in the version,
//! `pack_size / block_size` per pack), so after an interruption the packs left to do are the
//! same packs, and one already complete is found by name and not sent again.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use super::gc::{read_state, settled_state};
use super::{
    check_format, encode_idx, encode_map, idx_key, map_key, pack_key, parallel_each, tag_key,
    GcState, MapHeader, PackLoc, Remote, RemoteIndex, RemoteMap, SyncError, TagObject,
    DEFAULT_JOBS, DEFAULT_PACK_SIZE, FORMAT, FORMAT_KEY,
};
use crate::ids::{BlockHash, Tag, VersionId};
use crate::Store;

/// How a push runs.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Target size of a pack object in bytes.
    pub pack_size: u64,
    /// Uploads in flight at most.
    pub jobs: usize,
    /// A directory for copies of the remote's pack indexes (immutable, so never stale).
    pub cache: Option<PathBuf>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            pack_size: DEFAULT_PACK_SIZE,
            jobs: DEFAULT_JOBS,
            cache: None,
        }
    }
}

/// Progress of a push, in order: one `Planned`, one `Pack` per pack, one `Map`, one `Tag`.
#[derive(Debug, Clone)]
pub enum PushEvent {
    /// What the push will upload.
    Planned {
        /// Blocks of the version that are not holes (distinct hashes).
        blocks: u64,
        /// Of those, blocks the remote lacks.
        new_blocks: u64,
        /// Their bytes.
        new_bytes: u64,
        /// Packs they make.
        packs: u64,
    },
    /// One pack is in the remote (with its index).
    Pack {
        /// The pack's name (blake3 of its bytes).
        pack: String,
        blocks: u64,
        /// Bytes of the pack object.
        bytes: u64,
        /// False when a complete copy was already there (an interrupted push's).
        uploaded: bool,
    },
    /// The version's map is in the remote.
    Map { bytes: u64, uploaded: bool },
    /// The tag now names the version (the commit point).
    Tag { key: String },
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub id: VersionId,
    /// Distinct non-hole blocks of the version.
    pub blocks: u64,
    /// Blocks uploaded (the remote lacked them).
    pub new_blocks: u64,
    /// Packs uploaded by this push.
    pub packs_uploaded: u64,
    /// Packs found complete (from an interrupted push).
    pub packs_present: u64,
    /// Every byte this push sent: packs, pack indexes, map, tag, format marker.
    pub bytes_uploaded: u64,
    /// Of those, bytes of block data.
    pub block_bytes: u64,
    /// Objects written.
    pub objects_uploaded: u64,
}

struct PackDone {
    pack: String,
    entries: Vec<(BlockHash, PackLoc)>,
    bytes: u64,
    uploaded_bytes: u64,
    uploaded: bool,
    objects: u64,
}

impl Store {
    /// Pushes version `id` to `remote` as `IMAGE:tag` (its own image): uploads the blocks the
    /// remote lacks in packs, the map, and last the tag. `on_event` is called on this thread.
    pub fn push(
        &self,
        remote: &dyn Remote,
        id: &VersionId,
        tag: &Tag,
        opts: &PushOptions,
        on_event: &mut dyn FnMut(&PushEvent),
    ) -> Result<PushReport, SyncError> {
        let v = self.version(id)?;
        let mut r = PushReport {
            id: *id,
            blocks: 0,
            new_blocks: 0,
            packs_uploaded: 0,
            packs_present: 0,
            bytes_uploaded: 0,
            block_bytes: 0,
            objects_uploaded: 0,
        };
        if !check_format(remote)? {
            let marker = serde_json::json!({ "format": FORMAT })
                .to_string()
                .into_bytes();
            let len = marker.len() as u64;
            if remote.put_if_absent(FORMAT_KEY, marker)? {
                r.bytes_uploaded += len;
                r.objects_uploaded += 1;
            }
        }
        let n = v.block_count();
        let mut hashes = Vec::with_capacity(n as usize);
        for i in 0..n {
            hashes.push(v.block_hash(i)?);
        }
        if let Some(c) = &opts.cache {
            let _ = std::fs::create_dir_all(c);
        }
        // Each attempt plans against the gc state read before it; a deletion pass that began
        // since (seen before or after the tag write) means a new plan (module doc of gc.rs).
        for _ in 0..PUSH_ATTEMPTS {
            let before = settled_state(remote)?;
            let candidates: HashSet<String> = before
                .as_ref()
                .map(|s| s.candidates.iter().cloned().collect())
                .unwrap_or_default();
            let map =
                self.push_objects(remote, &v, &hashes, &candidates, opts, &mut r, on_event)?;
            if GcState::deletion_since(before.as_ref(), read_state(remote)?.as_ref()) {
                continue;
            }
            let key = tag_key(v.image(), tag);
            let t = TagObject {
                format: 1,
                image: v.image().to_string(),
                tag: tag.to_string(),
                version: id.to_hex(),
                size: v.size(),
                block_size: v.block_size(),
                pushed: crate::store::now_secs(),
            };
            let tag_bytes = serde_json::to_vec(&t).unwrap_or_default();
            r.bytes_uploaded += tag_bytes.len() as u64;
            r.objects_uploaded += 1;
            remote.put(&key, tag_bytes)?;
            if !GcState::deletion_since(before.as_ref(), read_state(remote)?.as_ref()) {
                on_event(&PushEvent::Tag { key });
                return Ok(r);
            }
            // A deletion pass began around the tag write: it may have listed the tags before
            // ours. Once it is over, everything the tag reaches must still be there.
            settled_state(remote)?;
            if all_present(remote, id, &map)? {
                on_event(&PushEvent::Tag { key });
                return Ok(r);
            }
        }
        Err(SyncError::Refused(format!(
            "remote gc deleted objects this push needs on each of {PUSH_ATTEMPTS} attempts; \
             run the push again"
        )))
    }

    /// One attempt's uploads: the blocks the remote lacks (gc candidates counted as lacking)
    /// in packs, then the map. Returns the map's header.
    #[allow(clippy::too_many_arguments)]
    fn push_objects(
        &self,
        remote: &dyn Remote,
        v: &crate::version::Version,
        hashes: &[Option<BlockHash>],
        candidates: &HashSet<String>,
        opts: &PushOptions,
        r: &mut PushReport,
        on_event: &mut dyn FnMut(&PushEvent),
    ) -> Result<MapHeader, SyncError> {
        let ridx = RemoteIndex::load(remote, opts.cache.as_deref(), candidates)?;
        let mut seen = HashSet::new();
        let mut need = Vec::new();
        for h in hashes.iter().flatten() {
            if seen.insert(*h) && !ridx.blocks.contains_key(h) {
                need.push(*h);
            }
        }
        let bs = u64::from(v.block_size());
        let per_pack = (opts.pack_size / bs).max(1) as usize;
        let groups: Vec<&[BlockHash]> = need.chunks(per_pack).collect();
        on_event(&PushEvent::Planned {
            blocks: seen.len() as u64,
            new_blocks: need.len() as u64,
            new_bytes: need.len() as u64 * bs,
            packs: groups.len() as u64,
        });
        r.blocks = seen.len() as u64;
        r.new_blocks += need.len() as u64;
        let done =
            self.upload_packs(remote, &groups, bs, opts.jobs.max(1), candidates, on_event)?;
        let mut located: std::collections::HashMap<BlockHash, String> =
            std::collections::HashMap::new();
        for d in &done {
            r.bytes_uploaded += d.uploaded_bytes;
            r.objects_uploaded += d.objects;
            if d.uploaded {
                r.packs_uploaded += 1;
                r.block_bytes += d.bytes;
            } else {
                r.packs_present += 1;
            }
            for (h, _) in &d.entries {
                located.insert(*h, d.pack.clone());
            }
        }
        let mut packs = BTreeSet::new();
        for h in hashes.iter().flatten() {
            let p = match located.get(h) {
                Some(p) => p.clone(),
                None => ridx.blocks.get(h).map(|(p, _)| p.clone()).ok_or_else(|| {
                    SyncError::Refused(format!("block {} was not uploaded", h.short()))
                })?,
            };
            packs.insert(p);
        }
        let map = RemoteMap {
            header: MapHeader {
                image: v.image().to_string(),
                size: v.size(),
                block_size: v.block_size(),
                packs: packs.into_iter().collect(),
            },
            hashes: hashes.to_vec(),
        };
        let map_bytes = encode_map(&map);
        let map_len = map_bytes.len() as u64;
        let mkey = map_key(&v.id());
        // A map already there is kept only when it is this one: one a gc marked, or one naming
        // packs since deleted (an earlier push's), is rewritten.
        let map_uploaded = if candidates.contains(&mkey) {
            remote.put(&mkey, map_bytes)?;
            true
        } else {
            match remote.get(&mkey) {
                Ok(old) if old == map_bytes => false,
                Ok(_) | Err(super::RemoteError::NotFound { .. }) => {
                    remote.put(&mkey, map_bytes)?;
                    true
                }
                Err(e) => return Err(e.into()),
            }
        };
        if map_uploaded {
            r.bytes_uploaded += map_len;
            r.objects_uploaded += 1;
        }
        on_event(&PushEvent::Map {
            bytes: map_len,
            uploaded: map_uploaded,
        });
        Ok(map.header)
    }

    /// Builds and uploads each group as a pack on `jobs` threads; returns them in any order.
    fn upload_packs(
        &self,
        remote: &dyn Remote,
        groups: &[&[BlockHash]],
        bs: u64,
        jobs: usize,
        candidates: &HashSet<String>,
        on_event: &mut dyn FnMut(&PushEvent),
    ) -> Result<Vec<PackDone>, SyncError> {
        let mut out = Vec::with_capacity(groups.len());
        parallel_each(
            groups,
            jobs,
            |group| self.upload_pack(remote, group, bs, candidates),
            |d| {
                on_event(&PushEvent::Pack {
                    pack: d.pack.clone(),
                    blocks: d.entries.len() as u64,
                    bytes: d.bytes,
                    uploaded: d.uploaded,
                });
                out.push(d);
            },
        )?;
        Ok(out)
    }

    /// One pack: its blocks read (and verified) from the store, the pack uploaded unless a
    /// complete copy is there, then its index (never an index before its pack).
    fn upload_pack(
        &self,
        remote: &dyn Remote,
        group: &[BlockHash],
        bs: u64,
        candidates: &HashSet<String>,
    ) -> Result<PackDone, SyncError> {
        let bsz = bs as usize;
        let mut data = vec![0u8; group.len() * bsz];
        let mut entries = Vec::with_capacity(group.len());
        for (i, (h, buf)) in group.iter().zip(data.chunks_mut(bsz)).enumerate() {
            self.read_block(h, buf)?;
            entries.push((
                *h,
                PackLoc {
                    offset: (i * bsz) as u64,
                    len: bsz as u32,
                },
            ));
        }
        let pack = blake3::hash(&data).to_hex().to_string();
        let bytes = data.len() as u64;
        let (mut uploaded_bytes, mut objects) = (0, 0);
        // a pack a gc marked is rewritten, not taken as there (gc.rs)
        let marked = candidates.contains(&pack_key(&pack));
        let uploaded = match remote.head(&pack_key(&pack))? {
            Some(len) if len == bytes && !marked => false,
            _ => {
                remote.put(&pack_key(&pack), data)?;
                uploaded_bytes += bytes;
                objects += 1;
                true
            }
        };
        let idx = encode_idx(&entries);
        let idx_len = idx.len() as u64;
        let idx_written = if candidates.contains(&idx_key(&pack)) {
            remote.put(&idx_key(&pack), idx)?;
            true
        } else {
            remote.put_if_absent(&idx_key(&pack), idx)?
        };
        if idx_written {
            uploaded_bytes += idx_len;
            objects += 1;
        }
        Ok(PackDone {
            pack,
            entries,
            bytes,
            uploaded_bytes,
            uploaded,
            objects,
        })
    }
}

/// Pushes a version at most this many times over when gc passes keep deleting what it needs.
const PUSH_ATTEMPTS: usize = 4;

/// True when the map of `id` and every pack and index its header names are in the remote.
fn all_present(remote: &dyn Remote, id: &VersionId, map: &MapHeader) -> Result<bool, SyncError> {
    if remote.head(&map_key(id))?.is_none() {
        return Ok(false);
    }
    for p in &map.packs {
        if remote.head(&pack_key(p))?.is_none() || remote.head(&idx_key(p))?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}
