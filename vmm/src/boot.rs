//! Guest memory and the Linux boot protocol: RAM regions around the MMIO gap, the bzImage (through
//! linux-loader), the initrd at the top of low RAM, the command line, and the zero page with its
//! e820 map. Everything written here lies inside guest RAM and outside the ACPI region.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_END, CMDLINE_ADDR, CMDLINE_MAX_LEN, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    ZERO_PAGE_ADDR,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Boot protocol 2.12 added the 64-bit entry point (XLF_KERNEL_64).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point is 0x200 past the protected-mode kernel's load address.
const ENTRY_64_OFFSET: u64 = 0x200;

/// Errors on the boot path; each names the part that failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// mmap of guest RAM failed.
    #[error("allocating {0} bytes of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// The kernel file cannot be opened.
    #[error("opening kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// linux-loader rejected the image.
    #[error("loading kernel {0} (is it a bzImage?)")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    /// The bzImage lacks the 64-bit entry point.
    #[error(
        "kernel {0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)"
    )]
    No64BitEntry(String),
    /// The initrd cannot be read.
    #[error("reading initrd {0}")]
    ReadInitrd(String, #[source] std::io::Error),
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd of {0} bytes does not fit in guest RAM below {1:#x}")]
    InitrdTooLarge(u64, u64),
    /// The command line is longer than the kernel or the vmm accepts.
    #[error("kernel command line is {0} bytes, the limit is {1}")]
    CmdlineTooLong(usize, usize),
    /// The command line holds a NUL or non-ASCII byte.
    #[error("kernel command line must be printable ASCII")]
    CmdlineInvalid,
    /// Writing boot data into guest memory failed.
    #[error("writing {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub typ: u32,
}

/// RAM regions for `size` bytes of guest memory: below the MMIO gap, then from 4 GiB up.
pub fn memory_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    ranges
}

/// Allocates guest RAM.
pub fn create_memory(size: u64) -> Result<GuestMemoryMmap, BootError> {
    GuestMemoryMmap::from_ranges(&memory_ranges(size)).map_err(|e| BootError::Memory(size, e))
}

/// The e820 map for `size` bytes of RAM: low RAM below the EBDA, the EBDA/ACPI/BIOS area
/// reserved, RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(size: u64) -> Vec<E820> {
    let mut map = vec![
        E820 {
            addr: 0,
            size: EBDA_START,
            typ: E820_RAM,
        },
        E820 {
            addr: EBDA_START,
            size: ACPI_END - EBDA_START,
            typ: E820_RESERVED,
        },
    ];
    let low_end = size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820 {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            typ: E820_RAM,
        });
    }
    if size > MMIO_GAP_START {
        map.push(E820 {
            addr: MMIO_GAP_END,
            size: size - MMIO_GAP_START,
            typ: E820_RAM,
        });
    }
    map
}

/// Where the initrd goes: page-aligned at the top of low RAM (and below the kernel's
/// `initrd_addr_max`), above the kernel's end.
pub fn initrd_address(
    mem_size: u64,
    initrd_size: u64,
    initrd_addr_max: u64,
    kernel_end: u64,
) -> Result<u64, BootError> {
    let top = mem_size
        .min(MMIO_GAP_START)
        .min(initrd_addr_max.saturating_add(1));
    let addr = top
        .checked_sub(initrd_size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end);
    addr.ok_or(BootError::InitrdTooLarge(initrd_size, top))
}

/// Checks the command line against the kernel's limit (`cmdline_size` from its header).
pub fn check_cmdline(cmdline: &str, kernel_limit: u32) -> Result<(), BootError> {
    let limit = (kernel_limit as usize).clamp(1, CMDLINE_MAX_LEN);
    // The kernel's limit counts the terminating NUL.
    if cmdline.len() >= limit {
        return Err(BootError::CmdlineTooLong(cmdline.len(), limit - 1));
    }
    if !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(BootError::CmdlineInvalid);
    }
    Ok(())
}

/// Result of loading: where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Loads kernel, initrd and command line and writes the zero page (RSDP at `rsdp_addr`).
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<BootInfo, BootError> {
    let name = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| BootError::OpenKernel(name.clone(), e))?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BootError::LoadKernel(name.clone(), e))?;
    let hdr: setup_header = loaded
        .setup_header
        .ok_or_else(|| BootError::No64BitEntry(name.clone()))?;
    if hdr.version < MIN_BOOT_PROTOCOL || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(name));
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.acpi_rsdp_addr = rsdp_addr;

    check_cmdline(cmdline, hdr.cmdline_size)?;
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write("command line", e))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(path) = initrd {
        let initrd_name = path.display().to_string();
        let data = std::fs::read(path).map_err(|e| BootError::ReadInitrd(initrd_name, e))?;
        let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;
        let size = data.len() as u64;
        let addr = initrd_address(mem_size, size, u64::from(hdr.initrd_addr_max), kernel_end)?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| BootError::Write("initrd", e))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.typ,
        };
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| BootError::Write("zero page", e))?;
    Ok(BootInfo {
        entry: loaded.kernel_load.raw_value() + ENTRY_64_OFFSET,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest_has_low_ram_reserved_hole_and_high_ram() {
        let map = e820_map(512 << 20);
        assert_eq!(
            map,
            vec![
                E820 {
                    addr: 0,
                    size: 0x9fc00,
                    typ: 1
                },
                E820 {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    typ: 2
                },
                E820 {
                    addr: 0x100000,
                    size: (512 << 20) - 0x100000,
                    typ: 1
                },
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_mmio_gap() {
        let size = 5u64 << 30;
        let map = e820_map(size);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820 {
                addr: 0x100000,
                size: 0xc000_0000 - 0x100000,
                typ: 1
            }
        );
        assert_eq!(
            map[3],
            E820 {
                addr: 1 << 32,
                size: 2 << 30,
                typ: 1
            }
        );
        let ram: u64 = map.iter().filter(|e| e.typ == 1).map(|e| e.size).sum();
        assert_eq!(ram, size - (ACPI_END - EBDA_START));
        // No entry overlaps the virtio MMIO slots or the APICs.
        for e in &map {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
        let ranges = memory_ranges(size);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(1 << 32), 2 << 30)
            ]
        );
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram_page_aligned() {
        let a = initrd_address(512 << 20, 10_000, 0x7fff_ffff, 0x200_0000);
        assert_eq!(a.ok(), Some(((512u64 << 20) - 10_000) & !0xfff));
        // Capped below the gap and by initrd_addr_max.
        let a = initrd_address(8 << 30, 4096, 0x7fff_ffff, 0x200_0000);
        assert_eq!(a.ok(), Some(0x8000_0000 - 4096));
        // Too large to fit above the kernel.
        assert!(initrd_address(64 << 20, 63 << 20, 0x7fff_ffff, 0x200_0000).is_err());
        assert!(initrd_address(64 << 20, u64::MAX, 0x7fff_ffff, 0).is_err());
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline("console=ttyS0", 2048).is_ok());
        assert!(check_cmdline(&"x".repeat(2047), 2048).is_ok());
        assert!(check_cmdline(&"x".repeat(2048), 2048).is_err());
        assert!(check_cmdline("a\0b", 2048).is_err());
        assert!(check_cmdline("caf\u{e9}", 2048).is_err());
    }
}
