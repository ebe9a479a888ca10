//! gc over an in-memory bucket: the two passes, the grace, and pushes racing deletion passes
//! (a hook runs gc passes at a chosen moment inside a push's requests).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use super::super::*;
use super::*;
use crate::{ImageName, Store, Tag};

type Hook = Box<dyn FnOnce(&MemRemote) + Send>;

/// A bucket in memory; `hook` runs once, just before the first put whose key starts with
/// `hook_on` is done (the push is then paused exactly there).
#[derive(Default)]
struct MemRemote {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    hook: Mutex<Option<(String, Hook)>>,
    puts: Mutex<Vec<String>>,
}

impl MemRemote {
    fn on_put(&self, prefix: &str, f: impl FnOnce(&MemRemote) + Send + 'static) {
        *self.hook.lock().unwrap() = Some((prefix.to_string(), Box::new(f)));
    }
    fn keys(&self, prefix: &str) -> Vec<String> {
        self.objects
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Remote for MemRemote {
    fn head(&self, key: &str) -> Result<Option<u64>, RemoteError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(key)
            .map(|v| v.len() as u64))
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, RemoteError> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| RemoteError::NotFound {
                key: key.to_string(),
            })
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, RemoteError> {
        let all = self.get(key)?;
        Ok(all
            .get(range.start as usize..(range.end as usize).min(all.len()))
            .unwrap_or_default()
            .to_vec())
    }
    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), RemoteError> {
        let hook = {
            let mut h = self.hook.lock().unwrap();
            match h.as_ref() {
                Some((p, _)) if key.starts_with(p.as_str()) => h.take(),
                _ => None,
            }
        };
        if let Some((_, f)) = hook {
            f(self);
        }
        self.puts.lock().unwrap().push(key.to_string());
        self.objects.lock().unwrap().insert(key.to_string(), data);
        Ok(())
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect())
    }
    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
}

const BS: usize = 4096;

/// 64 blocks of noise; blocks in `changed` differ with `seed`.
fn image(seed: u8, changed: &[usize]) -> Vec<u8> {
    let mut out = vec![0u8; 64 * BS];
    for (i, b) in out.chunks_mut(BS).enumerate() {
        let s = if changed.contains(&i) { seed } else { 0 };
        blake3::Hasher::new()
            .update(&[s, i as u8, 0x6c])
            .finalize_xof()
            .fill(b);
    }
    out
}

fn import(store: &Store, name: &str, tag: &str, bytes: &[u8], dir: &Path) -> VersionId {
    let f = dir.join(format!("{name}-{tag}.img"));
    std::fs::write(&f, bytes).unwrap();
    let mut src = crate::open_image(&f).unwrap();
    let img = ImageName::new(name).unwrap();
    let r = store
        .import(&img, Some(BS as u32), src.as_mut(), &mut |_| {})
        .unwrap();
    store.set_tag(&img, &Tag::new(tag).unwrap(), &r.id).unwrap();
    r.id
}

fn opts() -> PushOptions {
    PushOptions {
        pack_size: 8 * BS as u64,
        jobs: 2,
        cache: None,
    }
}

fn now() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        jobs: 2,
    }
}

fn tag(s: &str) -> Tag {
    Tag::new(s).unwrap()
}

/// Pulls `name:t` into a fresh store and checks it reads as `want`.
fn pulls_whole(remote: &MemRemote, dir: &Path, name: &str, t: &str, want: &[u8]) {
    let b = Store::init(&dir.join(format!("pull-{name}-{t}-{}", rand_suffix()))).unwrap();
    let img = ImageName::new(name).unwrap();
    let r = b
        .pull(
            remote,
            &img,
            &tag(t),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    let v = b.version(&r.id).unwrap();
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(&b, 0, &mut buf).unwrap();
    assert!(buf == want, "{name}:{t} pulled other bytes");
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct Two {
    tmp: tempfile::TempDir,
    a: Store,
    remote: MemRemote,
    i1: Vec<u8>,
    i2: Vec<u8>,
    v1: VersionId,
    v2: VersionId,
}

/// v1 and v2 (v1 with blocks 0..8 and 40 changed) pushed; 8 blocks a pack, so v1's first pack
/// holds only blocks v2 lacks.
fn two() -> Two {
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::init(&tmp.path().join("a")).unwrap();
    let i1 = image(0, &[]);
    let i2 = image(7, &[0, 1, 2, 3, 4, 5, 6, 7, 40]);
    let v1 = import(&a, "app", "v1", &i1, tmp.path());
    let v2 = import(&a, "app", "v2", &i2, tmp.path());
    let remote = MemRemote::default();
    a.push(&remote, &v1, &tag("v1"), &opts(), &mut |_| {})
        .unwrap();
    a.push(&remote, &v2, &tag("v2"), &opts(), &mut |_| {})
        .unwrap();
    Two {
        tmp,
        a,
        remote,
        i1,
        i2,
        v1,
        v2,
    }
}

#[test]
fn two_passes_delete_only_what_no_tag_reaches_and_v2_still_pulls() {
    let t = two();
    // v1: 8 packs of 8; v2: two packs of its 9 new blocks (with their indexes)
    assert_eq!(t.remote.keys("packs/").len(), 2 * 10);
    // nothing unreachable: a pass marks nothing
    let r = gc(&t.remote, &now()).unwrap();
    assert_eq!((r.action, r.candidates, r.tags), (GcAction::Marked, 0, 2));
    t.remote.delete("tags/app/v1.json").unwrap();
    // the first pass after the untag is a deletion pass of an empty list: it marks v1's map
    // and the one pack only v1 needs (its blocks 0..8), with its index (the pack holding v1's
    // block 40 holds blocks v2 uses: packs are gc's grain)
    let r = gc(&t.remote, &now()).unwrap();
    assert_eq!((r.action, r.deleted), (GcAction::Deleted, 0));
    assert_eq!(r.candidates, 3, "{r:?}");
    let marked = read_state(&t.remote).unwrap().unwrap().candidates;
    assert!(marked.contains(&map_key(&t.v1)));
    let r = gc(&t.remote, &now()).unwrap();
    assert_eq!(
        (r.action, r.deleted, r.candidates),
        (GcAction::Deleted, 3, 0)
    );
    for k in &marked {
        assert!(t.remote.head(k).unwrap().is_none(), "{k} left");
    }
    assert!(t.remote.head(&map_key(&t.v2)).unwrap().is_some());
    pulls_whole(&t.remote, t.tmp.path(), "app", "v2", &t.i2);
    // v1 is gone from the remote: its map is
    let b = Store::init(&t.tmp.path().join("b")).unwrap();
    let e = b
        .pull(
            &t.remote,
            &ImageName::new("app").unwrap(),
            &tag("v1"),
            Some(t.v1),
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{e}");
}

#[test]
fn nothing_is_deleted_before_the_grace_has_passed() {
    let t = two();
    t.remote.delete("tags/app/v1.json").unwrap();
    let hour = GcOptions::default();
    let r = gc(&t.remote, &hour).unwrap();
    assert_eq!((r.action, r.candidates), (GcAction::Marked, 3));
    let r = gc(&t.remote, &hour).unwrap();
    assert_eq!(
        (r.action, r.deleted, r.candidates),
        (GcAction::Waiting, 0, 3)
    );
    assert!(r.deletable_at.unwrap() > now_ms() + 3_500_000);
    assert_eq!(t.remote.keys("packs/").len(), 20);
    // a tag pushed again before the second pass saves what it reaches
    t.a.push(&t.remote, &t.v1, &tag("again"), &opts(), &mut |_| {})
        .unwrap();
    let r = gc(&t.remote, &now()).unwrap();
    assert_eq!((r.action, r.deleted), (GcAction::Deleted, 0));
    pulls_whole(&t.remote, t.tmp.path(), "app", "again", &t.i1);
}

#[test]
fn a_push_rewrites_the_marked_objects_it_reuses() {
    let t = two();
    t.remote.delete("tags/app/v1.json").unwrap();
    gc(&t.remote, &now()).unwrap();
    let marked = read_state(&t.remote).unwrap().unwrap().candidates;
    t.remote.puts.lock().unwrap().clear();
    let r =
        t.a.push(&t.remote, &t.v1, &tag("v1"), &opts(), &mut |_| {})
            .unwrap();
    // the marked pack (same blocks, same grouping: same name) is uploaded again, and the
    // marked map and index rewritten, not taken as there
    assert_eq!((r.new_blocks, r.packs_uploaded), (8, 1));
    let puts = t.remote.puts.lock().unwrap().clone();
    for k in &marked {
        assert!(puts.contains(k), "{k} not rewritten");
    }
    let r = gc(&t.remote, &now()).unwrap();
    assert_eq!(r.deleted, 0);
    pulls_whole(&t.remote, t.tmp.path(), "app", "v1", &t.i1);
}

#[test]
fn a_deletion_pass_between_the_packs_and_the_tag_does_not_break_the_push() {
    let t = two();
    let v3img = image(9, &[10, 11, 12, 13, 50]);
    let v3 = import(&t.a, "app", "v3", &v3img, t.tmp.path());
    // Two gc passes just before the map is written: the first marks v3's fresh packs
    // (no tag reaches them yet), the second deletes them.
    t.remote.on_put("maps/", |r| {
        gc(r, &now()).unwrap();
        let d = gc(r, &now()).unwrap();
        assert!(d.deleted >= 2, "{d:?}");
    });
    t.a.push(&t.remote, &v3, &tag("v3"), &opts(), &mut |_| {})
        .unwrap();
    pulls_whole(&t.remote, t.tmp.path(), "app", "v3", &v3img);
    pulls_whole(&t.remote, t.tmp.path(), "app", "v2", &t.i2);
}

#[test]
fn a_deletion_pass_racing_the_tag_write_does_not_break_the_push() {
    let t = two();
    t.remote.delete("tags/app/v1.json").unwrap();
    gc(&t.remote, &now()).unwrap();
    // The push plans against the marked state and uploads; then, as its tag is being
    // written, a deletion pass that listed the tags before it removes v1's marked objects.
    t.remote.on_put("tags/app/v1b", |r| {
        let d = gc(r, &now()).unwrap();
        assert!(d.deleted >= 3, "{d:?}");
    });
    t.a.push(&t.remote, &t.v1, &tag("v1b"), &opts(), &mut |_| {})
        .unwrap();
    pulls_whole(&t.remote, t.tmp.path(), "app", "v1b", &t.i1);
    assert_eq!(t.v2, t.a.resolve("app:v2").unwrap());
}

#[test]
fn a_running_deletion_pass_makes_another_gc_refuse() {
    let t = two();
    gc(&t.remote, &now()).unwrap();
    let mut s = read_state(&t.remote).unwrap().unwrap();
    s.phase = GcPhase::Deleting;
    s.phase_at = now_ms();
    write_state(&t.remote, &s).unwrap();
    let e = gc(&t.remote, &now()).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Conflict, "{e}");
    // one that died long ago is redone
    s.phase_at = now_ms() - STALE_DELETING.as_millis() as u64 - 1000;
    write_state(&t.remote, &s).unwrap();
    let r = gc(&t.remote, &now()).unwrap();
    assert_eq!(r.action, GcAction::Deleted);
    assert_eq!(
        read_state(&t.remote).unwrap().unwrap().phase,
        GcPhase::Marked
    );
}

#[test]
fn a_tag_whose_map_is_missing_stops_gc_and_leaves_no_deleting_phase() {
    let t = two();
    t.remote.delete("tags/app/v1.json").unwrap();
    gc(&t.remote, &now()).unwrap();
    let packs = t.remote.keys("packs/").len();
    // v2's tag now names a map the bucket lacks: what v2 needs cannot be known
    t.remote.delete(&map_key(&t.v2)).unwrap();
    let e = gc(&t.remote, &now()).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Conflict, "{e}");
    assert_eq!(
        t.remote.keys("packs/").len(),
        packs,
        "gc deleted while refusing"
    );
    // the pass it announced is closed, so a push does not wait on it
    let s = read_state(&t.remote).unwrap().unwrap();
    assert_eq!(s.phase, GcPhase::Marked);
    let start = std::time::Instant::now();
    t.a.push(&t.remote, &t.v2, &tag("v2"), &opts(), &mut |_| {})
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    // pushed again, v2 has its map back and gc goes on
    gc(&t.remote, &now()).unwrap();
    pulls_whole(&t.remote, t.tmp.path(), "app", "v2", &t.i2);
}
