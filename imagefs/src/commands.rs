//! The command set, in one place: the `imagefs` command line (`Args`), and the dispatcher that
//! runs a command forwarded to the daemon, over either transport (the control socket, or the
//! fleet's TLS listener, where only the commands on `served_to_the_fleet` run). The daemon gets
//! `run_forwarded` as a function pointer, so it never imports this module.

use clap::{Parser, Subcommand};

use crate::{agent_cmd, cli, daemon, fleet, mount, rollout, vm};

/// Content-addressed, versioned store of VM disk images.
#[derive(Debug, Parser)]
#[command(name = "imagefs", version, about)]
pub struct Args {
    #[command(flatten)]
    pub global: cli::Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand. Mount, instance, substitute, agent, vm and rollout join as variants here.
#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Store(cli::StoreCommand),
    #[command(flatten)]
    Daemon(daemon::cmd::DaemonCommand),
    #[command(flatten)]
    Mount(mount::cmd::MountCommand),
    /// Talk to a guest's agent: ping, hash a file, run a command, send a notice
    Agent(agent_cmd::AgentArgs),
    /// VMs on instances of the mount, run by the mount daemon
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Substitute a version into running VMs wave by wave, with health checks
    Rollout(rollout::RolloutArgs),
    /// The fleet: its CA and certificates, the hosts in the inventory, their status
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Show the daemon serving this store: imagefs version, mountpoint, pid (exit 3 if none)
    Status,
}

/// Whether `command` may run when it came over the fleet transport (TLS, from an operator's
/// certificate): what `fleet status` and rollouts need, nothing that removes, reads or writes
/// files of the host by path. Anything not listed is refused.
fn served_to_the_fleet(command: &Command, store_dir: &std::path::Path) -> bool {
    use cli::StoreCommand as S;
    use mount::cmd::{InstanceCmd, MountCommand as M};
    match command {
        // apply reads a file: only the bundle that came in this request's upload frame
        Command::Store(S::Apply(a)) => daemon::tls::is_spooled(store_dir, &a.file),
        c => matches!(
            c,
            Command::Status
                | Command::Store(S::Ls(_) | S::Diff(_) | S::Pull(_))
                | Command::Mount(M::Instance(InstanceCmd::Ls) | M::Substitute(_))
                | Command::Vm(vm::VmCommand::Ls | vm::VmCommand::Check(_))
        ),
    }
}

/// The name of the command in `argv` (its words before the first option or argument), for a
/// refusal message.
fn command_words(argv: &[String]) -> String {
    argv.iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .take(2)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `imagefs status` inside the daemon.
fn daemon_status(
    ctx: &mount::Ctx,
    json: bool,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let mountpoint = ctx
        .live
        .as_ref()
        .map(|l| l.life.mountpoint().display().to_string())
        .unwrap_or_default();
    let version = env!("CARGO_PKG_VERSION");
    let pid = std::process::id();
    // where this host takes new versions from (a fleet rollout uploads a bundle if none)
    let remote = imagefs_remote::Remotes::load(ctx.store.dir())
        .ok()
        .and_then(|r| r.default);
    if json {
        let v = serde_json::json!({"type": "result", "imagefs": version, "mountpoint": mountpoint,
            "store": ctx.store.dir().display().to_string(), "pid": pid, "remote": remote});
        writeln!(out, "{v}")
    } else {
        writeln!(
            out,
            "imagefs {version}: daemon {pid} serves {} at {mountpoint}",
            ctx.store.dir().display()
        )
    }
}

/// Runs a command forwarded to the daemon (control socket or fleet transport) on its store;
/// returns the exit code.
pub fn run_forwarded(
    argv: Vec<String>,
    ctx: &mount::Ctx,
    transport: daemon::Transport,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> i32 {
    let args = match Args::try_parse_from(&argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = write!(err, "{e}");
            return 2;
        }
    };
    if transport == daemon::Transport::Fleet && !served_to_the_fleet(&args.command, ctx.store.dir())
    {
        let _ = writeln!(
            err,
            "imagefs: error: `{}` is not served over the fleet transport (allowed: status, ls, \
             diff, pull, apply of an uploaded bundle, instance ls, substitute, vm ls, vm check)",
            command_words(&argv)
        );
        return 2;
    }
    let json = args.global.json;
    let result = match &args.command {
        Command::Status => {
            return match daemon_status(ctx, json, out) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        }
        Command::Store(cmd) => {
            let result = cli::run(&ctx.store, &ctx.instances, cmd, json, out);
            if matches!(cmd, cli::StoreCommand::Gc) {
                mount::cmd::prune_flat(ctx);
            }
            result
        }
        Command::Daemon(cmd) => daemon::cmd::run(ctx, cmd, out),
        Command::Mount(cmd) => mount::cmd::run(ctx, cmd, json, out),
        Command::Vm(cmd) => vm::run(ctx, cmd, json, out),
        Command::Agent(_) | Command::Rollout(_) | Command::Fleet(_) => {
            let _ = writeln!(
                err,
                "the agent, rollout and fleet commands are not run by the daemon"
            );
            return 2;
        }
    };
    // A command may have moved or removed tags (import, tag, rm, commit, gc): the kernel must
    // look those names up afresh before the CLI returns.
    mount::cmd::refresh_tags(ctx);
    match result {
        Ok(()) => 0,
        Err(e) => cli::report(&e, json, out, err),
    }
}
