//! The guest's physical address map. Every fixed address the boot path, ACPI tables and device
//! wiring agree on lives here, so no two parts can disagree about where something is.

/// GDT for the 64-bit entry (null, code, data, TSS descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`) handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: one PML4, one PDPT, one PD of 512 2-MiB pages (the first 1 GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Upper bound of the command line we accept, whatever the kernel's own limit says.
pub const CMDLINE_MAX_LEN: usize = 4096;
/// End of the low RAM below the EBDA; [EBDA_START, HIMEM_START) is reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP: where `acpi_rsdp_addr` points and where the legacy scan would find it too.
pub const RSDP_ADDR: u64 = 0xe0000;
/// End of the region the ACPI tables may use.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the protected-mode kernel is loaded (bzImage `code32_start`).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 1 GiB MMIO gap below 4 GiB; RAM above it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot; slot i is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xc000_1000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio device: 0-4 are timer, keyboard, cascade, COM2, COM1.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The in-kernel IOAPIC has 24 pins: virtio devices get GSIs 5..=22, the GED gets 23.
pub const MAX_VIRTIO_DEVICES: usize = 18;
/// GSI of the ACPI Generic Event Device that carries the power-button event.
pub const GED_GSI: u32 = 23;
/// Local APIC and IOAPIC addresses (emulated in the kernel).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// KVM's TSS needs three pages below 4 GiB that the guest never uses.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Legacy ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM2_PORT: u16 = 0x2f8;
pub const COM1_GSI: u32 = 4;
pub const COM2_GSI: u32 = 3;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_GSI: u32 = 1;
/// One byte-wide port serving as ACPI SLEEP_CONTROL, SLEEP_STATUS and RESET_REG.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Value written to `ACPI_PM_PORT` for reset (the FADT's RESET_VALUE).
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 as declared in `\_S5_`.
pub const ACPI_S5_SLP_TYP: u8 = 5;

/// Base address of virtio-mmio slot `index`, if the slot exists.
pub fn virtio_mmio_base(index: usize) -> Option<u64> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    Some(VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE)
}

/// GSI of virtio-mmio slot `index`.
pub fn virtio_gsi(index: usize) -> Option<u32> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    u32::try_from(index).ok().map(|i| VIRTIO_FIRST_GSI + i)
}
