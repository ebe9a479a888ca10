//! ACPI tables that describe the machine to the guest: RSDP -> XSDT -> {FADT (hardware-reduced,
//! sleep and reset registers on one I/O port), MADT}, FADT -> DSDT (COM1, COM2, `\_S5_`,
//! one LNRO0005 virtio-mmio node per disk in disk order, and a power button (PNP0C0C) signalled
//! through a Generic Event Device (ACPI0013) on GED_GSI, which the vmm raises on SIGTERM). Tables are built as plain bytes first
//! (tested without KVM) and then copied into [RSDP_ADDR, ACPI_END), which the e820 map reserves.
//!
//! No PNP0303 (i8042) node: our i8042 only implements the reset line, and a declared controller
//! makes Linux probe it and wait ~2 s for a CTR read that never answers. Without the node (and
//! with IAPC_BOOT_ARCH bit 1 clear) Linux skips the i8042, and 0xFE to port 0x64 still resets.

use acpi_tables::aml;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    virtio_gsi, virtio_mmio_base, ACPI_END, ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP,
    COM1_GSI, COM1_PORT, COM2_GSI, COM2_PORT, GED_GSI, IOAPIC_ADDR, LAPIC_ADDR, RSDP_ADDR,
    VIRTIO_MMIO_SIZE,
};

const OEM_ID: [u8; 6] = *b"IMGFS ";
const OEM_TABLE_ID: [u8; 8] = *b"IMGFSVMM";
const OEM_REVISION: u32 = 1;

/// FADT flags: hardware-reduced ACPI, ACPI reset register, power/sleep buttons absent as
/// fixed-feature buttons.
const FADT_FLAGS: u32 = (1 << 20) | (1 << 10) | (1 << 4) | (1 << 5);
/// IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5). Bit 1 (8042) stays clear so Linux does
/// not probe a keyboard controller we only emulate for its reset line.
const FADT_IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Errors while building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More virtio devices than MMIO slots and GSIs.
    #[error("too many virtio devices for the ACPI layout: {0}")]
    TooManyDevices(usize),
    /// The tables do not fit below ACPI_END.
    #[error("ACPI tables need {0} bytes, more than the reserved region holds")]
    TooLarge(u64),
    /// Copying a table into guest memory failed.
    #[error("writing ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The tables, each with the guest address it must be copied to.
#[derive(Debug)]
pub struct AcpiTables {
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Builds the tables for `cpus` vCPUs and `virtio_devices` virtio-mmio slots.
pub fn build(cpus: u8, virtio_devices: usize) -> Result<AcpiTables, AcpiError> {
    let dsdt = dsdt(virtio_devices)?;
    let madt = madt(cpus);
    // Layout: RSDP (36 bytes) at RSDP_ADDR, then each table 16-byte aligned.
    let align = |a: u64| (a + 15) & !15;
    let dsdt_addr = align(RSDP_ADDR + 36);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt_addr = align(fadt_addr + 276);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.append_slice(&fadt_addr.to_le_bytes());
    xsdt.append_slice(&madt_addr.to_le_bytes());
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - RSDP_ADDR));
    }
    let rsdp = rsdp(xsdt_addr);
    Ok(AcpiTables {
        blobs: vec![
            (RSDP_ADDR, rsdp),
            (dsdt_addr, dsdt.as_slice().to_vec()),
            (fadt_addr, fadt.as_slice().to_vec()),
            (madt_addr, madt.as_slice().to_vec()),
            (xsdt_addr, xsdt.as_slice().to_vec()),
        ],
    })
}

/// Builds the tables and copies them into guest memory; returns the RSDP address.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, virtio_devices: usize) -> Result<u64, AcpiError> {
    let tables = build(cpus, virtio_devices)?;
    for (addr, blob) in &tables.blobs {
        mem.write_slice(blob, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(RSDP_ADDR)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum over the first 20 bytes
    r.extend_from_slice(&OEM_ID);
    r.push(2); // revision 2: XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum over all 36 bytes
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// A generic address structure for a byte-wide register at `port` in system I/O space.
fn io_gas(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // SystemIO
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut f = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    f.write_u16(109, FADT_IAPC_BOOT_ARCH);
    f.write_u32(112, FADT_FLAGS);
    f.write_bytes(116, &io_gas(ACPI_PM_PORT)); // RESET_REG
    f.write_u8(128, ACPI_RESET_VALUE);
    f.write_u8(131, 5); // FADT minor version
    f.write_u64(140, dsdt_addr); // X_DSDT
    f.write_bytes(244, &io_gas(ACPI_PM_PORT)); // SLEEP_CONTROL_REG
    f.write_bytes(256, &io_gas(ACPI_PM_PORT)); // SLEEP_STATUS_REG
    f
}

fn madt(cpus: u8) -> Sdt {
    let mut m = Sdt::new(*b"APIC", 44, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.write_u32(36, LAPIC_ADDR);
    m.write_u32(40, 0); // no dual 8259s
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags = enabled.
        m.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = [0u8; 12];
    ioapic[0] = 1; // I/O APIC
    ioapic[1] = 12;
    ioapic[2] = 0; // IOAPIC id
    ioapic[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    // GSI base 0 (bytes 8..12 stay zero).
    m.append_slice(&ioapic);
    m
}

fn dsdt(virtio_devices: usize) -> Result<Sdt, AcpiError> {
    let mut body: Vec<u8> = Vec::new();
    legacy_uart("_SB_.COM1", 0, COM1_PORT, COM1_GSI).to_aml(&mut body);
    legacy_uart("_SB_.COM2", 1, COM2_PORT, COM2_GSI).to_aml(&mut body);

    power_button(&mut body);

    let typ = ACPI_S5_SLP_TYP;
    let s5 = aml::Package::new(vec![&typ, &typ, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    for i in 0..virtio_devices {
        let (Some(base), Some(gsi)) = (virtio_mmio_base(i), virtio_gsi(i)) else {
            return Err(AcpiError::TooManyDevices(virtio_devices));
        };
        virtio_node(i, base, gsi).to_aml(&mut body);
    }
    let mut d = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    d.append_slice(&body);
    Ok(d)
}

/// `\_SB_.PWRB` (PNP0C0C) and `\_SB_.GED_` (ACPI0013) whose `_EVT` notifies the button with
/// 0x80 (pressed): Linux's button driver turns that into KEY_POWER, which init systems (or an
/// agent watching /dev/input) answer with a clean poweroff.
fn power_button(body: &mut Vec<u8>) {
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let pwrb_hid_name = aml::Name::new("_HID".into(), &pwrb_hid);
    let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_hid_name, &pwrb_uid]).to_aml_bytes(body);

    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let ged_crs = aml::Name::new("_CRS".into(), &crs);
    let button = aml::Path::new("\\_SB_.PWRB");
    let pressed = 0x80u8;
    let notify = aml::Notify::new(&button, &pressed);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
    aml::Device::new("_SB_.GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt])
        .to_aml_bytes(body);
}

/// A device node: path, _HID, _UID, _CRS (and _CCA for DMA-capable virtio devices).
struct Node {
    path: String,
    hid: NodeHid,
    uid: u32,
    cca: bool,
    crs: Vec<u8>,
}

enum NodeHid {
    Eisa(&'static str),
    Str(&'static str),
}

impl Node {
    fn to_aml(&self, sink: &mut Vec<u8>) {
        let eisa;
        let string;
        let hid: &dyn Aml = match self.hid {
            NodeHid::Eisa(id) => {
                eisa = aml::EISAName::new(id);
                &eisa
            }
            NodeHid::Str(id) => {
                string = id;
                &string
            }
        };
        let hid_name = aml::Name::new("_HID".into(), hid);
        let uid_name = aml::Name::new("_UID".into(), &self.uid);
        let cca_name = aml::Name::new("_CCA".into(), &aml::ONE);
        let raw = RawAml(&self.crs);
        let crs_name = aml::Name::new("_CRS".into(), &raw);
        let mut children: Vec<&dyn Aml> = vec![&hid_name, &uid_name];
        if self.cca {
            children.push(&cca_name);
        }
        children.push(&crs_name);
        aml::Device::new(self.path.as_str().into(), children).to_aml_bytes(sink);
    }
}

/// Already-encoded AML (a serialized resource template).
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

fn legacy_uart(path: &str, uid: u32, port: u16, gsi: u32) -> Node {
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let io = aml::IO::new(port, port, 1, 8);
    let mut crs = Vec::new();
    aml::ResourceTemplate::new(vec![&irq, &io]).to_aml_bytes(&mut crs);
    Node {
        path: path.to_string(),
        hid: NodeHid::Eisa("PNP0501"),
        uid,
        cca: false,
        crs,
    }
}

fn virtio_node(index: usize, base: u64, gsi: u32) -> Node {
    // Slot addresses sit in the 32-bit MMIO gap, so they fit Memory32Fixed.
    let base32 = u32::try_from(base).unwrap_or(u32::MAX);
    let mem = aml::Memory32Fixed::new(true, base32, VIRTIO_MMIO_SIZE as u32);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let mut crs = Vec::new();
    aml::ResourceTemplate::new(vec![&mem, &irq]).to_aml_bytes(&mut crs);
    Node {
        path: format!("_SB_.V{index:03}"),
        hid: NodeHid::Str("LNRO0005"),
        uid: u32::try_from(index).unwrap_or(u32::MAX),
        cca: true,
        crs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[off..off + 4]);
        u32::from_le_bytes(a)
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }

    fn find(tables: &AcpiTables, sig: &[u8]) -> (u64, Vec<u8>) {
        tables
            .blobs
            .iter()
            .find(|(_, b)| b.starts_with(sig))
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn every_table_checksums_and_links_resolve() -> Result<(), AcpiError> {
        let t = build(2, 3)?;
        let (rsdp_addr, rsdp) = find(&t, b"RSD PTR ");
        assert_eq!(rsdp_addr, RSDP_ADDR);
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        for (addr, blob) in &t.blobs[1..] {
            assert_eq!(sum(blob), 0, "checksum of {:?}", &blob[..4]);
            assert_eq!(
                u32_at(blob, 4) as usize,
                blob.len(),
                "length of {:?}",
                &blob[..4]
            );
            assert!(*addr >= RSDP_ADDR && addr + blob.len() as u64 <= ACPI_END);
        }
        let (xsdt_addr, xsdt) = find(&t, b"XSDT");
        assert_eq!(u64_at(&rsdp, 24), xsdt_addr);
        let (fadt_addr, fadt) = find(&t, b"FACP");
        let (madt_addr, _) = find(&t, b"APIC");
        let (dsdt_addr, _) = find(&t, b"DSDT");
        assert_eq!(u64_at(&xsdt, 36), fadt_addr);
        assert_eq!(u64_at(&xsdt, 44), madt_addr);
        assert_eq!(fadt.len(), 276);
        assert_eq!(u64_at(&fadt, 140), dsdt_addr);
        assert_eq!(u32_at(&fadt, 112) & (1 << 20), 1 << 20, "hardware-reduced");
        // Sleep control, sleep status and reset registers: system I/O, port 0x600.
        for off in [116, 244, 256] {
            assert_eq!(fadt[off], 1);
            assert_eq!(u64_at(&fadt, off + 4), u64::from(ACPI_PM_PORT));
        }
        Ok(())
    }

    #[test]
    fn madt_has_one_lapic_per_cpu_and_one_ioapic() -> Result<(), AcpiError> {
        let t = build(4, 0)?;
        let (_, madt) = find(&t, b"APIC");
        let mut off = 44;
        let mut lapics = vec![];
        let mut ioapics = 0;
        while off + 2 <= madt.len() {
            let (typ, len) = (madt[off], madt[off + 1] as usize);
            match typ {
                0 => lapics.push(madt[off + 3]),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&madt, off + 4), IOAPIC_ADDR);
                }
                _ => panic!("unexpected MADT entry {typ}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
        Ok(())
    }

    #[test]
    fn dsdt_lists_virtio_nodes_in_disk_order_with_their_slots() -> Result<(), AcpiError> {
        let t = build(1, 3)?;
        let (_, dsdt) = find(&t, b"DSDT");
        let hits: Vec<usize> = dsdt
            .windows(8)
            .enumerate()
            .filter(|(_, w)| w == b"LNRO0005")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hits.len(), 3);
        // Each node's Memory32Fixed descriptor (0x86, len 9, rw) carries its slot base, and its
        // extended interrupt descriptor (0x89) its GSI, in order.
        for (i, &at) in hits.iter().enumerate() {
            let rest = &dsdt[at..];
            let m = rest
                .windows(4)
                .position(|w| w == [0x86, 9, 0, 1])
                .unwrap_or(usize::MAX);
            assert_ne!(m, usize::MAX);
            let base = u32_at(rest, m + 4);
            assert_eq!(u64::from(base), 0xc000_1000 + i as u64 * 0x1000);
            assert_eq!(u32_at(rest, m + 8), 0x1000);
            let irq = rest
                .windows(3)
                .position(|w| w == [0x89, 6, 0])
                .unwrap_or(usize::MAX);
            assert_eq!(u32_at(rest, irq + 5), 5 + i as u32);
        }
        for needle in [&b"COM1"[..], b"COM2", b"_S5_"] {
            assert!(dsdt.windows(4).any(|w| w == needle), "{needle:?}");
        }
        // The power button and its event device.
        assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"));
        for needle in [&b"PWRB"[..], b"GED_", b"_EVT"] {
            assert!(dsdt.windows(4).any(|w| w == needle), "{needle:?}");
        }
        // No keyboard controller node: Linux would stall probing it.
        assert!(!dsdt.windows(4).any(|w| w == b"PS2_"));
        assert!(build(1, 19).is_err());
        assert!(build(1, 18).is_ok());
        Ok(())
    }
}
