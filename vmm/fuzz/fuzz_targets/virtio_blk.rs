//! Fuzz target for virtio-blk over virtio-mmio: the input becomes a stream of mostly valid
//! requests (each broken in one way now and then), raw descriptor chains and register writes,
//! driven through the device exactly as a guest would. The device must never panic, must
//! answer each chain at most once, and an in-memory shadow must match every successful read.

#![no_main]

use std::sync::{Arc, RwLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};
use vmm::devices::virtio::block::QUEUE_SIZE;
use vmm::devices::virtio::testing::{blk_header, handshake, Buf, MmioAccess, RawDesc, SplitQueue};
use vmm::devices::virtio::{DiskBackend, IrqTrigger, VirtioMmioBlock};

const MEM_SIZE: usize = 4 << 20;
const QUEUE_BASE: u64 = 0x1000;
const HDR: u64 = 0x10000;
const STATUS: u64 = 0x10100;
const SCRATCH: u64 = 0x100000;
const SECTORS: u64 = 64;

/// A disk in memory: fast, and the shadow is the disk itself before each write.
struct MemDisk(RwLock<Vec<u8>>);

impl DiskBackend for MemDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let d = self.0.read().map_err(|_| std::io::Error::other("poisoned"))?;
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let src = d
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::other("out of range"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let mut d = self.0.write().map_err(|_| std::io::Error::other("poisoned"))?;
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let dst = d
            .get_mut(start..start + buf.len())
            .ok_or_else(|| std::io::Error::other("out of range"))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        SECTORS * 512
    }
    fn read_only(&self) -> bool {
        false
    }
    fn device_id(&self) -> String {
        "fuzz".into()
    }
    fn read_to_guest(&self, offset: u64, dst: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        let mut off = offset;
        for s in dst {
            let mut buf = vec![0u8; s.len()];
            self.read_at(off, &mut buf)?;
            s.copy_from(&buf);
            off += s.len() as u64;
        }
        Ok(())
    }
}

struct NoIrq;

impl IrqTrigger for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A well-formed request, sometimes broken in one way.
    Request {
        kind: u8,
        raw_type: u32,
        sector: u8,
        sectors: u8,
        cuts: [u8; 3],
        split_header: bool,
        fill: u8,
        breakage: u8,
        raw: u64,
    },
    /// A chain of arbitrary descriptors at slot 128.
    Raw { descs: Vec<(u64, u32, u16, u16)> },
    /// A register write (offsets below the config space).
    Reg { offset: u8, value: u32 },
    /// A register or config read.
    Read { offset: u16, len: u8 },
}

fuzz_target!(|ops: Vec<Op>| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let content: Vec<u8> = (0..SECTORS as usize * 512).map(|i| (i % 253) as u8).collect();
    let disk = Arc::new(MemDisk(RwLock::new(content)));
    let mut dev = VirtioMmioBlock::new(mem.clone(), disk.clone(), Arc::new(NoIrq));
    let mut q = SplitQueue::new(GuestAddress(QUEUE_BASE), QUEUE_SIZE);
    if handshake(&mut dev, &q, u64::MAX) & 4 == 0 {
        return;
    }
    for op in ops.iter().take(64) {
        match op {
            Op::Request {
                kind,
                raw_type,
                sector,
                sectors,
                cuts,
                split_header,
                fill,
                breakage,
                raw,
            } => {
                let t = match kind % 8 {
                    0..=2 => VIRTIO_BLK_T_IN,
                    3..=5 => VIRTIO_BLK_T_OUT,
                    6 => [VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID][usize::from(kind / 8 % 2)],
                    _ => *raw_type,
                };
                let len = u32::from(*sectors % 17) * 512;
                let sector = u64::from(*sector % (SECTORS as u8 + 4));
                let mut points = vec![0, len];
                points.extend(cuts.iter().map(|c| u32::from(*c) * len / 255));
                points.sort_unstable();
                points.dedup();
                let write = t != VIRTIO_BLK_T_OUT;
                let mut bufs = if *split_header {
                    vec![Buf::r(HDR, 7), Buf::r(HDR + 7, 9)]
                } else {
                    vec![Buf::r(HDR, 16)]
                };
                for (i, w) in points.windows(2).enumerate() {
                    let addr = SCRATCH + i as u64 * 0x4000;
                    bufs.push(Buf { addr, len: w[1] - w[0], write });
                    let _ = mem.write_slice(&vec![fill.wrapping_add(i as u8); (w[1] - w[0]) as usize], GuestAddress(addr));
                }
                bufs.push(Buf::w(STATUS, 1));
                // One break in eight: change one field of one buffer.
                if breakage % 8 == 0 && !bufs.is_empty() {
                    let i = usize::from(breakage / 8) % bufs.len();
                    if let Some(b) = bufs.get_mut(i) {
                        match breakage / 64 % 3 {
                            0 => b.write = !b.write,
                            1 => b.len = *raw as u32,
                            _ => b.addr = *raw,
                        }
                    }
                }
                let _ = mem.write_slice(&blk_header(t, sector), GuestAddress(HDR));
                let _ = mem.write_obj(0xffu8, GuestAddress(STATUS));
                let before = disk.0.read().map(|d| d.clone()).unwrap_or_default();
                let used_before = q.used_idx(&mem).unwrap_or(0);
                if q.add_chain(&mem, &bufs).is_err() {
                    continue;
                }
                dev.write32(VirtioMmioBlock::QUEUE_NOTIFY_OFFSET, 0);
                let used_after = q.used_idx(&mem).unwrap_or(0);
                assert!(used_after.wrapping_sub(used_before) <= 1, "one chain, at most one answer");
                // A successful read of an unbroken request returns exactly the disk's bytes.
                let ok = mem.read_obj::<u8>(GuestAddress(STATUS)).ok() == Some(VIRTIO_BLK_S_OK as u8);
                if ok && t == VIRTIO_BLK_T_IN && breakage % 8 != 0 {
                    let mut at = (sector * 512) as usize;
                    for b in bufs.iter().filter(|b| b.write && b.addr >= SCRATCH) {
                        let mut got = vec![0u8; b.len as usize];
                        let _ = mem.read_slice(&mut got, GuestAddress(b.addr));
                        assert_eq!(Some(&got[..]), before.get(at..at + got.len()), "read matches disk");
                        at += got.len();
                    }
                }
            }
            Op::Raw { descs } => {
                for (i, (addr, len, flags, next)) in descs.iter().take(8).enumerate() {
                    let d = RawDesc { addr: *addr, len: *len, flags: *flags, next: *next };
                    let _ = q.set_desc(&mem, 128 + i as u16, d);
                }
                let _ = q.publish(&mem, 128);
                dev.write32(VirtioMmioBlock::QUEUE_NOTIFY_OFFSET, 0);
            }
            Op::Reg { offset, value } => {
                dev.write32(u64::from(*offset & 0xfc), *value);
                // The driver may have reset or reconfigured the queue; keep driving the same layout.
                if dev.transport().status() == 0 {
                    q = SplitQueue::new(GuestAddress(QUEUE_BASE), QUEUE_SIZE);
                    let _ = mem.write_slice(&[0u8; 0x2000], GuestAddress(QUEUE_BASE));
                    handshake(&mut dev, &q, u64::MAX);
                }
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; usize::from(*len % 9)];
                dev.mmio_read(u64::from(*offset), &mut buf);
            }
        }
    }
});
