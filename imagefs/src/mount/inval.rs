//! Kernel page-cache invalidation, sent from threads that never serve FUSE requests. Invariant:
//! no request-serving thread ever sends a notification (the kernel may wait, inside
//! `inval_inode`, on pages that an in-flight read holds locked, and that read needs a worker to
//! finish). A job is split between the calling thread (a control-socket command) and a helper
//! thread, and waited for as a whole: each range costs a syscall and a page-cache walk, and the
//! caller working itself saves a wake-up and a hand-back on a loaded host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use imagefs_store::instance::Range;

/// One invalidation: these byte ranges of this inode.
#[derive(Debug)]
struct Job {
    ino: u64,
    ranges: Vec<Range>,
    done: Sender<Duration>,
}

/// Sends invalidations: a share on the calling thread, the rest on helper threads.
#[derive(Clone)]
pub struct Invalidator {
    tx: Sender<Job>,
    /// What the calling thread sends its share through.
    own: Arc<dyn Notify>,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator").finish_non_exhaustive()
    }
}

/// Sends the notification itself (the fuser notifier, behind the adapter's seam).
pub trait Notify: Send + Sync + 'static {
    /// Drops the kernel's cached pages of `ino` in `offset..offset+len`.
    fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> std::io::Result<()>;
    /// Drops the kernel's cached entry `name` of directory `parent`.
    fn inval_entry(&self, parent: u64, name: &str) -> std::io::Result<()>;
}

impl Notify for fuser::Notifier {
    fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> std::io::Result<()> {
        fuser::Notifier::inval_inode(self, fuser::INodeNo(ino), offset, len)
    }

    fn inval_entry(&self, parent: u64, name: &str) -> std::io::Result<()> {
        fuser::Notifier::inval_entry(self, fuser::INodeNo(parent), std::ffi::OsStr::new(name))
    }
}

/// Helper threads; with the calling thread, jobs are split in `HELPERS + 1` parts. More parts
/// than cores only contend: every part takes the same inode's page-cache locks per page.
const HELPERS: usize = 1;

impl Invalidator {
    /// Starts the helper threads over `notifier` (callers send their share through a clone).
    pub fn start(notifier: impl Notify + Clone) -> std::io::Result<Invalidator> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
        for n in 0..HELPERS {
            let (rx, notifier) = (rx.clone(), notifier.clone());
            std::thread::Builder::new()
                .name(format!("fuse-inval-{n}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let t = Instant::now();
                        send_all(&notifier, job.ino, &job.ranges);
                        let _ = job.done.send(t.elapsed());
                    }
                })?;
        }
        Ok(Invalidator {
            tx,
            own: Arc::new(notifier),
        })
    }

    /// Invalidates `ranges` of `ino` and waits (up to `timeout` for the helpers' parts) until the
    /// kernel has them; returns the time spent, or `None` if it did not finish in time. The
    /// calling thread sends a part itself, so it must not be a FUSE request-serving thread.
    pub fn invalidate(&self, ino: u64, ranges: Vec<Range>, timeout: Duration) -> Option<Duration> {
        if ranges.is_empty() {
            return Some(Duration::ZERO);
        }
        let t = Instant::now();
        let per = ranges.len().div_ceil(HELPERS + 1);
        let mut chunks = ranges.chunks(per);
        let mine = chunks.next().unwrap_or_default();
        let (done, wait) = bounded(HELPERS);
        let mut parts = 0;
        for chunk in chunks {
            let job = Job {
                ino,
                ranges: chunk.to_vec(),
                done: done.clone(),
            };
            self.tx.send(job).ok()?;
            parts += 1;
        }
        send_all(self.own.as_ref(), ino, mine);
        let deadline = t + timeout;
        for _ in 0..parts {
            wait.recv_deadline(deadline).ok()?;
        }
        Some(t.elapsed())
    }
}

impl Invalidator {
    /// Drops directory entries from the kernel's cache, on the calling thread (which, as for
    /// `invalidate`, must not serve FUSE requests).
    pub fn invalidate_entries(&self, entries: &[(u64, String)]) {
        for (parent, name) in entries {
            // ENOENT: the kernel holds no such entry; nothing to drop.
            if let Err(e) = self.own.inval_entry(*parent, name) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::warn!(parent, name, error = %e, "inval_entry failed");
                }
            }
        }
    }
}

/// Sends one notification per range, in order. Ranges come merged where adjacent; ranges with
/// a gap are not joined: measured here, a call costs ~1 us but each cached page it drops
/// ~0.5 us (order-0 folios, a lock round per page), so joining pays only for gaps of a page or
/// two that are not cached, and over-dropping a cached gap costs its re-read too.
fn send_all(notifier: &(impl Notify + ?Sized), ino: u64, ranges: &[Range]) {
    for r in ranges {
        let (Ok(off), Ok(len)) = (i64::try_from(r.offset), i64::try_from(r.len)) else {
            continue;
        };
        // ENOENT: the kernel holds nothing of this inode; nothing to drop.
        if let Err(e) = notifier.inval_inode(ino, off, len) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(ino, error = %e, "inval_inode failed");
            }
        }
        imagefs_store::fault::point("substitute.invalidating");
    }
}
