//! The guest files in the blocks that differ between two versions (ext4 maps of both), worked
//! out once per (from, to, ranges) and remembered: `diff --files` (cli/patch.rs) and a
//! substitution's notice to the guest (vm/notify.rs) ask the same question. Imports only the
//! store, so both may use it.

use std::sync::Mutex;

use imagefs_store::{ext4, Store, VersionId};

/// Guest files in changed blocks, and whether fs metadata changed.
pub type Files = (Vec<String>, bool);

/// `changed_files` answers already worked out, newest first: (from, to, ranges) -> files.
type FilesCache = Vec<((String, String, Vec<[u64; 2]>), Files)>;

/// Version ids name immutable, content-addressed block maps, so an answer never goes stale;
/// a rollout substitutes the same pair into every VM, and only the first reads both file
/// systems (~8-25 ms for a 48 MiB image on a loaded host).
static FILES: Mutex<FilesCache> = Mutex::new(Vec::new());
/// Answers kept (each a capped file list).
const FILES_KEPT: usize = 16;

/// Guest files (and whether fs metadata changed) in the blocks between `from` and `to`.
/// `None` when the image is not ext4 or cannot be read (not remembered: it may be a time
/// budget that a quieter moment would meet).
pub fn changed_files(store: &Store, from: &str, to: &str, changed: &[[u64; 2]]) -> Option<Files> {
    let key = (from.to_string(), to.to_string(), changed.to_vec());
    let cache = || FILES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, files)) = cache().iter().find(|(k, _)| *k == key) {
        return Some(files.clone());
    }
    let files = read_changed_files(store, from, to, changed)?;
    remember_files(from, to, changed, files.clone());
    Some(files)
}

/// Remembers the guest files of `from` -> `to` over `changed` worked out elsewhere: `diff
/// --files`, which a rollout runs before its first substitution, reads the same map.
pub fn remember_files(from: &str, to: &str, changed: &[[u64; 2]], files: Files) {
    let key = (from.to_string(), to.to_string(), changed.to_vec());
    let mut c = FILES.lock().unwrap_or_else(|p| p.into_inner());
    c.retain(|(k, _)| *k != key);
    c.insert(0, (key, files));
    c.truncate(FILES_KEPT);
}

fn read_changed_files(store: &Store, from: &str, to: &str, changed: &[[u64; 2]]) -> Option<Files> {
    let (a, b) = (
        from.parse::<VersionId>().ok()?,
        to.parse::<VersionId>().ok()?,
    );
    let (va, vb) = (store.version(&a).ok()?, store.version(&b).ok()?);
    let bs = u64::from(vb.block_size()).max(1);
    let mut blocks: Vec<u64> = Vec::new();
    for [off, len] in changed {
        let end = off.saturating_add(*len).div_ceil(bs);
        blocks.extend(off / bs..end);
    }
    blocks.dedup();
    let ra = ext4::VersionReader {
        store,
        version: &va,
    };
    let rb = ext4::VersionReader {
        store,
        version: &vb,
    };
    let m = ext4::map_diff(&ra, &rb, bs, &blocks).ok()??;
    Some((m.files().into_iter().collect(), m.metadata_changed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_files_are_found_only_for_the_same_pair_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s")).unwrap();
        let files = (vec!["/etc/app.conf".to_string()], false);
        remember_files("aa", "bb", &[[0, 4096]], files.clone());
        assert_eq!(changed_files(&store, "aa", "bb", &[[0, 4096]]), Some(files));
        // Anything else is worked out from the store (here: ids that do not parse, so none).
        assert_eq!(changed_files(&store, "aa", "bb", &[[0, 8192]]), None);
        assert_eq!(changed_files(&store, "bb", "aa", &[[0, 4096]]), None);
    }
}
