//! Kernel page-cache invalidation, sent from dedicated threads. Invariant: no request-serving
//! thread ever sends a notification (the kernel may wait, inside `inval_inode`, on pages that an
//! in-flight read holds locked, and that read needs a worker to finish). A job is split across
//! the threads (each range costs a syscall and a page-cache walk) and waited for as a whole.

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

/// Sends invalidations to the invalidation thread.
#[derive(Debug, Clone)]
pub struct Invalidator {
    tx: Sender<Job>,
}

/// Sends the notification itself (the fuser notifier, behind the adapter's seam).
pub trait Notify: Send + 'static {
    /// Drops the kernel's cached pages of `ino` in `offset..offset+len`.
    fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> std::io::Result<()>;
}

impl Notify for fuser::Notifier {
    fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> std::io::Result<()> {
        fuser::Notifier::inval_inode(self, ino, offset, len)
    }
}

/// Threads sending notifications.
const THREADS: usize = 2;

impl Invalidator {
    /// Starts the invalidation threads over `notifier`.
    pub fn start(notifier: impl Notify + Clone) -> std::io::Result<Invalidator> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
        for n in 0..THREADS {
            let (rx, notifier) = (rx.clone(), notifier.clone());
            std::thread::Builder::new()
                .name(format!("fuse-inval-{n}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let t = Instant::now();
                        for r in &job.ranges {
                            let (Ok(off), Ok(len)) =
                                (i64::try_from(r.offset), i64::try_from(r.len))
                            else {
                                continue;
                            };
                            // ENOENT: the kernel holds nothing of this inode; nothing to drop.
                            if let Err(e) = notifier.inval_inode(job.ino, off, len) {
                                if e.raw_os_error() != Some(libc::ENOENT) {
                                    tracing::warn!(ino = job.ino, error = %e, "inval_inode failed");
                                }
                            }
                        }
                        let _ = job.done.send(t.elapsed());
                    }
                })?;
        }
        Ok(Invalidator { tx })
    }

    /// Invalidates `ranges` of `ino` and waits (up to `timeout`) until the kernel has them;
    /// returns the time spent, or `None` if it did not finish in time.
    pub fn invalidate(&self, ino: u64, ranges: Vec<Range>, timeout: Duration) -> Option<Duration> {
        if ranges.is_empty() {
            return Some(Duration::ZERO);
        }
        let t = Instant::now();
        let per = ranges.len().div_ceil(THREADS);
        let (done, wait) = bounded(THREADS);
        let mut parts = 0;
        for chunk in ranges.chunks(per) {
            let job = Job {
                ino,
                ranges: chunk.to_vec(),
                done: done.clone(),
            };
            self.tx.send(job).ok()?;
            parts += 1;
        }
        let deadline = t + timeout;
        for _ in 0..parts {
            wait.recv_deadline(deadline).ok()?;
        }
        Some(t.elapsed())
    }
}
