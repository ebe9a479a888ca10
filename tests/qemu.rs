//! Boots the guest kernel and initramfs under QEMU (software emulation) with the agent channel on
//! a Unix socket. Owned by the guest-agent work.
