//! Routes the vCPUs' port I/O and MMIO exits to device models. Reads of unclaimed ports and
//! addresses return all-ones (what absent hardware reads as, and what makes PCI config probing
//! find nothing); writes there are ignored. Each device sits behind its own lock, so vCPUs only
//! contend when they touch the same device.

use std::sync::{Arc, Mutex, PoisonError};

use crate::devices::agent::AgentUart;
use crate::devices::legacy::{ConsoleOut, Keyboard, PmPort, Uart};
use crate::devices::virtio::VirtioMmioBlock;
use crate::layout::{
    ACPI_PM_PORT, COM1_PORT, COM2_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, VIRTIO_MMIO_SIZE,
};

/// All devices the vCPUs can reach by exits.
pub struct Bus {
    pub com1: Arc<Mutex<Uart<ConsoleOut>>>,
    pub com2: Option<Arc<Mutex<AgentUart>>>,
    pub keyboard: Mutex<Keyboard>,
    pub pm: PmPort,
    /// virtio-mmio slots: (base address, device).
    pub virtio: Vec<(u64, Arc<Mutex<VirtioMmioBlock>>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Offset of `port` within an 8-port UART at `base`.
fn uart_offset(port: u16, base: u16) -> Option<u8> {
    port.checked_sub(base)
        .filter(|o| *o < 8)
        .and_then(|o| u8::try_from(o).ok())
}

impl Bus {
    /// Port read of `data.len()` bytes (the UARTs and the i8042 are byte-wide).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let value = if let Some(o) = uart_offset(port, COM1_PORT) {
            Some(lock(&self.com1).read(o))
        } else if let Some(o) = uart_offset(port, COM2_PORT) {
            self.com2.as_ref().map(|u| lock(u).read(o))
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            Some(lock(&self.keyboard).read((port - I8042_DATA_PORT) as u8))
        } else if port == ACPI_PM_PORT {
            Some(self.pm.read())
        } else {
            None
        };
        if let (Some(v), Some(first)) = (value, data.first_mut()) {
            *first = v;
        }
    }

    /// Port write; only the first byte matters to byte-wide devices.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if let Some(o) = uart_offset(port, COM1_PORT) {
            // A console that cannot be written to must not stop the guest.
            let _ = lock(&self.com1).write(o, value);
        } else if let Some(o) = uart_offset(port, COM2_PORT) {
            if let Some(u) = &self.com2 {
                let _ = lock(u).write(o, value);
            }
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            let _ = lock(&self.keyboard).write((port - I8042_DATA_PORT) as u8, value);
        } else if port == ACPI_PM_PORT {
            self.pm.write(value);
        }
    }

    fn virtio_slot(&self, addr: u64) -> Option<(&Mutex<VirtioMmioBlock>, u64)> {
        self.virtio.iter().find_map(|(base, dev)| {
            let off = addr.checked_sub(*base).filter(|o| *o < VIRTIO_MMIO_SIZE)?;
            Some((dev.as_ref(), off))
        })
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_slot(addr) {
            Some((dev, off)) => lock(dev).mmio_read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, off)) = self.virtio_slot(addr) {
            lock(dev).mmio_write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::IrqLine;
    use crate::devices::legacy::ResetLine;
    use crate::exit::{ExitSender, GuestExit};

    #[test]
    fn ports_route_to_their_devices() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("console");
        let (tx, rx) = ExitSender::new();
        let bus = Bus {
            com1: Arc::new(Mutex::new(Uart::new(
                IrqLine::new()?,
                crate::devices::legacy::console_out(Some(&log), 1 << 20)?,
            ))),
            com2: None,
            keyboard: Mutex::new(Keyboard::new(ResetLine(tx.clone()))),
            pm: PmPort::new(tx),
            virtio: vec![],
        };
        bus.pio_write(0x3f8, b"A");
        assert_eq!(std::fs::read(&log)?, b"A");
        let mut b = [0u8; 1];
        bus.pio_read(0x3fd, &mut b); // LSR: transmitter empty
        assert_ne!(b[0] & 0x20, 0);
        bus.pio_read(0x2f8, &mut b); // COM2 absent
        assert_eq!(b[0], 0xff);
        let mut w = [0u8; 4];
        bus.pio_read(0xcfc, &mut w); // PCI config data: nothing there
        assert_eq!(w, [0xff; 4]);
        bus.mmio_read(0xc000_1000, &mut w); // no virtio device in slot 0
        assert_eq!(w, [0xff; 4]);
        bus.pio_write(0x64, &[0xfe]);
        assert_eq!(rx.try_recv().ok(), Some(GuestExit::Reboot));
        bus.pio_write(0x600, &[0x34]);
        assert_eq!(rx.try_recv().ok(), Some(GuestExit::Poweroff));
        Ok(())
    }
}
