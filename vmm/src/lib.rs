//! vmm: a small KVM microVM. It boots a bzImage with ACPI-described virtio-mmio devices, knows
//! nothing of the imagefs store (it is handed file paths and socket paths), and keeps device
//! emulation testable on plain guest memory without KVM.
//!
//! Machine model, and why. Debian's cloud kernel has no virtio-mmio command-line devices, so the
//! devices must be described by firmware tables or found on PCI. We describe them with ACPI in
//! hardware-reduced mode (RSDP -> XSDT -> FADT, MADT; DSDT with COM1, COM2, `\_S5_`, a GED power
//! button and one LNRO0005 node per disk), as Firecracker and cloud-hypervisor do: no PCI host
//! bridge, config space or MSI routing to emulate, one MMIO page and one GSI per disk, and the
//! kernel's own `virtio_mmio` ACPI binding does the rest. The price is legacy-IRQ sharing limits
//! (at most 18 disks on GSIs 5..=22), which a VM of this product never reaches.
//!
//! Boot steps, in the order `TryFrom<VmmConfig> for Vmm` runs them (each needs the one before):
//! 1. KVM VM; guest RAM (below the 3 GiB MMIO gap, the rest above 4 GiB) registered as memslots;
//! 2. TSS address, in-kernel irqchip (LAPICs + IOAPIC + PIC), PIT (speaker port in the kernel);
//! 3. devices, each interrupt an irqfd on its GSI: COM1 console (GSI 4), COM2 agent bridge
//!    (GSI 3, Unix socket), GED power button (GSI 23), virtio-mmio disks (GSI 5+i, QueueNotify
//!    as an ioeventfd with datamatch = queue index);
//! 4. ACPI tables at 0xE0000 (e820-reserved, `acpi_rsdp_addr` in the zero page);
//! 5. bzImage via linux-loader, initrd at the top of low RAM, command line, zero page + e820;
//! 6. GDT and identity page tables; per vCPU: CPUID (KVM_GET_SUPPORTED_CPUID + APIC ID, topology,
//!    hypervisor and TSC-deadline bits; KVM's kvm-clock leaves kept), MSRs, 64-bit registers,
//!    FPU, LAPIC LINT0/1.
//!
//! `Vmm::run` then starts one thread per vCPU, one per virtio queue and the agent bridge, and
//! waits for the first `GuestExit` (ACPI S5 -> 0, reset -> 0, SIGTERM: power button, then 143
//! after the grace period).

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
