//! vmm: a small KVM microVM. It boots a bzImage with ACPI-described virtio-mmio devices, knows
//! nothing of the imagefs store (it is handed file paths and socket paths), and keeps device
//! emulation testable on plain guest memory without KVM.

pub mod devices;
