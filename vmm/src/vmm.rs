//! The VM itself: `TryFrom<VmmConfig> for Vmm` builds everything in boot order (KVM VM, guest RAM,
//! irqchip/PIT/TSS, devices with their irqfds and ioeventfds, ACPI tables, kernel and zero page,
//! vCPUs), and `run` starts one thread per vCPU and waits for the first `GuestExit`. Nothing the
//! guest does ends the vmm except through a `GuestExit`.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::config::{ConsoleConfig, VmmConfig};
use crate::devices::agent::{self, AgentOut, AgentUart, Client};
use crate::devices::irq::IrqLine;
use crate::devices::legacy::{console_out, spawn_stdin_feeder, Keyboard, PmPort, ResetLine, Uart};
use crate::devices::virtio::block::limit::RateLimiter;
use crate::devices::virtio::{FileDisk, IrqTrigger, VirtioMmioBlock};
use crate::exit::{ExitSender, GuestExit};
use crate::layout::{virtio_gsi, virtio_mmio_base, COM1_GSI, COM2_GSI, GED_GSI, KVM_TSS_ADDR};
use crate::{acpi, boot, cpu};

/// One queue's notification eventfd, its device, its index and its disk's rate limits.
type QueueWorker = (EventFd, Arc<Mutex<VirtioMmioBlock>>, u16, Arc<RateLimiter>);

/// virtio-mmio QueueNotify register offset; its ioeventfd matches the queue index.
const QUEUE_NOTIFY: u64 = 0x50;

/// Errors while building or running the VM; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Creating an eventfd, thread or socket failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Boot protocol setup failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU setup failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// ACPI table setup failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A disk could not be opened.
    #[error("opening disk {0}")]
    Disk(PathBuf, #[source] crate::devices::virtio::DiskError),
    /// More disks than slots (config validation normally catches this first).
    #[error("too many disks")]
    TooManyDisks,
    /// Binding the agent socket failed.
    #[error("listening on agent socket {0}")]
    AgentSocket(PathBuf, #[source] std::io::Error),
}

/// A built VM, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    vm: VmFd,
    /// Guest RAM: KVM maps it by address, so it must live as long as the VM.
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    bus: Arc<Bus>,
    exit_tx: ExitSender,
    exit_rx: Receiver<GuestExit>,
    /// Interrupt lines registered as irqfds; kept alive for the VM's lifetime.
    _irqs: Vec<Arc<IrqLine>>,
    /// (queue ioeventfd, device, queue index) per virtio queue.
    queues: Vec<QueueWorker>,
    agent: Option<(UnixListener, Arc<Mutex<AgentUart>>, Client, PathBuf)>,
    /// The GED line: raising it presses the ACPI power button.
    power_button: Arc<IrqLine>,
    /// Whether the console is on stdio (then stdin feeds COM1).
    console_stdio: bool,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

impl TryFrom<VmmConfig> for Vmm {
    type Error = VmmError;

    fn try_from(config: VmmConfig) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;

        let mem = boot::create_memory(config.memory_bytes)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`; the Vmm keeps `mem` for as long
            // as the VM fd, and each vCPU thread holds a clone, so the map outlives every
            // KVM_RUN that could touch it.
            unsafe { vm.set_user_memory_region(region_desc) }
                .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;

        let (exit_tx, exit_rx) = ExitSender::new();
        let mut irqs = Vec::new();
        let mut irq_line = |gsi: u32| -> Result<Arc<IrqLine>, VmmError> {
            let line = Arc::new(IrqLine::new().map_err(|e| VmmError::Io("creating an irqfd", e))?);
            vm.register_irqfd(line.eventfd(), gsi)
                .map_err(|e| VmmError::Kvm("KVM_IRQFD", e))?;
            irqs.push(line.clone());
            Ok(line)
        };

        let console_path = match &config.console {
            ConsoleConfig::Stdio => None,
            ConsoleConfig::File(p) => Some(p.as_path()),
        };
        let out = console_out(console_path, config.console_max)
            .map_err(|e| VmmError::Io("opening the console", e))?;
        let com1_line = irq_line(COM1_GSI)?;
        let com1 = Arc::new(Mutex::new(Uart::new(clone_line(&com1_line)?, out)));

        let mut agent = None;
        let mut com2 = None;
        if let Some(path) = &config.agent_socket {
            let listener =
                UnixListener::bind(path).map_err(|e| VmmError::AgentSocket(path.clone(), e))?;
            // Whoever connects runs commands in the guest: the owner only.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| VmmError::AgentSocket(path.clone(), e))?;
            let client: Client = Arc::default();
            let line = irq_line(COM2_GSI)?;
            let uart = Arc::new(Mutex::new(AgentUart::new(
                clone_line(&line)?,
                AgentOut::new(client.clone()),
            )));
            com2 = Some(uart.clone());
            agent = Some((listener, uart, client, path.clone()));
        }

        let mut virtio = Vec::new();
        let mut queues = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let (Some(base), Some(gsi)) = (virtio_mmio_base(i), virtio_gsi(i)) else {
                return Err(VmmError::TooManyDisks);
            };
            let backend = FileDisk::open(&disk.path, disk.read_only)
                .map_err(|e| VmmError::Disk(disk.path.clone(), e))?;
            let line = irq_line(gsi)?;
            let dev = Arc::new(Mutex::new(VirtioMmioBlock::new(
                mem.clone(),
                Arc::new(backend),
                line,
            )));
            let evt = EventFd::new(0).map_err(|e| VmmError::Io("creating an ioeventfd", e))?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), 0u32)
                .map_err(|e| VmmError::Kvm("KVM_IOEVENTFD", e))?;
            // Each disk its own buckets, as QEMU's per-drive throttling.
            let limiter = Arc::new(RateLimiter::new(config.disk_bw, config.disk_iops));
            queues.push((evt, dev.clone(), 0, limiter));
            virtio.push((base, dev));
        }

        let power_button = irq_line(GED_GSI)?;

        let rsdp = acpi::write(&mem, config.cpus, config.disks.len())?;
        let info = boot::load(
            &mem,
            config.memory_bytes,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            rsdp,
        )?;
        cpu::write_boot_tables(&mem)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            cpu::configure_vcpu(&vcpu, &supported, id, config.cpus, info.entry)?;
            vcpus.push(vcpu);
        }

        let bus = Arc::new(Bus {
            com1,
            com2,
            keyboard: Mutex::new(Keyboard::new(ResetLine(exit_tx.clone()))),
            pm: PmPort::new(exit_tx.clone()),
            virtio,
        });
        Ok(Vmm {
            _kvm: kvm,
            vm,
            _mem: mem,
            vcpus,
            bus,
            exit_tx,
            exit_rx,
            _irqs: irqs,
            queues,
            agent,
            console_stdio: config.console == ConsoleConfig::Stdio,
            power_button,
        })
    }
}

/// A second handle on `line` for a UART, which owns its trigger by value.
fn clone_line(line: &IrqLine) -> Result<IrqLine, VmmError> {
    line.try_clone()
        .map_err(|e| VmmError::Io("cloning an irqfd", e))
}

/// Set by the SIGTERM handler.
static TERM_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERM_REQUESTED.store(true, Ordering::SeqCst);
}

fn install_sigterm_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the sigaction
    // struct is fully initialised (zeroed, then the handler set).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

impl Vmm {
    /// Runs the VM until the guest powers off or reboots, a vCPU fails, or SIGTERM's grace
    /// period (`term_grace`) runs out. SIGTERM presses the ACPI power button first. Returns how
    /// it ended. vCPUs still in KVM_RUN are not interrupted (each keeps its own handle on guest
    /// RAM), so the caller is expected to exit the process soon after.
    pub fn run(self, term_grace: Duration) -> Result<GuestExit, VmmError> {
        install_sigterm_handler();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        if let Some((listener, uart, client, path)) = &self.agent {
            let listener = listener
                .try_clone()
                .map_err(|e| VmmError::Io("cloning the agent listener", e))?;
            // The host's tools read the dropped-byte count beside the socket.
            let mut stats = path.clone().into_os_string();
            stats.push(".dropped");
            let (bridge, _inbox) =
                agent::spawn_bridge(listener, uart.clone(), client.clone(), Some(stats.into()))
                    .map_err(|e| VmmError::Io("starting the agent bridge", e))?;
            threads.push(bridge);
        }
        if self.console_stdio {
            threads.push(
                spawn_stdin_feeder(self.bus.com1.clone())
                    .map_err(|e| VmmError::Io("starting the console input thread", e))?,
            );
        }
        for (evt, dev, index, limiter) in &self.queues {
            let evt = evt
                .try_clone()
                .map_err(|e| VmmError::Io("cloning an ioeventfd", e))?;
            let (dev, index, limiter) = (dev.clone(), *index, limiter.clone());
            let t = std::thread::Builder::new()
                .name(format!("virtio-q{index}"))
                .spawn(move || {
                    let limiter = (!limiter.is_unlimited()).then_some(limiter.as_ref());
                    while evt.read().is_ok() {
                        crate::devices::virtio::block::serve_notified(&dev, index, limiter);
                    }
                })
                .map_err(|e| VmmError::Io("starting a queue thread", e))?;
            threads.push(t);
        }
        for (id, vcpu) in self.vcpus.into_iter().enumerate() {
            let bus = self.bus.clone();
            let exit = self.exit_tx.clone();
            // The thread's own handle on guest RAM: the map must outlive its last KVM_RUN.
            let mem = self._mem.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    run_vcpu(id, vcpu, &bus, &exit);
                    drop(mem);
                })
                .map_err(|e| VmmError::Io("starting a vCPU thread", e))?;
            threads.push(t);
        }
        let _keep_vm = &self.vm;

        let mut term_deadline: Option<Instant> = None;
        let result = loop {
            match self.exit_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(exit) => break exit,
                Err(RecvTimeoutError::Disconnected) => {
                    break GuestExit::Failed("every vCPU stopped".into())
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if TERM_REQUESTED.load(Ordering::SeqCst) {
                let deadline = *term_deadline.get_or_insert_with(|| {
                    let pressed = IrqTrigger::trigger(self.power_button.as_ref()).is_ok();
                    eprintln!(
                        "vmm: SIGTERM: {}waiting up to {}s for the guest to power off",
                        if pressed {
                            "pressed the ACPI power button; "
                        } else {
                            ""
                        },
                        term_grace.as_secs()
                    );
                    Instant::now() + term_grace
                });
                if Instant::now() >= deadline {
                    break GuestExit::Terminated;
                }
            }
        };
        if let Some((_, _, _, path)) = &self.agent {
            let _ = std::fs::remove_file(path);
        }
        Ok(result)
    }
}

/// One vCPU's run loop: dispatch exits to the bus until a terminal exit.
fn run_vcpu(id: usize, mut vcpu: VcpuFd, bus: &Bus, exit: &ExitSender) {
    let outcome = loop {
        if exit.stopping() {
            // Another vCPU or a device ended the VM: stop running the guest.
            return;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            // With the in-kernel LAPIC, HLT stays in the kernel; if one reaches us, go on.
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => break GuestExit::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                break match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::Poweroff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reboot,
                    other => GuestExit::Failed(format!("vCPU {id}: system event {other}")),
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break GuestExit::Failed(format!(
                    "vCPU {id}: KVM entry failed (reason {reason:#x}, cpu {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                break GuestExit::Failed(format!("vCPU {id}: KVM internal error"))
            }
            Ok(other) => break GuestExit::Failed(format!("vCPU {id}: unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break GuestExit::Failed(format!("vCPU {id}: KVM_RUN: {e}")),
        }
    };
    exit.send(outcome);
}
