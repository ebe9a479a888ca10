//! Legacy platform devices on port I/O: the 16550 console (COM1), the i8042's reset line, and
//! the ACPI power-management port (sleep control/status and reset register in one byte). The
//! latter two turn the guest's poweroff and reboot into a `GuestExit`, exactly once each.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use vm_superio::{I8042Device, Serial, Trigger};

use super::irq::IrqLine;
use crate::exit::{ExitSender, GuestExit};
use crate::layout::{ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};

/// A 16550 whose output goes to a byte sink (stdout, a file, a socket).
pub type Uart<W> = Serial<IrqLine, vm_superio::serial::NoEvents, W>;

/// The console's byte sink: unbuffered, so a partial line (a prompt) shows at once.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The default cap of a console log file; one rotated file (`PATH.1`) is kept beside it.
pub const CONSOLE_MAX: u64 = 16 << 20;

/// A log file that never grows past `max` bytes: past it, the file becomes `PATH.1` (replacing
/// the one before) and a new file starts, so a guest writing without end holds at most twice
/// `max` of the host's disk.
#[derive(Debug)]
pub struct CappedFile {
    path: std::path::PathBuf,
    file: File,
    len: u64,
    max: u64,
}

impl CappedFile {
    /// Creates (or truncates) `path`.
    pub fn create(path: &std::path::Path, max: u64) -> std::io::Result<CappedFile> {
        Ok(CappedFile {
            path: path.to_path_buf(),
            file: File::create(path)?,
            len: 0,
            max: max.max(1),
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = File::create(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len.saturating_add(buf.len() as u64) > self.max && self.len > 0 {
            self.rotate()?;
        }
        let room = usize::try_from(self.max.saturating_sub(self.len)).unwrap_or(usize::MAX);
        let n = self
            .file
            .write(buf.get(..room.clamp(1, buf.len().max(1))).unwrap_or(buf))?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Opens the console sink: the process's stdout, or `path` (created or truncated, capped at
/// `max` bytes with one rotated file).
pub fn console_out(path: Option<&std::path::Path>, max: u64) -> std::io::Result<ConsoleOut> {
    match path {
        Some(p) => Ok(Box::new(CappedFile::create(p, max)?)),
        None => {
            let fd: OwnedFd = std::io::stdout().as_fd().try_clone_to_owned()?;
            Ok(Box::new(File::from(fd)))
        }
    }
}

/// Poll period while a UART's receive FIFO is full.
const FIFO_FULL_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Feeds `bytes` into `uart`'s receive FIFO as fast as the guest drains it (nothing is dropped;
/// the caller waits while the FIFO is full).
pub fn feed_uart<W: Write>(uart: &std::sync::Mutex<Uart<W>>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let taken = {
            let mut u = uart
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let room = u.fifo_capacity().min(bytes.len());
            match bytes.get(..room) {
                Some(chunk) if room > 0 => u.enqueue_raw_bytes(chunk).unwrap_or(0),
                _ => 0,
            }
        };
        bytes = bytes.get(taken..).unwrap_or_default();
        if taken == 0 {
            std::thread::sleep(FIFO_FULL_WAIT);
        }
    }
}

/// Forwards the vmm's stdin to the console UART until stdin ends.
pub fn spawn_stdin_feeder(
    uart: std::sync::Arc<std::sync::Mutex<Uart<ConsoleOut>>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 1024];
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => feed_uart(&uart, buf.get(..n).unwrap_or_default()),
                }
            }
        })
}

/// Sends `Reboot` when the i8042 sees the CPU-reset command (0xFE to port 0x64).
#[derive(Debug)]
pub struct ResetLine(pub ExitSender);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(GuestExit::Reboot);
        Ok(())
    }
}

/// The i8042 as far as the vmm needs it: reads return 0, 0xFE on the command port resets.
pub type Keyboard = I8042Device<ResetLine>;

/// The ACPI sleep-control / sleep-status / reset port of the hardware-reduced FADT.
#[derive(Debug)]
pub struct PmPort {
    exit: ExitSender,
}

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 0x20;

impl PmPort {
    pub fn new(exit: ExitSender) -> Self {
        PmPort { exit }
    }

    /// Sleep status: wake status (bit 7) set, so a guest polling after S5 would not spin.
    pub fn read(&self) -> u8 {
        0x80
    }

    /// Decodes a write: reset value -> reboot; SLP_EN with SLP_TYP 5 -> poweroff; anything
    /// else (clearing sleep status, other sleep states) is ignored.
    pub fn write(&self, value: u8) {
        let exit = if value == ACPI_RESET_VALUE {
            Some(GuestExit::Reboot)
        } else if value & SLP_EN != 0 && (value >> 2) & 0x7 == ACPI_S5_SLP_TYP {
            Some(GuestExit::Poweroff)
        } else {
            None
        };
        if let Some(e) = exit {
            self.exit.send(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitSender;

    #[test]
    fn pm_port_decodes_poweroff_and_reset_only() {
        let (tx, rx) = ExitSender::new();
        let pm = PmPort::new(tx);
        pm.write(0x80); // clear sleep status: nothing
        pm.write(0x20 | (3 << 2)); // S3: not supported, ignored
        assert!(rx.try_recv().is_err());
        pm.write(0x34); // Linux's S5 write: ((5 << 2) & 0x1c) | 0x20
        assert_eq!(rx.try_recv().ok(), Some(GuestExit::Poweroff));
        pm.write(1);
        assert_eq!(rx.try_recv().ok(), Some(GuestExit::Reboot));
    }

    #[test]
    fn i8042_reset_command_reboots() {
        let (tx, rx) = ExitSender::new();
        let mut kbd = Keyboard::new(ResetLine(tx));
        assert_eq!(kbd.read(4), 0);
        let _ = kbd.write(4, 0xaa);
        assert!(rx.try_recv().is_err());
        assert!(kbd.write(4, 0xfe).is_ok());
        assert_eq!(rx.try_recv().ok(), Some(GuestExit::Reboot));
    }

    #[test]
    fn console_uart_writes_bytes_through() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("console.log");
        let mut uart = Uart::new(IrqLine::new()?, console_out(Some(&path), CONSOLE_MAX)?);
        for b in b"hello\n" {
            let _ = uart.write(0, *b);
        }
        assert_eq!(std::fs::read(&path)?, b"hello\n");
        Ok(())
    }

    #[test]
    fn a_capped_log_keeps_at_most_two_files_of_max_bytes() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("console.log");
        let mut log = CappedFile::create(&path, 1000)?;
        for i in 0..100u32 {
            log.write_all(format!("line {i:04} of a guest that never stops\n").as_bytes())?;
        }
        let now = std::fs::read_to_string(&path)?;
        let old = std::fs::read_to_string(dir.path().join("console.log.1"))?;
        assert!(
            now.len() <= 1000 && old.len() <= 1000,
            "{} {}",
            now.len(),
            old.len()
        );
        assert!(
            now.ends_with("line 0099 of a guest that never stops\n"),
            "{now}"
        );
        assert!(old.len() > 900, "the rotated file is a full one");
        Ok(())
    }
}
