//! `vmm` command line: parse, validate against the host, build the VM, run it, and turn how it
//! ended into the exit code. Every failure is one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vmm::config::{self, ConfigError, ConsoleConfig, DiskConfig, VmmConfig};
use vmm::devices::virtio::block::limit::Limit;
use vmm::{host, GuestExit, Vmm};

/// A small KVM microVM: boots a Linux bzImage with virtio-mmio disks, a serial console and an
/// agent port.
#[derive(Parser, Debug)]
#[command(name = "vmm", version)]
struct Cli {
    /// Kernel image (bzImage).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// A disk: PATH or PATH,ro. Repeatable; the guest sees them as vda, vdb, ... in this order.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u64,
    /// Kernel command line.
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Unix socket to bridge the guest's COM2 (ttyS1, the agent channel) to.
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    /// Where the guest console (COM1) goes: stdio or a file path.
    #[arg(long, default_value = "stdio")]
    console: String,
    /// Most bytes of a console file; past it the file becomes FILE.1 and a new one starts.
    #[arg(long, default_value_t = vmm::devices::legacy::CONSOLE_MAX)]
    console_max: u64,
    /// Bytes per second each disk may move, with an optional burst: RATE[/s][,BURST] (K, M, G).
    #[arg(long, value_parser = Limit::parse)]
    disk_bw: Option<Limit>,
    /// Operations per second each disk may serve, with an optional burst: N[,BURST].
    #[arg(long, value_parser = Limit::parse)]
    disk_iops: Option<Limit>,
    /// On SIGTERM the vmm presses the guest's ACPI power button, then waits this many seconds for
    /// it to power off before stopping it (exit 143).
    #[arg(long, default_value_t = 10)]
    term_timeout: u64,
    /// Boot even on a host whose KVM cannot run unmodified Linux (kvm_pvm); for experiments.
    #[arg(long)]
    allow_unsupported_kvm: bool,
}

/// Exit codes shared by the project's tools.
const EXIT_OTHER: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_FOUND: u8 = 3;
const EXIT_CONFLICT: u8 = 4;

fn config_exit_code(e: &ConfigError) -> u8 {
    match e {
        ConfigError::KernelMissing(_)
        | ConfigError::InitrdMissing(_)
        | ConfigError::DiskMissing(_)
        | ConfigError::ConsoleFolderMissing(_) => EXIT_NOT_FOUND,
        ConfigError::AgentSocketTaken(_) => EXIT_CONFLICT,
        _ => EXIT_USAGE,
    }
}

fn parse(cli: &Cli) -> Result<VmmConfig, ConfigError> {
    let disks = cli
        .disks
        .iter()
        .map(|d| d.parse::<DiskConfig>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmmConfig {
        kernel: cli.kernel.clone(),
        initrd: cli.initrd.clone(),
        disks,
        memory_bytes: config::parse_memory(&cli.memory)?,
        cpus: config::parse_cpus(cli.cpus)?,
        cmdline: cli.cmdline.clone(),
        agent_socket: cli.agent_socket.clone(),
        console: cli.console.parse::<ConsoleConfig>()?,
        console_max: cli.console_max,
        disk_bw: cli.disk_bw,
        disk_iops: cli.disk_iops,
    })
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    // The agent socket and the console log are the owner's only (a socket's mode comes from
    // the umask at bind).
    // SAFETY: umask has no preconditions; no thread has started yet.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let allow = cli.allow_unsupported_kvm
        || std::env::var(host::ALLOW_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    let config = match parse(&cli) {
        Ok(c) => c,
        Err(e) => return fail(config_exit_code(&e), e),
    };
    if let Err(e) = config.validate(config::host_memory().unwrap_or(u64::MAX)) {
        return fail(config_exit_code(&e), e);
    }
    if !allow {
        if let Err(e) = host::check_kvm() {
            return fail(EXIT_OTHER, e);
        }
    }
    let vm = match Vmm::try_from(config) {
        Ok(vm) => vm,
        Err(e) => return fail(EXIT_OTHER, anyhow::Error::new(e).to_string_chain()),
    };
    match vm.run(Duration::from_secs(cli.term_timeout)) {
        Ok(exit) => {
            match &exit {
                GuestExit::Poweroff => {}
                GuestExit::Reboot => {
                    eprintln!("vmm: the guest rebooted; the vmm does not restart guests, exiting")
                }
                GuestExit::TripleFault => {
                    eprintln!("vmm: the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
                }
                GuestExit::Terminated => {
                    eprintln!("vmm: SIGTERM: the guest did not power off in time; stopped it")
                }
                GuestExit::Failed(why) => eprintln!("vmm: {why}"),
            }
            // vCPU threads may still sit in KVM_RUN: leave without joining them.
            std::process::exit(exit.code())
        }
        Err(e) => fail(EXIT_OTHER, anyhow::Error::new(e).to_string_chain()),
    }
}

/// `{:#}` of an anyhow error: the message and its causes on one line.
trait Chain {
    fn to_string_chain(&self) -> String;
}

impl Chain for anyhow::Error {
    fn to_string_chain(&self) -> String {
        format!("{self:#}")
    }
}
