//! The FUSE mount: the namespace model (model.rs), the thin fuser adapter (fuse.rs), page-cache
//! invalidation (inval.rs), the daemon's lifecycle state machine (lifecycle.rs) and the
//! mount-side commands (cmd.rs). Invariant: all storage logic
//! lives in the store library; this module translates.

pub mod cmd;
pub mod fuse;
pub mod inval;
pub mod lifecycle;
pub mod model;

use std::sync::Arc;

use imagefs_store::instance::{Instances, SubstituteOutcome};
use imagefs_store::Store;

use lifecycle::Lifecycle;

/// What a command runs against: the store, its instances and, inside the daemon, the live mount.
#[derive(Debug)]
pub struct Ctx {
    /// The open store.
    pub store: Arc<Store>,
    /// Its instances (shared with the mount, so substitution acts on the live state).
    pub instances: Arc<Instances>,
    /// The mount, when the command runs inside the daemon.
    pub live: Option<Live>,
}

impl Ctx {
    /// A context over a store opened by the CLI itself (no daemon).
    pub fn offline(store: Store) -> Ctx {
        let instances = Arc::new(Instances::new(&store));
        register_gc_roots(&store, &instances);
        Ctx {
            store: Arc::new(store),
            instances,
            live: None,
        }
    }
}

/// Makes gc keep what live instances use (their base, and overlay blocks not yet in a log).
pub fn register_gc_roots(store: &Store, instances: &Arc<Instances>) {
    let weak: std::sync::Weak<Instances> = Arc::downgrade(instances);
    let weak: std::sync::Weak<dyn imagefs_store::GcRoots> = weak;
    store.add_gc_roots(weak);
}

/// The running mount, as commands see it.
#[derive(Debug)]
pub struct Live {
    /// The namespace (to find an instance's inode).
    pub model: Arc<model::Model>,
    /// Sends page-cache invalidations.
    pub inval: inval::Invalidator,
    /// The daemon's lifecycle (for `umount`).
    pub life: Arc<Lifecycle>,
    /// Tells the guest of a live VM on a substituted instance what changed.
    pub tell_guest: TellGuest,
}

/// Tells the live VM on `outcome`'s instance (if any) what changed, and reports what happened
/// as JSON. The daemon hands in vm/notify.rs `tell_guest`, so the mount never imports the VMs
/// (which import the mount).
pub type TellGuest = fn(&Store, &SubstituteOutcome) -> serde_json::Value;
