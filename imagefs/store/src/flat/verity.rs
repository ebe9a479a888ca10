//! fs-verity on finished flat copies, where the kernel and filesystem offer it: the kernel then
//! checks every page read from the copy against a Merkle tree, so a bit flipped on disk is an
//! I/O error at once instead of wrong bytes until the scrubber's next round. Where it is missing
//! (a kernel built without CONFIG_FS_VERITY, or a filesystem without the feature), copies are
//! re-checked by the scrubber only; that is a fact about the machine, not a failure.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

/// `FS_IOC_ENABLE_VERITY` = `_IOW('f', 133, struct fsverity_enable_arg)` (128 bytes), from
/// linux/fsverity.h; the libc crate does not carry it.
const FS_IOC_ENABLE_VERITY: libc::c_ulong = 0x4080_6685;
/// `FS_IOC_MEASURE_VERITY` = `_IOWR('f', 134, struct fsverity_digest)` (4-byte header).
const FS_IOC_MEASURE_VERITY: libc::c_ulong = 0xC004_6686;
/// `FS_VERITY_HASH_ALG_SHA256`.
const HASH_SHA256: u32 = 1;

/// `struct fsverity_enable_arg` (linux/fsverity.h, version 1).
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// What enabling fs-verity on a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verity {
    /// The kernel now verifies every read of the file.
    Enabled,
    /// This kernel or filesystem has no fs-verity.
    Unavailable,
}

/// The line printed where fs-verity is missing.
pub const UNAVAILABLE: &str =
    "fs-verity: not available on this kernel (flat copies are re-checked by the scrubber only)";

/// What the last attempt on this machine found: 0 unknown, 1 enabled, 2 unavailable.
static SEEN: AtomicU8 = AtomicU8::new(0);

/// Whether fs-verity worked on the last copy this process tried, if it tried one.
pub fn seen() -> Option<Verity> {
    match SEEN.load(Ordering::Relaxed) {
        1 => Some(Verity::Enabled),
        2 => Some(Verity::Unavailable),
        _ => None,
    }
}

/// Turns fs-verity on for `file` (opened read-only, with no writer left), or tells that the
/// kernel or filesystem lacks it. Errors are other failures (for example ENOMEM, EBUSY).
pub fn enable(file: &File) -> std::io::Result<Verity> {
    let arg = EnableArg {
        version: 1,
        hash_algorithm: HASH_SHA256,
        block_size: 4096,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: the ioctl reads a struct fsverity_enable_arg of exactly this layout from `arg`,
    // which lives across the call; no salt or signature pointers are passed.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_ENABLE_VERITY, &arg) };
    let verity = if rc == 0 {
        Verity::Enabled
    } else {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            // already a verity file
            Some(libc::EEXIST) => Verity::Enabled,
            // no such ioctl (kernel without CONFIG_FS_VERITY) or no such feature on this fs
            Some(libc::ENOTTY | libc::EOPNOTSUPP) => Verity::Unavailable,
            _ => return Err(err),
        }
    };
    let first = SEEN.swap(
        if verity == Verity::Enabled { 1 } else { 2 },
        Ordering::Relaxed,
    ) == 0;
    if first && verity == Verity::Unavailable {
        tracing::info!("{UNAVAILABLE}");
    }
    Ok(verity)
}

/// Whether fs-verity works for files in `dir`: tries it on a small scratch file there.
pub fn probe(dir: &std::path::Path) -> std::io::Result<Verity> {
    let path = dir.join(".verity-probe");
    let result = (|| {
        let mut f = File::create(&path)?;
        std::io::Write::write_all(&mut f, &[0u8; 4096])?;
        drop(f);
        enable(&File::open(&path)?)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Whether the kernel verifies reads of `file` (it has an fs-verity digest).
pub fn is_enabled(file: &File) -> bool {
    // struct fsverity_digest: u16 algorithm, u16 size (in: buffer room, out: digest length),
    // then the digest; room for SHA-512.
    let mut buf = [0u8; 4 + 64];
    buf[2..4].copy_from_slice(&64u16.to_ne_bytes());
    // SAFETY: the ioctl writes at most 4 + 64 bytes (the size we put in the header) into
    // `buf`, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_MEASURE_VERITY, buf.as_mut_ptr()) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn enable_turns_verity_on_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 64 << 10]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        let before = is_enabled(&f);
        assert!(!before, "a fresh file has no fs-verity digest");
        match enable(&f).expect("enabling fs-verity either works or is unavailable") {
            Verity::Enabled => {
                assert!(is_enabled(&f), "enabled, but the kernel measures no digest");
                assert_eq!(seen(), Some(Verity::Enabled));
            }
            Verity::Unavailable => {
                // What we claim must be true: the kernel really has no verity on this file.
                assert!(!is_enabled(&f));
                assert_eq!(seen(), Some(Verity::Unavailable));
                eprintln!("{UNAVAILABLE}");
            }
        }
    }
}
