//! The virtio-mmio (version 2) register file below offset 0x100: feature negotiation, queue
//! setup and the device-status state machine. Invariant: queues can only be configured between
//! FEATURES_OK and DRIVER_OK, and the device is "running" (may touch guest memory through its
//! queues) only after DRIVER_OK found every ready queue inside guest memory.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// Bytes of register space a device takes, config space included.
pub const MMIO_SIZE: u64 = 0x1000;
/// Start of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets (linux/virtio_mmio.h).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Vendor id the device reports ("RVMM"); drivers do not match on it.
const VENDOR_ID: u32 = 0x4d4d_5652;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// What a register write asks the owner of the transport to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing beyond the register update.
    None,
    /// The driver notified queue `n` (only reported while running).
    Notify(u16),
    /// The device just went live (DRIVER_OK accepted).
    Activated,
    /// The driver reset the device; the owner drops any device-side state.
    Reset,
    /// The device needs the guest's attention (config interrupt raised).
    NeedsInterrupt,
}

/// Register state of one virtio-mmio device.
#[derive(Debug)]
pub struct MmioTransport {
    device_id: u32,
    offered: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for a device of type `device_id` offering `features` (VERSION_1 is always
    /// added), with one queue per entry of `queue_sizes` (each a power of two, at most 32768).
    pub fn new(
        device_id: u32,
        features: u64,
        queue_sizes: &[u16],
    ) -> Result<Self, virtio_queue::Error> {
        let queues = queue_sizes
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device_id,
            offered: features | (1u64 << VIRTIO_F_VERSION_1),
            device_features_sel: 0,
            driver_features_sel: 0,
            acked: 0,
            queue_sel: 0,
            queues,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    /// Features the driver accepted (valid once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The device-status register as the guest sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device may serve its queues: DRIVER_OK accepted and no failure since.
    pub fn is_running(&self) -> bool {
        self.status & S_DRIVER_OK != 0 && self.status & (S_FAILED | S_NEEDS_RESET) == 0
    }

    /// The pending-interrupt bits (bit 0 used ring, bit 1 config change).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Record that a used ring changed; the caller then raises the interrupt line.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
    }

    /// Queue `index`, if it exists.
    pub fn queue_mut(&mut self, index: u16) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(index))
    }

    /// Read a register below 0x100. Anything but an aligned 32-bit read gets zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) else {
            data.fill(0);
            return;
        };
        let value = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        *out = value.to_le_bytes();
    }

    /// Write a register below 0x100. Writes the current state does not allow are ignored, as
    /// the spec lets a device do; `mem` is needed to validate queues at DRIVER_OK.
    pub fn write<M: GuestMemory>(&mut self, offset: u64, data: &[u8], mem: &M) -> WriteEffect {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return WriteEffect::None;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & (S_DRIVER | S_FEATURES_OK) == S_DRIVER => {
                match self.driver_features_sel {
                    0 => self.acked = (self.acked & !0xffff_ffff) | u64::from(value),
                    1 => self.acked = (self.acked & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_reg(offset, value),
            reg::QUEUE_NOTIFY if self.is_running() => {
                if let Ok(q) = u16::try_from(value) {
                    return WriteEffect::Notify(q);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => return self.write_status(value, mem),
            _ => {}
        }
        WriteEffect::None
    }

    fn selected(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        // Queue layout may change only after features are settled and before the device runs;
        // stopping a queue (QueueReady = 0, as Linux does when it deletes one) is always allowed.
        let stopping = offset == reg::QUEUE_READY && value == 0;
        if !stopping && self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) != S_FEATURES_OK {
            return;
        }
        let Some(q) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            return;
        };
        match offset {
            reg::QUEUE_NUM => {
                // virtio-queue refuses sizes that are not powers of two or exceed the maximum.
                if let Ok(size) = u16::try_from(value) {
                    q.set_size(size);
                }
            }
            reg::QUEUE_READY => q.set_ready(value == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            reg::QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// The device-status state machine: every accepted transition is one arm.
    fn write_status<M: GuestMemory>(&mut self, value: u32, mem: &M) -> WriteEffect {
        const ACK: u32 = S_ACK;
        const DRV: u32 = S_ACK | S_DRIVER;
        const FEAT: u32 = S_ACK | S_DRIVER | S_FEATURES_OK;
        const LIVE: u32 = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
        match (self.status, value) {
            (_, 0) => {
                self.reset();
                WriteEffect::Reset
            }
            // The driver gave up; keep everything else until it resets.
            (current, v) if v & S_FAILED != 0 => {
                self.status = current | S_FAILED;
                WriteEffect::None
            }
            (0, ACK) | (ACK, DRV) => {
                self.status = value;
                WriteEffect::None
            }
            (DRV, FEAT) => {
                let unknown = self.acked & !self.offered;
                let modern = self.acked & (1u64 << VIRTIO_F_VERSION_1) != 0;
                if unknown == 0 && modern {
                    self.status = FEAT;
                } else {
                    // Leaving FEATURES_OK clear tells the driver its feature set is refused.
                    tracing::warn!(acked = self.acked, "virtio: refused driver features");
                }
                WriteEffect::None
            }
            (FEAT, LIVE) => self.activate(mem),
            (current, v) => {
                tracing::debug!(current, requested = v, "virtio: ignored status write");
                WriteEffect::None
            }
        }
    }

    fn activate<M: GuestMemory>(&mut self, mem: &M) -> WriteEffect {
        let event_idx = self.acked & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut valid = true;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(mem) {
                valid = false;
            }
        }
        if valid {
            self.status |= S_DRIVER_OK;
            WriteEffect::Activated
        } else {
            // The guest set up a ring outside its memory: tell it to reset, never touch it.
            self.status |= S_DRIVER_OK | S_NEEDS_RESET;
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
            WriteEffect::NeedsInterrupt
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }
}
