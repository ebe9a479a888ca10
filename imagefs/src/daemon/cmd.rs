//! The daemon's own commands: `mount` (start a daemon serving the store, in this process or
//! detached) and `umount` (inside the daemon serving that mountpoint, a clean stop that answers
//! once the store is closed; otherwise a plain unmount of the path). Flattened into the CLI's
//! command enum next to the mount's commands, so they parse as before. Invariant: output goes
//! to the given writer only, and every failure maps to one exit code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use super::Dispatch;
use crate::cli::{exit_code, CliError};
use crate::mount::lifecycle::State;
use crate::mount::Ctx;

/// The daemon's subcommands (flattened into the CLI's command enum).
#[derive(Debug, Clone, Subcommand)]
pub enum DaemonCommand {
    /// Serve the store as files: images/NAME/TAG.raw, versions/ID.raw, instances/ID.raw
    Mount(MountArgs),
    /// Unmount a mount (a daemon serving it flushes and stops cleanly)
    Umount(UmountArgs),
}

/// `imagefs mount MOUNTPOINT`.
#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Detach into the background once mounted (logs to STORE/daemon.log).
    #[arg(long)]
    pub daemon: bool,
    /// Threads reading and answering requests, each on its own /dev/fuse clone.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Disk kept for flat copies of opened versions (STORE/flat), which the kernel reads
    /// directly (FUSE passthrough) at local-disk speed; least recently used go first. 0 turns
    /// them off: every read is then served, and verified, by the daemon.
    #[arg(long, default_value = "8G", value_parser = crate::cli::parse_size)]
    pub flat_cache: u64,
    /// Free space kept on the store's filesystem (SIZE or PCT of it; default the smaller of
    /// 1G and 5%; 0 turns it off): below it, instance writes and imports fail with ENOSPC,
    /// while metadata commits, substitutions and rollbacks go on.
    #[arg(long, value_parser = crate::cli::parse_reserve)]
    pub reserve: Option<crate::cli::Reserve>,
    /// Bytes per second the daemon spends re-verifying flat copies in the background (a bad
    /// copy is removed; its file is then served, and verified, by the daemon); 0 turns it off.
    #[arg(long, default_value = "50M", value_parser = crate::cli::parse_size)]
    pub scrub_rate: u64,
    #[command(flatten)]
    pub listen: super::tls::ListenArgs,
    /// Serve Prometheus metrics (GET /metrics) at ADDR: a loopback IP:PORT, readable by every
    /// local user, or a Unix socket path (a path holds a '/'), which only the store's owner and
    /// group may connect to.
    #[arg(long, value_name = "ADDR", value_parser = super::metrics::parse_addr)]
    pub metrics: Option<super::metrics::Addr>,
}

/// `imagefs umount MOUNTPOINT`.
#[derive(Debug, Clone, Args)]
pub struct UmountArgs {
    /// The mountpoint to release.
    pub mountpoint: PathBuf,
    /// Detach even while files are open (they keep working until closed).
    #[arg(long)]
    pub lazy: bool,
}

/// Runs `cmd` in a CLI process that holds no store (no daemon runs for `dir`); `mount` becomes
/// the daemon, which runs forwarded commands with `dispatch`.
pub fn run_dir(
    dir: &Path,
    cmd: &DaemonCommand,
    out: &mut dyn Write,
    dispatch: Dispatch,
) -> Result<(), CliError> {
    match cmd {
        DaemonCommand::Mount(a) => {
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            let cfg = super::MountConfig {
                store_dir: abs(dir),
                mountpoint: abs(&a.mountpoint),
                threads: a.threads,
                daemonize: a.daemon,
                flat_budget: a.flat_cache,
                reserve: a.reserve,
                scrub_rate: a.scrub_rate,
                listen: a.listen.clone(),
                metrics: a.metrics.clone(),
            };
            super::run(cfg, dispatch).map_err(|e| {
                use super::DaemonError;
                let code = match &e {
                    DaemonError::Store(s) => exit_code(s.kind()),
                    DaemonError::Control(_) => 4,
                    DaemonError::Mount { source, .. } => match source.raw_os_error() {
                        Some(libc::ENOENT) => 3,
                        Some(libc::ENOTDIR) | Some(libc::EINVAL) => 2,
                        Some(libc::EBUSY) => 4,
                        _ => 1,
                    },
                    _ => 1,
                };
                CliError::new(code, e.to_string())
            })
        }
        DaemonCommand::Umount(a) => {
            let target =
                std::fs::canonicalize(&a.mountpoint).unwrap_or_else(|_| a.mountpoint.clone());
            unmount_path(&target, a.lazy).map_err(|e| busy(&target, e))?;
            writeln!(out, "unmounted {}", target.display()).map_err(io_err)?;
            Ok(())
        }
    }
}

/// Runs `cmd` inside the daemon (a forwarded command).
pub fn run(ctx: &Ctx, cmd: &DaemonCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        DaemonCommand::Mount(_) => {
            let at = ctx
                .live
                .as_ref()
                .map(|l| l.life.mountpoint().display().to_string())
                .unwrap_or_default();
            Err(CliError::new(
                4,
                format!("a daemon already serves this store (mounted at {at})"),
            ))
        }
        DaemonCommand::Umount(a) => umount(ctx, a, out),
    }
}

/// `umount MOUNTPOINT`: inside the daemon serving it, a clean stop (the reply comes once the
/// store is flushed and closed); otherwise a plain unmount of the path.
pub fn umount(ctx: &Ctx, a: &UmountArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let target = std::fs::canonicalize(&a.mountpoint).unwrap_or_else(|_| a.mountpoint.clone());
    if let Some(live) = &ctx.live {
        let mine = std::fs::canonicalize(live.life.mountpoint())
            .unwrap_or_else(|_| live.life.mountpoint().to_path_buf());
        if mine == target {
            super::request_unmount(&live.life, a.lazy).map_err(|e| busy(&target, e))?;
            if !live.life.wait_for(State::Stopped, Duration::from_secs(30)) {
                return Err(CliError::new(
                    1,
                    "the daemon did not finish stopping within 30 s",
                ));
            }
            writeln!(out, "unmounted {}", target.display()).map_err(io_err)?;
            return Ok(());
        }
    }
    unmount_path(&target, a.lazy).map_err(|e| busy(&target, e))?;
    writeln!(out, "unmounted {}", target.display()).map_err(io_err)?;
    Ok(())
}

fn busy(path: &std::path::Path, e: std::io::Error) -> CliError {
    let (code, hint) = match e.raw_os_error() {
        Some(libc::EBUSY) => (4, " (files are open; close them or use --lazy)"),
        Some(libc::EINVAL) | Some(libc::ENOENT) => (3, " (not a mountpoint)"),
        _ => (1, ""),
    };
    CliError::new(code, format!("unmounting {}: {e}{hint}", path.display()))
}

/// umount2(2) on `path`.
pub fn unmount_path(path: &std::path::Path, lazy: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn io_err(e: std::io::Error) -> CliError {
    CliError::new(1, format!("output: {e}"))
}
