//! Telling a live guest that its disk changed under it: after `substitute` has retargeted an
//! instance and invalidated the host page cache, the VM running on it (if any) gets a
//! `SubstitutionNotice` (device, merged changed ranges, the guest files in them) and we wait for
//! its acknowledgement. Invariant: a substitution never fails because of the guest: no live VM,
//! an unreadable filesystem or a silent agent become a warning in the report, not an error.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_proto::{AgentClient, AgentLink, Range, SubstitutionNotice};
use imagefs_store::instance::SubstituteOutcome;
use imagefs_store::{ext4, Store, VersionId};
use serde_json::{json, Value};

use super::registry;

/// The guest's root disk, as both hypervisors present the instance.
const DEVICE: &str = "/dev/vda";
/// How long the guest gets to drop its caches and answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Sends the notice for `outcome` to the live VM on its instance and reports what happened as
/// JSON (`guest`: "told" | "not told", with times, the agent's steps and affected processes).
pub fn tell_guest(store: &Store, outcome: &SubstituteOutcome) -> Value {
    let Some(vm) = registry::live_on_instance(store.dir(), &outcome.instance) else {
        return json!({"guest": "not told", "warning": format!(
            "no live VM runs on instance {}: the guest was not told", outcome.instance)});
    };
    if outcome.changed.is_empty() {
        return json!({"guest": "not told", "vm": vm.name, "warning": "nothing changed"});
    }
    let t = Instant::now();
    let ranges: Vec<[u64; 2]> = outcome.changed.iter().map(|r| [r.offset, r.len]).collect();
    let (files, metadata) = match changed_files(store, &outcome.from, &outcome.to, &ranges) {
        Some(f) => f,
        // Unknown files: the guest drops everything it cached of the device.
        None => (Vec::new(), true),
    };
    let files_us = t.elapsed().as_micros() as u64;
    let notice = SubstitutionNotice::new(
        DEVICE,
        outcome
            .changed
            .iter()
            .map(|r| Range {
                offset: r.offset,
                len: r.len,
            })
            .collect(),
        files.clone(),
        metadata,
    );
    let t = Instant::now();
    let ack = AgentClient::new(&vm.agent_socket)
        .with_timeout(ACK_TIMEOUT)
        .notice(&notice);
    let notify_us = t.elapsed().as_micros() as u64;
    match &ack {
        Ok(_) => crate::metrics::agent_round_trip("notice", t.elapsed()),
        Err(_) => crate::metrics::agent_failure("notice"),
    }
    match ack {
        Ok(ack) => json!({"guest": "told", "vm": vm.name, "files": notice.files,
            "files_truncated": notice.files_truncated, "metadata_changed": metadata,
            "files_us": files_us, "notify_us": notify_us, "ack": ack}),
        Err(e) => json!({"guest": "not told", "vm": vm.name, "files": notice.files,
            "files_us": files_us, "notify_us": notify_us,
            "warning": format!("the agent of VM {} did not acknowledge: {e}", vm.name)}),
    }
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
