//! The images the benches run on: a 2 GiB ext4 image of real files (built once, cached), copies of
//! it patched at random block-aligned offsets, and a 20 GiB sparse image. Invariant: the cached
//! image is used only once complete (built under a temporary name, then renamed), and patches are
//! deterministic (seeded), so both sides of a comparison see the same bytes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, io, Result};

/// Size of the ext4 image.
pub const BASE_SIZE: u64 = 2 << 30;

/// Returns the cached ext4 image under `cache`, building it first if needed: `mkfs.ext4 -d` of a
/// copy of /usr/share (a few hundred MB of real files).
pub fn base_image(cache: &Path) -> Result<PathBuf> {
    let img = cache.join("base-ext4-2g.img");
    if img.is_file() {
        return Ok(img);
    }
    std::fs::create_dir_all(cache).map_err(io("mkdir", cache))?;
    let stage = cache.join("stage");
    let tmp = cache.join("base-ext4-2g.img.tmp");
    let _ = std::fs::remove_dir_all(&stage);
    let _ = std::fs::remove_file(&tmp);
    let usr = stage.join("usr");
    std::fs::create_dir_all(&usr).map_err(io("mkdir", &usr))?;
    eprintln!("bench: building the 2 GiB ext4 fixture from /usr/share (once; cached)");
    sys::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg("/usr/share")
            .arg(&usr),
    )?;
    sys::run(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&stage)
            .arg(&tmp)
            .arg("2G"),
    )?;
    std::fs::remove_dir_all(&stage).map_err(io("remove", &stage))?;
    std::fs::rename(&tmp, &img).map_err(io("rename", &tmp))?;
    Ok(img)
}

/// Copies `src` to `dst` keeping holes (the copy is what later patches modify).
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<()> {
    sys::run(
        std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(src)
            .arg(dst),
    )?;
    Ok(())
}

/// A 20 GiB sparse image: the ext4 image at its start, holes after.
pub fn sparse_20g(base: &Path, dst: &Path) -> Result<PathBuf> {
    sparse_copy(base, dst)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(io("open", dst))?;
    f.set_len(20 << 30).map_err(io("truncate", dst))?;
    Ok(dst.to_path_buf())
}

/// A small deterministic generator (xorshift64*): offsets and patch bytes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            let n = chunk.len();
            chunk.copy_from_slice(v.get(..n).unwrap_or(&v));
        }
    }

    /// `count` distinct values below `n` (n must exceed count), in ascending order.
    pub fn distinct(&mut self, count: u64, n: u64) -> Vec<u64> {
        let mut set = std::collections::BTreeSet::new();
        while (set.len() as u64) < count.min(n) {
            set.insert(self.next_u64() % n);
        }
        set.into_iter().collect()
    }
}

/// Overwrites `count` distinct random blocks of `img` (block-aligned, `block` bytes each) with
/// random bytes in place, like `dd conv=notrunc`, and fsyncs. Returns the block indices.
pub fn patch_blocks(img: &Path, block: u64, count: u64, rng: &mut Rng) -> Result<Vec<u64>> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .map_err(io("open", img))?;
    let len = f.metadata().map_err(io("stat", img))?.len();
    let blocks = rng.distinct(count, len / block);
    let mut buf = vec![0u8; usize::try_from(block).unwrap_or(65536)];
    for &b in &blocks {
        rng.fill(&mut buf);
        f.write_all_at(&buf, b * block).map_err(io("write", img))?;
    }
    f.sync_all().map_err(io("fsync", img))?;
    Ok(blocks)
}

/// Reads `len` bytes at `offset` of `path` (a fresh open: what a new reader sees).
pub fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .map_err(io("read", path))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_deterministic_distinct_and_in_place() {
        let dir = std::env::temp_dir().join(format!("imagefs-bench-fx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        for p in [&a, &b] {
            std::fs::write(p, vec![0u8; 64 * 4096]).unwrap();
        }
        let ba = patch_blocks(&a, 4096, 10, &mut Rng::new(7)).unwrap();
        let bb = patch_blocks(&b, 4096, 10, &mut Rng::new(7)).unwrap();
        assert_eq!(ba, bb);
        assert_eq!(ba.len(), 10);
        assert!(ba.windows(2).all(|w| w[0] < w[1]));
        let (da, db) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(da, db);
        assert_eq!(da.len(), 64 * 4096);
        let changed = da
            .chunks(4096)
            .filter(|c| c.iter().any(|&x| x != 0))
            .count();
        assert_eq!(changed, 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
