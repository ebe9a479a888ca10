//! Image files to import: raw (holes found with SEEK_DATA) or qcow2 (detected by its magic).
//! Invariant: a source reads exactly the guest-visible bytes; holes read as zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::qcow2::Qcow2;

/// A disk image read for import.
pub trait ImageSource: Send {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (zeros past the end and in holes).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;
    /// True when `[offset, offset + len)` is known to be zeros without reading it.
    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, StoreError>;
    /// "raw" or "qcow2".
    fn format(&self) -> &'static str;
    /// The sub-ranges of `[offset, offset + len)` that may hold data, ascending; everything
    /// outside them reads as zeros. The default asks `is_hole` about the whole range.
    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        if self.is_hole(offset, len)? {
            Ok(Vec::new())
        } else {
            Ok(vec![(offset, offset.saturating_add(len))])
        }
    }
}

/// lseek(SEEK_DATA / SEEK_HOLE) from `pos`; `None` when there is no such offset or the file
/// system cannot tell (then the caller treats everything as data).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> Option<u64> {
    let off = libc::off_t::try_from(pos).ok()?;
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).ok()
}

/// Opens `path` as qcow2 when it starts with the qcow2 magic, else as raw.
/// The largest virtual size of an image (64 TiB), raw or qcow2.
pub const MAX_IMAGE_SIZE: u64 = 1 << 46;

/// Refuses a virtual size over [`MAX_IMAGE_SIZE`].
pub(crate) fn check_image_size(path: &Path, size: u64) -> Result<(), StoreError> {
    if size > MAX_IMAGE_SIZE {
        return Err(StoreError::BadSource {
            path: path.to_path_buf(),
            why: format!("size {size} is more than the largest image (64 TiB)"),
        });
    }
    Ok(())
}

pub fn open_image(path: &Path) -> Result<Box<dyn ImageSource>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NoSuchFile(path.to_path_buf()))
        }
        Err(e) => return Err(StoreError::io("open", path)(e)),
    };
    let meta = file.metadata().map_err(StoreError::io("stat", path))?;
    if meta.is_dir() {
        return Err(StoreError::BadSource {
            path: path.to_path_buf(),
            why: "is a directory".to_string(),
        });
    }
    let mut magic = [0u8; 4];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(StoreError::io("read", path))?;
    if n == 4 && magic == *b"QFI\xfb" {
        return Ok(Box::new(Qcow2::open(path, file)?));
    }
    // block devices report size 0 in metadata; seek to the end instead
    let size = if meta.is_file() {
        meta.len()
    } else {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        u64::try_from(end).unwrap_or(0)
    };
    check_image_size(path, size)?;
    Ok(Box::new(Raw {
        path: path.to_path_buf(),
        file,
        size,
    }))
}

struct Raw {
    path: PathBuf,
    file: File,
    size: u64,
}

impl ImageSource for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(StoreError::io("read", &self.path))?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> Result<bool, StoreError> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(false);
        };
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data past offset; anything else: SEEK_DATA unsupported, read it
            return Ok(std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO));
        }
        Ok(data as u64 >= offset.saturating_add(len))
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn data_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let Some(data) = seek(&self.file, pos, libc::SEEK_DATA) else {
                // ENXIO: only holes from here; other errors: no hole support, read it all
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    out.push((pos, end));
                }
                break;
            };
            if data >= end {
                break;
            }
            let hole = seek(&self.file, data, libc::SEEK_HOLE)
                .unwrap_or(end)
                .min(end);
            out.push((data, hole.max(data + 1)));
            pos = hole.max(data + 1);
        }
        Ok(out)
    }
}
