//! The CLI side of the control socket: when a daemon holds the store, the command line (with
//! every path argument made absolute, since the daemon has another working directory) is
//! sent to it and its output and exit code become ours. Invariant: only arguments that clap
//! parses as paths are rewritten; everything else is sent byte for byte.

use std::any::TypeId;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, Command};

use super::control;
use crate::cli;

/// If a daemon serves the store in `dir`, runs this process's command line there and returns
/// its exit code; `None` when no daemon answers (run the command here).
pub fn forward_if_running(dir: &Path, cli: Command) -> Option<i32> {
    let stream = control::connect(dir)?;
    let daemon_pid = control::peer_pid(&stream).ok();
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let argv = absolutize(cli, argv);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut err = std::io::stderr();
    match control::forward(stream, argv, &mut out, &mut err) {
        Ok(code) => {
            // The command stopped the daemon (umount): it removed its socket before answering.
            // Wait for the process to go, so the store is free for whatever runs next.
            if let (false, Some(pid)) = (control::socket_path(dir).exists(), daemon_pid) {
                let start = std::time::Instant::now();
                while alive(pid) && start.elapsed() < std::time::Duration::from_secs(10) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            Some(code)
        }
        Err(e) => {
            eprintln!("imagefs: error: {e}");
            Some(1)
        }
    }
}

/// Whether process `pid` may still hold what it had open. A zombie leader alone has released
/// everything; but after exit_group the leader turns zombie while its other threads are still
/// exiting, and they share the descriptor table (the store lock), so those are waited for too.
fn alive(pid: i32) -> bool {
    let zombie = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => return false,
    };
    if !zombie {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count() > 1)
        .unwrap_or(false)
}

/// Rewrites relative path arguments of `argv` (as `cli` parses it) to absolute paths.
pub fn absolutize(cli: Command, mut argv: Vec<String>) -> Vec<String> {
    let mut cli = cli;
    cli.build();
    let Ok(m) = cli.clone().try_get_matches_from(&argv) else {
        return argv;
    };
    fix(&cli, &m, &mut argv, 0);
    argv
}

/// `base` is the position in `argv` of this (sub)command's own name: clap counts the indices
/// of a subcommand's arguments from there.
fn fix(cmd: &Command, m: &ArgMatches, argv: &mut [String], base: usize) {
    let mut last = base;
    for arg in cmd.get_arguments() {
        // Global arguments propagated into a subcommand keep the root's indices.
        if base > 0 && arg.is_global_set() {
            continue;
        }
        let id = arg.get_id().as_str();
        // try_get_raw first: indices_of panics on an id these matches do not know. Defaults
        // have indices too, but not into argv.
        if !matches!(m.try_get_raw(id), Ok(Some(_)))
            || m.value_source(id) != Some(clap::parser::ValueSource::CommandLine)
        {
            continue;
        }
        let Some(indices) = m.indices_of(id) else {
            continue;
        };
        let is_path = arg.get_value_parser().type_id() == TypeId::of::<PathBuf>();
        for i in indices.map(|i| i + base) {
            last = last.max(i);
            let Some(a) = argv.get_mut(i).filter(|_| is_path) else {
                continue;
            };
            if !a.starts_with('-') && Path::new(a.as_str()).is_relative() {
                if let Ok(abs) = std::path::absolute(a.as_str()) {
                    *a = abs.to_string_lossy().into_owned();
                }
            }
        }
    }
    if let Some((name, sub)) = m.subcommand() {
        let at = argv
            .iter()
            .enumerate()
            .skip(last + 1)
            .find(|(_, a)| a.as_str() == name)
            .map(|(i, _)| i);
        if let (Some(sc), Some(at)) = (cmd.find_subcommand(name), at) {
            fix(sc, sub, argv, at);
        }
    }
}

/// `imagefs` with the store's commands only: what `run_on_store` runs in this process. Parsed
/// here, not with the whole command set, so the daemon needs no import of it.
#[derive(Debug, clap::Parser)]
#[command(name = "imagefs")]
struct StoreArgs {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: cli::StoreCommand,
}

/// Runs a store command (`args` without the program name) on the store in `dir` as the CLI
/// would: through the daemon that serves it, else in this process. For a rollout's own
/// operator-side steps (resolving, diffing, building bundles). Returns (exit, stdout, stderr).
/// Only the store's commands parse here (the daemon, if any, parses the whole command set).
pub fn run_on_store(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut argv = vec!["imagefs".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = match control::connect(dir) {
        Some(stream) => control::forward(stream, argv, &mut out, &mut err).unwrap_or_else(|e| {
            let _ = writeln!(err, "imagefs: error: {e}");
            1
        }),
        None => match <StoreArgs as clap::Parser>::try_parse_from(&argv) {
            Err(e) => {
                let _ = write!(err, "{e}");
                2
            }
            Ok(a) => match cli::run_dir(dir, &a.command, a.global.json, &mut out) {
                Ok(()) => 0,
                Err(e) => cli::report(&e, a.global.json, &mut out, &mut err),
            },
        },
    };
    (
        code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("imagefs")
            .arg(
                clap::Arg::new("store")
                    .long("store")
                    .global(true)
                    .value_parser(clap::value_parser!(PathBuf)),
            )
            .arg(
                clap::Arg::new("json")
                    .long("json")
                    .global(true)
                    .action(clap::ArgAction::SetTrue),
            )
            .subcommand(
                Command::new("import")
                    .arg(clap::Arg::new("file").value_parser(clap::value_parser!(PathBuf)))
                    .arg(clap::Arg::new("name")),
            )
            .subcommand(
                Command::new("instance").subcommand(
                    Command::new("create")
                        .arg(clap::Arg::new("src"))
                        .arg(clap::Arg::new("out").value_parser(clap::value_parser!(PathBuf))),
                ),
            )
    }

    #[test]
    fn relative_paths_become_absolute_and_nothing_else_changes() {
        let argv: Vec<String> = ["imagefs", "--store", "s", "import", "disk.img", "web:v1"]
            .map(String::from)
            .to_vec();
        let out = absolutize(cli(), argv);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(out[2], cwd.join("s").to_string_lossy());
        assert_eq!(out[4], cwd.join("disk.img").to_string_lossy());
        assert_eq!(out[5], "web:v1");
        let abs: Vec<String> = ["imagefs", "import", "/x/disk.img", "web:v1"]
            .map(String::from)
            .to_vec();
        assert_eq!(absolutize(cli(), abs.clone()), abs);
        // Nested subcommands, and a value equal to a subcommand's name before it.
        let nested: Vec<String> = [
            "imagefs", "--store", "instance", "instance", "create", "create", "x",
        ]
        .map(String::from)
        .to_vec();
        let out = absolutize(cli(), nested);
        assert_eq!(out[2], cwd.join("instance").to_string_lossy());
        assert_eq!(out[5], "create");
        assert_eq!(out[6], cwd.join("x").to_string_lossy());
    }
}
