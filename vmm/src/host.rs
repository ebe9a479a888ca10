//! What this host's /dev/kvm can run. `kvm_pvm` (a shadow-paging module for nested use) runs
//! PVM-aware guest kernels only: an unmodified Linux guest dies early with emulation failures, so
//! the vmm refuses it up front with one clear line instead of a confusing crash later.

use std::path::Path;

/// Environment variable that lets an experiment boot on a host the vmm would refuse.
pub const ALLOW_ENV: &str = "VMM_ALLOW_UNSUPPORTED_KVM";

/// Why this host's KVM cannot run an unmodified Linux guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// /dev/kvm is served by kvm_pvm.
    #[error(
        "this host's /dev/kvm is kvm_pvm (/sys/module/kvm_pvm), which runs PVM-aware guest kernels \
         only; use QEMU (qemu-system-x86_64 -accel tcg) or run vmm inside the nested-KVM harness \
         (tests/nested.rs); set {ALLOW_ENV}=1 or pass --allow-unsupported-kvm to try anyway"
    )]
    PvmOnly,
}

/// Checks the host under `sys_module` (normally /sys/module).
pub fn check_kvm_at(sys_module: &Path) -> Result<(), HostError> {
    if sys_module.join("kvm_pvm").exists() {
        return Err(HostError::PvmOnly);
    }
    Ok(())
}

/// Checks this host.
pub fn check_kvm() -> Result<(), HostError> {
    check_kvm_at(Path::new("/sys/module"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_is_refused_and_plain_kvm_is_not() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("kvm"))?;
        assert_eq!(check_kvm_at(dir.path()), Ok(()));
        std::fs::create_dir(dir.path().join("kvm_pvm"))?;
        let err = check_kvm_at(dir.path()).err().map(|e| e.to_string());
        assert!(
            err.is_some_and(|m| m.contains("kvm_pvm") && m.contains("QEMU") && !m.contains('\n'))
        );
        Ok(())
    }
}
