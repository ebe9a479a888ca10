//! The object index: where each block and block-map node lives (pack, offset, length). Held in
//! memory (sharded maps, read without a global lock) and persisted in `objects.idx`, an
//! append-only file that is only a cache of the packs: entries are appended after their pack
//! was fsynced, a damaged tail is cut, and whatever it lacks is re-derived by scanning packs
//! past the last recorded offsets. sled proved unfit for millions of random keys (GBs of RAM).
//!
//! Record (64 bytes): `tag | key [33] (object) or pack u32 + length u64 (mark) | loc [16] |
//! pad | blake3(first 56)[..8]`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::error::StoreError;
use crate::pack::Loc;

const REC: usize = 64;
const BODY: usize = 56;
const TAG_OBJECT: u8 = 1;
const TAG_MARK: u8 = 2;
const SHARDS: usize = 16;

/// Index key: object kind prefix byte + hash.
pub(crate) type Key = [u8; 33];

#[derive(Debug)]
pub(crate) struct ObjIndex {
    path: PathBuf,
    shards: Vec<RwLock<HashMap<Key, Loc>>>,
    file: Mutex<File>,
    /// How far each pack is indexed (persisted as mark records).
    marks: Mutex<HashMap<u32, u64>>,
}

fn check(body: &[u8]) -> [u8; 8] {
    let mut c = [0u8; 8];
    c.copy_from_slice(&blake3::hash(body).as_bytes()[..8]);
    c
}

fn object_record(key: &Key, loc: &Loc) -> [u8; REC] {
    let mut r = [0u8; REC];
    r[0] = TAG_OBJECT;
    r[1..34].copy_from_slice(key);
    r[34..50].copy_from_slice(&loc.encode());
    let c = check(&r[..BODY]);
    r[BODY..].copy_from_slice(&c);
    r
}

fn mark_record(pack: u32, len: u64) -> [u8; REC] {
    let mut r = [0u8; REC];
    r[0] = TAG_MARK;
    r[1..5].copy_from_slice(&pack.to_le_bytes());
    r[5..13].copy_from_slice(&len.to_le_bytes());
    let c = check(&r[..BODY]);
    r[BODY..].copy_from_slice(&c);
    r
}

fn shard_of(key: &Key) -> usize {
    key[1] as usize % SHARDS
}

impl ObjIndex {
    /// Loads `path` (missing: empty), cutting a damaged tail.
    pub(crate) fn open(path: &Path) -> Result<ObjIndex, StoreError> {
        let mut data = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)
                    .map_err(StoreError::io("read", path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("open", path)(e)),
        }
        let mut shards: Vec<HashMap<Key, Loc>> = (0..SHARDS).map(|_| HashMap::new()).collect();
        let mut marks = HashMap::new();
        let mut valid = 0usize;
        for r in data.chunks_exact(REC) {
            if r[BODY..] != check(&r[..BODY]) {
                break;
            }
            match r[0] {
                TAG_OBJECT => {
                    let mut key = [0u8; 33];
                    key.copy_from_slice(&r[1..34]);
                    let Some(loc) = Loc::decode(&r[34..50]) else {
                        break;
                    };
                    shards[shard_of(&key)].insert(key, loc);
                }
                TAG_MARK => {
                    let pack = u32::from_le_bytes([r[1], r[2], r[3], r[4]]);
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&r[5..13]);
                    marks.insert(pack, u64::from_le_bytes(len));
                }
                _ => break,
            }
            valid += REC;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(StoreError::io("open", path))?;
        if valid != data.len() {
            tracing::warn!(path = %path.display(), valid, "cutting damaged object index tail");
            file.set_len(valid as u64)
                .map_err(StoreError::io("truncate", path))?;
        }
        Ok(ObjIndex {
            path: path.to_path_buf(),
            shards: shards.into_iter().map(RwLock::new).collect(),
            file: Mutex::new(file),
            marks: Mutex::new(marks),
        })
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Loc> {
        let s = self.shards[shard_of(key)]
            .read()
            .unwrap_or_else(|p| p.into_inner());
        s.get(key).copied()
    }

    /// Makes `key` findable in memory at once (not persisted: see `persist`).
    pub(crate) fn insert(&self, key: Key, loc: Loc) {
        self.shards[shard_of(&key)]
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, loc);
    }

    pub(crate) fn remove(&self, key: &Key) {
        self.shards[shard_of(key)]
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// How far `pack` is indexed.
    pub(crate) fn mark(&self, pack: u32) -> Option<u64> {
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pack)
            .copied()
    }

    /// Pack ids the index knows of.
    pub(crate) fn marked_packs(&self) -> Vec<u32> {
        let m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        m.keys().copied().collect()
    }

    /// Appends entries (whose pack is already durable) and the pack's new indexed length to
    /// the file; no fsync (a lost tail is re-derived from the packs).
    pub(crate) fn persist(
        &self,
        entries: &[(Key, Loc)],
        pack: u32,
        len: u64,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity((entries.len() + 1) * REC);
        for (k, l) in entries {
            buf.extend_from_slice(&object_record(k, l));
        }
        buf.extend_from_slice(&mark_record(pack, len));
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let before = f
            .metadata()
            .map_err(StoreError::io("stat", &self.path))?
            .len();
        if let Err(e) = f.write_all(&buf) {
            // Cut a partial record back (ENOSPC mid-record): records after it would be
            // misaligned and lost at the next open.
            if let Err(t) = f.set_len(before) {
                tracing::warn!(path = %self.path.display(), "cutting a failed append: {t}");
            }
            return Err(StoreError::io("append", &self.path)(e));
        }
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pack, len);
        Ok(())
    }

    /// Every entry (a snapshot).
    pub(crate) fn entries(&self) -> Vec<(Key, Loc)> {
        let mut out = Vec::new();
        for s in &self.shards {
            let s = s.read().unwrap_or_else(|p| p.into_inner());
            out.extend(s.iter().map(|(k, l)| (*k, *l)));
        }
        out
    }

    /// Replaces the file with exactly the current entries and the marks of `packs` (after gc),
    /// atomically: temp file, fsync, rename, fsync dir.
    pub(crate) fn rewrite(&self, packs: &HashMap<u32, u64>) -> Result<(), StoreError> {
        let tmp = self.path.with_extension("idx.tmp");
        let mut buf = Vec::new();
        for (k, l) in self.entries() {
            buf.extend_from_slice(&object_record(&k, &l));
        }
        for (&p, &len) in packs {
            buf.extend_from_slice(&mark_record(p, len));
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::write(&tmp, &buf).map_err(StoreError::io("write", &tmp))?;
        File::open(&tmp)
            .and_then(|t| t.sync_all())
            .map_err(StoreError::io("fsync", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(StoreError::io("rename", &tmp))?;
        if let Some(dir) = self.path.parent() {
            crate::pack::fsync_dir(dir)?;
        }
        *f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(StoreError::io("open", &self.path))?;
        *self.marks.lock().unwrap_or_else(|p| p.into_inner()) = packs.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("objects.idx");
        let idx = ObjIndex::open(&p).unwrap();
        let k = [7u8; 33];
        let loc = Loc {
            pack: 3,
            offset: 49,
            len: 4096,
        };
        idx.insert(k, loc);
        idx.persist(&[(k, loc)], 3, 4145).unwrap();
        drop(idx);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[1u8; 30]).unwrap();
        drop(f);
        let idx = ObjIndex::open(&p).unwrap();
        assert_eq!(idx.get(&k), Some(loc));
        assert_eq!(idx.mark(3), Some(4145));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * REC as u64);
    }
}
