//! The object layer and commits: blocks and block-map nodes put into and read from packs,
//! objects made durable before their index entries are persisted, and refs records committed
//! log-first. Invariant: a persisted index entry never points at bytes that are not durable;
//! a refs record is in the log (fsynced) before the index shows it, and every object it needs
//! is durable before that.

use std::sync::MutexGuard;

use crate::error::StoreError;
use crate::ids::{ImageName, VersionId};
use crate::pack::{Loc, ObjKind, PackWriter};
use crate::refs::{self, RefRecord, VersionMeta, REF_KIND};
use crate::store::{now_secs, obj_key, Inner, Writer, PACK_ROLL, REFS_STATE_KEY, SYNC_EVERY};

impl Inner {
    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the writer leaves only pending objects, which are re-scanned.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn locate(&self, kind: ObjKind, hash: &[u8; 32]) -> Result<Option<Loc>, StoreError> {
        Ok(self.objects()?.get(&obj_key(kind, hash)))
    }

    pub(crate) fn read_object(
        &self,
        kind: ObjKind,
        hash: &[u8; 32],
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let missing = || StoreError::MissingObject {
            what: kind.name(),
            hash: crate::ids::to_hex(hash),
        };
        let loc = self.locate(kind, hash)?.ok_or_else(missing)?;
        match self.readers.read(kind, hash, loc, buf) {
            // gc may have moved it between the lookup and the read: look again once
            Err(StoreError::Io { .. }) => {
                let loc = self.locate(kind, hash)?.ok_or_else(missing)?;
                self.readers.read(kind, hash, loc, buf)
            }
            r => r,
        }
    }

    /// Copies `out.len()` bytes at `within` of the block `hash` (of `bs` bytes), through the
    /// cache of verified blocks, so a run of small reads of one block hashes it once.
    pub(crate) fn read_block_part(
        &self,
        hash: &[u8; 32],
        bs: usize,
        within: usize,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let block = match self.block_cache.get(hash) {
            Some(b) => b,
            None => {
                let mut b = vec![0u8; bs];
                self.read_block_fetching(hash, &mut b)?;
                let b = std::sync::Arc::new(b);
                self.block_cache.insert(*hash, b.clone());
                b
            }
        };
        let src = block
            .get(within..within + out.len())
            .ok_or(StoreError::BadBuffer {
                expected: bs as u64,
                got: (within + out.len()) as u64,
            })?;
        out.copy_from_slice(src);
        Ok(())
    }

    pub(crate) fn object_len(
        &self,
        kind: ObjKind,
        hash: &[u8; 32],
    ) -> Result<Option<u32>, StoreError> {
        Ok(self.locate(kind, hash)?.map(|l| l.len))
    }

    /// Stores an object under its (already computed) hash unless present.
    pub(crate) fn put_object(
        &self,
        kind: ObjKind,
        hash: &[u8; 32],
        data: &[u8],
    ) -> Result<(), StoreError> {
        if self.locate(kind, hash)?.is_some() {
            return Ok(());
        }
        if kind == ObjKind::Block {
            // New data: refused below the reserve (nodes are metadata and go on).
            self.reserve.check(data.len() as u64)?;
        }
        let mut w = self.lock_writer();
        self.append_locked(&mut w, kind, hash, data)?;
        if w.unsynced.len() as u64 >= SYNC_EVERY {
            self.sync_objects(&mut w)?;
        }
        Ok(())
    }

    pub(crate) fn append_locked(
        &self,
        w: &mut Writer,
        kind: ObjKind,
        hash: &[u8; 32],
        data: &[u8],
    ) -> Result<Loc, StoreError> {
        if w.pack.as_ref().is_some_and(|p| p.len >= PACK_ROLL) {
            self.sync_objects(w)?;
            w.pack = None;
        }
        let pack = match w.pack.as_mut() {
            Some(p) => p,
            None => {
                // never reuse the id of a pack the index still mentions
                let known = self.objects()?.marked_packs().into_iter().max();
                let id = w.next_pack.max(known.map_or(0, |k| k + 1));
                w.next_pack = id + 1;
                w.pack
                    .insert(PackWriter::create(&self.dir.join("packs"), id)?)
            }
        };
        let loc = match pack.append(kind, hash, data) {
            Ok(loc) => loc,
            Err(e) => {
                // never append past a failed write: later records would be unreachable
                w.pack = None;
                return Err(e);
            }
        };
        let key = obj_key(kind, hash);
        self.objects()?.insert(key, loc);
        w.unsynced.push((key, loc));
        crate::fault::point("objects.put");
        Ok(loc)
    }

    /// fsyncs the current pack, then persists the index entries of its new objects.
    pub(crate) fn sync_objects(&self, w: &mut Writer) -> Result<(), StoreError> {
        let Some(pack) = w.pack.as_ref() else {
            return Ok(());
        };
        pack.sync()?;
        crate::fault::point("pack.synced");
        self.objects()?.persist(&w.unsynced, pack.id, pack.len)?;
        w.unsynced.clear();
        Ok(())
    }

    /// Durably records refs changes: objects first, then the log, then the index.
    pub(crate) fn commit(&self, records: &[RefRecord]) -> Result<(), StoreError> {
        let mut w = self.lock_writer();
        self.commit_locked(&mut w, records)
    }

    pub(crate) fn commit_locked(
        &self,
        w: &mut Writer,
        records: &[RefRecord],
    ) -> Result<(), StoreError> {
        self.sync_objects(w)?;
        let mut batch = sled::Batch::default();
        for r in records {
            r.apply(&mut batch)?;
            w.refs.append(REF_KIND, &r.encode())?;
        }
        crate::fault::point("refs.appended");
        w.refs.sync()?;
        crate::fault::point("refs.synced");
        batch.insert(REFS_STATE_KEY, &w.refs.len().to_le_bytes()[..]);
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Commits a version (and its image, if new) whose block map root is `root`.
    pub(crate) fn commit_version(
        &self,
        image: &ImageName,
        size: u64,
        block_size: u32,
        root: &[u8; 32],
    ) -> Result<VersionId, StoreError> {
        let id = refs::version_id(image, size, block_size, root);
        let mut records = Vec::new();
        if self.db.get(refs::image_key(image.as_str()))?.is_none() {
            records.push(RefRecord::Image {
                name: image.to_string(),
                block_size,
            });
        }
        if self.db.get(refs::version_key(&id))?.is_none() {
            records.push(RefRecord::Version {
                id: id.to_string(),
                meta: VersionMeta {
                    image: image.to_string(),
                    size,
                    block_size,
                    root: crate::ids::to_hex(root),
                    created: now_secs(),
                },
            });
        }
        let mut w = self.lock_writer();
        self.commit_locked(&mut w, &records)?;
        Ok(id)
    }
}
