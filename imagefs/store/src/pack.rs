//! Pack files: append-only files of content-addressed objects (blocks and block-map nodes).
//! Invariant: an object is found through the index only after its pack was fsynced, and every
//! object read back is checked against its hash before its bytes are used.
//!
//! Record layout: `magic "IFPK" | kind u8 | len u32 LE | hash [32] | check [8] | data [len]`,
//! where check = blake3(magic..hash)[..8] guards the header and the hash guards the data.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::error::StoreError;

const MAGIC: &[u8; 4] = b"IFPK";
pub(crate) const HEADER: u64 = 49;
/// Written bytes handed to writeback at a time.
const KICK_EVERY: u64 = 16 << 20;
/// Largest object (a 1 MiB block; nodes are 8 KiB).
const MAX_OBJECT: u32 = 1 << 20;

/// What an object is; blocks and nodes hash differently so they never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ObjKind {
    Block = 1,
    Node = 2,
}

impl ObjKind {
    fn from_u8(b: u8) -> Option<ObjKind> {
        match b {
            1 => Some(ObjKind::Block),
            2 => Some(ObjKind::Node),
            _ => None,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            ObjKind::Block => "block",
            ObjKind::Node => "block-map node",
        }
    }
    /// Index key prefix.
    pub(crate) fn key_prefix(self) -> u8 {
        match self {
            ObjKind::Block => b'b',
            ObjKind::Node => b'n',
        }
    }
}

/// The hash naming an object of `kind` with bytes `data`.
pub(crate) fn object_hash(kind: ObjKind, data: &[u8]) -> [u8; 32] {
    match kind {
        ObjKind::Block => *blake3::hash(data).as_bytes(),
        ObjKind::Node => {
            let mut h = blake3::Hasher::new_derive_key("imagefs 2026 block-map node v1");
            h.update(data);
            *h.finalize().as_bytes()
        }
    }
}

/// Where an object's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

impl Loc {
    pub(crate) fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..].copy_from_slice(&self.len.to_le_bytes());
        b
    }
    pub(crate) fn decode(b: &[u8]) -> Option<Loc> {
        if b.len() != 16 {
            return None;
        }
        Some(Loc {
            pack: u32::from_le_bytes(b[..4].try_into().ok()?),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            len: u32::from_le_bytes(b[12..].try_into().ok()?),
        })
    }
}

fn header_check(head: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&blake3::hash(head).as_bytes()[..8]);
    out
}

pub(crate) fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.pack"))
}

/// Ids of the pack files in `dir`, ascending.
pub(crate) fn list_packs(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StoreError::io("read dir", dir))? {
        let entry = entry.map_err(StoreError::io("read dir", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".pack") {
            if let Ok(id) = stem.parse::<u32>() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync dir", dir))
}

/// The pack being appended to by this session.
#[derive(Debug)]
pub(crate) struct PackWriter {
    pub id: u32,
    path: PathBuf,
    file: File,
    pub len: u64,
    /// Bytes handed to writeback already (see `append`).
    kicked: u64,
}

impl PackWriter {
    pub(crate) fn create(dir: &Path, id: u32) -> Result<PackWriter, StoreError> {
        let path = pack_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::io("create", &path))?;
        fsync_dir(dir)?;
        Ok(PackWriter {
            id,
            path,
            file,
            len: 0,
            kicked: 0,
        })
    }

    /// Appends one object; its data is visible to pread at once, durable after `sync`.
    pub(crate) fn append(
        &mut self,
        kind: ObjKind,
        hash: &[u8; 32],
        data: &[u8],
    ) -> Result<Loc, StoreError> {
        let mut head = [0u8; HEADER as usize];
        head[..4].copy_from_slice(MAGIC);
        head[4] = kind as u8;
        head[5..9].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[9..41].copy_from_slice(hash);
        let check = header_check(&head[..41]);
        head[41..].copy_from_slice(&check);
        let io = StoreError::io("write", &self.path);
        self.file.write_all_at(&head, self.len).map_err(io)?;
        let offset = self.len + HEADER;
        self.file
            .write_all_at(data, offset)
            .map_err(StoreError::io("write", &self.path))?;
        self.len = offset + data.len() as u64;
        if self.len - self.kicked >= KICK_EVERY {
            // Start writeback now without waiting, so the final fsync finds little left to
            // write and disk writes overlap hashing (the kernel would otherwise wait ~5 s).
            // SAFETY: sync_file_range on a descriptor we own; no memory is involved.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.kicked as libc::off64_t,
                    (self.len - self.kicked) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.kicked = self.len;
        }
        Ok(Loc {
            pack: self.id,
            offset,
            len: data.len() as u32,
        })
    }

    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(StoreError::io("fsync", &self.path))
    }
}

/// Scans the pack at `path` from byte `from`, calling `found` for each whole, verified object.
/// Stops at the first damaged or torn record (packs are never appended to after a restart,
/// so whatever follows is garbage); returns the end of the last good record.
pub(crate) fn scan(
    path: &Path,
    id: u32,
    from: u64,
    mut found: impl FnMut(ObjKind, [u8; 32], Loc) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut file = File::open(path).map_err(StoreError::io("open", path))?;
    file.seek(SeekFrom::Start(from))
        .map_err(StoreError::io("seek", path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut pos = from;
    let mut data = Vec::new();
    // Where a whole object whose data does not match its hash began: if nothing valid follows
    // it, it was a torn tail and the scan ends there; if an object follows, it was damage
    // inside the pack, and the scan goes on past it (its header gave its length), so the
    // intact objects after it stay indexed.
    let mut bad_at: Option<u64> = None;
    loop {
        let mut head = [0u8; HEADER as usize];
        if r.read_exact(&mut head).is_err() {
            break;
        }
        if &head[..4] != MAGIC || head[41..] != header_check(&head[..41]) {
            break;
        }
        let Some(kind) = ObjKind::from_u8(head[4]) else {
            break;
        };
        let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if len > MAX_OBJECT {
            break;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&head[9..41]);
        data.resize(len as usize, 0);
        if r.read_exact(&mut data).is_err() {
            break;
        }
        let at = pos;
        pos += HEADER + u64::from(len);
        if object_hash(kind, &data) != hash {
            tracing::warn!(pack = %path.display(), offset = at, "object does not match its hash: skipped");
            bad_at.get_or_insert(at);
            continue;
        }
        bad_at = None;
        found(
            kind,
            hash,
            Loc {
                pack: id,
                offset: at + HEADER,
                len,
            },
        )?;
    }
    Ok(bad_at.unwrap_or(pos))
}

/// Open read handles to pack files, shared without a lock on the read path.
#[derive(Debug)]
pub(crate) struct PackReaders {
    dir: PathBuf,
    files: ArcSwap<HashMap<u32, Arc<File>>>,
}

impl PackReaders {
    pub(crate) fn new(dir: PathBuf) -> PackReaders {
        PackReaders {
            dir,
            files: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    fn get(&self, id: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.files.load().get(&id) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.dir, id);
        let f = Arc::new(File::open(&path).map_err(StoreError::io("open", &path))?);
        self.files.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(id, f.clone());
            m
        });
        Ok(f)
    }

    /// Drops the handle of a pack about to be deleted.
    pub(crate) fn forget(&self, id: u32) {
        self.files.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(&id);
            m
        });
    }

    /// Reads the object at `loc` into `buf` (exactly `loc.len` bytes) and verifies it.
    pub(crate) fn read(
        &self,
        kind: ObjKind,
        hash: &[u8; 32],
        loc: Loc,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        if buf.len() != loc.len as usize {
            return Err(StoreError::BadBuffer {
                expected: u64::from(loc.len),
                got: buf.len() as u64,
            });
        }
        let corrupt = || StoreError::CorruptObject {
            what: kind.name(),
            hash: crate::ids::to_hex(hash),
            pack: loc.pack,
            offset: loc.offset,
        };
        let f = self.get(loc.pack)?;
        match f.read_exact_at(buf, loc.offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(corrupt()),
            Err(e) => return Err(StoreError::io("read", pack_path(&self.dir, loc.pack))(e)),
        }
        if object_hash(kind, buf) != *hash {
            return Err(corrupt());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_stops_at_a_torn_tail_and_reads_verify() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 1).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let ha = object_hash(ObjKind::Block, &a);
        let hb = object_hash(ObjKind::Block, &b);
        let la = w.append(ObjKind::Block, &ha, &a).unwrap();
        let lb = w.append(ObjKind::Block, &hb, &b).unwrap();
        let good_end = w.len;
        // torn third record: header only
        let hc = object_hash(ObjKind::Block, &[3u8; 4096]);
        w.append(ObjKind::Block, &hc, &[3u8; 100]).unwrap();
        let mut seen = Vec::new();
        let end = scan(&pack_path(dir.path(), 1), 1, 0, |_, h, l| {
            seen.push((h, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(end, good_end);
        assert_eq!(seen, vec![(ha, la), (hb, lb)]);

        let readers = PackReaders::new(dir.path().to_path_buf());
        let mut buf = vec![0u8; 4096];
        readers.read(ObjKind::Block, &hb, lb, &mut buf).unwrap();
        assert_eq!(buf, b);
        // flip a byte of block a: reading it is Corrupt
        let f = OpenOptions::new()
            .write(true)
            .open(pack_path(dir.path(), 1))
            .unwrap();
        f.write_all_at(&[9], la.offset + 7).unwrap();
        let err = readers.read(ObjKind::Block, &ha, la, &mut buf).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn scan_goes_on_past_a_damaged_object_inside_the_pack() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let ha = object_hash(ObjKind::Block, &a);
        let hb = object_hash(ObjKind::Block, &b);
        // A damaged object inside the pack: the scan goes on past it.
        let mut w = PackWriter::create(dir.path(), 2).unwrap();
        let la = w.append(ObjKind::Block, &ha, &a).unwrap();
        let lb = w.append(ObjKind::Block, &hb, &b).unwrap();
        let c = vec![3u8; 4096];
        let hc = object_hash(ObjKind::Block, &c);
        let lc = w.append(ObjKind::Block, &hc, &c).unwrap();
        let end2 = w.len;
        drop(w);
        let p2 = pack_path(dir.path(), 2);
        let f = OpenOptions::new().write(true).open(&p2).unwrap();
        f.write_all_at(b"X", lb.offset + 10).unwrap();
        let mut seen = Vec::new();
        let end = scan(&p2, 2, 0, |_, h, l| {
            seen.push((h, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(ha, la), (hc, lc)],
            "the intact object after the bad one"
        );
        assert_eq!(end, end2);
    }
}
