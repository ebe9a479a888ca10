//! The fuser 0.18 adapter, and the only file that knows fuser's request API: each method calls
//! a `Model` method and replies. Invariant: no storage logic here; the session runs several
//! threads, each on its own clone of /dev/fuse; reads and writes are answered on them, requests
//! that wait on the disk (flush, fsync, fallocate) on a worker pool, and every request gets
//! exactly one reply. It also holds the kernel's backing ids of passthrough
//! opens (a fuser type): one per (inode, version) while any open uses it.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, BsdFileFlags, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use imagefs_store::VersionId;

use super::model::{Attr, Errno, Handle, Kind, Model, Node, OpenMode};
use crate::metrics;

/// Largest read and write the kernel is asked to send in one request.
pub const MAX_IO: u32 = 1 << 20;
/// How long the kernel may cache attributes and entries.
const TTL: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Each session thread's read buffer, grown to the largest read seen (at most MAX_IO).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The pool's queue. A plain mutex and condvar: idle workers sleep at once, where a spinning
/// channel had them call sched_yield about 5 times per request (strace of a cold 1 GiB read:
/// 46k yields for 8k requests), CPU a 2-core host (or an emulated one) needs for the reads.
#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Cleared when the last `Pool` handle goes: workers finish the queue and exit.
    closed: bool,
}

/// Closes the queue when the last `Pool` clone is dropped.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.0.ready.notify_all();
    }
}

/// A fixed pool of threads serving data requests.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts `threads` workers; they exit when every `Pool` clone is dropped.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared::default());
        for n in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("fuse-worker-{n}"))
                .spawn(move || worker(&shared))?;
        }
        Ok(Pool {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
        })
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            drop(q);
            // No workers left (shutting down): serve inline rather than drop the reply.
            job();
            return;
        }
        q.jobs.push_back(Box::new(job));
        drop(q);
        self.shared.ready.notify_one();
    }
}

fn worker(shared: &Shared) {
    loop {
        let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let job = loop {
            if let Some(job) = q.jobs.pop_front() {
                break job;
            }
            if q.closed {
                return;
            }
            q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        };
        drop(q);
        job();
    }
}

/// Backing ids of passthrough opens. The kernel wants one id per inode for all its opens; an
/// id lives while a handle holds it, and is keyed by version too, so a tag that moved never
/// reuses its old version's id.
#[derive(Debug, Default)]
struct Backings {
    by_file: HashMap<(u64, VersionId), Weak<BackingId>>,
    by_fh: HashMap<u64, Arc<BackingId>>,
}

/// The filesystem handed to fuser.
#[derive(Debug)]
pub struct FuseFs {
    model: Arc<Model>,
    pool: Pool,
    uid: u32,
    gid: u32,
    backings: Mutex<Backings>,
}

impl FuseFs {
    /// Serves `model`, data requests on `pool`.
    pub fn new(model: Arc<Model>, pool: Pool) -> FuseFs {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // The store's group, when it has one, reads the files through their group bits.
        let gid = model.access().group.unwrap_or(gid);
        FuseFs {
            model,
            pool,
            uid,
            gid,
            backings: Mutex::new(Backings::default()),
        }
    }

    /// The backing id of `file` for `ino`, registered with the kernel on first use.
    fn backing(
        &self,
        reply: &ReplyOpen,
        ino: u64,
        version: VersionId,
        file: &std::fs::File,
        fh: u64,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        let id = match b.by_file.get(&(ino, version)).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let id = Arc::new(reply.open_backing(file)?);
                b.by_file.retain(|_, w| w.strong_count() > 0);
                b.by_file.insert((ino, version), Arc::downgrade(&id));
                id
            }
        };
        b.by_fh.insert(fh, id.clone());
        Ok(id)
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        to_file_attr(a, self.uid, self.gid)
    }
}

fn to_file_attr(a: &Attr, uid: u32, gid: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid,
        gid,
        rdev: 0,
        // Readers that size their reads by st_blksize (cat, cp, stdio) then ask for MAX_IO at a
        // time: fewer syscalls on the warm path, whole-request reads on the cold one.
        blksize: MAX_IO,
        flags: 0,
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

impl FuseFs {
    /// flush and fsync both make the handle's writes durable, on a worker thread.
    fn sync_on_worker(&self, fh: FileHandle, reply: ReplyEmpty) {
        let model = self.model.clone();
        let h = match model.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return reply.error(errno(e)),
        };
        self.pool.run(move || match model.fsync(&h) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        });
    }
}

fn errno(Errno(e): Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e)
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel may cap these lower; the nearest allowed value is fine.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(128);
        // O_DIRECT reads and writes from io_uring or libaio stay in flight together (QEMU's
        // cache=none at queue depth), instead of one at a time per submitting thread.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::warn!(
                "the kernel offers no FUSE_ASYNC_DIO: O_DIRECT requests go one at a time"
            );
        }
        // Passthrough lets version files read at the backing file's speed (its large folios);
        // stack depth 1: our copies live on a plain local filesystem.
        if self.model.flat().is_some() {
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !granted {
                tracing::warn!(
                    "the kernel offers no FUSE passthrough: version files are served by the daemon"
                );
            }
            self.model.set_passthrough(granted);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(fuser::Errno::ENOENT);
        };
        match self.model.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.model.setattr(ino.0, size) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fh, mode) = match self.model.open(ino.0, flags.0) {
            Ok(opened) => opened,
            Err(e) => return reply.error(errno(e)),
        };
        metrics::opened(matches!(mode, OpenMode::Passthrough { .. }));
        match mode {
            OpenMode::Cached => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            OpenMode::Passthrough { version, file } => {
                match self.backing(&reply, ino.0, version, &file, fh) {
                    Ok(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
                    Err(e) => {
                        tracing::warn!(error = %e, "the kernel refused a passthrough backing file: version files are served by the daemon from now on");
                        self.model.passthrough_refused(fh);
                        reply.opened(FileHandle(fh), FopenFlags::empty());
                    }
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Served on this session thread: each of the session's threads reads its own clone of
        // /dev/fuse, so a hand-off to another thread would only add a wake-up per request.
        let h = match self.model.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return reply.error(errno(e)),
        };
        let t = metrics::start();
        let n = READ_BUF.with_borrow_mut(|buf| {
            let want = (size as usize).min(MAX_IO as usize);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.model.read_into(&h, offset, &mut buf[..want]) {
                Ok(n) => {
                    reply.data(&buf[..n]);
                    Some(n)
                }
                Err(e) => {
                    reply.error(errno(e));
                    None
                }
            }
        });
        metrics::read(t, fh.0, || file_label(self.model.node_of(ino.0), &h), n);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // On this session thread, as read: writes go to the page cache of the instance's data
        // file; only flush, fsync and fallocate wait on the disk, and those go to the pool.
        let h = match self.model.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return reply.error(errno(e)),
        };
        let n = match self.model.write(&h, offset, data) {
            Ok(n) => {
                reply.written(n);
                Some(n as usize)
            }
            Err(e) => {
                reply.error(errno(e));
                None
            }
        };
        metrics::write(fh.0, || file_label(self.model.node_of(ino.0), &h), n);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.sync_on_worker(fh, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync_on_worker(fh, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model.release(fh.0);
        // The last handle of a backing id drops it, and with it the kernel's reference.
        self.backings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_fh
            .remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, kind(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS: the kernel stops asking for the life of the mount (no extended attributes).
        reply.error(fuser::Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let model = self.model.clone();
        let h = match model.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return reply.error(errno(e)),
        };
        self.pool
            .run(move || match model.fallocate(&h, offset, length, mode) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            });
    }
}

/// The `kind` and `file` labels of an open file: the instance's name; a version as the mount
/// shows it (NAME:TAG through images/, its id through versions/). Made once per open file and
/// session thread (metrics.rs caches its counters), never per read.
fn file_label(node: Option<Node>, h: &Handle) -> (metrics::Kind, String) {
    match (node, h) {
        (Some(Node::Tagged(name, tag, _)), _) => (metrics::Kind::Version, format!("{name}:{tag}")),
        (Some(Node::Instance(id)), _) => (metrics::Kind::Instance, id.to_string()),
        (_, Handle::Instance(i)) => (metrics::Kind::Instance, i.id().to_string()),
        (_, Handle::Version(v)) => (metrics::Kind::Version, v.id().to_hex()),
    }
}
