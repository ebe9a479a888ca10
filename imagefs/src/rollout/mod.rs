//! `imagefs rollout`: substitutes a version into running VMs wave by wave, checks health
//! through each guest's agent, and rolls back per `--on-failure`. It runs in the CLI process
//! and drives the mount daemon over its control socket, or with `--hosts` each host's daemon
//! of the fleet over mutual TLS (link.rs; planned in fleet.rs), so the rollout's own record
//! log in the operator's store (state.rs) is the truth about it whichever process dies.
//! Invariant: every step is recorded before it is reported; exit codes: 0 done, 1 a wave
//! failed or hosts stayed unreachable (interrupted; --resume goes on), 2 bad input, 3 not
//! found, 4 conflicts skipped.

mod drive;
mod fleet;
mod link;
mod plan;
mod state;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::daemon::control;
pub use state::OnFailure;
use state::{Journal, Plan, Rollout};

/// `imagefs rollout ...`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub sub: Option<RolloutSub>,
    /// NAME:TAG to roll out (a rollback is a rollout of the old version).
    pub target: Option<String>,
    /// Instances: a glob ('web-*') or a list (a,b,c).
    #[arg(long)]
    pub instances: Option<String>,
    /// Roll out across these hosts of the fleet inventory (`imagefs fleet add`): a glob
    /// ('host-*') or a list; without it the rollout is of this store's daemon.
    #[arg(long)]
    pub hosts: Option<String>,
    /// What waves and --max-unavailable count: (host, instance) pairs, or whole hosts.
    #[arg(long, value_enum, default_value = "pair", requires = "hosts")]
    pub by: WaveUnit,
    /// Pending pairs (hosts with --by host) on unreachable hosts tolerated after a wave; with
    /// more the rollout stops after that wave (interrupted, exit 1) until --resume.
    #[arg(long, default_value_t = 0, requires = "hosts")]
    pub max_unavailable: usize,
    /// Most time one command on a host may take (at most 10 s of it to connect).
    #[arg(long, default_value = "60s", value_parser = plan::parse_duration)]
    pub host_timeout: Duration,
    /// Waves as cumulative counts or percentages, e.g. 1,50%,100% [default: one wave].
    #[arg(long)]
    pub waves: Option<String>,
    /// Health check run in each guest under /bin/sh -c; exit 0 in time passes.
    #[arg(long)]
    pub health_cmd: Option<String>,
    #[arg(long, default_value = "30s", value_parser = plan::parse_duration)]
    pub health_timeout: Duration,
    #[arg(long, value_enum, default_value = "rollback-wave")]
    pub on_failure: OnFailure,
    /// On conflict take the patch's blocks.
    #[arg(long, conflicts_with = "keep_local")]
    pub force: bool,
    /// On conflict keep the guest's blocks.
    #[arg(long)]
    pub keep_local: bool,
    /// Print the plan (instances, waves, changed files, conflicts); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Resume an interrupted rollout.
    #[arg(long, value_name = "ID", conflicts_with_all = ["target", "abort"])]
    pub resume: Option<String>,
    /// Roll back every instance an interrupted or finished rollout changed.
    #[arg(long, value_name = "ID", conflicts_with = "target")]
    pub abort: Option<String>,
}

/// What a fleet rollout's waves count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WaveUnit {
    /// (host, instance) pairs.
    Pair,
    /// Whole hosts.
    Host,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RolloutSub {
    /// Past and running rollouts
    Ls,
    /// One rollout in detail
    Status {
        /// Rollout id.
        id: String,
    },
}

/// A failure that ends the command with `code`.
#[derive(Debug)]
pub struct Fail {
    pub code: i32,
    pub msg: String,
}

impl Fail {
    fn new(code: i32, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            msg: msg.into(),
        }
    }
}

impl From<state::StateError> for Fail {
    fn from(e: state::StateError) -> Fail {
        let code = if matches!(e, state::StateError::NotFound(_)) {
            3
        } else {
            1
        };
        Fail::new(code, e.to_string())
    }
}

/// Progress output: JSON Lines events or readable lines.
pub struct Emit {
    pub json: bool,
    pub id: String,
}

impl Emit {
    pub fn event(&self, kind: &str, mut v: Value, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = if self.json {
            if let Some(o) = v.as_object_mut() {
                o.insert("type".into(), json!("event"));
                o.insert("event".into(), json!(kind));
                o.insert("rollout".into(), json!(self.id));
            }
            writeln!(out, "{v}")
        } else {
            // event lines quote guests (health output, errors): shown, never obeyed; our own
            // line breaks stay
            let lines: Vec<_> = text.split('\n').map(agent_proto::text::shown).collect();
            writeln!(out, "{}", lines.join("\n"))
        };
        let _ = out.flush();
    }
}

/// What the daemon answered to one forwarded command.
pub struct Answer {
    pub code: i32,
    pub out: String,
    pub err: String,
}

impl Answer {
    /// The last JSON object of the output (the result), if any.
    pub fn result(&self) -> Option<Value> {
        self.out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    }

    /// Every JSON line of the output.
    pub fn lines(&self) -> Vec<Value> {
        self.out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The target as a version of the operator's store names it for `bundle`: NAME:TAG while the
/// tag still names the planned version (the hosts then get the tag too), else the id.
pub fn target_spec(dir: &Path, plan: &state::Plan) -> String {
    let (code, out, _) = crate::daemon::client::run_on_store(dir, &["ls", "--json"]);
    let a = Answer {
        code,
        out,
        err: String::new(),
    };
    match plan.target.split_once(':') {
        Some((name, tag))
            if fleet::tag_id(&a.result().unwrap_or(Value::Null), name, tag).as_deref()
                == Some(plan.target_id.as_str()) =>
        {
            plan.target.clone()
        }
        _ => plan.target_id.clone(),
    }
}

/// Runs `args` in the daemon that serves the store in `dir`.
pub fn daemon(dir: &Path, args: &[&str]) -> Result<Answer, Fail> {
    let stream = control::connect(dir).ok_or_else(|| {
        Fail::new(
            1,
            "no mount daemon serves this store: run `imagefs mount MOUNTPOINT --daemon` first",
        )
    })?;
    let mut argv = vec!["imagefs".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = control::forward(stream, argv, &mut out, &mut err)
        .map_err(|e| Fail::new(1, e.to_string()))?;
    Ok(Answer {
        code,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    })
}

/// Runs the rollout command; returns the exit code (errors printed as one line).
pub fn run(dir: &Path, a: &RolloutArgs, json: bool) -> i32 {
    match dispatch(dir, a, json) {
        Ok(code) => code,
        Err(f) => {
            if json {
                println!(
                    "{}",
                    json!({"type": "error", "error": f.msg, "code": f.code})
                );
            }
            eprintln!("imagefs rollout: {}", agent_proto::text::shown(&f.msg));
            f.code
        }
    }
}

fn dispatch(dir: &Path, a: &RolloutArgs, json: bool) -> Result<i32, Fail> {
    match (&a.sub, &a.resume, &a.abort, &a.target) {
        (Some(RolloutSub::Ls), ..) => ls(dir, json),
        (Some(RolloutSub::Status { id }), ..) => status(dir, id, json),
        (None, Some(id), _, _) => {
            let mut j = Journal::open(dir, id)?;
            refuse_if_running(&j.state)?;
            let emit = Emit {
                json,
                id: id.clone(),
            };
            drive::execute(dir, &mut j, &emit)
        }
        (None, None, Some(id), _) => {
            let mut j = Journal::open(dir, id)?;
            refuse_if_running(&j.state)?;
            let emit = Emit {
                json,
                id: id.clone(),
            };
            drive::abort(dir, &mut j, &emit)
        }
        (None, None, None, Some(target)) => start(dir, a, target, json),
        (None, None, None, None) => Err(Fail::new(
            2,
            "rollout needs NAME:TAG --instances ..., --resume ID, --abort ID, ls or status ID",
        )),
    }
}

fn refuse_if_running(r: &Rollout) -> Result<(), Fail> {
    match r.driver {
        Some(pid) if pid != std::process::id() && state::alive(pid) && r.finished.is_none() => {
            Err(Fail::new(
                4,
                format!("rollout {} is still running (pid {pid})", r.plan.id),
            ))
        }
        _ => Ok(()),
    }
}

/// Plans a new rollout (resolving everything through the daemon, or each host's), then runs it.
fn start(dir: &Path, a: &RolloutArgs, target: &str, json: bool) -> Result<i32, Fail> {
    let spec = a
        .instances
        .as_deref()
        .ok_or_else(|| Fail::new(2, "--instances GLOB|a,b,c is required"))?;
    if let Some(hosts) = &a.hosts {
        let (plan, d) = fleet::plan(dir, a, target, hosts, spec)?;
        return run_plan(dir, plan, &d, a.dry_run, json);
    }
    // Instances and their current versions.
    let ls = daemon(dir, &["instance", "ls", "--json"])?;
    if ls.code != 0 {
        return Err(Fail::new(ls.code, ls.err.trim().to_string()));
    }
    let mut bases = BTreeMap::new();
    for v in ls.lines() {
        if let (Some(i), Some(b)) = (v["instance"].as_str(), v["base"].as_str()) {
            bases.insert(i.to_string(), b.to_string());
        }
    }
    let names: Vec<String> = bases.keys().cloned().collect();
    let chosen = plan::select(spec, &names).map_err(|e| Fail::new(2, e))?;
    let sizes = plan::wave_sizes(a.waves.as_deref(), chosen.len()).map_err(|e| Fail::new(2, e))?;
    let waves = plan::split(&chosen, &sizes);
    // The target version, and the files it changes from every base the chosen instances run.
    let distinct: Vec<&String> = chosen.iter().filter_map(|c| bases.get(c)).collect();
    let (d, expected, target_id) = changed_files(&distinct, target, |args| daemon(dir, args))?;
    let from: BTreeMap<String, String> = chosen
        .iter()
        .filter_map(|c| bases.get(c).map(|b| (c.clone(), b.clone())))
        .collect();
    let plan = new_plan(a, target, target_id, from, waves, expected);
    run_plan(dir, plan, &d, a.dry_run, json)
}

/// The changed guest files and their target hashes over every base in `bases`, the widest
/// diff (for the dry run), and the target's id: `diff BASE TARGET --files --json` through `run`.
fn changed_files(
    bases: &[&String],
    target: &str,
    run: impl Fn(&[&str]) -> Result<Answer, Fail>,
) -> Result<(Value, BTreeMap<String, String>, String), Fail> {
    let mut distinct = bases.to_vec();
    distinct.sort();
    distinct.dedup();
    let (mut d, mut expected, mut target_id) = (Value::Null, BTreeMap::new(), String::new());
    for base in distinct {
        let diff = run(&["diff", base, target, "--files", "--json"])?;
        if diff.code != 0 {
            return Err(Fail::new(diff.code, diff.err.trim().to_string()));
        }
        let r = diff.result().unwrap_or(Value::Null);
        target_id = r["b"].as_str().unwrap_or_default().to_string();
        expected.extend(drive::expected_hashes(&r, &drive::data_files(&r)));
        if d.is_null() || r["changed_blocks"].as_u64() > d["changed_blocks"].as_u64() {
            d = r;
        }
    }
    Ok((d, expected, target_id))
}

/// A plan of what every rollout takes from its arguments, for this store's daemon; a fleet
/// rollout adds its hosts.
fn new_plan(
    a: &RolloutArgs,
    target: &str,
    target_id: String,
    from: BTreeMap<String, String>,
    waves: Vec<Vec<String>>,
    expected: BTreeMap<String, String>,
) -> Plan {
    let policy = match (a.force, a.keep_local) {
        (true, _) => Some("force".to_string()),
        (_, true) => Some("keep-local".to_string()),
        _ => None,
    };
    Plan {
        id: state::new_id(),
        target: target.to_string(),
        target_id,
        from,
        waves,
        health_cmd: a.health_cmd.clone(),
        health_timeout_ms: u64::try_from(a.health_timeout.as_millis()).unwrap_or(u64::MAX),
        on_failure: a.on_failure,
        policy,
        expected,
        created_at: now_secs(),
        hosts: BTreeMap::new(),
        bundle_hosts: Default::default(),
        by_host: false,
        max_unavailable: 0,
        host_timeout_ms: u64::try_from(a.host_timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records `plan` (or only prints it, `dry_run`) and runs it.
fn run_plan(dir: &Path, plan: Plan, d: &Value, dry_run: bool, json: bool) -> Result<i32, Fail> {
    let emit = Emit {
        json,
        id: plan.id.clone(),
    };
    if dry_run {
        return drive::dry_run(dir, &plan, d, &emit);
    }
    let mut j = Journal::create(dir, plan)?;
    let p = &j.state.plan;
    let hosts = if p.hosts.is_empty() {
        String::new()
    } else {
        format!(
            " on {} host(s) ({})",
            p.hosts.len(),
            p.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    emit.event(
        "plan",
        json!({"target": p.target, "target_id": p.target_id, "waves": p.waves,
               "files": p.expected.keys().collect::<Vec<_>>(),
               "hosts": p.hosts.keys().collect::<Vec<_>>(), "bundle_hosts": p.bundle_hosts,
               "by_host": p.by_host, "max_unavailable": p.max_unavailable}),
        &format!(
            "rollout {} of {} ({}): {} instance(s){hosts} in {} wave(s); changed files: {}",
            p.id,
            p.target,
            p.target_id.get(..12).unwrap_or(""),
            p.from.len(),
            p.waves.len(),
            p.expected.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    );
    drive::execute(dir, &mut j, &emit)
}

fn summary(r: &Rollout) -> Value {
    let pending = r.pending();
    json!({"id": r.plan.id, "target": r.plan.target, "target_id": r.plan.target_id,
        "state": r.state(), "waves": r.plan.waves, "done": r.done.keys().collect::<Vec<_>>(),
        "checked": r.checked, "pending": pending, "unreachable": r.unreachable,
        "hosts": r.plan.hosts.keys().collect::<Vec<_>>(),
        "healthy_waves": r.healthy, "unhealthy": r.unhealthy, "conflicts": r.conflicts,
        "rolled_back": r.rolled_back, "exit": r.finished.map(|f| f.1),
        "created_at": r.plan.created_at})
}

fn ls(dir: &Path, json: bool) -> Result<i32, Fail> {
    for r in state::list(dir)? {
        if json {
            println!("{}", summary(&r));
        } else {
            println!(
                "{}\t{}\t{}\t{}/{} instance(s) on target, {} wave(s)",
                r.plan.id,
                r.plan.target,
                r.state(),
                r.done.len(),
                r.plan.from.len(),
                r.plan.waves.len()
            );
        }
    }
    Ok(0)
}

fn status(dir: &Path, id: &str, json: bool) -> Result<i32, Fail> {
    let r = Journal::open(dir, id)?.state;
    if json {
        println!("{}", summary(&r));
        return Ok(0);
    }
    println!("rollout {} of {}: {}", r.plan.id, r.plan.target, r.state());
    for (w, insts) in r.plan.waves.iter().enumerate() {
        let health = if r.healthy.contains(&w) {
            "healthy".to_string()
        } else if let Some(f) = r.unhealthy.get(&w) {
            // the reasons quote the guest's health check
            format!("unhealthy: {}", agent_proto::text::shown(&f.join("; ")))
        } else {
            "pending".to_string()
        };
        println!("  wave {}: {health}", w + 1);
        for i in insts {
            let unreachable;
            let s = if r.checked.contains(i) {
                "on target, checked"
            } else if r.done.contains_key(i) {
                "on target"
            } else if let Some(e) = r.unreachable.get(i) {
                unreachable = format!("pending: host unreachable ({e})");
                unreachable.as_str()
            } else if r.conflicts.contains(i) {
                "skipped (conflict)"
            } else if r.rolled_back.contains(i) {
                "rolled back"
            } else {
                "not changed"
            };
            println!("    {i}: {s}");
        }
    }
    Ok(0)
}
