//! Who may read a store: its owner, and a group the operator names (`init --group`).
//! Invariant: the store directory is 0700 (0750 with a group) and every file and socket under
//! it is created with an explicit mode that grants no one else, so no local user reaches a
//! guest's disk, a pack or a console log through the store or its mount.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::StoreError;

/// The store's sharing: `Some(gid)` when a group may read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// The group that may read the store and its mount, if any.
    pub group: Option<u32>,
}

impl Access {
    /// The sharing of the store at `dir`, from its directory's mode and group.
    pub fn of(dir: &Path) -> Result<Access, StoreError> {
        let m = std::fs::metadata(dir).map_err(StoreError::io("stat", dir))?;
        Ok(Access {
            group: (m.mode() & 0o050 != 0).then_some(m.gid()),
        })
    }

    /// The mode for something the owner reads (and writes, with `write`), or lists (`dir`):
    /// the group gets read (and list) access when there is one, no one else anything.
    pub fn mode(&self, write: bool, dir: bool) -> u32 {
        let owner = 0o400 | if write { 0o200 } else { 0 } | if dir { 0o100 } else { 0 };
        let group = match self.group {
            Some(_) => 0o040 | if dir { 0o010 } else { 0 },
            None => 0,
        };
        owner | group
    }

    /// The process umask that gives new files no more than `mode` allows.
    pub fn umask(&self) -> u32 {
        if self.group.is_some() {
            0o027
        } else {
            0o077
        }
    }

    /// Sets `dir`'s mode (and group) to this sharing.
    pub fn apply(&self, dir: &Path) -> Result<(), StoreError> {
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(dir, None, Some(gid)).map_err(StoreError::io("chown", dir))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(self.mode(true, true)))
            .map_err(StoreError::io("chmod", dir))
    }
}

/// The gid of the group named `name`.
pub fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer into static storage
    // (or null), read at once on this thread.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        return None;
    }
    // SAFETY: non-null, so it points at a valid struct group.
    Some(unsafe { (*g).gr_gid })
}

/// Makes this process create files with no more than `access` allows.
pub fn set_umask(access: &Access) {
    // SAFETY: umask has no preconditions; called before threads that create files start.
    unsafe { libc::umask(access.umask() as libc::mode_t) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_grant_the_owner_and_only_a_named_group() {
        let own = Access::default();
        assert_eq!(own.mode(false, false), 0o400);
        assert_eq!(own.mode(true, false), 0o600);
        assert_eq!(own.mode(true, true), 0o700);
        let grp = Access { group: Some(5) };
        assert_eq!(grp.mode(false, false), 0o440);
        assert_eq!(grp.mode(true, false), 0o640);
        assert_eq!(grp.mode(true, true), 0o750);
        assert_eq!(grp.mode(false, true), 0o550);
    }
}
