//! virtio devices over the virtio-mmio transport. The transport (`mmio`) owns the register state
//! machine and the queues; each device only says what it offers and how it serves a queue, so a
//! guest can never reach a device's I/O path before the handshake validated its queues.

pub mod block;
pub mod mmio;
pub mod testing;

pub use block::{DiskBackend, DiskError, FileDisk, VirtioMmioBlock};

/// How a device tells the guest that it has news (used buffers or a config change).
///
/// The vmm implements it with an irqfd; tests count calls. It must be cheap and never block for
/// long: the device calls it from its queue-processing path.
pub trait IrqTrigger: Send + Sync {
    /// Raise the device's interrupt line once (edge semantics).
    fn trigger(&self) -> std::io::Result<()>;
}
