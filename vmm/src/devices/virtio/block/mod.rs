//! virtio-blk over virtio-mmio. Every chain the guest queues is parsed (pure, validated) before
//! any I/O, and every chain popped is returned to the used ring exactly once, answered with a
//! status byte when it has a place for one; a bad chain never stops the device serving the next.

pub mod disk;
pub mod request;

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

pub use disk::{DiskBackend, DiskError, FileDisk};
pub use request::{parse, Completion, Rejected, Request, RequestError, RequestKind, Segment};

use super::mmio::{MmioTransport, WriteEffect, CONFIG_OFFSET};
use super::IrqTrigger;
use request::{SECTOR_SIZE, SEG_MAX, SIZE_MAX};

/// Descriptors in the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` we expose (through num_queues).
const CONFIG_LEN: usize = 36;

/// One virtio-blk disk as the guest sees it at a virtio-mmio window.
pub struct VirtioMmioBlock {
    transport: MmioTransport,
    config: [u8; CONFIG_LEN],
    capacity: u64,
    mem: GuestMemoryMmap,
    disk: Arc<dyn DiskBackend>,
    irq: Arc<dyn IrqTrigger>,
}

impl std::fmt::Debug for VirtioMmioBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmioBlock")
            .field("transport", &self.transport)
            .field("capacity", &self.capacity)
            .field("device_id", &self.disk.device_id())
            .finish()
    }
}

impl VirtioMmioBlock {
    /// Offset of QueueNotify: where the vmm registers its ioeventfd (datamatch = queue index).
    pub const QUEUE_NOTIFY_OFFSET: u64 = super::mmio::reg::QUEUE_NOTIFY;

    /// A device serving `disk` to a guest whose memory is `mem`, interrupting through `irq`.
    pub fn new(mem: GuestMemoryMmap, disk: Arc<dyn DiskBackend>, irq: Arc<dyn IrqTrigger>) -> Self {
        let mut features = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        if disk.read_only() {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        let capacity = disk.size() / SECTOR_SIZE;
        let transport = match MmioTransport::new(VIRTIO_ID_BLOCK, features, &[QUEUE_SIZE]) {
            Ok(t) => t,
            // QUEUE_SIZE is a constant power of two, which Queue::new always accepts.
            Err(_) => unreachable!("QUEUE_SIZE is a valid queue size"),
        };
        Self {
            transport,
            config: block_config(capacity),
            capacity,
            mem,
            disk,
            irq,
        }
    }

    /// Disk size in 512-byte sectors, as offered to the guest.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The transport's register state (status, interrupt bits), for the vmm and tests.
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    /// A guest read inside this device's 4 KiB window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            read_config(&self.config, offset - CONFIG_OFFSET, data);
        } else {
            self.transport.read(offset, data);
        }
    }

    /// A guest write inside this device's 4 KiB window. A write to QueueNotify processes the
    /// queue right away (the vmm may instead route it to an ioeventfd and call `process_queue`).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            // Nothing in our config space is writable (no CONFIG_WCE offered).
            return;
        }
        match self.transport.write(offset, data, &self.mem) {
            WriteEffect::Notify(q) => self.process_queue(q),
            WriteEffect::NeedsInterrupt => self.raise(),
            WriteEffect::None | WriteEffect::Activated | WriteEffect::Reset => {}
        }
    }

    /// Serve every chain the guest made available on queue `queue_index`, then interrupt the
    /// guest if the used ring changed and the guest wants to hear about it.
    pub fn process_queue(&mut self, queue_index: u16) {
        if !self.transport.is_running() {
            return;
        }
        let Some(queue) = self.transport.queue_mut(queue_index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let used = serve_queue(queue, &self.mem, self.disk.as_ref(), self.capacity);
        let notify = used && queue.needs_notification(&self.mem).unwrap_or(true);
        if notify {
            self.transport.signal_used();
            self.raise();
        }
    }

    fn raise(&self) {
        if let Err(e) = self.irq.trigger() {
            tracing::warn!(error = %e, "virtio-blk: cannot raise interrupt");
        }
    }
}

/// Drain the available ring; with EVENT_IDX, re-check after re-enabling notifications so a
/// chain queued meanwhile is not left waiting for a kick that will never come.
fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskBackend,
    capacity: u64,
) -> bool {
    let mut used_any = false;
    loop {
        if queue.event_idx_enabled() && queue.disable_notification(mem).is_err() {
            break;
        }
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            let used_len = handle_chain(mem, chain, disk, capacity);
            match queue.add_used(mem, head, used_len) {
                Ok(()) => used_any = true,
                Err(e) => tracing::warn!(head, error = %e, "virtio-blk: cannot return chain"),
            }
        }
        if !queue.event_idx_enabled() {
            break;
        }
        match queue.enable_notification(mem) {
            // More work arrived; but a ring that claims work and yields none is broken: stop.
            Ok(true) if popped => continue,
            _ => break,
        }
    }
    used_any
}

/// Parse, process and answer one chain; returns the used length.
fn handle_chain<I>(mem: &GuestMemoryMmap, chain: I, disk: &dyn DiskBackend, capacity: u64) -> u32
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    match parse(mem, chain, capacity) {
        Ok(req) => {
            let done = req.process(mem, disk);
            match mem.write_obj(done.status, req.status) {
                Ok(()) => done.used_len,
                Err(_) => 0,
            }
        }
        Err(Rejected { status, error }) => {
            tracing::debug!(%error, "virtio-blk: refused request");
            match status.map(|addr| mem.write_obj(error.status(), addr)) {
                Some(Ok(())) => 1,
                _ => 0,
            }
        }
    }
}

/// `struct virtio_blk_config` up to num_queues, little endian.
fn block_config(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let fields: [(usize, &[u8]); 5] = [
        (0, &capacity.to_le_bytes()),
        (8, &SIZE_MAX.to_le_bytes()),
        (12, &SEG_MAX.to_le_bytes()),
        (20, &512u32.to_le_bytes()),
        (34, &1u16.to_le_bytes()),
    ];
    for (at, bytes) in fields {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    c
}

/// Copy config bytes at `offset`; bytes past the structure read as zero.
fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests;
