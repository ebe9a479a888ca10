//! An interrupt line backed by an eventfd that KVM watches (irqfd): writing it raises the GSI in
//! the in-kernel IOAPIC without leaving the calling thread. One type serves the 16550 ports
//! (vm-superio's `Trigger`) and the virtio devices (`IrqTrigger`).

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::virtio::IrqTrigger;

/// An irqfd-backed interrupt line.
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
}

impl IrqLine {
    /// A new line; register `eventfd()` with KVM_IRQFD to connect it to a GSI.
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd KVM listens on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Another handle on the same eventfd (same GSI).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(IrqLine {
            evt: self.evt.try_clone()?,
        })
    }

    fn raise(&self) -> std::io::Result<()> {
        match self.evt.write(1) {
            // The counter is saturated: an interrupt is already pending, which is all we need.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

impl IrqTrigger for IrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_counts_on_the_eventfd() -> std::io::Result<()> {
        let line = IrqLine::new()?;
        IrqTrigger::trigger(&line)?;
        vm_superio::Trigger::trigger(&line)?;
        assert_eq!(line.eventfd().read()?, 2);
        Ok(())
    }
}
