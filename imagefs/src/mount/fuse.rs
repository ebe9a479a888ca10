//! The fuser 0.15 adapter, and the only file that knows fuser's request API: each method calls
//! a `Model` method and replies. Invariant: no storage logic here; data requests (read, write,
//! fsync, fallocate) run on a worker pool so the session thread keeps reading requests, and
//! every request gets exactly one reply.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

use super::model::{Attr, Errno, Kind, Model};

/// Largest read and write the kernel is asked to send in one request.
pub const MAX_IO: u32 = 1 << 20;
/// FOPEN_KEEP_CACHE: keep the page cache across opens (we invalidate precisely instead).
const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// How long the kernel may cache attributes and entries.
const TTL: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads serving data requests.
#[derive(Debug, Clone)]
pub struct Pool {
    tx: Sender<Job>,
}

impl Pool {
    /// Starts `threads` workers; they exit when every `Pool` clone is dropped.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("fuse-worker-{n}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })?;
        }
        Ok(Pool { tx })
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(crossbeam_channel::SendError(job)) = self.tx.send(Box::new(job)) {
            // No workers left (shutting down): serve inline rather than drop the reply.
            job();
        }
    }
}

/// The filesystem handed to fuser.
#[derive(Debug)]
pub struct FuseFs {
    model: Arc<Model>,
    pool: Pool,
    uid: u32,
    gid: u32,
}

impl FuseFs {
    /// Serves `model`, data requests on `pool`.
    pub fn new(model: Arc<Model>, pool: Pool) -> FuseFs {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseFs {
            model,
            pool,
            uid,
            gid,
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        to_file_attr(a, self.uid, self.gid)
    }
}

fn to_file_attr(a: &Attr, uid: u32, gid: u32) -> FileAttr {
    FileAttr {
        ino: a.ino,
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
    fn sync_on_worker(&self, fh: u64, reply: ReplyEmpty) {
        let model = self.model.clone();
        let h = match model.handle(fh) {
            Ok(h) => h,
            Err(Errno(e)) => return reply.error(e),
        };
        self.pool.run(move || match model.fsync(&h) {
            Ok(()) => reply.ok(),
            Err(Errno(e)) => reply.error(e),
        });
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // The kernel may cap these lower; the nearest allowed value is fine.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(libc::ENOENT);
        };
        match self.model.lookup(parent, name) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), 0),
            Err(Errno(e)) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.model.getattr(ino) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(Errno(e)) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        match self.model.setattr(ino, size) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(Errno(e)) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        match self.model.open(ino, flags) {
            Ok((fh, keep)) => reply.opened(fh, if keep { FOPEN_KEEP_CACHE } else { 0 }),
            Err(Errno(e)) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let model = self.model.clone();
        let h = match model.handle(fh) {
            Ok(h) => h,
            Err(Errno(e)) => return reply.error(e),
        };
        self.pool.run(move || match model.read(&h, offset, size) {
            Ok(data) => reply.data(&data),
            Err(Errno(e)) => reply.error(e),
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let model = self.model.clone();
        let h = match model.handle(fh) {
            Ok(h) => h,
            Err(Errno(e)) => return reply.error(e),
        };
        // fuser reuses its request buffer, so the data is copied before leaving this thread.
        let data = data.to_vec();
        self.pool.run(move || match model.write(&h, offset, &data) {
            Ok(n) => reply.written(n),
            Err(Errno(e)) => reply.error(e),
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _lo: u64, reply: ReplyEmpty) {
        self.sync_on_worker(fh, reply);
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _ds: bool, reply: ReplyEmpty) {
        self.sync_on_worker(fh, reply);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model.release(fh);
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model.readdir(ino) {
            Ok(e) => e,
            Err(Errno(e)) => return reply.error(e),
        };
        let skip = usize::try_from(offset).unwrap_or(0);
        for (i, e) in entries.iter().enumerate().skip(skip) {
            let next = i64::try_from(i + 1).unwrap_or(i64::MAX);
            if reply.add(e.ino, next, kind(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let model = self.model.clone();
        let h = match model.handle(fh) {
            Ok(h) => h,
            Err(Errno(e)) => return reply.error(e),
        };
        self.pool
            .run(move || match model.fallocate(&h, offset, length, mode) {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => reply.error(e),
            });
    }
}
