//! `imagefs vm start|stop|ls|logs|config`: VMs on instances of the mount, run by the mount daemon
//! as its supervised children and known to the store (registry.rs). Also tells a live guest
//! about a substitution (notify.rs). Invariant: `start` runs only inside the daemon (the VM must
//! read its disk through the live mount); the rest also works from the registry alone.

pub mod health;
pub mod launch;
mod logs;
pub mod notify;
pub mod registry;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_proto::{AgentClient, AgentLink};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cli::CliError;
use crate::mount::cmd::InstanceCmd;
use crate::mount::Ctx;
use launch::{Hypervisor, LaunchSpec};
use registry::{GuestConfig, RegistryError};

/// `imagefs vm ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum VmCommand {
    /// Start VMs on instances of IMAGE:TAG (created if new), run by the mount daemon
    Start(StartArgs),
    /// Stop VMs: agent shutdown, then SIGTERM, then SIGKILL
    Stop(StopArgs),
    /// List VMs: state, hypervisor, the version each runs, its agent's state
    Ls,
    /// Print a VM's console log
    Logs {
        /// VM name.
        name: String,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing what the guest writes, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Set the guest defaults vm start uses (kernel, initramfs, memory, cpus)
    Config(ConfigArgs),
    /// Forget a stopped VM (its instance stays)
    Rm {
        /// VM name.
        name: String,
    },
    /// Check the guest of the live VM on INSTANCE through its agent: the health command exits
    /// 0 in time and each --expect file hashes as given (exit 1 if not; no live VM: "not
    /// checked", exit 0)
    Check(CheckArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The instance whose live VM to check.
    pub instance: String,
    /// Run in the guest under /bin/sh -c; exit 0 in time passes.
    #[arg(long)]
    pub health_cmd: Option<String>,
    #[arg(long, default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub health_timeout: Duration,
    /// A guest file and the blake3 it must read as: PATH=BLAKE3 (repeatable).
    #[arg(long = "expect", value_parser = health::parse_expect)]
    pub expect: Vec<(String, String)>,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Most bytes each VM's instance may hold on the host (K, M, G suffixes; default twice
    /// the disk); past it the guest's writes fail with an I/O error (ENOSPC).
    #[arg(long, value_parser = crate::cli::parse_size)]
    pub max_bytes: Option<u64>,
    /// Most bytes of each VM's console log (K, M, G; default 16M); past it the log becomes
    /// LOG.1 (one kept) and a new one starts.
    #[arg(long, value_parser = crate::cli::parse_size)]
    pub console_max: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// IMAGE:TAG (or version id) new instances start from.
    pub source: String,
    /// VM names (each runs on the instance of the same name).
    #[arg(required = true)]
    pub names: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub hypervisor: Hypervisor,
    #[command(flatten)]
    pub guest: ConfigArgs,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Wait until each agent answers (seconds; 0 = do not wait).
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// Disk bandwidth limit per VM: RATE[/s][,BURST] (K, M, G), enforced by the vmm's token
    /// bucket or QEMU's throttling.
    #[arg(long, value_parser = check_limit)]
    pub disk_bw: Option<String>,
    /// Disk operations per second per VM: N[,BURST].
    #[arg(long, value_parser = check_limit)]
    pub disk_iops: Option<String>,
}

/// Accepts `RATE[/s][,BURST]` as both hypervisors take it.
fn check_limit(s: &str) -> Result<String, String> {
    let (rate, burst) = match s.split_once(',') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let rate = crate::cli::parse_size(rate.trim().trim_end_matches("/s"))?;
    if rate == 0 {
        return Err(format!("{s:?}: a rate of 0 would stop the disk"));
    }
    if let Some(b) = burst {
        crate::cli::parse_size(b.trim())?;
    }
    Ok(s.trim().to_string())
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Seconds to wait after each step before the next.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

impl From<RegistryError> for CliError {
    fn from(e: RegistryError) -> CliError {
        let code = match e {
            RegistryError::NotFound(_) => 3,
            RegistryError::BadName(_) => 2,
            _ => 1,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<launch::LaunchError> for CliError {
    fn from(e: launch::LaunchError) -> CliError {
        CliError::new(1, e.to_string())
    }
}

fn io_err(e: std::io::Error) -> CliError {
    CliError::new(1, format!("output: {e}"))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest kernel and initramfs a checkout built (`make guest`), found from this executable
/// (target*/PROFILE/imagefs -> target/guest), as the last fallback.
fn built_guest() -> GuestConfig {
    let exe = std::env::current_exe().unwrap_or_default();
    for dir in exe.ancestors().skip(1) {
        let g = dir.join("target/guest");
        let (k, i) = (g.join("kernel/vmlinuz"), g.join("initramfs.cpio.gz"));
        if k.exists() && i.exists() {
            return GuestConfig {
                kernel: Some(k),
                initrd: Some(i),
                ..GuestConfig::default()
            };
        }
    }
    GuestConfig::default()
}

/// Runs a `vm` command. `start` needs the daemon (`ctx.live`).
pub fn run(ctx: &Ctx, cmd: &VmCommand, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let store = ctx.store.dir().to_path_buf();
    match cmd {
        VmCommand::Start(a) => start(ctx, &store, a, json, out),
        VmCommand::Stop(a) => {
            for name in &a.names {
                let rec = registry::load(&store, name)?;
                let how = launch::stop(&store, &rec, Duration::from_secs(a.timeout))?;
                line(
                    out,
                    json,
                    json!({"vm": name, "stopped": how}),
                    &format!("{name}: stopped ({how})"),
                )?;
            }
            Ok(())
        }
        VmCommand::Ls => ls(ctx, &store, json, out),
        VmCommand::Check(a) => check(&store, a, json, out),
        VmCommand::Logs { name, tail, follow } => {
            let rec = registry::load(&store, name)?;
            logs::stream(&rec.console_log, *tail, *follow, out).map_err(io_err)
        }
        VmCommand::Config(c) => {
            let mut cfg = registry::config(&store);
            merge(&mut cfg, c);
            registry::save_config(&store, &cfg)?;
            let v = serde_json::to_value(&cfg).map_err(|e| io_err(e.into()))?;
            line(out, json, v.clone(), &v.to_string())
        }
        VmCommand::Rm { name } => {
            let rec = registry::load(&store, name)?;
            if registry::is_live(&rec) {
                return Err(CliError::new(
                    4,
                    format!("VM {name} is running: stop it first"),
                ));
            }
            registry::remove(&store, name)?;
            line(
                out,
                json,
                json!({"vm": name, "removed": true}),
                &format!("removed VM {name}"),
            )
        }
    }
}

/// `vm check`: the health verdict of the live VM on the instance (agent calls time out after
/// the health timeout plus 15 s, so a hung guest cannot hold the command).
fn check(store: &Path, a: &CheckArgs, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let Some(vm) = registry::live_on_instance(store, &a.instance) else {
        return line(
            out,
            json,
            json!({"type": "result", "instance": a.instance, "ok": true, "checked": false,
                   "detail": "no live VM: not checked"}),
            &format!("{}: no live VM: not checked", a.instance),
        );
    };
    let spec = health::HealthSpec {
        cmd: a.health_cmd.clone(),
        timeout_ms: u64::try_from(a.health_timeout.as_millis()).unwrap_or(u64::MAX),
        expected: a.expect.iter().cloned().collect(),
    };
    let agent =
        AgentClient::new(&vm.agent_socket).with_timeout(a.health_timeout + Duration::from_secs(15));
    let t = std::time::Instant::now();
    let verdict = health::check(&agent, &spec, &a.instance);
    // a verdict is an answer (even "unhealthy"); an agent that did not answer is a failure
    match &verdict {
        Err(health::Unhealthy::NoAnswer(_)) => crate::metrics::agent_failure("check"),
        _ => crate::metrics::agent_round_trip("check", t.elapsed()),
    }
    match verdict {
        Ok(detail) => line(
            out,
            json,
            json!({"type": "result", "instance": a.instance, "vm": vm.name, "ok": true,
                   "checked": true, "detail": detail}),
            &format!("{}: {detail}", a.instance),
        ),
        // the reason quotes the guest: shown to the operator, never obeyed
        Err(why) => Err(CliError::new(1, why.to_string())),
    }
}

fn line(out: &mut dyn Write, json: bool, v: serde_json::Value, text: &str) -> Result<(), CliError> {
    if json {
        writeln!(out, "{v}")
    } else {
        writeln!(out, "{text}")
    }
    .map_err(io_err)
}

fn merge(cfg: &mut GuestConfig, c: &ConfigArgs) {
    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    if let Some(k) = &c.kernel {
        cfg.kernel = Some(abs(k));
    }
    if let Some(i) = &c.initrd {
        cfg.initrd = Some(abs(i));
    }
    if let Some(m) = &c.memory {
        cfg.memory = Some(m.clone());
    }
    if let Some(n) = c.cpus {
        cfg.cpus = Some(n);
    }
    if let Some(n) = c.max_bytes {
        cfg.max_bytes = Some(n);
    }
    if let Some(n) = c.console_max {
        cfg.console_max = Some(n);
    }
}

fn start(
    ctx: &Ctx,
    store: &Path,
    a: &StartArgs,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let Some(live) = &ctx.live else {
        return Err(CliError::new(
            1,
            "vm start needs the mount daemon: run `imagefs mount MOUNTPOINT --daemon` first",
        ));
    };
    // Flags given are remembered as the store's defaults.
    let mut cfg = registry::config(store);
    if a.guest.kernel.is_some() || a.guest.initrd.is_some() {
        merge(&mut cfg, &a.guest);
        registry::save_config(store, &cfg)?;
    }
    let built = built_guest();
    let pick = |flag: &Option<PathBuf>, cfg: &Option<PathBuf>, built: &Option<PathBuf>, what| {
        flag.clone()
            .or_else(|| cfg.clone())
            .or_else(|| built.clone())
            .ok_or_else(|| {
                CliError::new(
                    2,
                    format!(
                        "no guest {what}: pass --{what} or run `imagefs vm config --{what} FILE`"
                    ),
                )
            })
    };
    let kernel = pick(&a.guest.kernel, &cfg.kernel, &built.kernel, "kernel")?;
    let initrd = pick(&a.guest.initrd, &cfg.initrd, &built.initrd, "initrd")?;
    let memory = a
        .guest
        .memory
        .clone()
        .or(cfg.memory.clone())
        .unwrap_or_else(|| "512M".into());
    let cpus = a.guest.cpus.or(cfg.cpus).unwrap_or(1);
    let engine = launch::pick(a.hypervisor);
    let mut started = Vec::new();
    for name in &a.names {
        registry::check_name(name)?;
        if let Ok(old) = registry::load(store, name) {
            if registry::is_live(&old) {
                return Err(CliError::new(
                    4,
                    format!("VM {name} is already running (pid {:?})", old.pid),
                ));
            }
        }
        let id = imagefs_store::instance::InstanceId::parse(name)?;
        if !ctx.instances.exists(&id) {
            let create = InstanceCmd::Create {
                source: a.source.clone(),
                id: name.clone(),
                max_bytes: a.guest.max_bytes.or(cfg.max_bytes),
            };
            crate::mount::cmd::instance(ctx, &create, false, &mut std::io::sink())?;
        } else if let Some(max) = a.guest.max_bytes {
            ctx.instances.get(&ctx.store, &id)?.set_max_bytes(max)?;
        }
        let spec = LaunchSpec {
            name: name.clone(),
            instance: name.clone(),
            disk: live
                .life
                .mountpoint()
                .join("instances")
                .join(format!("{name}.raw")),
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            memory: memory.clone(),
            cpus,
            engine,
            cmdline_extra: a.cmdline.clone(),
            console_max: a
                .guest
                .console_max
                .or(cfg.console_max)
                .unwrap_or(launch::CONSOLE_MAX),
            disk_bw: a.disk_bw.clone(),
            disk_iops: a.disk_iops.clone(),
        };
        let rec = launch::spawn(store, &spec)?;
        started.push(rec);
    }
    // A hypervisor that refuses the host (or its arguments) exits at once: say so now.
    std::thread::sleep(Duration::from_millis(300));
    for rec in &started {
        let now = registry::load(store, &rec.name)?;
        if !registry::is_live(&now) {
            let err = std::fs::read_to_string(rec.console_log.with_extension("stderr.log"))
                .unwrap_or_default();
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(CliError::new(
                1,
                format!(
                    "VM {} ({}) exited at once ({}): {last}",
                    rec.name,
                    rec.hypervisor,
                    now.exit.as_deref().unwrap_or("?")
                ),
            ));
        }
    }
    for rec in &started {
        let ready =
            a.wait == 0 || launch::wait_agent(&rec.agent_socket, Duration::from_secs(a.wait));
        let v = json!({"vm": rec.name, "instance": rec.instance, "hypervisor": rec.hypervisor,
            "pid": rec.pid, "agent_socket": rec.agent_socket, "console_log": rec.console_log,
            "agent_ready": if a.wait == 0 { serde_json::Value::Null } else { json!(ready) }});
        let text = format!(
            "started {} on instance {} ({}, pid {}), agent {}",
            rec.name,
            rec.instance,
            rec.hypervisor,
            rec.pid.unwrap_or(0),
            rec.agent_socket.display()
        );
        line(out, json, v, &text)?;
        if !ready {
            return Err(CliError::new(
                1,
                format!(
                    "VM {}: the agent did not answer within {} s",
                    rec.name, a.wait
                ),
            ));
        }
    }
    Ok(())
}

/// Bytes the vmm's agent bridge dropped because the guest was not reading (it keeps the count
/// in SOCKET.dropped); 0 without the file (QEMU holds input back instead of dropping it).
fn agent_dropped_bytes(socket: &Path) -> u64 {
    let mut p = socket.as_os_str().to_os_string();
    p.push(".dropped");
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The version an instance runs, with the tags naming it.
fn running_version(ctx: &Ctx, instance: &str) -> (String, Vec<String>) {
    let Ok(id) = imagefs_store::instance::InstanceId::parse(instance) else {
        return (String::new(), Vec::new());
    };
    let Ok(inst) = ctx.instances.get(&ctx.store, &id) else {
        return (String::new(), Vec::new());
    };
    let base = inst.view().base().id();
    let tags = ctx
        .store
        .images()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|i| {
            let name = i.name.to_string();
            i.tags
                .into_iter()
                .filter(|(_, v)| *v == base)
                .map(move |(t, _)| format!("{name}:{t}"))
        })
        .collect();
    (base.to_string(), tags)
}

fn ls(ctx: &Ctx, store: &Path, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let recs = registry::list(store)?;
    // Ping every live agent at once: a listing waits for the slowest, not the sum.
    let pings: Vec<Option<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = recs
            .iter()
            .map(|r| {
                s.spawn(move || {
                    if !registry::is_live(r) {
                        return None;
                    }
                    Some(
                        match AgentClient::new(&r.agent_socket)
                            .with_timeout(Duration::from_millis(1500))
                            .ping()
                        {
                            Ok(p) => format!("ok (up {:.0}s)", p.uptime_ms as f64 / 1000.0),
                            Err(_) => "unreachable".into(),
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(None))
            .collect()
    });
    for (r, agent) in recs.iter().zip(pings) {
        let live = registry::is_live(r);
        let state = if live { "running" } else { "stopped" };
        let (version, tags) = running_version(ctx, &r.instance);
        let agent = agent.unwrap_or_else(|| "-".into());
        let v = json!({"vm": r.name, "instance": r.instance, "state": state,
            "hypervisor": r.hypervisor, "pid": if live { r.pid } else { None },
            "version": version, "tags": tags, "agent": agent,
            "agent_socket": r.agent_socket, "console_log": r.console_log, "exit": r.exit,
            "agent_dropped_bytes": agent_dropped_bytes(&r.agent_socket)});
        let text = format!(
            "{}\t{state}\t{}\t{}\t{}\tagent {agent}",
            r.name,
            r.hypervisor,
            r.instance,
            if tags.is_empty() {
                version.get(..12).unwrap_or(&version).to_string()
            } else {
                tags.join(",")
            }
        );
        line(out, json, v, &text)?;
    }
    Ok(())
}
