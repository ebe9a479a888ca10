//! The rollout's wave loop: in each wave, every host (this store's daemon, or each host of a
//! fleet, side by side) first gets the target's blocks (from its remote, or as a bundle the
//! driver uploads), then substitutes its instances and checks each guest through its daemon
//! (`vm check`: the health command, then the changed files' hashes against the target). A
//! failed check rolls back per the plan; a host that does not answer leaves its pairs pending,
//! never rolls anything back, and stops the rollout (`interrupted`, exit 1) once more are
//! pending than --max-unavailable allows. Also abort and the dry run.
//! Invariant: the journal is appended after each step completes and before it is reported, so
//! a resumed rollout skips exactly what is recorded and redoes at most one harmless step per
//! host (substituting onto the version an instance already has changes nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

use super::link::{Link, Links, Unreached};
use super::state::{Journal, OnFailure, Outcome, Plan, Rec};
use super::{Emit, Fail};

/// Regular files whose data changed, from a `diff --files --json` result.
pub fn data_files(diff: &Value) -> Vec<String> {
    let mut files: Vec<String> = diff["file_blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["files"].as_array().into_iter().flatten())
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// blake3 of each of `files` in the target version, from a `diff --files --json` result's
/// `target_hashes` (the daemon reads them from the store's version with the ext4 reader: no
/// mount, VM or debugfs needed). A file absent from the target has none (no check for it).
pub fn expected_hashes(diff: &Value, files: &[String]) -> BTreeMap<String, String> {
    files
        .iter()
        .filter_map(|f| {
            let h = diff["target_hashes"][f.as_str()].as_str()?;
            Some((f.clone(), h.to_string()))
        })
        .collect()
}

enum SubErr {
    Conflict(Value),
    Other(String),
    Unreached(String),
}

/// Substitutes `instance` onto `to` through its host's daemon; the daemon's JSON result.
fn substitute(
    link: &Link,
    instance: &str,
    to: &str,
    policy: Option<&str>,
) -> Result<Value, SubErr> {
    let flag = policy.map(|p| format!("--{p}"));
    let mut args = vec!["substitute", instance, to, "--json"];
    if let Some(f) = &flag {
        args.push(f);
    }
    let a = link.call(&args).map_err(|u| SubErr::Unreached(u.0))?;
    match a.code {
        0 => Ok(a.result().unwrap_or(Value::Null)),
        4 => Err(SubErr::Conflict(a.result().unwrap_or(Value::Null))),
        _ => Err(SubErr::Other(a.err.trim().to_string())),
    }
}

/// Checks one instance's guest through its host's daemon (`vm check`): Ok(Ok(detail)) healthy
/// (or no live VM: not checked), Ok(Err(reason)) unhealthy.
fn health(link: &Link, plan: &Plan, instance: &str) -> Result<Result<String, String>, Unreached> {
    let timeout = format!("{}ms", plan.health_timeout_ms.max(1));
    let mut args: Vec<String> = ["vm", "check", instance, "--json", "--health-timeout"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(timeout);
    if let Some(cmd) = &plan.health_cmd {
        args.extend(["--health-cmd".to_string(), cmd.clone()]);
    }
    for (path, hash) in &plan.expected {
        args.extend(["--expect".to_string(), format!("{path}={hash}")]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // the check may use its whole timeout (plus the agent's margin) before the host answers
    let takes = std::time::Duration::from_millis(plan.health_timeout_ms)
        + std::time::Duration::from_secs(15);
    let a = link.call_taking(&argv, takes)?;
    if a.code == 0 {
        let r = a.result().unwrap_or(Value::Null);
        return Ok(Ok(r["detail"].as_str().unwrap_or("healthy").to_string()));
    }
    let why = a.err.trim();
    let why = why.strip_prefix("imagefs: error: ").unwrap_or(why);
    Ok(Err(if why.is_empty() {
        format!("{instance}: vm check exited {}", a.code)
    } else {
        why.to_string()
    }))
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

fn processes(res: &Value) -> Value {
    res["guest"]["ack"]["processes"].clone()
}

/// The event fields naming a pair: its host (fleet rollouts), instance and pair.
fn who(plan: &Plan, pair: &str) -> serde_json::Map<String, Value> {
    let (host, instance) = plan.split_pair(pair);
    let mut m = serde_json::Map::new();
    if !host.is_empty() {
        m.insert("host".into(), json!(host));
    }
    m.insert("instance".into(), json!(instance));
    m.insert("pair".into(), json!(pair));
    m
}

fn with(mut base: serde_json::Map<String, Value>, more: Value) -> Value {
    if let Value::Object(m) = more {
        base.extend(m);
    }
    Value::Object(base)
}

/// What a wave's hosts share while they run side by side.
struct Wave<'a, 'j> {
    w: usize,
    plan: &'a Plan,
    links: &'a Links,
    journal: &'a Mutex<&'j mut Journal>,
    emit: &'a Emit,
    /// base version id -> the bundle to upload to a host without a remote
    bundles: &'a BTreeMap<String, PathBuf>,
    /// hosts that have the target this run
    fetched: &'a Mutex<BTreeSet<String>>,
}

/// One host's part of a wave: the failures of its commands and health checks.
#[derive(Default)]
struct HostOutcome {
    failures: Vec<String>,
}

impl Wave<'_, '_> {
    fn append(&self, r: Rec) -> Result<(), Fail> {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        j.append(r)?;
        Ok(())
    }

    fn state<T>(&self, f: impl FnOnce(&super::state::Rollout) -> T) -> T {
        let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        f(&j.state)
    }

    /// Records and reports `pairs` of `host` as unreachable.
    fn unreached(&self, host: &str, pairs: Vec<String>, u: Unreached) -> Result<(), Fail> {
        self.append(Rec::Unreachable {
            wave: self.w,
            host: host.to_string(),
            pairs: pairs.clone(),
            error: u.0.clone(),
        })?;
        let name = if host.is_empty() { "the daemon" } else { host };
        self.emit.event(
            "unreachable",
            json!({"wave": self.w + 1, "host": host, "error": u.0, "pairs": pairs}),
            &format!(
                "  {name}: UNREACHABLE ({}): {} pending",
                u.0,
                pairs.join(", ")
            ),
        );
        Ok(())
    }

    /// Runs `pairs` of `host`: fetch the target, substitute, check.
    fn run_host(&self, host: &str, pairs: &[String]) -> Result<HostOutcome, Fail> {
        let mut out = HostOutcome::default();
        let link = match self.links.get(host) {
            Ok(l) => l,
            Err(u) => {
                self.unreached(host, pairs.to_vec(), u)?;
                return Ok(out);
            }
        };
        let to_substitute: Vec<&String> = pairs
            .iter()
            .filter(|p| self.state(|s| !s.done.contains_key(*p)))
            .collect();
        let fetched = self
            .fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(host);
        if !host.is_empty() && !to_substitute.is_empty() && !fetched {
            match self.fetch_target(link, host, pairs) {
                Ok(()) => {
                    self.fetched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(host.to_string());
                }
                Err(Step::Unreached(u)) => {
                    self.unreached(host, pairs.to_vec(), u)?;
                    return Ok(out);
                }
                Err(Step::Failed(e)) => {
                    out.failures
                        .push(format!("{host}: getting the target version: {e}"));
                    return Ok(out);
                }
            }
        }
        let plan = self.plan;
        for (k, pair) in to_substitute.iter().enumerate() {
            let (_, inst) = plan.split_pair(pair);
            let t = Instant::now();
            match substitute(link, inst, &plan.target_id, plan.policy.as_deref()) {
                Ok(res) => {
                    self.append(Rec::Substituted {
                        wave: self.w,
                        instance: pair.to_string(),
                    })?;
                    imagefs_store::fault::point("rollout.between_vms");
                    self.report_substituted(pair, &res, t);
                }
                Err(SubErr::Conflict(v)) => {
                    self.append(Rec::Conflict {
                        wave: self.w,
                        instance: pair.to_string(),
                    })?;
                    self.emit.event(
                        "conflict",
                        with(who(plan, pair), json!({"wave": self.w + 1, "conflicts": v["conflicts"]})),
                        &format!("  {pair}: skipped: the guest wrote blocks the patch changes (use --force or --keep-local)"),
                    );
                }
                Err(SubErr::Other(msg)) => out
                    .failures
                    .push(format!("{pair}: substitute failed: {msg}")),
                Err(SubErr::Unreached(e)) => {
                    // this one may or may not have happened: only the host's answer says so
                    let rest = to_substitute[k..].iter().map(|p| p.to_string()).collect();
                    self.unreached(host, rest, Unreached(e))?;
                    return Ok(out);
                }
            }
        }
        let to_check: Vec<String> = pairs
            .iter()
            .filter(|p| self.state(|s| s.done.contains_key(*p) && !s.checked.contains(*p)))
            .cloned()
            .collect();
        for (k, pair) in to_check.iter().enumerate() {
            let (_, inst) = plan.split_pair(pair);
            match health(link, plan, inst) {
                Ok(Ok(detail)) => {
                    self.append(Rec::Checked {
                        instance: pair.clone(),
                    })?;
                    self.emit.event(
                        "health",
                        with(
                            who(plan, pair),
                            json!({"wave": self.w + 1, "ok": true, "detail": detail}),
                        ),
                        &format!("  {pair}: {detail}"),
                    );
                }
                Ok(Err(why)) => {
                    self.emit.event(
                        "health",
                        with(
                            who(plan, pair),
                            json!({"wave": self.w + 1, "ok": false, "detail": why}),
                        ),
                        &format!("  {pair}: UNHEALTHY: {why}"),
                    );
                    out.failures.push(why);
                }
                Err(u) => {
                    self.unreached(host, to_check[k..].to_vec(), u)?;
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    fn report_substituted(&self, pair: &str, res: &Value, t: Instant) {
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let procs = processes(res);
        let guest = res["guest"]["guest"]
            .as_str()
            .unwrap_or("not told")
            .to_string();
        let mut text = format!(
            "  {pair}: substituted {} block(s) in {ms:.0} ms, guest {guest}",
            res["changed_blocks"]
        );
        for p in procs.as_array().into_iter().flatten() {
            text.push_str(&format!(
                "\n    process {} ({}) had {} open",
                p["pid"],
                p["comm"].as_str().unwrap_or("?"),
                p["file"].as_str().unwrap_or("?")
            ));
        }
        if let Some(w) = res["guest"]["warning"].as_str() {
            text.push_str(&format!("\n    warning: {w}"));
        }
        self.emit.event(
            "substituted",
            with(
                who(self.plan, pair),
                json!({"wave": self.w + 1, "changed_blocks": res["changed_blocks"], "ms": ms,
                    "guest": guest, "processes": procs,
                    "stale_files": res["guest"]["ack"]["stale_files"], "times": res["times"],
                    "warning": res["guest"]["warning"]}),
            ),
            &text,
        );
    }

    /// Makes sure `host` holds the target version: present already, pulled from its remote
    /// (only the blocks it lacks cross the network), or applied from an uploaded bundle built
    /// from the version each of its instances runs.
    fn fetch_target(&self, link: &Link, host: &str, pairs: &[String]) -> Result<(), Step> {
        let plan = self.plan;
        let ls = ok(link.call(&["ls", "--json"])?)?;
        let present = ls.result().is_some_and(|r| {
            r["versions"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["id"] == plan.target_id.as_str()))
        });
        let (how, bytes) = if present {
            ("present", 0)
        } else if !plan.bundle_hosts.contains(host) {
            let spec = format!("{}@{}", plan.target, plan.target_id);
            let r = ok(link.call(&["pull", &spec, "--json"])?)?;
            let v = r.result().unwrap_or(Value::Null);
            ("pull", v["bytes_fetched"].as_u64().unwrap_or(0))
        } else {
            let mut bases: Vec<&String> = pairs.iter().filter_map(|p| plan.from.get(p)).collect();
            bases.sort();
            bases.dedup();
            let mut sent = 0;
            for base in bases {
                let file = self.bundles.get(base).ok_or_else(|| {
                    Step::Failed(format!("no bundle from {} was built", short(base)))
                })?;
                let r = ok(link.call_with_upload(
                    &["apply", crate::daemon::tls::UPLOAD_TOKEN, "--json"],
                    file,
                )?)?;
                let v = r.result().unwrap_or(Value::Null);
                if v["id"].as_str().is_some_and(|id| id != plan.target_id) {
                    return Err(Step::Failed(format!(
                        "the bundle made {}, not the target {}",
                        v["id"],
                        short(&plan.target_id)
                    )));
                }
                sent += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            }
            ("bundle", sent)
        };
        self.emit.event(
            "fetched",
            json!({"wave": self.w + 1, "host": host, "how": how, "bytes": bytes}),
            &format!(
                "  {host}: {} ({bytes} bytes)",
                match how {
                    "present" => "has the target already",
                    "pull" => "pulled the target's missing blocks from its remote",
                    _ => "applied the bundle the driver uploaded",
                }
            ),
        );
        Ok(())
    }
}

/// A step on a host: no answer, or a failed command.
enum Step {
    Unreached(Unreached),
    Failed(String),
}

impl From<Unreached> for Step {
    fn from(u: Unreached) -> Step {
        Step::Unreached(u)
    }
}

/// The answer if the command succeeded, else its error as a failed step.
fn ok(a: super::Answer) -> Result<super::Answer, Step> {
    if a.code == 0 {
        Ok(a)
    } else {
        let e = a.err.trim();
        Err(Step::Failed(
            e.strip_prefix("imagefs: error: ").unwrap_or(e).to_string(),
        ))
    }
}

/// Builds, in the operator's store, the bundles the hosts without a remote need in `pairs`
/// (one per base version they run), kept beside the rollout's log until it finishes.
fn build_bundles(
    dir: &Path,
    plan: &Plan,
    pairs: &[String],
    built: &mut BTreeMap<String, PathBuf>,
) -> Result<(), Fail> {
    let at = super::state::bundle_dir(dir, &plan.id);
    for pair in pairs {
        let (host, _) = plan.split_pair(pair);
        let Some(base) = plan.from.get(pair) else {
            continue;
        };
        if !plan.bundle_hosts.contains(host) || built.contains_key(base) {
            continue;
        }
        std::fs::create_dir_all(&at).map_err(|e| Fail::new(1, format!("{}: {e}", at.display())))?;
        let file = at.join(format!("{base}.bundle"));
        if !file.exists() {
            let tmp = at.join(format!("{base}.bundle.tmp"));
            let _ = std::fs::remove_file(&tmp);
            let (tmp_s, target) = (tmp.display().to_string(), super::target_spec(dir, plan));
            let (code, _, err) =
                crate::daemon::client::run_on_store(dir, &["bundle", base, &target, &tmp_s]);
            if code != 0 {
                return Err(Fail::new(
                    code,
                    format!("building the bundle from {}: {}", short(base), err.trim()),
                ));
            }
            std::fs::rename(&tmp, &file)
                .map_err(|e| Fail::new(1, format!("{}: {e}", file.display())))?;
        }
        built.insert(base.clone(), file);
    }
    Ok(())
}

/// Runs (or resumes) the rollout in `j` to its end; returns the exit code.
pub fn execute(dir: &Path, j: &mut Journal, emit: &Emit) -> Result<i32, Fail> {
    if let Some((_, exit)) = j.state.finished {
        emit.event(
            "result",
            super::summary(&j.state),
            &format!("rollout {} already {}", j.state.plan.id, j.state.state()),
        );
        return Ok(exit);
    }
    j.append(Rec::Driver {
        pid: std::process::id(),
    })?;
    let plan = j.state.plan.clone();
    // Interrupted while handling a failed wave: finish handling it.
    if let Some(w) = j.state.unhealthy.keys().next().copied() {
        return fail_wave(dir, j, w, emit);
    }
    let links = Links::new(dir, &plan)?;
    let mut bundles = BTreeMap::new();
    let fetched = Mutex::new(BTreeSet::new());
    for (w, pairs) in plan.waves.iter().enumerate() {
        if j.state.healthy.contains(&w) {
            continue;
        }
        let todo: Vec<String> = pairs
            .iter()
            .filter(|p| !j.state.checked.contains(*p) && !j.state.conflicts.contains(*p))
            .cloned()
            .collect();
        if !todo.is_empty() {
            emit.event(
                "wave_start",
                json!({"wave": w + 1, "instances": pairs, "pairs": todo}),
                &format!("wave {}/{}: {}", w + 1, plan.waves.len(), todo.join(", ")),
            );
            build_bundles(dir, &plan, &todo, &mut bundles)?;
        }
        let mut by_host: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for p in &todo {
            by_host
                .entry(plan.split_pair(p).0)
                .or_default()
                .push(p.clone());
        }
        let journal = Mutex::new(&mut *j);
        let outcomes: Vec<Result<HostOutcome, Fail>> = {
            let wave = Wave {
                w,
                plan: &plan,
                links: &links,
                journal: &journal,
                emit,
                bundles: &bundles,
                fetched: &fetched,
            };
            std::thread::scope(|s| {
                let hs: Vec<_> = by_host
                    .iter()
                    .map(|(host, pairs)| {
                        let wave = &wave;
                        s.spawn(move || wave.run_host(host, pairs))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(Fail::new(1, "a host's driver thread panicked"))
                        })
                    })
                    .collect()
            })
        };
        let mut failures = Vec::new();
        for o in outcomes {
            failures.extend(o?.failures);
        }
        if !failures.is_empty() {
            j.append(Rec::Unhealthy { wave: w, failures })?;
            return fail_wave(dir, j, w, emit);
        }
        let wave_done = pairs
            .iter()
            .all(|p| j.state.checked.contains(p) || j.state.conflicts.contains(p));
        if wave_done {
            j.append(Rec::Healthy { wave: w })?;
            imagefs_store::fault::point("rollout.wave_saved");
            emit.event(
                "wave_healthy",
                json!({"wave": w + 1}),
                &format!("wave {} healthy", w + 1),
            );
            continue;
        }
        let pending = j.state.pending_through(w);
        let unavailable = j.state.unavailable(&pending);
        if unavailable > plan.max_unavailable {
            return interrupt(j, w, pending, emit);
        }
        emit.event(
            "wave_partial",
            json!({"wave": w + 1, "pending": pending, "unavailable": unavailable,
                   "max_unavailable": plan.max_unavailable}),
            &format!(
                "wave {}: {} pending on unreachable hosts, within --max-unavailable {}: going on",
                w + 1,
                pending.join(", "),
                plan.max_unavailable
            ),
        );
    }
    let last = plan.waves.len().saturating_sub(1);
    let pending = j.state.pending_through(last);
    if !pending.is_empty() {
        return interrupt(j, last, pending, emit);
    }
    let exit = if j.state.conflicts.is_empty() { 0 } else { 4 };
    finish(dir, j, Outcome::Completed, exit, emit)
}

/// Stops after wave `w` with `pending` pairs left on unreachable hosts: recorded, reported,
/// exit 1; `--resume` retries them.
fn interrupt(j: &mut Journal, w: usize, pending: Vec<String>, emit: &Emit) -> Result<i32, Fail> {
    let unavailable = j.state.unavailable(&pending);
    j.append(Rec::Interrupted {
        wave: w,
        pending: pending.clone(),
    })?;
    emit.event(
        "interrupted",
        json!({"wave": w + 1, "pending": pending, "unavailable": unavailable,
               "max_unavailable": j.state.plan.max_unavailable}),
        &format!(
            "rollout {} INTERRUPTED after wave {}: {} pending on unreachable hosts ({} unavailable, --max-unavailable {}); `imagefs rollout --resume {}` retries them",
            j.state.plan.id,
            w + 1,
            pending.join(", "),
            unavailable,
            j.state.plan.max_unavailable,
            j.state.plan.id
        ),
    );
    print_result(&j.state, "interrupted", emit);
    Ok(1)
}

/// Handles failed wave `w` per the plan, then ends the rollout as failed.
fn fail_wave(dir: &Path, j: &mut Journal, w: usize, emit: &Emit) -> Result<i32, Fail> {
    let plan = j.state.plan.clone();
    let failures = j.state.unhealthy.get(&w).cloned().unwrap_or_default();
    emit.event(
        "wave_failed",
        json!({"wave": w + 1, "failures": failures, "on_failure": plan.on_failure}),
        &format!("wave {} FAILED: {}", w + 1, failures.join("; ")),
    );
    let back: Vec<String> = match plan.on_failure {
        OnFailure::RollbackWave => plan
            .waves
            .get(w)
            .into_iter()
            .flatten()
            .filter(|i| j.state.done.contains_key(*i))
            .cloned()
            .collect(),
        OnFailure::RollbackAll => j.state.done.keys().cloned().collect(),
        OnFailure::Stop => Vec::new(),
    };
    let links = Links::new(dir, &plan)?;
    rollback(&links, j, &back, emit)?;
    finish(dir, j, Outcome::Failed, 1, emit)
}

/// Substitutes each of `pairs` back onto its version before the rollout, through its host.
fn rollback(links: &Links, j: &mut Journal, pairs: &[String], emit: &Emit) -> Result<bool, Fail> {
    let plan = j.state.plan.clone();
    let mut all_ok = true;
    for pair in pairs {
        let Some(from) = plan.from.get(pair) else {
            continue;
        };
        let (host, inst) = plan.split_pair(pair);
        let r = links
            .get(host)
            .map_err(|u| SubErr::Unreached(u.0))
            .and_then(|l| substitute(l, inst, from, plan.policy.as_deref()));
        match r {
            Ok(res) => {
                j.append(Rec::RolledBack {
                    instance: pair.clone(),
                })?;
                emit.event(
                    "rolled_back",
                    with(
                        who(&plan, pair),
                        json!({"to": from, "changed_blocks": res["changed_blocks"],
                    "guest": res["guest"]["guest"]}),
                    ),
                    &format!("  {pair}: rolled back to {}", short(from)),
                );
            }
            Err(e) => {
                all_ok = false;
                let why = match e {
                    SubErr::Conflict(_) => "conflict".to_string(),
                    SubErr::Other(m) => m,
                    SubErr::Unreached(m) => format!("unreachable: {m}"),
                };
                emit.event(
                    "rollback_failed",
                    with(who(&plan, pair), json!({"error": why})),
                    &format!("  {pair}: ROLLBACK FAILED: {why}"),
                );
            }
        }
    }
    Ok(all_ok)
}

fn print_result(s: &super::state::Rollout, state: &str, emit: &Emit) {
    let mut v = super::summary(s);
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), json!("result"));
        o.insert("state".into(), json!(state));
    }
    if emit.json {
        println!("{v}");
    } else {
        println!(
            "rollout {} {state}: {} of {} on {}, {} pending, {} conflict(s), {} rolled back",
            s.plan.id,
            s.checked.len().max(s.done.len()),
            s.plan.waves.iter().map(Vec::len).sum::<usize>(),
            s.plan.target,
            s.pending_through(s.plan.waves.len().saturating_sub(1))
                .len(),
            s.conflicts.len(),
            s.rolled_back.len()
        );
    }
}

fn finish(
    dir: &Path,
    j: &mut Journal,
    outcome: Outcome,
    exit: i32,
    emit: &Emit,
) -> Result<i32, Fail> {
    j.append(Rec::Finished { outcome, exit })?;
    let _ = std::fs::remove_dir_all(super::state::bundle_dir(dir, &j.state.plan.id));
    print_result(&j.state, j.state.state(), emit);
    Ok(exit)
}

/// `--abort ID`: rolls back every pair the rollout moved.
pub fn abort(dir: &Path, j: &mut Journal, emit: &Emit) -> Result<i32, Fail> {
    j.append(Rec::Driver {
        pid: std::process::id(),
    })?;
    let back: Vec<String> = j.state.done.keys().cloned().collect();
    emit.event(
        "abort",
        json!({"instances": back}),
        &format!(
            "aborting {}: rolling back {}",
            j.state.plan.id,
            back.join(", ")
        ),
    );
    let links = Links::new(dir, &j.state.plan)?;
    let ok = rollback(&links, j, &back, emit)?;
    finish(dir, j, Outcome::Aborted, if ok { 0 } else { 1 }, emit)
}

/// `--dry-run`: the plan and each pair's conflicts; changes nothing.
pub fn dry_run(dir: &Path, plan: &Plan, diff: &Value, emit: &Emit) -> Result<i32, Fail> {
    let links = Links::new(dir, plan)?;
    let mut conflicts = Vec::new();
    for pair in plan.waves.iter().flatten() {
        let (host, inst) = plan.split_pair(pair);
        let mut args = vec![
            "substitute",
            inst,
            plan.target_id.as_str(),
            "--dry-run",
            "--json",
        ];
        let flag = plan.policy.as_ref().map(|p| format!("--{p}"));
        if let Some(f) = &flag {
            args.push(f);
        }
        let a = links
            .get(host)
            .and_then(|l| l.call(&args))
            .map_err(|u| Fail::new(1, format!("{host}: {}", u.0)))?;
        // A dry run lists the conflicts it would refuse rather than refusing.
        let listed = a
            .result()
            .is_some_and(|r| r["conflicts"].as_array().is_some_and(|c| !c.is_empty()));
        if a.code == 4 || (listed && plan.policy.is_none()) {
            conflicts.push(pair.clone());
        }
    }
    let v = json!({"type": "result", "dry_run": true, "target": plan.target, "target_id": plan.target_id,
        "waves": plan.waves, "changed_blocks": diff["changed_blocks"], "files": diff["files"],
        "expected": plan.expected, "conflicts": conflicts, "hosts": plan.hosts.keys().collect::<Vec<_>>(),
        "bundle_hosts": plan.bundle_hosts});
    if emit.json {
        println!("{v}");
    } else {
        println!(
            "plan: {} -> {} ({} changed block(s))",
            plan.from.len(),
            plan.target,
            diff["changed_blocks"]
        );
        for (w, insts) in plan.waves.iter().enumerate() {
            println!("  wave {}: {}", w + 1, insts.join(", "));
        }
        for f in diff["files"].as_array().into_iter().flatten() {
            println!("  changes {}", f.as_str().unwrap_or("?"));
        }
        for h in &plan.bundle_hosts {
            println!("  {h}: no remote: gets a bundle uploaded by the driver");
        }
        for c in &conflicts {
            println!("  conflict: {c} (would be skipped)");
        }
    }
    Ok(if conflicts.is_empty() { 0 } else { 4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_files_come_from_the_changed_blocks_files_only() {
        let diff = serde_json::json!({"file_blocks": [
            {"files": ["/b", "/a"], "directories": ["/d"]}, {"files": ["/a"]}]});
        assert_eq!(data_files(&diff), ["/a", "/b"]);
        assert!(data_files(&Value::Null).is_empty());
    }

    #[test]
    fn expected_hashes_are_the_targets_hashes_of_the_data_files() {
        let diff = serde_json::json!({"target_hashes": {"/a": "aa", "/other": "cc"}});
        let files = ["/a".to_string(), "/deleted".to_string()];
        let want: BTreeMap<String, String> = [("/a".to_string(), "aa".to_string())].into();
        assert_eq!(expected_hashes(&diff, &files), want);
        assert!(expected_hashes(&Value::Null, &files).is_empty());
    }
}
