//! Disk backends behind virtio-blk. The device validates every guest request against `size()`
//! before a backend sees it, so a backend only moves bytes at in-range offsets; its errors reach
//! the guest as an I/O error status on that one request.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

/// Length of the virtio-blk device id string (VIRTIO_BLK_ID_BYTES).
pub const DEVICE_ID_BYTES: usize = 20;

/// The storage behind one virtio-blk device.
pub trait DiskBackend: Send + Sync {
    /// Fill `buf` from `offset`; a short read is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes; the guest sees `size() / 512` sectors.
    fn size(&self) -> u64;
    /// Whether the guest must not write (offered as VIRTIO_BLK_F_RO, writes fail with IOERR).
    fn read_only(&self) -> bool;
    /// The id string the guest reads with GET_ID (at most 20 bytes are used).
    fn device_id(&self) -> String;

    /// Read consecutive bytes from `offset` straight into guest memory, slice after slice.
    /// The default goes through a bounce buffer per slice; backends that can do scatter I/O
    /// into raw memory override it to avoid the copy.
    fn read_to_guest(&self, offset: u64, dst: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for slice in dst {
            let mut buf = vec![0u8; slice.len()];
            self.read_at(off, &mut buf)?;
            slice.copy_from(&buf);
            off = advance(off, slice.len())?;
        }
        Ok(())
    }

    /// Write consecutive bytes at `offset` straight from guest memory. See `read_to_guest`.
    fn write_from_guest(&self, offset: u64, src: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for slice in src {
            let mut buf = vec![0u8; slice.len()];
            slice.copy_to(&mut buf);
            self.write_at(off, &buf)?;
            off = advance(off, slice.len())?;
        }
        Ok(())
    }
}

fn advance(off: u64, len: usize) -> io::Result<u64> {
    u64::try_from(len)
        .ok()
        .and_then(|l| off.checked_add(l))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "disk offset overflows"))
}

/// Opening a disk backend failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// cannot open disk image {path}
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot find the size of disk image {path}
    #[error("cannot find the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A disk backed by a regular file (or block device): pread/pwrite, preadv/pwritev straight
/// into guest memory, fsync on flush. Its size is fixed when it is opened.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
    read_only: bool,
    id: String,
}

impl FileDisk {
    /// Open `path` for the guest; `read_only` opens it O_RDONLY and offers a read-only disk.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        // Seeking to the end gives the size of block devices too, where metadata says 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            file,
            size,
            read_only,
            id: truncate_id(&name),
        })
    }

    /// Replace the id the guest reads with GET_ID (truncated to 20 bytes).
    pub fn with_device_id(mut self, id: &str) -> Self {
        self.id = truncate_id(id);
        self
    }
}

/// Cut `id` to at most 20 bytes without splitting a character.
fn truncate_id(id: &str) -> String {
    let mut end = id.len().min(DEVICE_ID_BYTES);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id.get(..end).unwrap_or_default().to_string()
}

/// The most iovecs one preadv/pwritev call takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl FileDisk {
    /// Scatter I/O between the file and guest memory, resuming after short transfers.
    fn vectored(
        &self,
        dir: Direction,
        offset: u64,
        slices: &[VolatileSlice<'_>],
    ) -> io::Result<()> {
        // The guards keep the mappings' pointers valid for the duration of the syscalls.
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .zip(slices)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len(),
            })
            .filter(|iov| iov.iov_len > 0)
            .collect();
        let mut first = 0usize;
        let mut off = offset;
        while let Some(rest) = iovs.get_mut(first..) {
            if rest.is_empty() {
                break;
            }
            let count = rest.len().min(IOV_MAX);
            let pos = libc::off_t::try_from(off)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            let fd = self.file.as_raw_fd();
            // `count` fits in c_int since it is at most IOV_MAX.
            let cnt = count as libc::c_int;
            let n = match dir {
                // SAFETY: every iovec points into a live guest-memory mapping (held by `guards`)
                // of exactly iov_len bytes; the kernel writes only within them.
                Direction::Read => unsafe { libc::preadv(fd, rest.as_ptr(), cnt, pos) },
                // SAFETY: as above; the kernel only reads the iovecs' memory.
                Direction::Write => unsafe { libc::pwritev(fd, rest.as_ptr(), cnt, pos) },
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "disk file ended before the request",
                ));
            }
            // n > 0 and at most the iovecs' total, which is a usize.
            let mut done = n as usize;
            off = advance(off, done)?;
            for iov in rest.iter_mut() {
                if done == 0 {
                    break;
                }
                if done >= iov.iov_len {
                    done -= iov.iov_len;
                    iov.iov_len = 0;
                    first += 1;
                } else {
                    // SAFETY: done < iov_len, so the new base stays inside the same slice.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                    iov.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }
}

impl DiskBackend for FileDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn device_id(&self) -> String {
        self.id.clone()
    }

    fn read_to_guest(&self, offset: u64, dst: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.vectored(Direction::Read, offset, dst)
    }

    fn write_from_guest(&self, offset: u64, src: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.vectored(Direction::Write, offset, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

    fn disk_with(bytes: &[u8], ro: bool) -> (tempfile::TempDir, FileDisk) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a-rather-long-disk-name.raw");
        std::fs::write(&path, bytes).unwrap();
        let disk = FileDisk::open(&path, ro).unwrap();
        (dir, disk)
    }

    #[test]
    fn id_is_the_file_name_cut_to_20_bytes() {
        let (_d, disk) = disk_with(&[0; 512], true);
        assert_eq!(disk.device_id(), "a-rather-long-disk-n");
        assert_eq!(truncate_id("ééééééééééé"), "éééééééééé");
    }

    #[test]
    fn missing_file_is_an_open_error_naming_the_path() {
        let err = FileDisk::open(Path::new("/nonexistent/disk.raw"), false).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/disk.raw"));
    }

    #[test]
    fn vectored_io_crosses_slices_and_matches_bounce_path() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let (_d, disk) = disk_with(&data, false);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let slices: Vec<_> = [(0x1000u64, 100usize), (0x3000, 3000), (0x8000, 1000)]
            .iter()
            .map(|&(a, l)| {
                mem.get_slices(GuestAddress(a), l, Permissions::Write)
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap()
            })
            .collect();
        disk.read_to_guest(512, &slices).unwrap();
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got, data[512..612]);
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got, data[3612..4612]);
        // Write the same bytes back shifted by one sector and compare through read_at.
        disk.write_from_guest(4096, &slices).unwrap();
        let mut back = vec![0u8; 4100];
        disk.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data[512..4612]);
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let (_d, disk) = disk_with(&[1; 1024], true);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let s = mem
            .get_slices(GuestAddress(0), 1024, Permissions::Write)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert!(disk.read_to_guest(512, &[s]).is_err());
    }
}
