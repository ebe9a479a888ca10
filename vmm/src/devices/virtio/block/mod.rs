//! virtio-blk over virtio-mmio. Every chain the guest queues is parsed (pure, validated) before
//! any I/O, and every chain popped is returned to the used ring exactly once, answered with a
//! status byte when it has a place for one; a bad chain never stops the device serving the next.

pub mod disk;
pub mod limit;
pub mod request;

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
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
        while let Some(batch) = self.take_available(queue_index) {
            let done = batch.run(None);
            if !self.complete(queue_index, &done) {
                break;
            }
        }
    }

    /// Pops and parses every chain available on queue `queue_index` (with EVENT_IDX, guest
    /// notifications off until `complete`). The I/O is then done by `Batch::run` without the
    /// device: the caller releases its lock on the device meanwhile. `None`: nothing to do.
    pub fn take_available(&mut self, queue_index: u16) -> Option<Batch> {
        if !self.transport.is_running() {
            return None;
        }
        let queue = self.transport.queue_mut(queue_index)?;
        if !queue.ready() {
            return None;
        }
        if queue.event_idx_enabled() && queue.disable_notification(&self.mem).is_err() {
            return None;
        }
        let mut items = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            items.push((head, parse(&self.mem, chain, self.capacity)));
        }
        Some(Batch {
            mem: self.mem.clone(),
            disk: self.disk.clone(),
            items,
        })
    }

    /// Returns a batch's chains to the used ring and interrupts the guest if it wants to hear
    /// of it; true when more work arrived meanwhile (take another batch).
    pub fn complete(&mut self, queue_index: u16, done: &[(u16, u32)]) -> bool {
        if !self.transport.is_running() {
            return false; // reset while the batch ran: the rings are gone
        }
        let Some(queue) = self.transport.queue_mut(queue_index) else {
            return false;
        };
        let mut used_any = false;
        for &(head, used_len) in done {
            match queue.add_used(&self.mem, head, used_len) {
                Ok(()) => used_any = true,
                Err(e) => tracing::warn!(head, error = %e, "virtio-blk: cannot return chain"),
            }
        }
        // With EVENT_IDX, re-check after re-enabling notifications so a chain queued meanwhile
        // is not left waiting for a kick that will never come; a ring that claims work and
        // yielded none is broken: stop.
        let more = queue.event_idx_enabled()
            && matches!(queue.enable_notification(&self.mem), Ok(true))
            && !done.is_empty();
        let notify = used_any && queue.needs_notification(&self.mem).unwrap_or(true);
        if notify {
            self.transport.signal_used();
            self.raise();
        }
        more
    }

    fn raise(&self) {
        if let Err(e) = self.irq.trigger() {
            tracing::warn!(error = %e, "virtio-blk: cannot raise interrupt");
        }
    }
}

/// Serves queue `index` of `dev` after a notification: the device lock is held to take chains
/// and to return them, never across the I/O (or a rate limit's wait), so the guest's register
/// accesses and interrupts go on meanwhile.
pub fn serve_notified(
    dev: &std::sync::Mutex<VirtioMmioBlock>,
    index: u16,
    limiter: Option<&limit::RateLimiter>,
) {
    let lock = || {
        dev.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    loop {
        let Some(batch) = lock().take_available(index) else {
            break;
        };
        let done = batch.run(limiter);
        if !lock().complete(index, &done) {
            break;
        }
    }
}

/// Chains taken from a queue, parsed, waiting for their I/O.
pub struct Batch {
    mem: GuestMemoryMmap,
    disk: Arc<dyn DiskBackend>,
    items: Vec<(u16, Result<Request, Rejected>)>,
}

impl Batch {
    /// Does each chain's I/O (waiting on `limiter` first, if any) and writes its status;
    /// returns `(head, used length)` for `complete`.
    pub fn run(self, limiter: Option<&limit::RateLimiter>) -> Vec<(u16, u32)> {
        let Batch { mem, disk, items } = self;
        items
            .into_iter()
            .map(|(head, parsed)| {
                if let (Some(l), Ok(req)) = (limiter, &parsed) {
                    l.wait(req.data_len());
                }
                (head, answer(&mem, parsed, disk.as_ref()))
            })
            .collect()
    }
}

/// Process and answer one parsed chain; returns the used length.
fn answer(mem: &GuestMemoryMmap, parsed: Result<Request, Rejected>, disk: &dyn DiskBackend) -> u32 {
    match parsed {
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
