//! Tests of the mount's model without mounting: namespace, attributes, open modes, reads,
//! writes and discards, against a real store in a temp dir.

use std::sync::Arc;

use imagefs_store::instance::{InstanceId, Instances};
use imagefs_store::{open_image, ImageName, Store};

use super::{Errno, Kind, Model, OpenMode, ROOT_INO};

const BS: usize = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    model: Model,
    store: Arc<Store>,
    instances: Arc<Instances>,
    image: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::init(&dir.path().join("s")).unwrap());
    // 16 blocks: 4..8 a hole, then a 10-byte tail.
    let mut image: Vec<u8> = (0..16 * BS + 10).map(|i| (i % 251) as u8 | 1).collect();
    image[4 * BS..8 * BS].fill(0);
    let path = dir.path().join("a.img");
    std::fs::write(&path, &image).unwrap();
    let name = ImageName::new("web").unwrap();
    let r = store
        .import(
            &name,
            Some(BS as u32),
            open_image(&path).unwrap().as_mut(),
            &mut |_| {},
        )
        .unwrap();
    store
        .set_tag(&name, &imagefs_store::Tag::new("v1").unwrap(), &r.id)
        .unwrap();
    let instances = Arc::new(Instances::new(&store));
    Fixture {
        model: Model::new(store.clone(), instances.clone()),
        _dir: dir,
        store,
        instances,
        image,
    }
}

impl Fixture {
    fn lookup_path(&self, path: &str) -> Result<super::Attr, Errno> {
        let mut ino = ROOT_INO;
        let mut attr = self.model.getattr(ino)?;
        for part in path.split('/') {
            attr = self.model.lookup(ino, part)?;
            ino = attr.ino;
        }
        Ok(attr)
    }

    fn names(&self, path: &str) -> Vec<String> {
        let ino = self.lookup_path(path).unwrap().ino;
        let mut n: Vec<String> = self
            .model
            .readdir(ino)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != "." && n != "..")
            .collect();
        n.sort();
        n
    }
}

#[test]
fn the_namespace_shows_tags_versions_and_new_instances() {
    let f = fixture();
    assert_eq!(
        f.names("images"),
        vec!["web".to_string()],
        "images/ lists image names"
    );
    assert_eq!(f.names("images/web"), vec!["v1.raw".to_string()]);
    let id = f.store.resolve("web:v1").unwrap();
    assert_eq!(f.names("versions"), vec![format!("{id}.raw")]);
    let tag = f.lookup_path("images/web/v1.raw").unwrap();
    let ver = f.lookup_path(&format!("versions/{id}.raw")).unwrap();
    assert_eq!(
        (tag.kind, tag.size, tag.perm),
        (Kind::File, f.image.len() as u64, 0o400)
    );
    assert_eq!(ver.size, tag.size);
    // 13 of 17 blocks hold data (the hole is not allocated).
    assert_eq!(tag.blocks, 13 * BS as u64 / 512);
    for missing in [
        "images/db",
        "images/web/v2.raw",
        "images/web/v1",
        "instances/vm1.raw",
    ] {
        assert_eq!(
            f.lookup_path(missing).unwrap_err(),
            Errno(libc::ENOENT),
            "{missing}"
        );
    }
    // An instance created while "mounted" appears without anything being rebuilt.
    let vm1 = InstanceId::parse("vm1").unwrap();
    f.instances.create(&f.store, &vm1, &id, "web:v1").unwrap();
    assert_eq!(f.names("instances"), vec!["vm1.raw".to_string()]);
    let inst = f.lookup_path("instances/vm1.raw").unwrap();
    assert_eq!((inst.size, inst.perm), (f.image.len() as u64, 0o600));
    assert_eq!(f.model.known_instance_ino(&vm1), Some(inst.ino));
}

#[test]
fn versions_are_read_only_and_reads_past_the_end_are_short() {
    let f = fixture();
    let ino = f.lookup_path("images/web/v1.raw").unwrap().ino;
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(f.model.open(ino, flags).unwrap_err(), Errno(libc::EROFS));
    }
    let (fh, mode) = f.model.open(ino, libc::O_RDONLY).unwrap();
    assert!(
        matches!(mode, OpenMode::Cached),
        "a tag file's inode never changes bytes: its cache stays"
    );
    let h = f.model.handle(fh).unwrap();
    assert_eq!(f.model.write(&h, 0, b"x").unwrap_err(), Errno(libc::EROFS));
    let all = f.model.read(&h, 0, 1 << 20).unwrap();
    assert_eq!(all, f.image);
    let len = f.image.len() as u64;
    assert_eq!(
        f.model.read(&h, len - 4, 100).unwrap(),
        &f.image[f.image.len() - 4..]
    );
    assert!(f.model.read(&h, len + 1, 100).unwrap().is_empty());
    f.model.release(fh);
    let (_, mode) = f.model.open(ino, libc::O_RDONLY).unwrap();
    assert!(
        matches!(mode, OpenMode::Cached),
        "the tag still names the same version: keep the page cache"
    );
}

#[test]
fn a_moved_tag_is_a_new_inode_and_open_files_keep_the_old_bytes() {
    let f = fixture();
    let old = f.lookup_path("images/web/v1.raw").unwrap().ino;
    let (fh, _) = f.model.open(old, libc::O_RDONLY).unwrap();
    assert!(f.model.moved_tags().is_empty());

    // web:v1 now names a version with other bytes.
    let mut other = f.image.clone();
    other[..BS].fill(7);
    let path = f._dir.path().join("b.img");
    std::fs::write(&path, &other).unwrap();
    let name = ImageName::new("web").unwrap();
    let r = f
        .store
        .import(
            &name,
            Some(BS as u32),
            open_image(&path).unwrap().as_mut(),
            &mut |_| {},
        )
        .unwrap();
    f.store
        .set_tag(&name, &imagefs_store::Tag::new("v1").unwrap(), &r.id)
        .unwrap();

    let images_web = f.lookup_path("images/web").unwrap().ino;
    assert_eq!(
        f.model.moved_tags(),
        vec![(images_web, "v1.raw".to_string())]
    );
    assert!(f.model.moved_tags().is_empty(), "reported once");
    let new = f.lookup_path("images/web/v1.raw").unwrap().ino;
    assert_ne!(new, old);
    let h = f.model.handle(fh).unwrap();
    assert_eq!(f.model.read(&h, 0, BS as u32).unwrap(), f.image[..BS]);
    let (fh2, _) = f.model.open(new, libc::O_RDONLY).unwrap();
    let h2 = f.model.handle(fh2).unwrap();
    assert_eq!(f.model.read(&h2, 0, BS as u32).unwrap(), other[..BS]);
    // The old inode still answers for its version (the kernel may hold it open).
    assert_eq!(f.model.getattr(old).unwrap().size, f.image.len() as u64);
}

#[test]
fn instance_files_write_discard_and_keep_their_size() {
    let f = fixture();
    let id = f.store.resolve("web:v1").unwrap();
    let vm1 = InstanceId::parse("vm1").unwrap();
    f.instances.create(&f.store, &vm1, &id, "web:v1").unwrap();
    let ino = f.lookup_path("instances/vm1.raw").unwrap().ino;
    assert_eq!(
        f.model.open(ino, libc::O_RDWR | libc::O_TRUNC).unwrap_err(),
        Errno(libc::EINVAL)
    );
    let (fh, _) = f.model.open(ino, libc::O_RDWR).unwrap();
    let h = f.model.handle(fh).unwrap();
    assert_eq!(f.model.write(&h, 5 * BS as u64 + 3, b"hello").unwrap(), 5);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    f.model.fallocate(&h, 0, BS as u64, punch).unwrap();
    assert_eq!(
        f.model
            .fallocate(&h, 0, BS as u64, libc::FALLOC_FL_COLLAPSE_RANGE),
        Err(Errno(libc::EOPNOTSUPP))
    );
    f.model.fsync(&h).unwrap();
    let mut want = f.image.clone();
    want[5 * BS + 3..5 * BS + 8].copy_from_slice(b"hello");
    want[..BS].fill(0);
    assert_eq!(f.model.read(&h, 0, 1 << 20).unwrap(), want);
    let size = want.len() as u64;
    let attr = f.model.getattr(ino).unwrap();
    // Block 0 became a hole, block 5 (a hole before) now holds data.
    assert_eq!(attr.blocks, 13 * BS as u64 / 512);
    assert!(f.model.setattr(ino, Some(size)).is_ok());
    assert_eq!(
        f.model.setattr(ino, Some(size + 1)).unwrap_err(),
        Errno(libc::EPERM)
    );
    assert_eq!(
        f.model.write(&h, size - 1, b"ab").unwrap_err(),
        Errno(libc::ENOSPC)
    );
}
