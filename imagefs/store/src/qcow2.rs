//! A small qcow2 reader for import: versions 2 and 3, uncompressed, unencrypted, no backing
//! file. Everything refused is refused at open, before a byte is stored. Offsets read from the
//! file are untrusted: checked arithmetic and bounds on every one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::source::ImageSource;

const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;
/// Largest virtual size accepted (64 TiB): bounds the table walk.
const MAX_SIZE: u64 = crate::source::MAX_IMAGE_SIZE;

pub(crate) struct Qcow2 {
    path: PathBuf,
    file: File,
    size: u64,
    cluster_bits: u32,
    l1: Vec<u64>,
    /// The last L2 table read (import reads sequentially).
    l2_cache: Option<(u64, Vec<u64>)>,
}

fn be32(h: &[u8], at: usize) -> u32 {
    h.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}
fn be64(h: &[u8], at: usize) -> u64 {
    h.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

impl Qcow2 {
    pub(crate) fn open(path: &Path, file: File) -> Result<Qcow2, StoreError> {
        let bad = |why: &str| StoreError::BadSource {
            path: path.to_path_buf(),
            why: format!("qcow2: {why}"),
        };
        let mut h = [0u8; 112];
        let n = file
            .read_at(&mut h, 0)
            .map_err(StoreError::io("read", path))?;
        if n < 72 {
            return Err(bad("truncated header"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(bad(&format!("version {version} is not supported (2 or 3)")));
        }
        if be64(&h, 8) != 0 {
            return Err(bad("images with a backing file are not supported; flatten it first (qemu-img convert -O qcow2)"));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(&format!("cluster_bits {cluster_bits} out of range")));
        }
        let size = be64(&h, 24);
        if size > MAX_SIZE {
            return Err(bad("virtual size too large"));
        }
        if be32(&h, 32) != 0 {
            return Err(bad("encrypted images are not supported"));
        }
        if version == 3 {
            let incompatible = be64(&h, 72);
            // bit 0 (dirty) only concerns refcounts, which we do not read
            if incompatible & !1 != 0 {
                return Err(bad(&format!(
                    "incompatible features {incompatible:#x} (corrupt, external data file, \
                     compression type or extended L2) are not supported"
                )));
            }
        }
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        let l2_entries = 1u64 << (cluster_bits - 3);
        let need = size.div_ceil(l2_entries << cluster_bits);
        if l1_size < need || l1_size > (1 << 22) {
            return Err(bad("L1 table size does not match the virtual size"));
        }
        let mut raw = vec![0u8; (need * 8) as usize];
        file.read_exact_at(&mut raw, l1_offset)
            .map_err(|_| bad("L1 table is past the end of the file"))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| be64(c, 0) & L2_OFFSET_MASK)
            .collect();
        let mut q = Qcow2 {
            path: path.to_path_buf(),
            file,
            size,
            cluster_bits,
            l1,
            l2_cache: None,
        };
        // refuse compressed clusters now, before anything is stored
        // Every host cluster the active tables name (L2 tables and data) must lie inside the
        // file and be named once: a table aliasing one cluster many times would present
        // terabytes of data from a small file and keep the import hashing for hours. This
        // walk reads each L2 table once and stops at the first alias, before any hashing.
        let file_len = q
            .file
            .metadata()
            .map_err(StoreError::io("stat", path))?
            .len();
        let cs = 1u64 << cluster_bits;
        let inside = |off: u64| off.checked_add(cs).is_some_and(|end| end <= file_len);
        let mut used = std::collections::HashSet::new();
        for i in 0..q.l1.len() {
            let l2_off = q.l1.get(i).copied().unwrap_or(0);
            if l2_off == 0 {
                continue;
            }
            if !inside(l2_off) {
                return Err(bad(&format!(
                    "L2 table at {l2_off} is past the end of the file"
                )));
            }
            if !used.insert(l2_off) {
                return Err(bad(&format!("host cluster {l2_off} is mapped twice")));
            }
            let Some(l2) = q.l2(i)? else { continue };
            if l2.iter().any(|e| e & COMPRESSED != 0) {
                return Err(bad(
                    "compressed clusters are not supported; convert without -c",
                ));
            }
            let data: Vec<u64> = l2
                .iter()
                .filter(|&&e| e & ZERO_FLAG == 0 && e & L2_OFFSET_MASK != 0)
                .map(|e| e & L2_OFFSET_MASK)
                .collect();
            for host in data {
                // (qemu-img may end the file inside the last data cluster)
                if host >= file_len {
                    return Err(bad(&format!(
                        "data cluster at {host} is past the end of the file"
                    )));
                }
                if !used.insert(host) {
                    return Err(bad(&format!("host cluster {host} is mapped twice")));
                }
            }
        }
        Ok(q)
    }

    fn l2(&mut self, l1_index: usize) -> Result<Option<&Vec<u64>>, StoreError> {
        let off = self.l1.get(l1_index).copied().unwrap_or(0);
        if off == 0 {
            return Ok(None);
        }
        if self.l2_cache.as_ref().is_none_or(|(o, _)| *o != off) {
            let mut raw = vec![0u8; 1 << self.cluster_bits];
            self.file
                .read_exact_at(&mut raw, off)
                .map_err(|_| StoreError::BadSource {
                    path: self.path.clone(),
                    why: format!("qcow2: L2 table at {off} is past the end of the file"),
                })?;
            let t = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
            self.l2_cache = Some((off, t));
        }
        Ok(self.l2_cache.as_ref().map(|(_, t)| t))
    }

    /// Host offset of the cluster holding guest offset `off`; `None` when it reads as zeros.
    fn map(&mut self, off: u64) -> Result<Option<u64>, StoreError> {
        let cb = self.cluster_bits;
        let l2_bits = cb - 3;
        let l1_index = (off >> (cb + l2_bits)) as usize;
        let l2_index = ((off >> cb) & ((1 << l2_bits) - 1)) as usize;
        let Some(l2) = self.l2(l1_index)? else {
            return Ok(None);
        };
        let e = l2.get(l2_index).copied().unwrap_or(0);
        if e & ZERO_FLAG != 0 || e & L2_OFFSET_MASK == 0 {
            return Ok(None);
        }
        Ok(Some(e & L2_OFFSET_MASK))
    }
}

impl ImageSource for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let cs = 1u64 << self.cluster_bits;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % cs;
            let take = ((cs - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + take];
            match (pos < self.size)
                .then(|| self.map(pos))
                .transpose()?
                .flatten()
            {
                None => out.fill(0),
                Some(host) => {
                    self.file.read_exact_at(out, host + within).map_err(|_| {
                        StoreError::BadSource {
                            path: self.path.clone(),
                            why: format!("qcow2: cluster at {host} is past the end of the file"),
                        }
                    })?;
                }
            }
            done += take;
        }
        Ok(())
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, StoreError> {
        let cs = 1u64 << self.cluster_bits;
        let mut pos = offset - offset % cs;
        let end = offset.saturating_add(len).min(self.size);
        while pos < end {
            if self.map(pos)?.is_some() {
                return Ok(false);
            }
            pos += cs;
        }
        Ok(true)
    }

    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let cs = 1u64 << self.cluster_bits;
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset - offset % cs;
        while pos < end {
            if self.map(pos)?.is_some() {
                let (a, b) = (pos.max(offset), (pos + cs).min(end));
                match out.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => out.push((a, b)),
                }
            }
            pos += cs;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::source::open_image;

    fn header(version: u32, cluster_bits: u32, size: u64, l1_size: u32, l1_off: u64) -> Vec<u8> {
        let mut h = vec![0u8; 112];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&l1_off.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    /// A 384 KiB qcow2 (64 KiB clusters) whose L1 entries all name one L2 table and whose
    /// L2 entries all name one data cluster: 1 TiB of virtual data from one real cluster.
    fn aliased(l1_alias: bool) -> Vec<u8> {
        let cs = 1u64 << 16;
        let size = 1u64 << 40;
        let l1_entries = size / (8192 * cs); // 2048
        let mut f = header(3, 16, size, l1_entries as u32, cs);
        f.resize(6 * cs as usize, 0);
        let (l2_at, data_at, l2b_at) = (2 * cs, 3 * cs, 4 * cs);
        for i in 0..l1_entries as usize {
            let l2 = if l1_alias || i == 0 {
                l2_at
            } else {
                l2b_at + i as u64 * cs
            };
            let e = (l2 | (1 << 63)).to_be_bytes();
            f[cs as usize + i * 8..cs as usize + i * 8 + 8].copy_from_slice(&e);
            if !l1_alias {
                break;
            }
        }
        for j in 0..8192usize {
            let e = (data_at | (1 << 63)).to_be_bytes();
            let at = l2_at as usize + j * 8;
            f[at..at + 8].copy_from_slice(&e);
        }
        f[data_at as usize..data_at as usize + 16].copy_from_slice(b"the one cluster!");
        f
    }

    #[test]
    fn a_qcow2_that_maps_one_cluster_twice_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for l1_alias in [true, false] {
            let p = dir.path().join(format!("alias{l1_alias}.qcow2"));
            std::fs::write(&p, aliased(l1_alias)).unwrap();
            let t = std::time::Instant::now();
            let err = open_image(&p).err().expect("refused");
            assert!(err.to_string().contains("mapped twice"), "{err}");
            assert_eq!(err.kind(), crate::ErrorKind::BadInput);
            assert!(t.elapsed() < std::time::Duration::from_secs(1));
        }
    }

    #[test]
    fn an_image_over_64_tib_is_refused() {
        // (this host's ext4 cannot hold so large a sparse file, so the check is called directly;
        // a block device reaches it the same way)
        let p = std::path::Path::new("huge.raw");
        let max = crate::source::MAX_IMAGE_SIZE;
        assert!(crate::source::check_image_size(p, max).is_ok());
        let err = crate::source::check_image_size(p, max + 1).unwrap_err();
        assert!(err.to_string().contains("64 TiB"), "{err}");
    }

    proptest! {
        // Untrusted headers and tables: open and read either work or fail cleanly, never panic.
        #[test]
        fn arbitrary_qcow2_files_never_panic(
            version in 1u32..5,
            cluster_bits in 0u32..32,
            size in prop_oneof![0u64..(1 << 24), any::<u64>()],
            l1_size in prop_oneof![0u32..64, any::<u32>()],
            l1_off in prop_oneof![0u64..4096, any::<u64>()],
            tail in proptest::collection::vec(any::<u8>(), 0..8192),
        ) {
            let mut bytes = header(version, cluster_bits, size, l1_size, l1_off);
            bytes.extend_from_slice(&tail);
            // the fuzz target's own checks: open, read both ends, map the data
            crate::fuzzing::image(&bytes);
        }
    }
}
