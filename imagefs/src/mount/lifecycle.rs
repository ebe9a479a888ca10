//! The mount daemon's lifecycle: Starting -> Serving -> Stopping -> Stopped. Invariant: the
//! state moves only through `Lifecycle::on` (one `match` holds every transition); waiters
//! (`umount` inside the daemon) wake on each change. The daemon (daemon/mod.rs) drives it; the
//! mount's commands read it through `Live`.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Opening the store and mounting.
    Starting,
    /// Mounted and serving requests.
    Serving,
    /// Unmount requested; waiting for the kernel to let go.
    Stopping,
    /// The kernel dropped the mount; the store is flushed and closed.
    Stopped,
}

/// What happens to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The mount is up.
    Mounted,
    /// A signal or `imagefs umount` asked to stop.
    StopRequested,
    /// The FUSE session ended (the kernel unmounted).
    SessionEnded,
    /// Instances flushed and the control socket removed.
    Closed,
}

impl State {
    /// The state after `event`, or `None` if the event is meaningless now (ignored).
    pub fn on(self, event: Event) -> Option<State> {
        use Event::*;
        use State::*;
        match (self, event) {
            (Starting, Mounted) => Some(Serving),
            (Starting | Serving, StopRequested) => Some(Stopping),
            (Starting | Serving | Stopping, SessionEnded) => Some(Stopping),
            (Stopping, Closed) => Some(Stopped),
            (Stopping, StopRequested) => None,
            (Serving, Mounted)
            | (Stopping, Mounted)
            | (Starting | Serving, Closed)
            | (Stopped, _) => None,
        }
    }
}

/// The shared lifecycle: state plus a condition variable to wait on it.
#[derive(Debug)]
pub struct Lifecycle {
    state: Mutex<State>,
    changed: Condvar,
    mountpoint: PathBuf,
}

impl Lifecycle {
    /// A lifecycle in Starting, of a mount at `mountpoint`.
    pub fn new(mountpoint: PathBuf) -> Lifecycle {
        Lifecycle {
            state: Mutex::new(State::Starting),
            changed: Condvar::new(),
            mountpoint,
        }
    }

    /// Applies `event`; returns the state after it.
    pub fn on(&self, event: Event) -> State {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(next) = s.on(event) {
            tracing::info!(from = ?*s, to = ?next, ?event, "daemon state");
            *s = next;
            self.changed.notify_all();
        }
        *s
    }

    /// Waits until the daemon reaches `want` (or `timeout` passes); true if reached.
    pub fn wait_for(&self, want: State, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| *s != want)
            .unwrap_or_else(|p| p.into_inner());
        *s == want
    }

    /// The mountpoint served.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_follows_its_transitions_and_ignores_the_rest() {
        use Event::*;
        let mut s = State::Starting;
        for (e, want) in [
            (Closed, State::Starting),
            (Mounted, State::Serving),
            (Mounted, State::Serving),
            (StopRequested, State::Stopping),
            (StopRequested, State::Stopping),
            (SessionEnded, State::Stopping),
            (Closed, State::Stopped),
            (Mounted, State::Stopped),
        ] {
            s = s.on(e).unwrap_or(s);
            assert_eq!(s, want, "after {e:?}");
        }
        // The kernel can drop the mount without anyone asking (umount(8)).
        assert_eq!(State::Serving.on(SessionEnded), Some(State::Stopping));
    }
}
