//! The store-wide free-space reserve: below it, writes that grow the store with new data
//! (instance writes, imports, applied bundles) fail with "no space", while metadata commits,
//! substitutions, rollbacks and gc go on, so a guest that fills the disk cannot stop the
//! store from recording what it already holds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::StoreError;

/// How long a free-space reading is trusted (one statvfs per this, not per write).
const FRESH: Duration = Duration::from_millis(20);
/// The default reserve: the smaller of this and `DEFAULT_PCT` of the filesystem.
const DEFAULT_MAX: u64 = 1 << 30;
const DEFAULT_PCT: u64 = 5;

/// Free bytes and total bytes of the filesystem holding `dir`.
pub fn fs_space(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the zeroed struct we own from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers are valid for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// The default reserve for a filesystem of `total` bytes.
pub fn default_reserve(total: u64) -> u64 {
    DEFAULT_MAX.min(total / 100 * DEFAULT_PCT)
}

/// A reserve of free space on the store's filesystem.
#[derive(Debug)]
pub(crate) struct Reserve {
    dir: PathBuf,
    bytes: AtomicU64,
    /// The last reading: when, and the free bytes then.
    last: Mutex<Option<(Instant, u64)>>,
}

impl Reserve {
    /// The default reserve for the filesystem of `dir` (none if it cannot be read).
    pub(crate) fn new(dir: PathBuf) -> Reserve {
        let bytes = fs_space(&dir).map_or(0, |(_, total)| default_reserve(total));
        Reserve {
            dir,
            bytes: AtomicU64::new(bytes),
            last: Mutex::new(None),
        }
    }

    pub(crate) fn set(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Fails when writing `need` more bytes would leave less than the reserve free.
    pub(crate) fn check(&self, need: u64) -> Result<(), StoreError> {
        let reserve = self.bytes();
        if reserve == 0 {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let free = match *last {
            Some((at, free)) if at.elapsed() < FRESH => free,
            _ => {
                let free = fs_space(&self.dir)
                    .map(|(free, _)| free)
                    .map_err(StoreError::io("statvfs", &self.dir))?;
                *last = Some((Instant::now(), free));
                free
            }
        };
        if free < reserve.saturating_add(need) {
            return Err(StoreError::NoSpace { free, reserve });
        }
        // Count what this write takes until the next reading.
        if let Some((_, f)) = last.as_mut() {
            *f = f.saturating_sub(need);
        }
        Ok(())
    }
}
