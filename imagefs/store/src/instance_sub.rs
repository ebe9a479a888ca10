//! Substitution (atomic rebase of an instance onto another version) and commit.
//! Invariant: a substitution becomes durable through one checksummed `Rebased` record written
//! before the in-memory view is swapped, so a crash leaves it wholly applied or not at all, and
//! a reader holding the old view never sees a block of the new one.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::instance::{now_secs, Instance, InstanceError, View};
use crate::instance_log::Record;
use crate::overlay::Overlay;
use crate::tree::{self, Node, FANOUT, ZERO};
use crate::{BlockHash, Store, StoreError, Version};

/// Overlay changes as `Store::create_version` takes them: block index, new hash or a hole.
pub type Changes = Vec<(u64, Option<BlockHash>)>;

/// What to do with blocks the instance wrote that the target also changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Refuse the whole substitution (the default).
    Refuse,
    /// The target's block wins (`--force`).
    Force,
    /// The instance's block stays (`--keep-local`).
    KeepLocal,
}

impl ConflictPolicy {
    fn name(self) -> &'static str {
        match self {
            ConflictPolicy::Refuse => "refuse",
            ConflictPolicy::Force => "force",
            ConflictPolicy::KeepLocal => "keep-local",
        }
    }
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A substitution to perform.
#[derive(Debug, Clone)]
pub struct SubstituteRequest<'a> {
    /// The target version.
    pub target: &'a Version,
    /// What the user named (e.g. `web:v2`), for the event log.
    pub label: &'a str,
    /// Conflict policy.
    pub policy: ConflictPolicy,
    /// Compute and report only.
    pub dry_run: bool,
}

/// Time spent in each step, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubstituteTimes {
    /// Comparing the base's and target's block maps.
    pub diff_us: u64,
    /// Working out visible changes and conflicts.
    pub plan_us: u64,
    /// Making pending writes and the rebase record durable.
    pub persist_us: u64,
    /// Swapping the live view.
    pub swap_us: u64,
}

/// The result of a substitution (or of a dry run).
#[derive(Debug, Clone, Serialize)]
pub struct SubstituteOutcome {
    /// The instance.
    pub instance: String,
    /// Previous base version.
    pub from: String,
    /// New base version.
    pub to: String,
    /// Byte ranges whose visible content changed (merged, sorted).
    pub changed: Vec<Range>,
    /// Number of blocks whose visible content changed.
    pub changed_blocks: u64,
    /// Byte ranges the instance wrote that the target also changes.
    pub conflicts: Vec<Range>,
    /// Policy applied.
    pub policy: ConflictPolicy,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Per-step times.
    pub times: SubstituteTimes,
}

/// Merges sorted block indices into byte ranges, clipped to the disk size.
pub fn block_ranges(indices: &[u64], block_size: u64, size: u64) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for &i in indices {
        let offset = i.saturating_mul(block_size);
        if offset >= size {
            continue;
        }
        let len = block_size.min(size - offset);
        match out.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += len,
            _ => out.push(Range { offset, len }),
        }
    }
    out
}

/// The blocks whose hash differs between `base` and `target` (equal block counts), each with
/// the target's hash (`None`: a hole), ascending. Only differing subtrees are walked: interior
/// nodes come from the store's node cache, leaves through each `Version`'s own leaf cache. The
/// base's leaves are warm from serving reads, and the target's are loaded once here and kept
/// as the new base's after the swap (`Store::diff` reloads both sides' leaves every time and
/// the plan then loaded the target's again, ~2 leaf loads per changed block more).
pub(crate) fn changed_blocks(
    store: &Store,
    base: &Version,
    target: &Version,
) -> Result<Vec<(u64, Option<BlockHash>)>, StoreError> {
    let n = base.block_count();
    let mut leaves = Vec::new();
    let walk = Walk { store, n };
    walk.node(tree::height(n), 0, base.root(), target.root(), &mut leaves)?;
    prefetch(base, target, &leaves);
    let mut out = Vec::new();
    for leaf in leaves {
        let first = leaf.saturating_mul(FANOUT);
        for i in first..first.saturating_add(FANOUT).min(n) {
            let theirs = target.block_hash(i)?;
            if base.block_hash(i)? != theirs {
                out.push((i, theirs));
            }
        }
    }
    Ok(out)
}

/// Leaves compared by more than this many are loaded by `PREFETCH_THREADS` threads first.
const PREFETCH_MIN: usize = 64;
const PREFETCH_THREADS: usize = 4;

/// Loads both sides of `leaves` into the versions' caches, several at a time. A leaf not in the
/// host page cache is a disk read: one at a time, 620 of them took ~38 ms here after a
/// drop_caches. Errors are left for the comparison to report.
fn prefetch(base: &Version, target: &Version, leaves: &[u64]) {
    if leaves.len() < PREFETCH_MIN {
        return;
    }
    let load = |part: &[u64]| {
        for &leaf in part {
            let _ = target.block_hash(leaf.saturating_mul(FANOUT));
            let _ = base.block_hash(leaf.saturating_mul(FANOUT));
        }
    };
    std::thread::scope(|s| {
        for part in leaves.chunks(leaves.len().div_ceil(PREFETCH_THREADS)) {
            let spawned = std::thread::Builder::new()
                .name("leaf-prefetch".into())
                .spawn_scoped(s, move || load(part));
            if spawned.is_err() {
                load(part); // no thread to be had: the comparison loads them anyway
            }
        }
    });
}

/// The walk down to the leaves whose hashes differ.
struct Walk<'a> {
    store: &'a Store,
    n: u64,
}

impl Walk<'_> {
    /// Appends to `leaves` the index of every leaf under node `idx` at `level` whose hash
    /// differs between `a` and `b`.
    fn node(
        &self,
        level: u32,
        idx: u64,
        a: &[u8; 32],
        b: &[u8; 32],
        leaves: &mut Vec<u64>,
    ) -> Result<(), StoreError> {
        if a == b {
            return Ok(());
        }
        if level == 0 {
            leaves.push(idx);
            return Ok(());
        }
        let count = tree::entry_count(self.n, level, idx);
        let (na, nb) = (self.load(a, level, count)?, self.load(b, level, count)?);
        let entry = |node: &Option<Arc<Node>>, i: usize| {
            node.as_ref()
                .and_then(|n| n.entries.get(i).copied())
                .unwrap_or(ZERO)
        };
        for i in 0..count {
            let child = idx * FANOUT + i as u64;
            self.node(level - 1, child, &entry(&na, i), &entry(&nb, i), leaves)?;
        }
        Ok(())
    }

    /// An interior node (`None`: an all-hole subtree, never stored).
    fn load(
        &self,
        hash: &[u8; 32],
        level: u32,
        count: usize,
    ) -> Result<Option<Arc<Node>>, StoreError> {
        if *hash == ZERO {
            return Ok(None);
        }
        self.store.inner.load_node(hash, level, count).map(Some)
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl Instance {
    /// Rebases the instance onto `req.target` in one atomic step (see module doc).
    pub fn substitute(
        &self,
        store: &Store,
        req: &SubstituteRequest<'_>,
    ) -> Result<SubstituteOutcome, InstanceError> {
        let mut writer = self.lock_writer();
        let view = self.view();
        let base = &view.base;
        let target = req.target;
        if target.size() != base.size() {
            return Err(InstanceError::SizeMismatch {
                id: self.id.clone(),
                size: base.size(),
                target: target.size(),
            });
        }
        if target.block_size() != base.block_size() {
            return Err(InstanceError::BlockSizeMismatch {
                size: u64::from(base.block_size()),
                target: u64::from(target.block_size()),
            });
        }
        let mut times = SubstituteTimes::default();
        let t = Instant::now();
        let diff = if target.id() == base.id() {
            Vec::new()
        } else {
            changed_blocks(store, base, target)?
        };
        times.diff_us = micros(t);

        let t = Instant::now();
        let overlay = view.read_overlay();
        let per_block = overlay.per_block();
        let mut changed = Vec::new();
        let mut conflicts = Vec::new();
        for &(i, theirs) in &diff {
            match overlay.get(i) {
                None => changed.push(i),
                Some(mine) if mine.whole() == Some(theirs) => {}
                Some(mine) => {
                    conflicts.push(i);
                    match req.policy {
                        ConflictPolicy::Force => changed.push(i),
                        // The guest's sub-blocks stay over the target's block: what shows
                        // through between them changes.
                        ConflictPolicy::KeepLocal
                            if mine.under.is_none() && !mine.covers_all(per_block) =>
                        {
                            changed.push(i)
                        }
                        _ => {}
                    }
                }
            }
        }
        // A written block the target does not change: nothing to do; overlay entries
        // outside the diff keep showing the instance's bytes.
        let bs = u64::from(base.block_size());
        let size = base.size();
        let conflict_ranges = block_ranges(&conflicts, bs, size);
        times.plan_us = micros(t);
        let outcome = SubstituteOutcome {
            instance: self.id.to_string(),
            from: base.id().to_string(),
            to: target.id().to_string(),
            changed: block_ranges(&changed, bs, size),
            changed_blocks: changed.len() as u64,
            conflicts: conflict_ranges.clone(),
            policy: req.policy,
            dry_run: req.dry_run,
            times,
        };
        if req.dry_run {
            return Ok(outcome);
        }
        if req.policy == ConflictPolicy::Refuse && !conflicts.is_empty() {
            return Err(InstanceError::Conflicts(conflict_ranges));
        }
        let dropped: Vec<u64> = if req.policy == ConflictPolicy::Force {
            conflicts.clone()
        } else {
            Vec::new()
        };
        let mut new_overlay: Overlay = overlay.clone();
        drop(overlay);
        let dropped_entries: Vec<crate::overlay::Entry> = dropped
            .iter()
            .filter_map(|i| new_overlay.remove(*i))
            .collect();
        let mut outcome = outcome;

        let t = Instant::now();
        // Pending writes and the rebase go in one append and one log fsync (after the blocks
        // they name are synced): a crash keeps both, the writes only, or neither, and unflushed
        // guest writes may be lost in any case.
        let pending = std::mem::take(&mut writer.pending);
        let mut records = Vec::with_capacity(2);
        if !pending.is_empty() {
            if let Err(e) = self.sync_data(&mut writer) {
                writer.pending = pending;
                return Err(e);
            }
            records.push(Record::Overlay {
                ops: pending.clone(),
            });
        }
        records.push(Record::Rebased {
            from: outcome.from.clone(),
            to: outcome.to.clone(),
            target: req.label.to_string(),
            dropped,
            changed_blocks: outcome.changed_blocks,
            conflicts: conflicts.len() as u64,
            policy: req.policy.name().to_string(),
            at: now_secs(),
        });
        if let Err(e) = writer.log.append_durable(&records) {
            writer.pending = pending;
            return Err(e.into());
        }
        if !pending.is_empty() {
            writer.write_records += 1;
        }
        writer.slots.durable();
        // The dropped entries' slots are named by no record from the rebase on.
        for e in &dropped_entries {
            for s in &e.subs {
                if let Some(crate::overlay::Sub::Data { slot, .. }) = s {
                    writer.slots.release(*slot);
                }
            }
        }
        writer.slots.durable();
        outcome.times.persist_us = micros(t);
        crate::fault::point("substitute.logged");

        let t = Instant::now();
        self.view
            .store(std::sync::Arc::new(View::new(target.clone(), new_overlay)));
        outcome.times.swap_us = micros(t);
        drop(writer);
        Ok(outcome)
    }

    /// The instance's current contents as `(base, overlay changes)`, after making pending
    /// writes durable: what `Store::create_version` needs to commit it in O(changed blocks).
    /// Blocks with written sub-blocks are read whole and stored as pack blocks (synced).
    pub fn snapshot_changes(&self, store: &Store) -> Result<(Version, Changes), InstanceError> {
        let mut writer = self.lock_writer();
        self.flush_locked(&mut writer)?;
        let view = self.view();
        let bs = u64::from(view.base.block_size());
        let size = view.base.size();
        let mut written: Vec<u64> = view.read_overlay().iter().map(|(&i, _)| i).collect();
        written.sort_unstable();
        let mut block = vec![0u8; bs as usize];
        let mut changes = Vec::with_capacity(written.len());
        for i in written {
            let whole = view.read_overlay().get(i).and_then(|e| e.whole());
            let hash = match whole {
                Some(h) => h,
                None => {
                    let start = i * bs;
                    let visible = (size - start).min(bs) as usize;
                    block.fill(0);
                    crate::instance::read_view(
                        store,
                        &view,
                        &self.data,
                        start,
                        &mut block[..visible],
                    )?;
                    store.put_block(&block)?
                }
            };
            changes.push((i, hash));
        }
        store.sync()?;
        Ok((view.base.clone(), changes))
    }

    /// Records in the event log that the instance was committed as `version` named `tag`.
    pub fn record_commit(&self, version: &str, tag: &str) -> Result<(), InstanceError> {
        let mut writer = self.lock_writer();
        writer.log.append_durable(&[Record::Committed {
            version: version.to_string(),
            tag: tag.to_string(),
            at: now_secs(),
        }])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ranges_merge_adjacent_and_clip_the_tail() {
        let r = block_ranges(&[0, 1, 3, 4, 9], 4096, 4 * 4096 + 100);
        assert_eq!(
            r,
            vec![
                Range {
                    offset: 0,
                    len: 8192
                },
                Range {
                    offset: 3 * 4096,
                    len: 4096 + 100
                }
            ]
        );
    }
}
