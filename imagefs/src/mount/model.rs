//! The mount's namespace and file model, with no FUSE types: inodes for
//! images/NAME/TAG.raw, versions/ID.raw and instances/ID.raw, open handles, and each operation
//! as a method returning `Result<_, Errno>`. Invariants: an inode number names one node for the
//! life of the mount (never reused); version files are read-only (EROFS on any write); every
//! byte served comes from the store through one version or one instance view, or, for a
//! version file in passthrough, from that version's flat copy (which the store built from it).
//!
//! How each open is served (`OpenMode`) follows the kernel's rule that one inode is either in
//! cached mode or in passthrough to one backing file at a time (any other open fails, EIO): an
//! inode with cached opens stays cached, one in passthrough stays on its copy. Every file
//! inode's bytes are fixed (a moved tag is a new inode), so one backing file always fits.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use imagefs_store::flat::FlatCache;
use imagefs_store::instance::{Instance, InstanceError, InstanceId, Instances};
use imagefs_store::{ErrorKind, ImageName, Store, StoreError, Tag, Version, VersionId};

/// An errno for the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn from_kind(kind: ErrorKind) -> Errno {
        Errno(match kind {
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::BadInput => libc::EINVAL,
            ErrorKind::Busy | ErrorKind::Conflict => libc::EBUSY,
            _ => libc::EIO,
        })
    }
}

impl From<StoreError> for Errno {
    fn from(e: StoreError) -> Errno {
        if e.kind() == ErrorKind::Corrupt {
            tracing::error!(error = %e, "corrupt data: answering EIO");
            crate::metrics::integrity_error();
        }
        Errno::from_kind(e.kind())
    }
}

impl From<InstanceError> for Errno {
    fn from(e: InstanceError) -> Errno {
        match e {
            InstanceError::PastEnd { .. }
            | InstanceError::NoSpace { .. }
            | InstanceError::Store(StoreError::NoSpace { .. }) => Errno(libc::ENOSPC),
            e => {
                if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io) {
                    tracing::error!(error = %e, "instance I/O failed: answering EIO");
                }
                if e.kind() == ErrorKind::Corrupt {
                    crate::metrics::integrity_error();
                }
                Errno::from_kind(e.kind())
            }
        }
    }
}

/// Bytes of a version served by the daemon after which it gets a flat copy (or half the
/// version, if smaller).
const BULK_READ: u64 = 64 << 20;

/// Inodes of the fixed directories.
pub const ROOT_INO: u64 = 1;
const IMAGES_INO: u64 = 2;
const VERSIONS_INO: u64 = 3;
const INSTANCES_INO: u64 = 4;
const FIRST_DYNAMIC_INO: u64 = 16;

/// A node of the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// The mount root.
    Root,
    /// `images/`.
    Images,
    /// `versions/`.
    Versions,
    /// `instances/`.
    InstancesDir,
    /// `images/NAME/`.
    Image(ImageName),
    /// `images/NAME/TAG.raw` as it was while the tag named this version: one inode per
    /// (tag, version), so a file's bytes never change under its inode. Moving a tag is, to the
    /// kernel, a new file renamed over the name; open files keep the old one.
    Tagged(ImageName, Tag, VersionId),
    /// `versions/ID.raw`.
    Version(VersionId),
    /// `instances/ID.raw`.
    Instance(InstanceId),
}

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
}

/// Attributes of a node, FUSE-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated (non-hole blocks).
    pub blocks: u64,
    /// Permission bits.
    pub perm: u16,
    /// Modification time.
    pub mtime: SystemTime,
    /// Link count.
    pub nlink: u32,
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: Kind,
    /// Name.
    pub name: String,
}

/// What an open file reads from (resolved when a request arrives, so a later release cannot
/// pull it from under a queued request).
#[derive(Debug, Clone)]
pub enum Handle {
    /// A version (or tag) file.
    Version(Arc<Version>),
    /// An instance file.
    Instance(Arc<Instance>),
}

/// How the kernel serves an open file.
#[derive(Debug, Clone)]
pub enum OpenMode {
    /// Through the daemon, with the kernel's page cache kept across opens: a file inode's bytes
    /// never change, except an instance's, whose changed ranges substitution invalidates.
    Cached,
    /// Straight from `version`'s flat copy `file` (FUSE passthrough): the daemon sees no reads.
    Passthrough {
        /// The version whose bytes `file` holds.
        version: VersionId,
        /// Its flat copy.
        file: Arc<File>,
    },
}

/// Which of the kernel's I/O modes an open handle holds on its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    Cached,
    Passthrough,
}

/// One inode's open handles per I/O mode.
#[derive(Debug, Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    /// The copy the inode is passed through to while `passthrough > 0`.
    backing: Option<(VersionId, Arc<File>)>,
}

#[derive(Debug, Default)]
struct IoState {
    inodes: HashMap<u64, InodeIo>,
    /// fh -> (inode, mode), for release.
    handles: HashMap<u64, (u64, IoKind)>,
}

#[derive(Debug, Default)]
struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_node: HashMap<Node, u64>,
    next: u64,
}

/// The mount's model over one store.
#[derive(Debug)]
pub struct Model {
    store: Arc<Store>,
    instances: Arc<Instances>,
    inodes: RwLock<Inodes>,
    handles: RwLock<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Non-hole block count per version, computed once (versions are immutable).
    allocated: Mutex<HashMap<VersionId, u64>>,
    /// Last write time of each instance since the mount.
    written: Mutex<HashMap<InstanceId, SystemTime>>,
    started: SystemTime,
    /// Flat copies of versions, for passthrough (None: every read goes through the daemon).
    flat: Option<Arc<FlatCache>>,
    /// Whether the kernel accepted passthrough at init (and it has not failed since).
    passthrough: AtomicBool,
    /// Tag inodes whose name already leads elsewhere (reported once by `moved_tags`).
    stale_tags: Mutex<HashSet<u64>>,
    /// Bytes the daemon has served per version without a flat copy (to ask for one).
    served: Mutex<HashMap<VersionId, u64>>,
    io: Mutex<IoState>,
    /// Who may read the files: the store's owner, and its group if it has one.
    access: imagefs_store::access::Access,
}

fn secs(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)
}

fn enoent() -> Errno {
    Errno(libc::ENOENT)
}

impl Model {
    /// A model serving `store` and its `instances`.
    pub fn new(store: Arc<Store>, instances: Arc<Instances>) -> Model {
        let fixed = [
            (ROOT_INO, Node::Root),
            (IMAGES_INO, Node::Images),
            (VERSIONS_INO, Node::Versions),
            (INSTANCES_INO, Node::InstancesDir),
        ];
        let mut inodes = Inodes {
            next: FIRST_DYNAMIC_INO,
            ..Inodes::default()
        };
        for (ino, node) in fixed {
            inodes.by_ino.insert(ino, node.clone());
            inodes.by_node.insert(node, ino);
        }
        Model {
            store,
            instances,
            inodes: RwLock::new(inodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            allocated: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            started: SystemTime::now(),
            flat: None,
            passthrough: AtomicBool::new(false),
            stale_tags: Mutex::new(HashSet::new()),
            served: Mutex::new(HashMap::new()),
            io: Mutex::new(IoState::default()),
            access: imagefs_store::access::Access::default(),
        }
    }

    /// Grants `access`'s group read access to the mount's files (owner-only without one).
    pub fn with_access(mut self, access: imagefs_store::access::Access) -> Model {
        self.access = access;
        self
    }

    /// Who may read the mount's files.
    pub fn access(&self) -> imagefs_store::access::Access {
        self.access
    }

    /// Serves version files from `flat` copies once the kernel allows passthrough.
    pub fn with_flat(mut self, flat: Arc<FlatCache>) -> Model {
        self.flat = Some(flat);
        self
    }

    /// The flat-copy cache, if the mount has one.
    pub fn flat(&self) -> Option<&Arc<FlatCache>> {
        self.flat.as_ref()
    }

    /// Called at FUSE init: whether the kernel granted passthrough.
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    /// Whether new version opens may be passed through.
    pub fn passthrough(&self) -> bool {
        self.flat.is_some() && self.passthrough.load(Ordering::Relaxed)
    }

    /// The inode of `node`, allocated on first use.
    pub fn ino(&self, node: &Node) -> u64 {
        if let Some(&ino) = self
            .inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_node
            .get(node)
        {
            return ino;
        }
        let mut t = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&ino) = t.by_node.get(node) {
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.by_ino.insert(ino, node.clone());
        t.by_node.insert(node.clone(), ino);
        ino
    }

    /// The inode of an instance file if the kernel may know it (for cache invalidation).
    pub fn known_instance_ino(&self, id: &InstanceId) -> Option<u64> {
        self.inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_node
            .get(&Node::Instance(id.clone()))
            .copied()
    }

    /// The node of `ino`, if known (metrics label files as the mount shows them).
    pub fn node_of(&self, ino: u64) -> Option<Node> {
        self.node(ino).ok()
    }

    fn node(&self, ino: u64) -> Result<Node, Errno> {
        self.inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_ino
            .get(&ino)
            .cloned()
            .ok_or_else(enoent)
    }

    fn allocated_blocks(&self, v: &Version) -> u64 {
        let id = v.id();
        let mut cache = self.allocated.lock().unwrap_or_else(|p| p.into_inner());
        *cache.entry(id).or_insert_with(|| {
            (0..v.block_count())
                .filter(|&i| !matches!(v.block_hash(i), Ok(None)))
                .count() as u64
        })
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            blocks: 0,
            perm: self.access.mode(false, true) as u16,
            mtime: self.started,
            nlink: 2,
        }
    }

    fn version_attr(&self, ino: u64, v: &Version) -> Attr {
        let blocks = self.allocated_blocks(v) * u64::from(v.block_size()) / 512;
        Attr {
            ino,
            kind: Kind::File,
            size: v.size(),
            blocks,
            perm: self.access.mode(false, false) as u16,
            mtime: secs(v.created()),
            nlink: 1,
        }
    }

    fn instance_attr(&self, ino: u64, inst: &Instance) -> Attr {
        let view = inst.view();
        let base = view.base();
        let mut count = self.allocated_blocks(base);
        for (i, holds) in view.written() {
            match (!matches!(base.block_hash(i), Ok(None)), holds) {
                (false, true) => count += 1,
                (true, false) => count = count.saturating_sub(1),
                _ => {}
            }
        }
        let mtime = self
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(inst.id())
            .copied()
            .unwrap_or_else(|| secs(base.created()));
        Attr {
            ino,
            kind: Kind::File,
            size: base.size(),
            blocks: count * u64::from(base.block_size()) / 512,
            perm: self.access.mode(true, false) as u16,
            mtime,
            nlink: 1,
        }
    }

    fn resolve_tag(&self, name: &ImageName, tag: &Tag) -> Result<Version, Errno> {
        let id = self.store.resolve(&format!("{name}:{tag}"))?;
        Ok(self.store.version(&id)?)
    }

    fn instance(&self, id: &InstanceId) -> Result<Arc<Instance>, Errno> {
        Ok(self.instances.get(&self.store, id)?)
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        match self.node(ino)? {
            Node::Root | Node::Images | Node::Versions | Node::InstancesDir | Node::Image(_) => {
                Ok(self.dir_attr(ino))
            }
            Node::Tagged(_, _, id) => Ok(self.version_attr(ino, &self.store.version(&id)?)),
            Node::Version(id) => Ok(self.version_attr(ino, &self.store.version(&id)?)),
            Node::Instance(id) => Ok(self.instance_attr(ino, &*self.instance(&id)?)),
        }
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, Errno> {
        let node = match self.node(parent)? {
            Node::Root => match name {
                "images" => Node::Images,
                "versions" => Node::Versions,
                "instances" => Node::InstancesDir,
                _ => return Err(enoent()),
            },
            Node::Images => {
                let image = ImageName::new(name).map_err(|_| enoent())?;
                if self.store.image_block_size(&image)?.is_none() {
                    return Err(enoent());
                }
                Node::Image(image)
            }
            Node::Image(image) => {
                let tag = name.strip_suffix(".raw").ok_or_else(enoent)?;
                let tag = Tag::new(tag).map_err(|_| enoent())?;
                let id = self.resolve_tag(&image, &tag)?.id();
                Node::Tagged(image, tag, id)
            }
            Node::Versions => {
                let id: VersionId = name
                    .strip_suffix(".raw")
                    .ok_or_else(enoent)?
                    .parse()
                    .map_err(|_| enoent())?;
                self.store.version(&id)?;
                Node::Version(id)
            }
            Node::InstancesDir => {
                let id = name.strip_suffix(".raw").ok_or_else(enoent)?;
                let id = InstanceId::parse(id).map_err(|_| enoent())?;
                if !self.instances.exists(&id) {
                    return Err(enoent());
                }
                Node::Instance(id)
            }
            _ => return Err(Errno(libc::ENOTDIR)),
        };
        self.getattr(self.ino(&node))
    }

    /// Entries of directory `ino`, with `.` and `..`.
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let node = self.node(ino)?;
        let parent = match node {
            Node::Image(_) => IMAGES_INO,
            _ => ROOT_INO,
        };
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        let mut add = |node: Node, kind: Kind, name: String| {
            out.push(DirEntry {
                ino: self.ino(&node),
                kind,
                name,
            })
        };
        match node {
            Node::Root => {
                add(Node::Images, Kind::Dir, "images".into());
                add(Node::Versions, Kind::Dir, "versions".into());
                add(Node::InstancesDir, Kind::Dir, "instances".into());
            }
            Node::Images => {
                for image in self.store.images()? {
                    let name = image.name.to_string();
                    add(Node::Image(image.name), Kind::Dir, name);
                }
            }
            Node::Image(image) => {
                let images = self.store.images()?;
                let tags = images
                    .into_iter()
                    .find(|i| i.name == image)
                    .map(|i| i.tags)
                    .unwrap_or_default();
                for (tag, id) in tags {
                    let name = format!("{tag}.raw");
                    add(Node::Tagged(image.clone(), tag, id), Kind::File, name);
                }
            }
            Node::Versions => {
                for info in self.store.versions()? {
                    let name = format!("{}.raw", info.id);
                    add(Node::Version(info.id), Kind::File, name);
                }
            }
            Node::InstancesDir => {
                for id in self.instances.list()? {
                    let name = format!("{id}.raw");
                    add(Node::Instance(id), Kind::File, name);
                }
            }
            Node::Tagged(..) | Node::Version(_) | Node::Instance(_) => {
                return Err(Errno(libc::ENOTDIR))
            }
        }
        Ok(out)
    }

    /// Opens `ino`; returns the handle and how the kernel is to serve it.
    pub fn open(&self, ino: u64, flags: i32) -> Result<(u64, OpenMode), Errno> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let (handle, mode) = match self.node(ino)? {
            Node::Version(id) => {
                if writable {
                    return Err(Errno(libc::EROFS));
                }
                let v = self.store.version(&id)?;
                let mode = self.version_mode(&mut io, ino, &v);
                (Handle::Version(Arc::new(v)), mode)
            }
            Node::Tagged(_, _, id) => {
                if writable {
                    return Err(Errno(libc::EROFS));
                }
                let v = self.store.version(&id)?;
                let mode = self.version_mode(&mut io, ino, &v);
                (Handle::Version(Arc::new(v)), mode)
            }
            Node::Instance(id) => {
                if flags & libc::O_TRUNC != 0 {
                    return Err(Errno(libc::EINVAL));
                }
                io.inodes.entry(ino).or_default().cached += 1;
                // Substitution invalidates exactly what changed, so the cache stays valid.
                (Handle::Instance(self.instance(&id)?), OpenMode::Cached)
            }
            _ => return Err(Errno(libc::EISDIR)),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let kind = match mode {
            OpenMode::Cached => IoKind::Cached,
            OpenMode::Passthrough { .. } => IoKind::Passthrough,
        };
        io.handles.insert(fh, (ino, kind));
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, handle);
        Ok((fh, mode))
    }

    /// Picks the mode of a read-only open of `v` on `ino` (whose bytes never change) and
    /// counts it.
    fn version_mode(&self, io: &mut IoState, ino: u64, v: &Version) -> OpenMode {
        let st = io.inodes.entry(ino).or_default();
        if st.passthrough > 0 {
            if let Some((id, file)) = &st.backing {
                st.passthrough += 1;
                return OpenMode::Passthrough {
                    version: *id,
                    file: file.clone(),
                };
            }
        }
        if st.cached == 0 && self.passthrough() {
            if let Some(file) = self.flat.as_ref().and_then(|f| f.ready(&v.id())) {
                st.passthrough = 1;
                st.backing = Some((v.id(), file.clone()));
                return OpenMode::Passthrough {
                    version: v.id(),
                    file,
                };
            }
        }
        st.cached += 1;
        OpenMode::Cached
    }

    /// Entries of `images/NAME/` the kernel may hold that now name another version, or none
    /// (a tag moved or was removed): the caller drops them from the kernel's dentry cache, so
    /// the next lookup finds the new file at once. Forgets them.
    pub fn moved_tags(&self) -> Vec<(u64, String)> {
        let tagged: Vec<(u64, ImageName, Tag, VersionId)> = self
            .inodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_node
            .iter()
            .filter_map(|(n, &ino)| match n {
                Node::Tagged(name, tag, id) => Some((ino, name.clone(), tag.clone(), *id)),
                _ => None,
            })
            .collect();
        let mut stale = self.stale_tags.lock().unwrap_or_else(|p| p.into_inner());
        let mut moved = Vec::new();
        for (ino, name, tag, id) in tagged {
            let now = self.store.resolve(&format!("{name}:{tag}")).ok();
            if now == Some(id) {
                // Moved back: the name leads to this inode again.
                stale.remove(&ino);
            } else if stale.insert(ino) {
                let dir = self.ino(&Node::Image(name.clone()));
                moved.push((dir, format!("{tag}.raw")));
            }
        }
        moved.sort();
        moved.dedup();
        moved
    }

    /// The kernel refused the passthrough open `fh` was given (the adapter could not register
    /// its copy): serve it cached, and stop passing through.
    pub fn passthrough_refused(&self, fh: u64) {
        self.passthrough.store(false, Ordering::Relaxed);
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let Some((ino, kind)) = io.handles.get(&fh).copied() else {
            return;
        };
        if kind != IoKind::Passthrough {
            return;
        }
        io.handles.insert(fh, (ino, IoKind::Cached));
        let st = io.inodes.entry(ino).or_default();
        st.passthrough = st.passthrough.saturating_sub(1);
        if st.passthrough == 0 {
            st.backing = None;
        }
        st.cached += 1;
    }

    /// The open file `fh`.
    pub fn handle(&self, fh: u64) -> Result<Handle, Errno> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    /// Whether the instance is open through the mount (a VM may be using it).
    pub fn is_open(&self, id: &InstanceId) -> bool {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|h| matches!(h, Handle::Instance(i) if i.id() == id))
    }

    /// Forgets an open handle.
    pub fn release(&self, fh: u64) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let Some((ino, kind)) = io.handles.remove(&fh) else {
            return;
        };
        let st = io.inodes.entry(ino).or_default();
        match kind {
            IoKind::Cached => st.cached = st.cached.saturating_sub(1),
            IoKind::Passthrough => {
                st.passthrough = st.passthrough.saturating_sub(1);
                if st.passthrough == 0 {
                    st.backing = None;
                }
            }
        }
        if st.cached == 0 && st.passthrough == 0 {
            io.inodes.remove(&ino);
        }
    }

    /// Reads up to `size` bytes at `offset` (short at the end of the file).
    #[cfg(test)]
    pub fn read(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; size as usize];
        let n = self.read_into(h, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf`; returns how many (short at the
    /// end of the file). The adapter passes a buffer it keeps per thread: a fresh 1 MiB
    /// allocation per request cost more than the copy itself (page faults on every mmap).
    pub fn read_into(&self, h: &Handle, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        Ok(match h {
            Handle::Version(v) => {
                let n = v.read_at(&self.store, offset, buf)?;
                self.count_served(v, n as u64);
                n
            }
            Handle::Instance(i) => {
                self.find_base_copy(i);
                i.read_at(&self.store, offset, buf)?
            }
        })
    }

    /// Unwritten blocks of an instance are read from a flat copy of its base once there is one
    /// (a VM's disk is its hot path): asks for the copy, and hands it to the view when ready.
    fn find_base_copy(&self, inst: &Instance) {
        let Some(flat) = self.flat.as_ref() else {
            return;
        };
        let view = inst.view();
        if view.has_base_copy() {
            return;
        }
        let id = view.base().id();
        match flat.ready(&id) {
            Some(copy) => view.set_base_copy(random_access(&copy).unwrap_or(copy)),
            None => flat.request(&id),
        }
    }

    /// Asks for a flat copy of a version once it is read in bulk (a `qemu-img info` or a
    /// header peek never costs a copy); later opens then go straight to the copy.
    fn count_served(&self, v: &Version, n: u64) {
        let Some(flat) = self.flat.as_ref().filter(|_| self.passthrough()) else {
            return;
        };
        let threshold = BULK_READ.min(v.size() / 2).max(1);
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let total = served.entry(v.id()).or_insert(0);
        let before = *total;
        *total = before.saturating_add(n);
        if before < threshold && *total >= threshold {
            flat.request(&v.id());
        }
    }

    fn instance_handle(h: &Handle) -> Result<&Arc<Instance>, Errno> {
        match h {
            Handle::Instance(i) => Ok(i),
            Handle::Version(_) => Err(Errno(libc::EROFS)),
        }
    }

    /// Writes `data` at `offset` into an instance (EROFS on a version).
    pub fn write(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let inst = Self::instance_handle(h)?;
        let n = inst.write_at(&self.store, offset, data)?;
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.get_mut(inst.id()) {
            Some(t) => *t = SystemTime::now(),
            None => {
                written.insert(inst.id().clone(), SystemTime::now());
            }
        }
        u32::try_from(n).map_err(|_| Errno(libc::EINVAL))
    }

    /// Makes an instance's writes durable (no-op on versions).
    pub fn fsync(&self, h: &Handle) -> Result<(), Errno> {
        match h {
            Handle::Instance(i) => Ok(i.flush(&self.store)?),
            Handle::Version(_) => Ok(()),
        }
    }

    /// fallocate: punch-hole (with keep-size) discards; plain allocation inside the disk is a
    /// no-op (blocks are allocated on write); anything else is unsupported.
    pub fn fallocate(&self, h: &Handle, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let inst = Self::instance_handle(h)?;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if mode == punch {
            inst.punch_hole(&self.store, offset, len)?;
            self.written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(inst.id().clone(), SystemTime::now());
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or(Errno(libc::EINVAL))?;
        if (mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE) && end <= inst.size() {
            return Ok(());
        }
        Err(Errno(libc::EOPNOTSUPP))
    }

    /// setattr: sizes are fixed (a live disk does not change size); times and modes are not
    /// stored, so only a no-op size change succeeds.
    pub fn setattr(&self, ino: u64, size: Option<u64>) -> Result<Attr, Errno> {
        let attr = self.getattr(ino)?;
        match (self.node(ino)?, size) {
            (_, None) => Ok(attr),
            (Node::Instance(_), Some(s)) if s == attr.size => Ok(attr),
            (Node::Instance(_), Some(_)) => Err(Errno(libc::EPERM)),
            (_, Some(_)) => Err(Errno(libc::EROFS)),
        }
    }
}

/// A second open of `copy` marked for random access: a guest's reads arrive already sized by
/// its own readahead, and a 4 KiB miss should cost 4 KiB, not the 128 KiB readahead window
/// (32 times the disk traffic on random reads of a cold copy). The copy's own handle keeps
/// its readahead: the kernel reads through it for passthrough opens of the version file.
fn random_access(copy: &Arc<std::fs::File>) -> Option<Arc<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let own = std::fs::File::open(format!("/proc/self/fd/{}", copy.as_raw_fd())).ok()?;
    // SAFETY: posix_fadvise on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(own.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    (rc == 0).then(|| Arc::new(own))
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
