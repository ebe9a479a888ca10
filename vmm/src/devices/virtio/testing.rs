//! The driver's side of a virtio-mmio device, for tests and fuzzing: lays out a split virtqueue
//! in plain guest memory and performs the register handshake the way Linux does. It writes only
//! guest memory and device registers, so it exercises the device exactly as a guest would.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::block::VirtioMmioBlock;
use super::mmio::reg;

/// Descriptor continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor points at an indirect table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// One split-ring descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A buffer of a chain: guest address, length, device-writable or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A split virtqueue laid out at `base`: descriptor table, then available ring (with
/// used_event), then the used ring (with avail_event) at the next 4-byte boundary.
#[derive(Debug, Clone)]
pub struct SplitQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    avail_idx: u16,
    next_free: u16,
}

impl SplitQueue {
    /// Layout for a queue of `size` entries starting at `base` (16-byte aligned).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc.unchecked_add(16 * n);
        let avail_end = avail.raw_value() + 4 + 2 * n + 2;
        let used = GuestAddress((avail_end + 3) & !3);
        Self {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            next_free: 0,
        }
    }

    /// Bytes of guest memory the layout takes from `base`.
    pub fn footprint(&self) -> u64 {
        self.used.raw_value() + 4 + 8 * u64::from(self.size) + 2 - self.desc.raw_value()
    }

    /// Write descriptor `index` of the table.
    pub fn set_desc<M: GuestMemory>(
        &self,
        mem: &M,
        index: u16,
        d: RawDesc,
    ) -> Result<(), GuestMemoryError> {
        let at = self.desc.unchecked_add(16 * u64::from(index));
        mem.write_obj(d.addr.to_le(), at)?;
        mem.write_obj(d.len.to_le(), at.unchecked_add(8))?;
        mem.write_obj(d.flags.to_le(), at.unchecked_add(12))?;
        mem.write_obj(d.next.to_le(), at.unchecked_add(14))
    }

    /// Write `bufs` as one chain in consecutive free slots (wrapping) and make it available.
    /// Returns the head index.
    pub fn add_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, GuestMemoryError> {
        let head = self.next_free;
        let mut index = head;
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let next = (index + 1) % self.size;
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.set_desc(
                mem,
                index,
                RawDesc {
                    addr: b.addr,
                    len: b.len,
                    flags,
                    next: if last { 0 } else { next },
                },
            )?;
            index = next;
        }
        self.next_free = index;
        self.publish(mem, head)?;
        Ok(head)
    }

    /// Put `head` in the available ring and bump its index.
    pub fn publish<M: GuestMemory>(&mut self, mem: &M, head: u16) -> Result<(), GuestMemoryError> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), self.avail.unchecked_add(2))
    }

    /// Overwrite the available ring's index (to test a driver that lies about it).
    pub fn set_avail_idx<M: GuestMemory>(
        &mut self,
        mem: &M,
        idx: u16,
    ) -> Result<(), GuestMemoryError> {
        self.avail_idx = idx;
        mem.write_obj(idx.to_le(), self.avail.unchecked_add(2))
    }

    /// Ask for an interrupt only once the used index passes `v` (EVENT_IDX).
    pub fn set_used_event<M: GuestMemory>(&self, mem: &M, v: u16) -> Result<(), GuestMemoryError> {
        mem.write_obj(
            v.to_le(),
            self.avail.unchecked_add(4 + 2 * u64::from(self.size)),
        )
    }

    /// The device's avail_event (EVENT_IDX): the index at which it wants the next kick.
    pub fn avail_event<M: GuestMemory>(&self, mem: &M) -> Result<u16, GuestMemoryError> {
        mem.read_obj::<u16>(self.used.unchecked_add(4 + 8 * u64::from(self.size)))
            .map(u16::from_le)
    }

    /// The used ring's index.
    pub fn used_idx<M: GuestMemory>(&self, mem: &M) -> Result<u16, GuestMemoryError> {
        mem.read_obj::<u16>(self.used.unchecked_add(2))
            .map(u16::from_le)
    }

    /// Used element number `n` (counting from 0, wrapping): (descriptor head, length).
    pub fn used_elem<M: GuestMemory>(
        &self,
        mem: &M,
        n: u16,
    ) -> Result<(u32, u32), GuestMemoryError> {
        let at = self.used.unchecked_add(4 + 8 * u64::from(n % self.size));
        let id = mem.read_obj::<u32>(at)?;
        let len = mem.read_obj::<u32>(at.unchecked_add(4))?;
        Ok((u32::from_le(id), u32::from_le(len)))
    }
}

/// Something with a virtio-mmio register window.
pub trait MmioAccess {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);

    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }
}

impl MmioAccess for VirtioMmioBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data);
    }
}

/// The 64 feature bits the device offers.
pub fn device_features(dev: &mut impl MmioAccess) -> u64 {
    dev.write32(reg::DEVICE_FEATURES_SEL, 0);
    let lo = dev.read32(reg::DEVICE_FEATURES);
    dev.write32(reg::DEVICE_FEATURES_SEL, 1);
    let hi = dev.read32(reg::DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The Linux driver's handshake: reset, ACKNOWLEDGE, DRIVER, accept `offered & wanted`,
/// FEATURES_OK, set up queue 0 as `q`, DRIVER_OK. Returns the final status register.
pub fn handshake(dev: &mut impl MmioAccess, q: &SplitQueue, wanted: u64) -> u32 {
    dev.write32(reg::STATUS, 0);
    dev.write32(reg::STATUS, 1);
    dev.write32(reg::STATUS, 1 | 2);
    let features = device_features(dev) & wanted;
    dev.write32(reg::DRIVER_FEATURES_SEL, 0);
    dev.write32(reg::DRIVER_FEATURES, features as u32);
    dev.write32(reg::DRIVER_FEATURES_SEL, 1);
    dev.write32(reg::DRIVER_FEATURES, (features >> 32) as u32);
    dev.write32(reg::STATUS, 1 | 2 | 8);
    if dev.read32(reg::STATUS) & 8 == 0 {
        return dev.read32(reg::STATUS);
    }
    dev.write32(reg::QUEUE_SEL, 0);
    dev.write32(reg::QUEUE_NUM, u32::from(q.size));
    let addrs = [
        (reg::QUEUE_DESC_LOW, q.desc),
        (reg::QUEUE_AVAIL_LOW, q.avail),
        (reg::QUEUE_USED_LOW, q.used),
    ];
    for (low, addr) in addrs {
        dev.write32(low, addr.raw_value() as u32);
        dev.write32(low + 4, (addr.raw_value() >> 32) as u32);
    }
    dev.write32(reg::QUEUE_READY, 1);
    dev.write32(reg::STATUS, 1 | 2 | 8 | 4);
    dev.read32(reg::STATUS)
}

/// A virtio-blk request header (type, sector) as bytes.
pub fn blk_header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}
