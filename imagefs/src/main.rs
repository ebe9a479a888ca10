//! The `imagefs` command: parses arguments and hands each command to its module. Thin on
//! purpose: commands write to the writer they are given, so the daemon can run them too.

mod agent_cmd;
mod cli;
mod commands;
mod daemon;
mod fleet;
mod guest_files;
mod metrics;
mod mount;
mod rollout;
mod vm;
mod wire;

use std::process::ExitCode;

use clap::Parser;

use commands::{Args, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMAGEFS_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,sled=off,fuser::session=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // The agent is reached through its own socket, never through the store or its daemon.
    let args = match args.command {
        Command::Agent(agent) => {
            let dir = cli::store_dir(args.global.store.as_deref());
            return agent_exit(agent_cmd::run(agent, &dir));
        }
        command => Args { command, ..args },
    };
    let dir = cli::store_dir(args.global.store.as_deref());
    // Everything this process (and a daemon it becomes, and the VMs that daemon starts)
    // creates is for the store's owner and group only, before any thread starts.
    let access = imagefs_store::access::Access::of(&dir).unwrap_or_default();
    imagefs_store::access::set_umask(&access);
    // A rollout drives the daemon from this process, so its state outlives a kill of either.
    if let Command::Rollout(r) = &args.command {
        let code = rollout::run(&dir, r, args.global.json);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // The fleet's files are the operator's own (STORE/fleet), never the daemon's business.
    if let Command::Fleet(f) = &args.command {
        let code = fleet::run(&dir, f, args.global.json);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let json = args.global.json;
    // A daemon holding the store runs the command itself (daemon/client.rs).
    if let Some(code) =
        daemon::client::forward_if_running(&dir, <Args as clap::CommandFactory>::command())
    {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match &args.command {
        Command::Store(cmd) => cli::run_dir(&dir, cmd, json, &mut out),
        Command::Daemon(cmd) => daemon::cmd::run_dir(&dir, cmd, &mut out, commands::run_forwarded),
        Command::Mount(cmd) => mount::cmd::run_dir(&dir, cmd, json, &mut out),
        Command::Vm(cmd) => imagefs_store::Store::open(&dir)
            .map_err(cli::CliError::from)
            .inspect(|s| cli::remote::attach(s, false))
            .and_then(|s| vm::run(&mount::Ctx::offline(s), cmd, json, &mut out)),
        Command::Status => {
            let e = cli::CliError::new(3, format!("no daemon serves {}", dir.display()));
            let code = cli::report(&e, json, &mut out, &mut std::io::stderr());
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Command::Agent(_) | Command::Rollout(_) | Command::Fleet(_) => return ExitCode::from(2),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = cli::report(&e, json, &mut out, &mut std::io::stderr());
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

/// Maps the agent command's outcome to the process exit code (errors as one line on stderr).
fn agent_exit(result: anyhow::Result<i32>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("imagefs: {e:#}");
            ExitCode::from(1)
        }
    }
}
