//! vmm: a small KVM microVM. It boots a bzImage with ACPI-described virtio-mmio devices, knows
//! nothing of the imagefs store (it is handed file paths and socket paths), and keeps device
//! emulation testable on plain guest memory without KVM.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod exit;
pub mod host;
pub mod layout;
pub mod vmm;

pub use config::{ConsoleConfig, DiskConfig, VmmConfig};
pub use exit::GuestExit;
pub use vmm::{Vmm, VmmError};
