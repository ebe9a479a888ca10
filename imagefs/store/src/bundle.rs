//! Bundles: portable patches holding only the blocks that changed between two versions of an
//! image, self-verifying (checksummed records, a trailer, every block checked against its hash,
//! and the target id recomputed before anything is written to the receiving store).
//!
//! Layout (a record log): header (JSON), change lists (index u64 LE + hash, zero hash = hole),
//! block data, trailer (JSON counts + blake3 of the header).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::ids::{BlockHash, ImageName, Tag, VersionId};
use crate::log::{RecordLog, RecordStream};

const FORMAT: &str = "imagefs-bundle 1";
const K_HEADER: u8 = 1;
const K_CHANGES: u8 = 2;
const K_BLOCK: u8 = 3;
const K_TRAILER: u8 = 4;
const CHANGES_PER_RECORD: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    format: String,
    image: String,
    block_size: u32,
    base: String,
    base_size: u64,
    base_spec: String,
    target: String,
    target_size: u64,
    tag: Option<String>,
    changes: u64,
    blocks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Trailer {
    changes: u64,
    blocks: u64,
    header: String,
}

/// What a bundle holds or what applying it did.
#[derive(Debug, Clone)]
pub struct BundleReport {
    pub image: ImageName,
    pub tag: Option<Tag>,
    pub base: VersionId,
    pub target: VersionId,
    /// Changed blocks (including ones that became holes).
    pub changes: u64,
    /// Block payloads carried (or, for apply, new to this store).
    pub blocks: u64,
    /// Bundle file size.
    pub bytes: u64,
}

fn bad(path: &Path, why: impl Into<String>) -> StoreError {
    StoreError::BadBundle {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

impl Store {
    /// Writes to `path` the bundle turning version `base` into `target` (same image); applying
    /// it also sets `tag` when given. `base_spec` is how the base is named, for error messages.
    pub fn write_bundle(
        &self,
        base: &VersionId,
        base_spec: &str,
        target: &VersionId,
        tag: Option<&Tag>,
        path: &Path,
    ) -> Result<BundleReport, StoreError> {
        let vb = self.version(base)?;
        let vt = self.version(target)?;
        if vb.image() != vt.image() {
            return Err(StoreError::Refused(format!(
                "a bundle goes between versions of one image, not {} and {}",
                vb.image(),
                vt.image()
            )));
        }
        let changed = self.diff(base, target)?;
        let mut changes = Vec::with_capacity(changed.len());
        let mut payload: Vec<BlockHash> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &i in &changed {
            let h = if i < vt.block_count() {
                vt.block_hash(i)?
            } else {
                None
            };
            if i >= vt.block_count() {
                continue;
            }
            if let Some(h) = h {
                if seen.insert(h) {
                    payload.push(h);
                }
            }
            changes.push((i, h));
        }
        let header = Header {
            format: FORMAT.to_string(),
            image: vt.image().to_string(),
            block_size: vt.block_size(),
            base: base.to_string(),
            base_size: vb.size(),
            base_spec: base_spec.to_string(),
            target: target.to_string(),
            target_size: vt.size(),
            tag: tag.map(|t| t.to_string()),
            changes: changes.len() as u64,
            blocks: payload.len() as u64,
        };
        let header_json = serde_json::to_vec(&header).unwrap_or_default();
        let tmp = tmp_path(path);
        let _ = std::fs::remove_file(&tmp);
        let result = (|| -> Result<u64, StoreError> {
            let (mut log, _) = RecordLog::open(&tmp)?;
            log.append(K_HEADER, &header_json)?;
            for part in changes.chunks(CHANGES_PER_RECORD) {
                let mut rec = Vec::with_capacity(part.len() * 40);
                for (i, h) in part {
                    rec.extend_from_slice(&i.to_le_bytes());
                    rec.extend_from_slice(&h.map_or([0u8; 32], |h| h.0));
                }
                log.append(K_CHANGES, &rec)?;
            }
            let mut buf = vec![0u8; vt.block_size() as usize];
            for h in &payload {
                self.read_block(h, &mut buf)?;
                log.append(K_BLOCK, &buf)?;
            }
            let trailer = Trailer {
                changes: header.changes,
                blocks: header.blocks,
                header: blake3::hash(&header_json).to_hex().to_string(),
            };
            log.append(K_TRAILER, &serde_json::to_vec(&trailer).unwrap_or_default())?;
            log.sync()?;
            Ok(log.len())
        })();
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, path).map_err(StoreError::io("rename", &tmp))?;
        crate::log::sync_parent(path).map_err(StoreError::io("fsync dir of", path))?;
        Ok(BundleReport {
            image: vt.image().clone(),
            tag: tag.cloned(),
            base: *base,
            target: *target,
            changes: header.changes,
            blocks: header.blocks,
            bytes,
        })
    }

    /// Applies a bundle: checks it wholly (integrity, base present, target id reproduced)
    /// before writing anything, then commits the target version and sets its tag.
    pub fn apply_bundle(&self, path: &Path) -> Result<BundleReport, StoreError> {
        let bytes = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchFile(path.to_path_buf()))
            }
            Err(e) => return Err(StoreError::io("stat", path)(e)),
        };
        // Pass 1 checks everything and keeps only the change list and the block hashes.
        let damaged = |e: crate::log::LogError| match e {
            crate::log::LogError::Corrupt { offset, .. } => {
                bad(path, format!("damaged at offset {offset}"))
            }
            e => StoreError::Log(e),
        };
        let mut stream = RecordStream::open(path).map_err(damaged)?;
        let first = stream
            .next()
            .transpose()
            .map_err(damaged)?
            .ok_or_else(|| bad(path, "empty or not a bundle"))?;
        if first.kind != K_HEADER {
            return Err(bad(path, "not a bundle"));
        }
        let header: Header = serde_json::from_slice(&first.payload)
            .map_err(|e| bad(path, format!("bad header: {e}")))?;
        if header.format != FORMAT {
            return Err(bad(
                path,
                format!("unknown bundle format {:?}", header.format),
            ));
        }
        let image = ImageName::new(&header.image)?;
        let tag = header.tag.as_deref().map(Tag::new).transpose()?;
        let parse_id = |s: &str| s.parse::<VersionId>().map_err(|e| bad(path, e.to_string()));
        let base = parse_id(&header.base)?;
        let target = parse_id(&header.target)?;
        let bs = header.block_size;
        let mut changes: Vec<(u64, Option<BlockHash>)> = Vec::new();
        let mut blocks: HashSet<BlockHash> = HashSet::new();
        let mut trailer = None;
        for rec in stream {
            let rec = rec.map_err(damaged)?;
            if trailer.is_some() {
                return Err(bad(
                    path,
                    format!("data after the trailer at {}", rec.offset),
                ));
            }
            match rec.kind {
                K_CHANGES => {
                    if rec.payload.len() % 40 != 0 {
                        return Err(bad(path, "malformed change list"));
                    }
                    for c in rec.payload.chunks_exact(40) {
                        let mut i = [0u8; 8];
                        i.copy_from_slice(&c[..8]);
                        let mut h = [0u8; 32];
                        h.copy_from_slice(&c[8..]);
                        changes.push((
                            u64::from_le_bytes(i),
                            (h != [0; 32]).then_some(BlockHash(h)),
                        ));
                    }
                }
                K_BLOCK => {
                    if rec.payload.len() != bs as usize {
                        return Err(bad(path, "block of the wrong size"));
                    }
                    blocks.insert(BlockHash(*blake3::hash(&rec.payload).as_bytes()));
                }
                K_TRAILER => {
                    let t: Trailer = serde_json::from_slice(&rec.payload)
                        .map_err(|_| bad(path, "bad trailer"))?;
                    trailer = Some(t);
                }
                _ => return Err(bad(path, format!("unexpected record at {}", rec.offset))),
            }
        }
        let want = Trailer {
            changes: header.changes,
            blocks: header.blocks,
            header: blake3::hash(&first.payload).to_hex().to_string(),
        };
        match trailer {
            None => return Err(bad(path, "truncated (no trailer)")),
            Some(t) if t != want => return Err(bad(path, "trailer does not match the header")),
            Some(_) => {}
        }
        if changes.len() as u64 != header.changes || blocks.len() as u64 != header.blocks {
            return Err(bad(path, "truncated (counts do not match)"));
        }
        // A target can only grow by the blocks the bundle names (each change carries or
        // references one): a huge claimed size would make committing it cost time in
        // proportion to the claim, not to the bundle.
        let carried = (changes.len() as u64).saturating_mul(u64::from(bs));
        if header.target_size > header.base_size.saturating_add(carried)
            || header.target_size > crate::source::MAX_IMAGE_SIZE
        {
            return Err(bad(
                path,
                format!(
                    "target size {} is more than the base's {} plus the {} bytes of blocks it names",
                    header.target_size, header.base_size, carried
                ),
            ));
        }
        let vbase = match self.version(&base) {
            Ok(v) => v,
            Err(StoreError::UnknownVersion(_)) => {
                return Err(StoreError::BundleBaseMissing {
                    path: path.to_path_buf(),
                    base: base.short(),
                    spec: header.base_spec.clone(),
                })
            }
            Err(e) => return Err(e),
        };
        if *vbase.image() != image || vbase.size() != header.base_size || vbase.block_size() != bs {
            return Err(bad(path, "base version does not match the header"));
        }
        for (i, h) in &changes {
            if let Some(h) = h {
                if !blocks.contains(h) && !self.has_block(h)? {
                    return Err(bad(
                        path,
                        format!("block {i} ({}) is not in the bundle", h.short()),
                    ));
                }
            }
        }
        if self.preview_version(&image, Some(&base), header.target_size, &changes)? != target {
            return Err(bad(
                path,
                "does not produce the version it names (tampered?)",
            ));
        }
        if let Some(tag) = &tag {
            if let Ok(existing) = self.resolve(&format!("{image}:{tag}")) {
                if existing != target {
                    return Err(StoreError::Refused(format!(
                        "{image}:{tag} already names version {}; remove the tag first",
                        existing.short()
                    )));
                }
            }
        }
        // Pass 2 stores the blocks this store lacks (each re-hashed: the file may have changed).
        let mut new_blocks = 0;
        for rec in RecordStream::open(path).map_err(damaged)? {
            let rec = rec.map_err(damaged)?;
            if rec.kind != K_BLOCK {
                continue;
            }
            let h = BlockHash(*blake3::hash(&rec.payload).as_bytes());
            if !blocks.contains(&h) {
                return Err(bad(path, "changed while being applied"));
            }
            if !self.has_block(&h)? {
                self.put_block(&rec.payload)?;
                new_blocks += 1;
            }
        }
        crate::fault::point("apply.blocks_stored");
        let id = self.create_version(&image, Some(&base), header.target_size, &changes)?;
        if id != target {
            return Err(bad(path, "does not produce the version it names"));
        }
        crate::fault::point("apply.committed");
        if let Some(tag) = &tag {
            self.set_tag(&image, tag, &id)?;
        }
        Ok(BundleReport {
            image,
            tag,
            base,
            target,
            changes: header.changes,
            blocks: new_blocks,
            bytes,
        })
    }
}

use crate::store::Store;

/// A temp name beside `path`, renamed over it once complete.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    /// Re-encodes bundle `path` with `edit` applied to its header, every checksum and the
    /// trailer recomputed, as an attacker would.
    fn forge(path: &Path, edit: impl Fn(&mut Header)) {
        let records: Vec<crate::log::Record> = RecordStream::open(path)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let mut header: Header = serde_json::from_slice(&records[0].payload).unwrap();
        edit(&mut header);
        let head = serde_json::to_vec(&header).unwrap();
        let trailer = Trailer {
            changes: header.changes,
            blocks: header.blocks,
            header: blake3::hash(&head).to_hex().to_string(),
        };
        std::fs::remove_file(path).unwrap();
        let (mut log, _) = RecordLog::open(path).unwrap();
        log.append(K_HEADER, &head).unwrap();
        for r in &records[1..records.len() - 1] {
            log.append(r.kind, &r.payload).unwrap();
        }
        log.append(K_TRAILER, &serde_json::to_vec(&trailer).unwrap())
            .unwrap();
        log.sync().unwrap();
    }

    #[test]
    fn a_forged_huge_target_size_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::init(&dir.path().join("s")).unwrap();
        let t = Store::init(&dir.path().join("t")).unwrap();
        let web = ImageName::new("web").unwrap();
        let import = |store: &Store, bytes: &[u8], name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let mut src = crate::open_image(&p).unwrap();
            store
                .import(&web, Some(4096), src.as_mut(), &mut |_| {})
                .unwrap()
                .id
        };
        let v1: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 | 1).collect();
        let mut v2 = v1.clone();
        v2[100] ^= 0xFF;
        let i1 = import(&s, &v1, "v1");
        let i2 = import(&s, &v2, "v2");
        import(&t, &v1, "v1t");
        let b = dir.path().join("b.bundle");
        s.write_bundle(&i1, "web:v1", &i2, None, &b).unwrap();
        // Untouched, the forgery machinery yields a bundle that applies.
        forge(&b, |_| {});
        let good = dir.path().join("good.bundle");
        std::fs::copy(&b, &good).unwrap();
        forge(&b, |h| h.target_size = 1 << 34);
        let started = std::time::Instant::now();
        let err = t.apply_bundle(&b).unwrap_err();
        assert!(err.to_string().contains("target size"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(t.apply_bundle(&good).unwrap().target, i2);
    }
}
