//! Remote gc: deletes the packs, pack indexes and maps no remote tag reaches, in two passes at
//! least a grace period apart, without ever breaking a push that runs at the same time.
//!
//! # The gc state object (`gc/state.json`, in the bucket)
//! The first pass records the objects it found unreachable (the candidates) and the time in
//! [`GcState`]; a later pass, once the grace has passed, deletes the candidates still
//! unreachable and records the ones found unreachable now as the next candidates. The state
//! lives in the bucket, not in a store's directory: several operators on several hosts push to
//! and gc one bucket, and every push (on any host) must see the candidates and every gc run
//! must see the pass another host made. Everything else a gc run needs is in the bucket too.
//!
//! # Why a concurrent push is never broken
//! S3 has no conditional delete, so no check a gc makes can exclude a push racing it. Instead
//! every deletion pass is announced: the state's `deletions` counter is raised and its phase
//! set to `deleting` before the pass lists the tags, and the phase goes back to `marked` after.
//! A push ([`Store::push`](crate::Store::push)) reads the state before it plans and again after
//! it has written its tag:
//! - planning, it treats the candidates as absent: blocks that only candidate packs hold are
//!   uploaded again and a candidate object it needs is rewritten (put, not skipped because it
//!   exists), so it never builds on what a due deletion pass will remove;
//! - unchanged `deletions` and phase `marked` after the tag mean no deletion pass began before
//!   the tag was in the bucket, and any later pass lists that tag and keeps what it reaches;
//! - otherwise the push waits for the pass to end, checks that every object its tag reaches is
//!   there and, if a pass removed one, uploads again (a new plan) and rewrites the tag. It also
//!   re-plans before writing the tag when a pass began since it planned.
//!
//! A push therefore ends only with a tag whose objects are all there. A deletion pass that dies
//! midway leaves phase `deleting`; pushes wait for at most [`STALE_DELETING`] and then go on (and
//! check as above), and the next gc run redoes the pass.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    idx_key, integrity, list_tags, map_key, pack_key, parallel_each, MapHeader, Remote,
    RemoteError, SyncError, DEFAULT_JOBS,
};
use crate::ids::VersionId;

/// Key of the gc state object.
pub const GC_STATE_KEY: &str = "gc/state.json";
/// The grace period between the pass that marks an object and the one that deletes it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// A `deleting` phase older than this is a gc that died: pushes stop waiting for it and the
/// next gc run redoes the pass.
pub const STALE_DELETING: Duration = Duration::from_secs(600);

/// Where a gc pass stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GcPhase {
    /// Candidates recorded; deletable once `marked_at + grace` has passed.
    Marked,
    /// A deletion pass is running (or died).
    Deleting,
}

/// The gc state object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    /// Format of this object (1).
    pub format: u32,
    /// Deletion passes begun so far: a push compares it before and after its tag.
    pub deletions: u64,
    pub phase: GcPhase,
    /// Unix milliseconds of the pass that recorded the candidates.
    pub marked_at: u64,
    /// Unix milliseconds the phase began.
    pub phase_at: u64,
    /// Keys found unreachable by the marking pass (sorted).
    pub candidates: Vec<String>,
}

impl GcState {
    /// True when a deletion pass that began at or after `self` was read may have removed
    /// objects by the time `later` was read.
    pub(crate) fn deletion_since(before: Option<&GcState>, later: Option<&GcState>) -> bool {
        let d = |s: Option<&GcState>| s.map_or(0, |s| s.deletions);
        d(before) != d(later) || later.is_some_and(|s| s.phase == GcPhase::Deleting)
    }
}

/// How a gc run goes.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Least time between marking an object and deleting it.
    pub grace: Duration,
    /// Deletes in flight at most.
    pub jobs: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: DEFAULT_GRACE,
            jobs: DEFAULT_JOBS,
        }
    }
}

/// What a gc run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcAction {
    /// The bucket has no imagefs objects.
    Empty,
    /// First pass: candidates recorded, nothing deleted.
    Marked,
    /// The grace has not passed since the marking pass: nothing done.
    Waiting,
    /// Deletion pass: candidates still unreachable deleted, the next candidates recorded.
    Deleted,
}

/// The outcome of [`gc`].
#[derive(Debug, Clone)]
pub struct GcReport {
    pub action: GcAction,
    /// Tags the remote holds.
    pub tags: u64,
    /// Objects (packs, indexes, maps) the tags reach (counted when the run walked them).
    pub reachable: u64,
    /// Objects found unreachable now (counted when the run walked them).
    pub unreachable: u64,
    /// Objects deleted, and their bytes.
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Candidates recorded for a later pass, and their bytes.
    pub candidates: u64,
    pub candidate_bytes: u64,
    /// Unix milliseconds from which the next pass may delete them (None: no candidates).
    pub deletable_at: Option<u64>,
    /// Deletion passes so far in this bucket.
    pub deletions: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the gc state (None: no gc has run on this bucket).
pub fn read_state(remote: &dyn Remote) -> Result<Option<GcState>, SyncError> {
    match remote.get(GC_STATE_KEY) {
        Ok(bytes) => {
            let s: GcState = serde_json::from_slice(&bytes)
                .map_err(|e| integrity("gc state", GC_STATE_KEY, format!("malformed: {e}")))?;
            if s.format != 1 {
                return Err(integrity(
                    "gc state",
                    GC_STATE_KEY,
                    format!("format {} (this imagefs knows 1)", s.format),
                ));
            }
            Ok(Some(s))
        }
        Err(RemoteError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn write_state(remote: &dyn Remote, s: &GcState) -> Result<(), SyncError> {
    let bytes = serde_json::to_vec(s).map_err(|e| SyncError::Refused(e.to_string()))?;
    remote.put(GC_STATE_KEY, bytes)?;
    Ok(())
}

/// Reads the gc state, waiting while a deletion pass runs (one younger than
/// [`STALE_DELETING`]), so that a push plans against what the pass left.
pub(crate) fn settled_state(remote: &dyn Remote) -> Result<Option<GcState>, SyncError> {
    let start = std::time::Instant::now();
    loop {
        let s = read_state(remote)?;
        let running = s.as_ref().is_some_and(|s| {
            s.phase == GcPhase::Deleting
                && now_ms().saturating_sub(s.phase_at) < STALE_DELETING.as_millis() as u64
        });
        if !running || start.elapsed() > STALE_DELETING {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The header of a map object (untrusted: a map that lies about its packs can only make gc
/// keep too much, or delete packs its own version then lacks; it never makes a wrong byte
/// readable, as every block is checked against its hash).
fn map_header(key: &str, data: &[u8]) -> Result<MapHeader, SyncError> {
    super::split_map(key, data).map(|(header, _)| header)
}

/// The objects gc manages (packs, pack indexes, maps) with their sizes. Other keys (the format
/// marker, tags, the gc state, anything unknown) are never touched.
fn managed_objects(remote: &dyn Remote) -> Result<HashMap<String, u64>, SyncError> {
    let mut out = HashMap::new();
    for (k, size) in remote.list("packs/")? {
        if k.ends_with(".pack") || k.ends_with(".idx") {
            out.insert(k, size);
        }
    }
    for (k, size) in remote.list("maps/")? {
        if k.ends_with(".map") {
            out.insert(k, size);
        }
    }
    Ok(out)
}

/// Every object some tag reaches: the tag's map, the packs its header names and their indexes.
/// A tag whose map is missing stops the run: what it needs cannot be known.
fn reachable(remote: &dyn Remote) -> Result<(u64, HashSet<String>), SyncError> {
    let tags = list_tags(remote)?;
    let mut keys = HashSet::new();
    for t in &tags {
        let id: VersionId = t.version.parse().map_err(|_| {
            integrity(
                "tag",
                &format!("tags/{}/{}.json", t.image, t.tag),
                "bad version id",
            )
        })?;
        let key = map_key(&id);
        if keys.contains(&key) {
            continue;
        }
        let bytes = match remote.get(&key) {
            Ok(b) => b,
            Err(RemoteError::NotFound { .. }) => {
                return Err(SyncError::Refused(format!(
                    "tag {}:{} names version {} whose map is not in the remote; remote gc \
                     deletes nothing until that tag is pushed again or removed",
                    t.image,
                    t.tag,
                    id.short()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let h = map_header(&key, &bytes)?;
        for p in &h.packs {
            keys.insert(pack_key(p));
            keys.insert(idx_key(p));
        }
        keys.insert(key);
    }
    Ok((tags.len() as u64, keys))
}

/// Runs one gc pass on `remote` (see the module doc): records the unreachable objects when no
/// pass has, deletes the recorded ones still unreachable once `opts.grace` has passed since, or
/// does nothing while the grace runs. Refuses while another deletion pass is running.
pub fn gc(remote: &dyn Remote, opts: &GcOptions) -> Result<GcReport, SyncError> {
    let mut report = GcReport {
        action: GcAction::Empty,
        tags: 0,
        reachable: 0,
        unreachable: 0,
        deleted: 0,
        deleted_bytes: 0,
        candidates: 0,
        candidate_bytes: 0,
        deletable_at: None,
        deletions: 0,
    };
    if !super::check_format(remote)? {
        return Ok(report);
    }
    let grace_ms = opts.grace.as_millis() as u64;
    let state = read_state(remote)?;
    let now = now_ms();
    if let Some(s) = &state {
        report.deletions = s.deletions;
        let age = now.saturating_sub(s.phase_at);
        if s.phase == GcPhase::Deleting && age < STALE_DELETING.as_millis() as u64 {
            return Err(SyncError::Refused(format!(
                "another remote gc has been deleting for {} s; run gc again once it is done \
                 (a pass that died is redone after {} s)",
                age / 1000,
                STALE_DELETING.as_secs()
            )));
        }
        if s.phase == GcPhase::Marked && now < s.marked_at.saturating_add(grace_ms) {
            report.action = GcAction::Waiting;
            report.candidates = s.candidates.len() as u64;
            let objects = managed_objects(remote)?;
            report.candidate_bytes = s.candidates.iter().filter_map(|k| objects.get(k)).sum();
            report.deletable_at = Some(s.marked_at.saturating_add(grace_ms));
            return Ok(report);
        }
    }
    // A deletion pass is announced before the tags are listed (a push compares `deletions`
    // around its tag write).
    let announced = match &state {
        Some(s) => {
            let a = GcState {
                format: 1,
                deletions: s.deletions + 1,
                phase: GcPhase::Deleting,
                marked_at: s.marked_at,
                phase_at: now_ms(),
                candidates: s.candidates.clone(),
            };
            write_state(remote, &a)?;
            report.deletions = a.deletions;
            Some(a)
        }
        None => None,
    };
    if let Err(e) = pass(remote, opts, announced.as_ref(), &mut report) {
        if let Some(a) = &announced {
            // a pass that stops early (a broken tag, the remote gone) must not leave pushes
            // waiting on `deleting`; best effort: if this fails too, pushes stop waiting after
            // STALE_DELETING
            let _ = write_state(
                remote,
                &GcState {
                    phase: GcPhase::Marked,
                    phase_at: now_ms(),
                    ..a.clone()
                },
            );
        }
        return Err(e);
    }
    report.action = if state.is_some() {
        GcAction::Deleted
    } else {
        GcAction::Marked
    };
    Ok(report)
}

/// The body of a gc run after the announcement: the deletion half when `announced` (the
/// candidates it names still unreachable are deleted), then the marking half (what is
/// unreachable now and was not just deleted becomes the next candidates, state `marked`).
fn pass(
    remote: &dyn Remote,
    opts: &GcOptions,
    announced: Option<&GcState>,
    report: &mut GcReport,
) -> Result<(), SyncError> {
    let grace_ms = opts.grace.as_millis() as u64;
    let mut deleted = BTreeSet::new();
    if let Some(s) = announced {
        let (tags, reach) = reachable(remote)?;
        let objects = managed_objects(remote)?;
        let doomed: Vec<(String, u64)> = s
            .candidates
            .iter()
            .filter(|k| !reach.contains(*k))
            .filter_map(|k| objects.get(k).map(|n| (k.clone(), *n)))
            .collect();
        // indexes first: an index whose pack is gone is ignored by readers, while a pack with
        // no index is only a leftover a push overwrites
        let (idx, rest): (Vec<_>, Vec<_>) =
            doomed.into_iter().partition(|(k, _)| k.ends_with(".idx"));
        for batch in [idx, rest] {
            parallel_each(
                &batch,
                opts.jobs,
                |(k, n)| {
                    remote
                        .delete(k)
                        .map(|()| (k.clone(), *n))
                        .map_err(Into::into)
                },
                |(k, n)| {
                    report.deleted += 1;
                    report.deleted_bytes += n;
                    deleted.insert(k);
                },
            )?;
        }
        report.tags = tags;
        report.reachable = reach.len() as u64;
    }
    // The marking half (the first pass, or the end of a deletion pass): what is unreachable
    // now and was not just deleted becomes the next candidates.
    let (tags, reach) = reachable(remote)?;
    let objects = managed_objects(remote)?;
    let mut candidates: Vec<String> = objects
        .keys()
        .filter(|k| !reach.contains(*k) && !deleted.contains(*k))
        .cloned()
        .collect();
    candidates.sort();
    let marked_at = now_ms();
    report.tags = tags;
    report.reachable = objects.keys().filter(|k| reach.contains(*k)).count() as u64;
    report.unreachable = candidates.len() as u64;
    report.candidates = candidates.len() as u64;
    report.candidate_bytes = candidates.iter().filter_map(|k| objects.get(k)).sum();
    report.deletable_at = (!candidates.is_empty()).then(|| marked_at.saturating_add(grace_ms));
    write_state(
        remote,
        &GcState {
            format: 1,
            deletions: report.deletions,
            phase: GcPhase::Marked,
            marked_at,
            phase_at: marked_at,
            candidates,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
