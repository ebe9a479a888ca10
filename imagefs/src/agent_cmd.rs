//! `imagefs agent ping|hash|exec|notice|shutdown --socket PATH`: talk to a VM's guest agent.
//! Invariant: every call has a deadline, and the process exit code says what happened (0 ok,
//! 1 other, 2 bad input, 3 not found, 4 refused; exec returns the guest command's own status).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use agent_proto::text::shown;
use agent_proto::{
    AgentClient, AgentLink, ClientError, Command, ErrorCode, ExecReply, ExecRequest, Range,
    SubstitutionNotice,
};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

/// Options every agent call takes.
#[derive(Debug, Args)]
pub struct Conn {
    /// The VM's agent socket (vmm --agent-socket, or QEMU's socket chardev on COM2).
    #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
    pub socket: Option<PathBuf>,
    /// A VM started by `imagefs vm start` (its socket comes from the store's registry).
    #[arg(long)]
    pub vm: Option<String>,
    /// Deadline for the whole call: connecting, sending and the reply (e.g. 5s, 500ms; exec
    /// adds the command's own timeout).
    #[arg(long, default_value = "5s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    /// The deadline in milliseconds (overrides --timeout; kept for scripts).
    #[arg(long, hide = true)]
    pub timeout_ms: Option<u64>,
    /// Print the agent's reply as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Agent and kernel version, uptime, mounts.
    Ping(Conn),
    /// blake3 of a file as the guest reads it.
    Hash {
        #[command(flatten)]
        conn: Conn,
        /// Path as the guest sees its root filesystem.
        path: String,
    },
    /// Run a command in the guest: `-- ARGV...`, or `--shell 'LINE'`.
    Exec {
        #[command(flatten)]
        conn: Conn,
        /// Kill the command after this many milliseconds.
        #[arg(long, default_value_t = 30_000)]
        command_timeout_ms: u64,
        /// A shell command line (/bin/sh -c) instead of an argv.
        #[arg(long, conflicts_with = "argv")]
        shell: Option<String>,
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Tell the guest that blocks of a device changed (normally sent by substitute/rollout).
    Notice {
        #[command(flatten)]
        conn: Conn,
        /// The guest's block device.
        #[arg(long, default_value = "/dev/vda")]
        device: String,
        /// Changed byte range OFFSET:LEN (repeatable).
        #[arg(long = "range", value_parser = parse_range)]
        ranges: Vec<Range>,
        /// A changed file, as a guest path (repeatable).
        #[arg(long = "file")]
        files: Vec<String>,
        /// Inodes or directories changed too.
        #[arg(long)]
        metadata_changed: bool,
    },
    /// Power the guest off.
    Shutdown(Conn),
}

fn parse_range(s: &str) -> Result<Range, String> {
    let (o, l) = s.split_once(':').ok_or("expected OFFSET:LEN")?;
    let offset = o.parse().map_err(|_| format!("bad offset {o:?}"))?;
    let len = l.parse().map_err(|_| format!("bad length {l:?}"))?;
    Ok(Range { offset, len })
}

/// The exit code for a failed call.
pub fn exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Agent { code, .. } => match code {
            ErrorCode::NotFound => 3,
            ErrorCode::Refused => 4,
            ErrorCode::BadRequest
            | ErrorCode::Malformed
            | ErrorCode::Oversized
            | ErrorCode::UnknownType => 2,
            ErrorCode::Io | ErrorCode::Internal | ErrorCode::Unknown => 1,
        },
        ClientError::Request(_) => 2,
        _ => 1,
    }
}

/// The exit status `imagefs agent exec` reports for a guest command (as `timeout(1)` and shells do).
pub fn exec_status(r: &ExecReply) -> i32 {
    if r.timed_out {
        124
    } else {
        match (r.exit_code, r.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }
}

fn client(conn: &Conn) -> AgentClient {
    let socket = conn.socket.clone().unwrap_or_default();
    let timeout = conn.timeout_ms.map_or(conn.timeout, Duration::from_millis);
    AgentClient::new(socket).with_timeout(timeout)
}

/// Fills in the socket of `--vm NAME` from the registry of the store in `dir`.
fn resolve(conn: &mut Conn, dir: &std::path::Path) -> Result<(), Failure> {
    if let (None, Some(vm)) = (&conn.socket, &conn.vm) {
        let sock = crate::vm::registry::agent_socket(dir, vm).map_err(|e| match e {
            crate::vm::registry::RegistryError::NotFound(_) => Failure::NotFound(e.to_string()),
            e => Failure::Usage(e.to_string()),
        })?;
        conn.socket = Some(sock);
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// Runs one agent subcommand. Call failures are printed as one line on stderr and turned into
/// the exit code; only local failures (stdout closed) are returned as errors.
pub fn run(mut args: AgentArgs, dir: &std::path::Path) -> anyhow::Result<i32> {
    let conn = match &mut args.command {
        AgentCommand::Ping(c) | AgentCommand::Shutdown(c) => c,
        AgentCommand::Hash { conn, .. }
        | AgentCommand::Exec { conn, .. }
        | AgentCommand::Notice { conn, .. } => conn,
    };
    let resolved = resolve(conn, dir);
    match resolved.and_then(|()| call(args)) {
        Ok(code) => Ok(code),
        Err(Failure::Client(e)) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            // The error may carry the guest's words.
            eprintln!("imagefs agent: {}", agent_proto::text::shown(&msg));
            Ok(exit_code(&e))
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("imagefs agent: {msg}");
            Ok(2)
        }
        Err(Failure::NotFound(msg)) => {
            eprintln!("imagefs agent: {msg}");
            Ok(3)
        }
        Err(Failure::Local(e)) => Err(e),
    }
}

enum Failure {
    Client(ClientError),
    Usage(String),
    NotFound(String),
    Local(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Local(e)
    }
}

fn call(args: AgentArgs) -> Result<i32, Failure> {
    match args.command {
        AgentCommand::Ping(conn) => {
            let p = client(&conn).ping()?;
            if conn.json {
                print_json(&p)?;
            } else {
                println!(
                    "agent {} (protocol {}), kernel {}, up {:.1}s, {}",
                    shown(&p.agent_version),
                    p.protocol,
                    shown(&p.kernel),
                    p.uptime_ms as f64 / 1000.0,
                    if p.init_mode {
                        "as /init"
                    } else {
                        "as a service"
                    }
                );
                for m in p.mounts.iter().filter(|m| m.device.starts_with('/')) {
                    let mode = if m.read_only { "ro" } else { "rw" };
                    println!(
                        "  {} on {} ({}, {mode})",
                        shown(&m.device),
                        shown(&m.mountpoint),
                        shown(&m.fstype)
                    );
                }
            }
            Ok(0)
        }
        AgentCommand::Hash { conn, path } => {
            let h = client(&conn).hash(&path)?;
            if conn.json {
                print_json(&h)?;
            } else {
                println!("{}  {}", shown(&h.blake3), shown(&h.path));
            }
            Ok(0)
        }
        AgentCommand::Exec {
            conn,
            command_timeout_ms,
            shell,
            argv,
        } => {
            let command = match (shell, argv.is_empty()) {
                (Some(line), _) => Command::Shell(line),
                (None, false) => Command::Argv(argv),
                (None, true) => {
                    return Err(Failure::Usage(
                        "exec needs -- ARGV... or --shell LINE".into(),
                    ))
                }
            };
            let r = client(&conn).exec(ExecRequest {
                command,
                timeout_ms: command_timeout_ms,
            })?;
            if conn.json {
                print_json(&r)?;
            } else {
                // Byte for byte into a pipe or file; on a terminal, escape sequences from the
                // guest are shown as \xNN instead of being obeyed.
                let (out, err) = (r.stdout_bytes(), r.stderr_bytes());
                if std::io::stdout().is_terminal() {
                    print!("{}", agent_proto::text::shown_bytes(&out, true));
                } else {
                    std::io::stdout()
                        .write_all(&out)
                        .map_err(anyhow::Error::from)?;
                }
                // Best effort, as eprint! would be.
                if std::io::stderr().is_terminal() {
                    eprint!("{}", agent_proto::text::shown_bytes(&err, true));
                } else {
                    let _ = std::io::stderr().write_all(&err);
                }
                if r.timed_out {
                    eprintln!("imagefs agent: command timed out after {command_timeout_ms} ms");
                }
            }
            Ok(exec_status(&r))
        }
        AgentCommand::Notice {
            conn,
            device,
            ranges,
            files,
            metadata_changed,
        } => {
            let n = SubstitutionNotice::new(&device, ranges, files, metadata_changed);
            let ack = client(&conn).notice(&n)?;
            if conn.json {
                print_json(&ack)?;
            } else {
                for s in &ack.steps {
                    let name = shown(&s.name);
                    println!("{name:<22} {:>8} us  {}", s.micros, shown(&s.detail));
                }
                for p in &ack.processes {
                    println!(
                        "process {} ({}) {}: {}",
                        p.pid,
                        shown(&p.comm),
                        shown(&p.how.join(",")),
                        shown(&p.file)
                    );
                }
                for f in &ack.stale_files {
                    println!("still cached (mapped by a running process): {}", shown(f));
                }
                for h in &ack.hooks {
                    println!(
                        "hook {} for {}: exit {:?}",
                        shown(&h.command),
                        shown(&h.path),
                        h.exit_code
                    );
                }
            }
            Ok(0)
        }
        AgentCommand::Shutdown(conn) => {
            client(&conn).shutdown()?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        agent: AgentCommand,
    }

    #[test]
    fn exec_takes_argv_after_double_dash() {
        let cli = Cli::try_parse_from([
            "x",
            "exec",
            "--socket",
            "/tmp/vm1.agent",
            "--",
            "/bin/check",
            "--quick",
        ])
        .unwrap();
        match cli.agent {
            AgentCommand::Exec { argv, conn, .. } => {
                assert_eq!(argv, ["/bin/check", "--quick"]);
                assert_eq!(conn.socket, Some(PathBuf::from("/tmp/vm1.agent")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn notice_ranges_parse_and_bad_ones_are_usage_errors() {
        let cli = Cli::try_parse_from([
            "x",
            "notice",
            "--socket",
            "s",
            "--range",
            "4096:8192",
            "--file",
            "/etc/x",
        ])
        .unwrap();
        match cli.agent {
            AgentCommand::Notice { ranges, .. } => {
                assert_eq!(
                    ranges,
                    [Range {
                        offset: 4096,
                        len: 8192
                    }]
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["x", "notice", "--socket", "s", "--range", "4096"]).is_err());
    }

    #[test]
    fn exit_codes_follow_the_cli_convention() {
        let agent = |code| ClientError::Agent {
            op: "hash",
            code,
            message: String::new(),
        };
        assert_eq!(exit_code(&agent(ErrorCode::NotFound)), 3);
        assert_eq!(exit_code(&agent(ErrorCode::Refused)), 4);
        let timeout = ClientError::Timeout {
            op: "ping",
            waited: Duration::from_secs(1),
        };
        assert_eq!(exit_code(&timeout), 1);
        let reply = |exit_code, signal, timed_out| ExecReply {
            exit_code,
            signal,
            timed_out,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            stdout_hex: None,
            stderr_hex: None,
            duration_ms: 0,
        };
        assert_eq!(exec_status(&reply(Some(7), None, false)), 7);
        assert_eq!(exec_status(&reply(None, Some(9), false)), 137);
        assert_eq!(exec_status(&reply(None, Some(9), true)), 124);
    }

    #[test]
    fn unreachable_agent_is_a_one_line_failure_with_exit_1() {
        let args = AgentArgs {
            command: AgentCommand::Ping(Conn {
                socket: Some(PathBuf::from("/nonexistent/vm.agent")),
                vm: None,
                timeout: Duration::from_millis(100),
                timeout_ms: None,
                json: false,
            }),
        };
        assert_eq!(run(args, std::path::Path::new("/nonexistent")).unwrap(), 1);
    }
}
