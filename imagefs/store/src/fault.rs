//! Named fault points: a crash test arms one and the process dies there as by kill -9, so the
//! test knows its kill landed inside the operation, at a chosen depth.
//!
//! `IMAGEFS_FAULT=NAME` kills the process the first time it reaches the point `NAME`;
//! `IMAGEFS_FAULT=NAME@N` the Nth time. On a hit the process writes one line
//! `IMAGEFS-FAULT NAME` to stderr and sends itself SIGKILL: no destructors, no flush, no
//! buffered writes beyond what already reached the kernel. Unset (always, outside crash
//! tests), a point costs one relaxed atomic load. The variable is read once per process.
//!
//! The points (also listed in [`POINTS`] and the README):
//!
//! | name | where |
//! |---|---|
//! | `objects.put` | an object was appended to the pack (not yet synced or indexed) |
//! | `pack.synced` | a pack was fsynced, before the object index learns its objects |
//! | `refs.appended` | refs records were appended, before the log is fsynced |
//! | `refs.synced` | refs records are durable, before the sled index applies them |
//! | `import.blocks_stored` | an import stored every block, before it commits the version |
//! | `apply.blocks_stored` | a bundle apply stored its blocks, before it commits the version |
//! | `apply.committed` | a bundle apply committed the version, before it sets the tag |
//! | `gc.dropped` | gc logged its version drops, before it copies live objects |
//! | `gc.copied` | gc copied live objects to a new pack (synced), before the index rewrite |
//! | `gc.index_rewritten` | gc rewrote the object index, before it deletes the old packs |
//! | `gc.deleting` | gc is between deletions of old packs (reached once per pack) |
//! | `log.appending` | a record log wrote part of a record (half its bytes) |
//! | `instance.data_written` | an instance write reached the data file, before its overlay op |
//! | `instance.flush.data_synced` | a flush fsynced the data file, before appending the record |
//! | `instance_log.appended` | instance records (a flush's, a rebase) appended, before the fsync |
//! | `instance.flush.synced` | a flush made its record durable, before the guest is answered |
//! | `substitute.logged` | a substitution's `Rebased` record is durable, before the view swap |
//! | `substitute.invalidating` | a daemon is between page-cache invalidations after a swap |
//! | `rollout.between_vms` | a rollout driver substituted one VM of a wave, before the next |
//! | `rollout.wave_saved` | a rollout driver logged a wave's outcome, before the next wave |
//! | `export.before_rename` | an export wrote and fsynced its temporary file, before the rename |

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

/// Every fault point name (see the module documentation for where each lies).
pub const POINTS: &[&str] = &[
    "objects.put",
    "pack.synced",
    "refs.appended",
    "refs.synced",
    "import.blocks_stored",
    "apply.blocks_stored",
    "apply.committed",
    "gc.dropped",
    "gc.copied",
    "gc.index_rewritten",
    "gc.deleting",
    "log.appending",
    "instance.data_written",
    "instance.flush.data_synced",
    "instance_log.appended",
    "instance.flush.synced",
    "substitute.logged",
    "substitute.invalidating",
    "rollout.between_vms",
    "rollout.wave_saved",
    "export.before_rename",
];

/// The environment variable naming the armed point.
pub const ENV: &str = "IMAGEFS_FAULT";

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Parses `NAME` or `NAME@N` (N >= 1); anything else arms nothing.
fn parse(spec: &str) -> Option<(String, u64)> {
    let spec = spec.trim();
    let (name, at) = match spec.split_once('@') {
        Some((n, k)) => (n, k.parse::<u64>().ok().filter(|&k| k >= 1)?),
        None => (spec, 1),
    };
    (!name.is_empty()).then(|| (name.to_string(), at))
}

/// Dies here if `IMAGEFS_FAULT` names this point (and this is the Nth time it is reached).
#[inline]
pub fn point(name: &'static str) {
    if STATE.load(Ordering::Relaxed) == OFF {
        return;
    }
    reached(name);
}

/// Whether `IMAGEFS_FAULT` names this point (for code that splits a write only when a crash
/// test asks for a kill in the middle of it).
#[inline]
pub fn is_armed(name: &str) -> bool {
    if STATE.load(Ordering::Relaxed) == OFF {
        return false;
    }
    armed().as_ref().is_some_and(|(n, _)| n == name)
}

fn armed() -> &'static Option<(String, u64)> {
    let armed = ARMED.get_or_init(|| std::env::var(ENV).ok().as_deref().and_then(parse));
    STATE.store(if armed.is_some() { ON } else { OFF }, Ordering::Relaxed);
    armed
}

#[cold]
#[inline(never)]
fn reached(name: &'static str) {
    let Some((armed, at)) = armed() else {
        return;
    };
    if armed != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *at {
        die(name);
    }
}

fn die(name: &str) -> ! {
    use std::io::Write;
    // stderr is unbuffered: the line is in the kernel before the signal.
    let _ = writeln!(std::io::stderr().lock(), "IMAGEFS-FAULT {name}");
    // SAFETY: kill(2) and getpid(2) on our own process; SIGKILL cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // Unreachable: SIGKILL to ourselves is delivered before kill returns.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(parse("gc.copied"), Some(("gc.copied".into(), 1)));
        assert_eq!(parse("gc.deleting@3"), Some(("gc.deleting".into(), 3)));
        assert_eq!(parse("x@0"), None);
        assert_eq!(parse("x@y"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn every_point_is_named_once() {
        let mut names = POINTS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), POINTS.len());
    }
}
