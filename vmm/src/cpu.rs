//! vCPU boot state for the Linux 64-bit entry: identity page tables and GDT in guest memory, then
//! per vCPU the CPUID (from KVM_GET_SUPPORTED_CPUID, with topology and the hypervisor bits), MSRs,
//! registers, segment registers, FPU and LAPIC LINT pins. CPUID is set before MSRs, as KVM needs.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

/// Errors while setting up a vCPU; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Writing GDT or page tables failed.
    #[error("writing {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {0}: {1}")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU {0}: KVM set {1} of {2} boot MSRs")]
    Msrs(u8, usize, usize),
    /// Building the MSR list failed.
    #[error("building the MSR list")]
    MsrList,
}

// GDT entries: flat 64-bit code, flat data, and a TSS descriptor (KVM requires a usable TR).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT, an empty IDT and identity page tables for the first 1 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| CpuError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|e| CpuError::Write("IDT", e))?;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| CpuError::Write("page tables", e))
    };
    w(PDPT_ADDR | 0x03, PML4_ADDR)?;
    w(PD_ADDR | 0x03, PDPT_ADDR)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w((i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, code: bool, system: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: u8::from(!system),
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Number of APIC-ID bits needed to number `cpus` logical CPUs.
fn id_bits(cpus: u8) -> u32 {
    (u32::from(cpus).max(1) - 1)
        .checked_ilog2()
        .map(|b| b + 1)
        .unwrap_or(0)
}

/// Adjusts the host-supported CPUID for vCPU `id` of `cpus`.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, cpus: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // APIC ID, logical processor count, HTT when there is more than one.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                e.ecx |= (1 << 31) | (1 << 24); // hypervisor, TSC-deadline
                if cpus > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            0xb | 0x1f => {
                // One thread per core, `cpus` cores per package.
                let (eax, ebx, level) = match e.index {
                    0 => (0, 1, 1),
                    1 => (id_bits(cpus), u32::from(cpus), 2),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = u32::from(id);
            }
            0x8000_0008 => {
                // AMD: number of cores minus one, and the APIC-ID size.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(cpus) << 12) | (u32::from(cpus) - 1);
            }
            _ => {}
        }
    }
}

/// Boot MSRs: syscall MSRs cleared, fast strings on, MTRRs enabled with write-back default.
/// The TSC is left alone: KVM synchronises it across vCPUs created together, and writing it
/// per vCPU at different moments makes Linux mark the TSC unstable.
fn boot_msrs() -> Result<Msrs, CpuError> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(0x174, 0),             // IA32_SYSENTER_CS
        entry(0x175, 0),             // IA32_SYSENTER_ESP
        entry(0x176, 0),             // IA32_SYSENTER_EIP
        entry(0xc000_0081, 0),       // STAR
        entry(0xc000_0082, 0),       // LSTAR
        entry(0xc000_0083, 0),       // CSTAR
        entry(0xc000_0084, 0),       // SYSCALL_MASK
        entry(0xc000_0102, 0),       // KERNEL_GS_BASE
        entry(0x1a0, 1),             // MISC_ENABLE: fast strings
        entry(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    Msrs::from_entries(&entries).map_err(|_| CpuError::MsrList)
}

/// Sets up vCPU `id`: CPUID, MSRs, registers, segments, FPU, LAPIC. Non-boot vCPUs get the same
/// state; the in-kernel irqchip holds them until the guest's INIT/SIPI resets them.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    supported: &CpuId,
    id: u8,
    cpus: u8,
    entry: u64,
) -> Result<(), CpuError> {
    let kvm = |what| move |e| CpuError::Kvm(id, what, e);
    let mut cpuid = supported.clone();
    patch_cpuid(&mut cpuid, id, cpus);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let msrs = boot_msrs()?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        return Err(CpuError::Msrs(id, set, msrs.as_slice().len()));
    }

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(CODE_SEL, 0xb, true, false);
    let data = segment(DATA_SEL, 0x3, false, false);
    let tss = segment(TSS_SEL, 0xb, false, true);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    // LINT0 = ExtINT, LINT1 = NMI, as firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs.get(off + i).copied().unwrap_or(0) as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            if let Some(slot) = lapic.regs.get_mut(off + i) {
                *slot = *b as _;
            }
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn topology_bits() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(64), 6);
    }

    #[test]
    fn cpuid_carries_apic_id_and_hypervisor_bits() -> Result<(), Box<dyn std::error::Error>> {
        let leaf = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1)])
            .map_err(|e| format!("{e:?}"))?;
        patch_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].ecx & (1 << 24), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!((e[1].edx, e[2].edx), (3, 3));
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
        Ok(())
    }
}
