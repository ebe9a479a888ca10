//! Device-level tests: a driver (virtio::testing) drives VirtioMmioBlock through its registers
//! on plain guest memory, against real backing files, and checks used ring, data and status.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::mmio::reg;
use crate::devices::virtio::testing::*;

pub(super) const MEM_SIZE: usize = 8 << 20;
pub(super) const QUEUE_BASE: u64 = 0x1000;
pub(super) const HDR: u64 = 0x10000;
pub(super) const STATUS: u64 = 0x10100;
pub(super) const DATA: u64 = 0x100000;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
/// What a well-behaved Linux driver accepts of our offer.
pub(super) const LINUX_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// An interrupt line backed by a real eventfd, as the vmm's irqfd is.
pub(super) struct EventIrq(EventFd);

impl EventIrq {
    fn new() -> Arc<Self> {
        Arc::new(Self(EventFd::new(EFD_NONBLOCK).unwrap()))
    }

    /// Interrupts raised since the last call.
    pub(super) fn take(&self) -> u64 {
        self.0.read().unwrap_or(0)
    }
}

impl IrqTrigger for EventIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A FileDisk whose sectors [bad_from, bad_to) fail with EIO, as a corrupt block in the store's
/// mount does.
struct CorruptDisk {
    inner: FileDisk,
    bad: std::ops::Range<u64>,
}

impl CorruptDisk {
    fn check(&self, offset: u64, len: usize) -> std::io::Result<()> {
        let first = offset / 512;
        let last = (offset + len as u64).div_ceil(512);
        if first < self.bad.end && self.bad.start < last {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl DiskBackend for CorruptDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.check(offset, buf.len())?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn device_id(&self) -> String {
        self.inner.device_id()
    }
}

pub(super) struct Fixture {
    pub mem: GuestMemoryMmap,
    pub dev: VirtioMmioBlock,
    pub q: SplitQueue,
    pub irq: Arc<EventIrq>,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Disk content where every byte depends on its offset, so misplaced reads show.
pub(super) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 512) % 251) as u8).collect()
}

impl Fixture {
    pub(super) fn new(content: &[u8], read_only: bool) -> Self {
        Self::with_features(content, read_only, LINUX_FEATURES)
    }

    pub(super) fn with_features(content: &[u8], read_only: bool, wanted: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk0.raw");
        std::fs::write(&path, content).unwrap();
        let disk = FileDisk::open(&path, read_only).unwrap();
        Self::with_disk(Arc::new(disk), wanted, dir, path)
    }

    fn with_disk(
        disk: Arc<dyn DiskBackend>,
        wanted: u64,
        dir: tempfile::TempDir,
        path: PathBuf,
    ) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = EventIrq::new();
        let mut dev = VirtioMmioBlock::new(mem.clone(), disk, irq.clone());
        let q = SplitQueue::new(GuestAddress(QUEUE_BASE), QUEUE_SIZE);
        let status = handshake(&mut dev, &q, wanted);
        assert_eq!(status, 0xf, "handshake must reach DRIVER_OK");
        Self {
            mem,
            dev,
            q,
            irq,
            path,
            _dir: dir,
        }
    }

    pub(super) fn notify(&mut self) {
        self.dev
            .mmio_write(VirtioMmioBlock::QUEUE_NOTIFY_OFFSET, &0u32.to_le_bytes());
    }

    /// Submit one chain, notify, and return the used element it produced (or None).
    pub(super) fn run(&mut self, bufs: &[Buf]) -> Option<(u32, u32)> {
        let before = self.q.used_idx(&self.mem).unwrap();
        let head = self.q.add_chain(&self.mem, bufs).unwrap();
        self.notify();
        let after = self.q.used_idx(&self.mem).unwrap();
        if after == before {
            return None;
        }
        assert_eq!(after, before.wrapping_add(1), "one chain, one used entry");
        let (id, len) = self.q.used_elem(&self.mem, before).unwrap();
        assert_eq!(id, u32::from(head));
        Some((id, len))
    }

    pub(super) fn header(&self, req_type: u32, sector: u64) {
        self.mem
            .write_slice(&blk_header(req_type, sector), GuestAddress(HDR))
            .unwrap();
    }

    pub(super) fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    pub(super) fn reset_status(&self) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    pub(super) fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A plain read of `sectors` at `sector` into DATA; returns (status, used len, bytes).
    pub(super) fn read(&mut self, sector: u64, sectors: u32) -> (u8, u32, Vec<u8>) {
        self.header(VIRTIO_BLK_T_IN, sector);
        self.reset_status();
        let len = sectors * 512;
        let (_, used) = self
            .run(&[Buf::r(HDR, 16), Buf::w(DATA, len), Buf::w(STATUS, 1)])
            .unwrap();
        (self.status(), used, self.guest(DATA, len as usize))
    }
}

#[test]
fn registers_identify_a_modern_block_device() {
    let mut f = Fixture::new(&pattern(64 * 1024 + 100), false);
    assert_eq!(f.dev.read32(reg::MAGIC), 0x7472_6976);
    assert_eq!(f.dev.read32(reg::VERSION), 2);
    assert_eq!(f.dev.read32(reg::DEVICE_ID), 2);
    let feats = device_features(&mut f.dev);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
    ] {
        assert_ne!(feats & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(feats & (1 << VIRTIO_BLK_F_RO), 0, "writable disk is not RO");
    // Capacity in whole sectors, read as one u64 and byte by byte.
    let mut cap = [0u8; 8];
    f.dev.mmio_read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut bytes = [0u8; 8];
    for (i, b) in bytes.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        f.dev.mmio_read(0x100 + i as u64, &mut one);
        *b = one[0];
    }
    assert_eq!(bytes, cap);
    let mut blk = [0u8; 4];
    f.dev.mmio_read(0x100 + 20, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), 512);
    f.dev.mmio_read(0x100 + 12, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), request::SEG_MAX);
    assert_eq!(f.dev.read32(reg::CONFIG_GENERATION), 0);
    assert_eq!(f.dev.read32(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    f.dev.write32(reg::QUEUE_SEL, 1);
    assert_eq!(f.dev.read32(reg::QUEUE_NUM_MAX), 0, "no second queue");
}

#[test]
fn read_only_disk_is_offered_read_only_and_refuses_writes() {
    let content = pattern(8192);
    let mut f = Fixture::new(&content, true);
    assert_ne!(device_features(&mut f.dev) & (1 << VIRTIO_BLK_F_RO), 0);
    f.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 1);
    let used = f.run(&[Buf::r(HDR, 16), Buf::r(DATA, 512), Buf::w(STATUS, 1)]);
    assert_eq!(used.map(|u| u.1), Some(1));
    assert_eq!(f.status(), IOERR);
    assert_eq!(std::fs::read(&f.path).unwrap(), content, "file untouched");
    // Reads still work.
    let (st, _, data) = f.read(1, 2);
    assert_eq!((st, data.as_slice()), (OK, &content[512..1536]));
}

#[test]
fn features_the_device_did_not_offer_are_refused() {
    let mut f = Fixture::new(&pattern(4096), false);
    let q = f.q.clone();
    // Without VERSION_1 a modern device refuses FEATURES_OK.
    let status = handshake(&mut f.dev, &q, 1 << VIRTIO_BLK_F_FLUSH);
    assert_eq!(status & 8, 0);
    // An unoffered bit (VIRTIO_BLK_F_MQ) is refused even if written directly.
    f.dev.write32(reg::STATUS, 0);
    f.dev.write32(reg::STATUS, 1);
    f.dev.write32(reg::STATUS, 3);
    f.dev.write32(reg::DRIVER_FEATURES_SEL, 1);
    f.dev.write32(reg::DRIVER_FEATURES, 1);
    f.dev.write32(reg::DRIVER_FEATURES_SEL, 0);
    f.dev.write32(reg::DRIVER_FEATURES, 1 << VIRTIO_BLK_F_MQ);
    f.dev.write32(reg::STATUS, 0xb);
    assert_eq!(f.dev.read32(reg::STATUS), 3);
}

#[test]
fn queue_is_fixed_once_running_and_reset_stops_the_device() {
    let content = pattern(4096);
    let mut f = Fixture::new(&content, false);
    // Moving the queue while running is ignored: the request still lands on the real ring.
    f.dev.write32(reg::QUEUE_DESC_LOW, 0x20_0000);
    f.dev.write32(reg::QUEUE_NUM, 2);
    let (st, _, data) = f.read(0, 1);
    assert_eq!((st, &data[..]), (OK, &content[..512]));
    // A queue the driver stops reads back as stopped and is no longer served.
    f.dev.write32(reg::QUEUE_READY, 0);
    assert_eq!(f.dev.read32(reg::QUEUE_READY), 0);
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)]),
        None
    );
    // After a reset the device answers nothing until the driver sets it up again.
    f.dev.write32(reg::STATUS, 0);
    assert_eq!(f.dev.read32(reg::STATUS), 0);
    assert_eq!(f.dev.read32(reg::QUEUE_READY), 0);
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)]),
        None
    );
    // A fresh handshake (new ring state) serves again.
    f.q = SplitQueue::new(GuestAddress(QUEUE_BASE), QUEUE_SIZE);
    f.mem
        .write_slice(&[0u8; 4096], GuestAddress(QUEUE_BASE))
        .unwrap();
    let q = f.q.clone();
    let f_status = handshake(&mut f.dev, &q, LINUX_FEATURES);
    assert_eq!(f_status, 0xf);
    // Clear the stale ring indices the first session left behind.
    f.q.set_avail_idx(&f.mem, 0).unwrap();
    f.mem.write_obj(0u16, GuestAddress(f.q.used.0 + 2)).unwrap();
    let (st, _, data) = f.read(2, 1);
    assert_eq!((st, &data[..]), (OK, &content[1024..1536]));
}

#[test]
fn queue_outside_guest_memory_makes_the_device_ask_for_reset() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    std::fs::write(&path, pattern(4096)).unwrap();
    let irq = EventIrq::new();
    let disk = Arc::new(FileDisk::open(&path, false).unwrap());
    let mut dev = VirtioMmioBlock::new(mem, disk, irq.clone());
    let q = SplitQueue::new(GuestAddress(0xf000), QUEUE_SIZE);
    let status = handshake(&mut dev, &q, LINUX_FEATURES);
    assert_ne!(status & 0x40, 0, "DEVICE_NEEDS_RESET");
    assert!(!dev.transport().is_running());
    assert_eq!(irq.take(), 1, "config-change interrupt");
    assert_eq!(dev.read32(reg::INTERRUPT_STATUS), 2);
    dev.write32(reg::QUEUE_NOTIFY, 0);
}

#[test]
fn read_fills_scattered_buffers_and_interrupts_once() {
    let content = pattern(1 << 20);
    let mut f = Fixture::new(&content, false);
    f.header(VIRTIO_BLK_T_IN, 3);
    // Header and status in one buffer each; data split unevenly over three buffers.
    let used = f
        .run(&[
            Buf::r(HDR, 16),
            Buf::w(DATA, 1024),
            Buf::w(DATA + 0x10000, 512),
            Buf::w(DATA + 0x3000, 2560),
            Buf::w(STATUS, 1),
        ])
        .unwrap();
    assert_eq!(used.1, 4096 + 1);
    assert_eq!(f.status(), OK);
    let start = 3 * 512;
    assert_eq!(f.guest(DATA, 1024), content[start..start + 1024]);
    assert_eq!(
        f.guest(DATA + 0x10000, 512),
        content[start + 1024..start + 1536]
    );
    assert_eq!(
        f.guest(DATA + 0x3000, 2560),
        content[start + 1536..start + 4096]
    );
    assert_eq!(f.irq.take(), 1);
    assert_eq!(f.dev.read32(reg::INTERRUPT_STATUS), 1);
    f.dev.write32(reg::INTERRUPT_ACK, 1);
    assert_eq!(f.dev.read32(reg::INTERRUPT_STATUS), 0);
    // A notify with nothing new changes no used ring and raises nothing.
    f.notify();
    assert_eq!(f.irq.take(), 0);
}

#[test]
fn write_then_flush_lands_in_the_file() {
    let mut f = Fixture::new(&pattern(16384), false);
    let new: Vec<u8> = (0..1024).map(|i| (i % 7) as u8).collect();
    f.mem.write_slice(&new, GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 4);
    let used = f
        .run(&[Buf::r(HDR, 16), Buf::r(DATA, 1024), Buf::w(STATUS, 1)])
        .unwrap();
    assert_eq!((f.status(), used.1), (OK, 1));
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    f.reset_status();
    f.run(&[Buf::r(HDR, 16), Buf::w(STATUS, 1)]).unwrap();
    assert_eq!(f.status(), OK);
    let file = std::fs::read(&f.path).unwrap();
    assert_eq!(&file[2048..3072], &new[..]);
    assert_eq!(
        &file[..2048],
        &pattern(16384)[..2048],
        "neighbours untouched"
    );
}

#[test]
fn header_and_data_may_share_a_buffer() {
    // VERSION_1 implies any layout: header + data in one readable buffer, data + status in one
    // writable buffer, both must work.
    let content = pattern(8192);
    let mut f = Fixture::new(&content, false);
    let mut req = blk_header(VIRTIO_BLK_T_OUT, 2).to_vec();
    req.extend_from_slice(&[0x5a; 512]);
    f.mem.write_slice(&req, GuestAddress(DATA)).unwrap();
    f.run(&[Buf::r(DATA, 528), Buf::w(STATUS, 1)]).unwrap();
    assert_eq!(f.status(), OK);
    assert_eq!(&std::fs::read(&f.path).unwrap()[1024..1536], &[0x5a; 512]);
    f.header(VIRTIO_BLK_T_IN, 0);
    let used = f.run(&[Buf::r(HDR, 16), Buf::w(DATA, 513)]).unwrap();
    assert_eq!(used.1, 513);
    assert_eq!(f.guest(DATA, 512), content[..512]);
    assert_eq!(f.guest(DATA + 512, 1), [OK]);
}

#[test]
fn get_id_returns_the_disk_name() {
    let mut f = Fixture::new(&pattern(4096), false);
    f.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    let used = f
        .run(&[Buf::r(HDR, 16), Buf::w(DATA, 20), Buf::w(STATUS, 1)])
        .unwrap();
    assert_eq!((f.status(), used.1), (OK, 21));
    let mut want = b"disk0.raw".to_vec();
    want.resize(20, 0);
    assert_eq!(f.guest(DATA, 20), want);
}

#[test]
fn backend_eio_reaches_the_guest_as_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    let content = pattern(8192);
    std::fs::write(&path, &content).unwrap();
    let disk = CorruptDisk {
        inner: FileDisk::open(&path, false).unwrap(),
        bad: 4..5,
    };
    let mut f = Fixture::with_disk(Arc::new(disk), LINUX_FEATURES, dir, path);
    let (st, used, _) = f.read(3, 2);
    assert_eq!((st, used), (IOERR, 1));
    let (st, _, data) = f.read(5, 2);
    assert_eq!((st, &data[..]), (OK, &content[2560..3584]));
}

#[test]
fn unsupported_request_types_get_unsupp() {
    let mut f = Fixture::new(&pattern(4096), false);
    for t in [
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_SCSI_CMD,
        0xdead,
    ] {
        f.header(t, 0);
        f.reset_status();
        let used = f.run(&[Buf::r(HDR, 16), Buf::w(STATUS, 1)]).unwrap();
        assert_eq!((f.status(), used.1), (UNSUPP, 1), "type {t}");
    }
}

#[test]
fn event_idx_suppresses_interrupts_until_asked_and_publishes_avail_event() {
    let content = pattern(8192);
    let mut f = Fixture::with_features(
        &content,
        false,
        LINUX_FEATURES | (1 << VIRTIO_RING_F_EVENT_IDX),
    );
    // Interrupt wanted only once used idx passes 1: the first completion stays silent.
    f.q.set_used_event(&f.mem, 1).unwrap();
    let (st, _, _) = f.read(0, 1);
    assert_eq!(st, OK);
    assert_eq!(f.irq.take(), 0);
    assert_eq!(
        f.q.avail_event(&f.mem).unwrap(),
        1,
        "device asks for a kick at the next chain"
    );
    let (st, _, data) = f.read(1, 1);
    assert_eq!((st, &data[..]), (OK, &content[512..1024]));
    assert_eq!(f.irq.take(), 1);
}

#[test]
fn one_mebibyte_read_through_an_indirect_table() {
    let content = pattern(2 << 20);
    let mut f = Fixture::new(&content, false);
    f.header(VIRTIO_BLK_T_IN, 100);
    // 256 pages of 4 KiB, scattered in reverse order, in an indirect table of 258 entries.
    let table = 0x80000u64;
    let pages = 256u16;
    let mut descs = vec![RawDesc {
        addr: HDR,
        len: 16,
        flags: VRING_DESC_F_NEXT,
        next: 1,
    }];
    for p in 0..pages {
        let addr = DATA + u64::from(pages - 1 - p) * 4096;
        descs.push(RawDesc {
            addr,
            len: 4096,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: p + 2,
        });
    }
    descs.push(RawDesc {
        addr: STATUS,
        len: 1,
        flags: VRING_DESC_F_WRITE,
        next: 0,
    });
    let ind = SplitQueue::new(GuestAddress(table), 512);
    for (i, d) in descs.iter().enumerate() {
        ind.set_desc(&f.mem, i as u16, *d).unwrap();
    }
    // 258 descriptors is more than SEG_MAX + 2 allows: the device drops it unanswered.
    f.q.set_desc(
        &f.mem,
        0,
        RawDesc {
            addr: table,
            len: 16 * 258,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    )
    .unwrap();
    f.reset_status();
    let before = f.q.used_idx(&f.mem).unwrap();
    f.q.publish(&f.mem, 0).unwrap();
    f.notify();
    assert_eq!(f.q.used_elem(&f.mem, before).unwrap(), (0, 0));
    assert_eq!(f.status(), 0xff, "no status written");
    // The same megabyte as 254 data segments (the offered SEG_MAX) is served.
    let segs = request::SEG_MAX as u16;
    let mut descs = vec![RawDesc {
        addr: HDR,
        len: 16,
        flags: VRING_DESC_F_NEXT,
        next: 1,
    }];
    for p in 0..segs {
        let len = if p < segs - 2 { 4096 } else { 4096 * 2 };
        let addr = DATA + u64::from(p) * 8192;
        descs.push(RawDesc {
            addr,
            len,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: p + 2,
        });
    }
    descs.push(RawDesc {
        addr: STATUS,
        len: 1,
        flags: VRING_DESC_F_WRITE,
        next: 0,
    });
    for (i, d) in descs.iter().enumerate() {
        ind.set_desc(&f.mem, i as u16, *d).unwrap();
    }
    let n = descs.len() as u32;
    f.q.set_desc(
        &f.mem,
        1,
        RawDesc {
            addr: table,
            len: 16 * n,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    )
    .unwrap();
    f.q.publish(&f.mem, 1).unwrap();
    f.notify();
    let total = 4096 * 256;
    assert_eq!(
        f.q.used_elem(&f.mem, before + 1).unwrap(),
        (1, total as u32 + 1)
    );
    assert_eq!(f.status(), OK);
    let mut at = 100 * 512;
    for (p, d) in descs[1..descs.len() - 1].iter().enumerate() {
        let got = f.guest(d.addr, d.len as usize);
        assert_eq!(got, content[at..at + d.len as usize], "segment {p}");
        at += d.len as usize;
    }
    assert_eq!(at, 100 * 512 + total);
}

mod malformed;
mod model;
mod parse;

/// A FileDisk whose reads take `delay`, as a throttled or slow backing file does.
struct SlowDisk {
    inner: FileDisk,
    delay: std::time::Duration,
}

impl DiskBackend for SlowDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn device_id(&self) -> String {
        self.inner.device_id()
    }
}

fn slow_fixture(delay: std::time::Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk0.raw");
    std::fs::write(&path, pattern(1 << 20)).unwrap();
    let inner = FileDisk::open(&path, false).unwrap();
    Fixture::with_disk(
        Arc::new(SlowDisk { inner, delay }),
        LINUX_FEATURES,
        dir,
        path,
    )
}

#[test]
fn the_device_lock_is_free_while_a_request_does_its_io() {
    let mut f = slow_fixture(std::time::Duration::from_millis(400));
    f.header(VIRTIO_BLK_T_IN, 0);
    f.reset_status();
    f.q.add_chain(
        &f.mem,
        &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)],
    )
    .unwrap();
    let Fixture { mem, dev, q, .. } = f;
    let dev = Arc::new(std::sync::Mutex::new(dev));
    let worker = {
        let dev = dev.clone();
        std::thread::spawn(move || serve_notified(&dev, 0, None))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    // Mid-I/O: a vCPU's register access gets the device at once.
    let start = std::time::Instant::now();
    let status = dev.lock().unwrap().read32(reg::STATUS);
    let waited = start.elapsed();
    assert_eq!(status, 0xf);
    assert!(
        waited < std::time::Duration::from_millis(150),
        "waited {waited:?}"
    );
    worker.join().unwrap();
    assert_eq!(q.used_idx(&mem).unwrap(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
}

#[test]
fn a_rate_limit_spaces_requests_out() {
    let mut f = slow_fixture(std::time::Duration::ZERO);
    // 30 reads against 20 operations a second (20 at once, then 20/s): about half a second.
    for i in 0..30u64 {
        f.header(VIRTIO_BLK_T_IN, i);
        f.q.add_chain(
            &f.mem,
            &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)],
        )
        .unwrap();
    }
    let Fixture { mem, dev, q, .. } = f;
    let dev = std::sync::Mutex::new(dev);
    let limiter = limit::RateLimiter::new(None, Some(limit::Limit { rate: 20, burst: 0 }));
    let start = std::time::Instant::now();
    serve_notified(&dev, 0, Some(&limiter));
    let took = start.elapsed();
    assert_eq!(q.used_idx(&mem).unwrap(), 30);
    assert!(took >= std::time::Duration::from_millis(400), "{took:?}");
    let start = std::time::Instant::now();
    let unlimited = limit::RateLimiter::new(None, None);
    assert!(unlimited.is_unlimited());
    unlimited.wait(1 << 30);
    assert!(start.elapsed() < std::time::Duration::from_millis(50));
}
