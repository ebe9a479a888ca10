//! Device models the guest sees. Each is driven by plain reads and writes of its registers, so it
//! can be tested without KVM.

pub mod agent;
pub mod irq;
pub mod legacy;
pub mod virtio;
