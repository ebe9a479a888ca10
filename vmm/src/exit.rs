//! Why a VM stopped. Devices and vCPU threads report one `GuestExit` on a channel; the first one
//! the vmm receives decides the process's exit code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

/// How the guest (or the vmm) ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5 (poweroff).
    Poweroff,
    /// ACPI reset register or i8042 reset line (reboot). The vmm does not restart guests.
    Reboot,
    /// KVM_EXIT_SHUTDOWN: a triple fault, Linux's last-resort reboot method or a crash.
    TripleFault,
    /// SIGTERM and the guest did not power off within the grace period.
    Terminated,
    /// A vCPU failed (internal error, failed entry, an ioctl error).
    Failed(String),
}

impl GuestExit {
    /// The vmm's process exit code: 0 for a guest that powered off or rebooted cleanly, 1 for a
    /// failure, 143 (128 + SIGTERM) when killed after the grace period.
    pub fn code(&self) -> i32 {
        match self {
            GuestExit::Poweroff | GuestExit::Reboot => 0,
            GuestExit::TripleFault | GuestExit::Failed(_) => 1,
            GuestExit::Terminated => 143,
        }
    }
}

/// Where exits are reported. Once anything reports, `stopping` is true, so vCPU threads stop
/// running the guest instead of letting it go on past its poweroff.
#[derive(Debug, Clone)]
pub struct ExitSender {
    tx: Sender<GuestExit>,
    stopping: Arc<AtomicBool>,
}

impl ExitSender {
    /// A reporter and the receiving end.
    pub fn new() -> (Self, Receiver<GuestExit>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sender = ExitSender {
            tx,
            stopping: Arc::new(AtomicBool::new(false)),
        };
        (sender, rx)
    }

    /// Reports an exit (the receiver acts on the first one).
    pub fn send(&self, exit: GuestExit) {
        self.stopping.store(true, Ordering::SeqCst);
        // A closed channel means the vmm is already stopping.
        let _ = self.tx.send(exit);
    }

    /// Whether any exit was reported.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
