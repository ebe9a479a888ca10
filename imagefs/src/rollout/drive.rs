//! The rollout's wave loop: substitute each instance of a wave through the daemon, check every
//! guest's health through its agent (the health command, then the changed files' hashes against
//! the target version), and on failure roll back per the plan. Also abort and the dry run.
//! Invariant: the journal is appended after each step completes and before the next begins, so
//! a resumed rollout skips exactly what is recorded and redoes at most one harmless step.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_proto::{AgentClient, AgentLink, Command, ExecRequest};
use serde_json::{json, Value};

use super::state::{Journal, OnFailure, Outcome, Plan, Rec};
use super::{daemon, Emit, Fail};
use crate::vm::registry;

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
}

/// Substitutes `instance` onto `to` through the daemon; the daemon's JSON result.
fn substitute(dir: &Path, instance: &str, to: &str, policy: Option<&str>) -> Result<Value, SubErr> {
    let flag = policy.map(|p| format!("--{p}"));
    let mut args = vec!["substitute", instance, to, "--json"];
    if let Some(f) = &flag {
        args.push(f);
    }
    let a = daemon(dir, &args).map_err(|f| SubErr::Other(f.msg))?;
    match a.code {
        0 => Ok(a.result().unwrap_or(Value::Null)),
        4 => Err(SubErr::Conflict(a.result().unwrap_or(Value::Null))),
        _ => Err(SubErr::Other(a.err.trim().to_string())),
    }
}

/// Checks one instance's guest (if a live VM runs on it).
fn health(dir: &Path, plan: &Plan, instance: &str) -> Result<String, String> {
    let Some(vm) = registry::live_on_instance(dir, instance) else {
        return Ok("no live VM: not checked".into());
    };
    let agent = AgentClient::new(&vm.agent_socket).with_timeout(Duration::from_secs(15));
    check(&agent, plan, instance)
}

/// The health verdict through `agent`: the health command exits 0 in time, then every changed
/// file hashes to the target's bytes.
pub fn check(agent: &dyn AgentLink, plan: &Plan, instance: &str) -> Result<String, String> {
    let t = Instant::now();
    if let Some(cmd) = &plan.health_cmd {
        let r = agent
            .exec(ExecRequest {
                command: Command::Shell(cmd.clone()),
                timeout_ms: plan.health_timeout_ms,
            })
            .map_err(|e| format!("{instance}: health check: {e}"))?;
        if r.timed_out {
            return Err(format!(
                "{instance}: health check timed out after {} ms",
                plan.health_timeout_ms
            ));
        }
        if r.exit_code != Some(0) {
            return Err(format!(
                "{instance}: health check exited {:?}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr_bytes())
                    .trim()
                    .chars()
                    .take(200)
                    .collect::<String>()
            ));
        }
    }
    for (path, want) in &plan.expected {
        let h = agent
            .hash(path)
            .map_err(|e| format!("{instance}: hash of {path}: {e}"))?;
        if &h.blake3 != want {
            return Err(format!(
                "{instance}: {path} reads {} in the guest, the target has {}",
                short(&h.blake3),
                short(want)
            ));
        }
    }
    Ok(format!(
        "healthy ({} file hash(es) match, {} ms)",
        plan.expected.len(),
        t.elapsed().as_millis()
    ))
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

fn processes(res: &Value) -> Value {
    res["guest"]["ack"]["processes"].clone()
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
    for (w, insts) in plan.waves.iter().enumerate() {
        if j.state.healthy.contains(&w) {
            continue;
        }
        emit.event(
            "wave_start",
            json!({"wave": w + 1, "instances": insts}),
            &format!("wave {}/{}: {}", w + 1, plan.waves.len(), insts.join(", ")),
        );
        let mut failures = Vec::new();
        for inst in insts {
            if j.state.done.contains_key(inst) || j.state.conflicts.contains(inst) {
                continue;
            }
            let t = Instant::now();
            match substitute(dir, inst, &plan.target_id, plan.policy.as_deref()) {
                Ok(res) => {
                    j.append(Rec::Substituted {
                        wave: w,
                        instance: inst.clone(),
                    })?;
                    imagefs_store::fault::point("rollout.between_vms");
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    let procs = processes(&res);
                    let guest = res["guest"]["guest"]
                        .as_str()
                        .unwrap_or("not told")
                        .to_string();
                    let mut text = format!(
                        "  {inst}: substituted {} block(s) in {ms:.0} ms, guest {guest}",
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
                    emit.event(
                        "substituted",
                        json!({"wave": w + 1, "instance": inst,
                        "changed_blocks": res["changed_blocks"], "ms": ms, "guest": guest,
                        "processes": procs, "stale_files": res["guest"]["ack"]["stale_files"],
                        "times": res["times"], "warning": res["guest"]["warning"]}),
                        &text,
                    );
                }
                Err(SubErr::Conflict(v)) => {
                    j.append(Rec::Conflict {
                        wave: w,
                        instance: inst.clone(),
                    })?;
                    emit.event("conflict", json!({"wave": w + 1, "instance": inst, "conflicts": v["conflicts"]}),
                        &format!("  {inst}: skipped: the guest wrote blocks the patch changes (use --force or --keep-local)"));
                }
                Err(SubErr::Other(msg)) => {
                    failures.push(format!("{inst}: substitute failed: {msg}"))
                }
            }
        }
        let checked: Vec<&String> = insts
            .iter()
            .filter(|i| j.state.done.contains_key(*i))
            .collect();
        let results: Vec<(String, Result<String, String>)> = std::thread::scope(|s| {
            let hs: Vec<_> = checked
                .iter()
                .map(|i| (i.to_string(), s.spawn(|| health(dir, &plan, i))))
                .collect();
            hs.into_iter()
                .map(|(i, h)| {
                    (
                        i,
                        h.join()
                            .unwrap_or_else(|_| Err("health check panicked".into())),
                    )
                })
                .collect()
        });
        for (inst, r) in results {
            let (ok, detail) = match r {
                Ok(d) => (true, d),
                Err(e) => {
                    failures.push(e.clone());
                    (false, e)
                }
            };
            emit.event(
                "health",
                json!({"wave": w + 1, "instance": inst, "ok": ok, "detail": detail}),
                &format!(
                    "  {inst}: {}",
                    if ok {
                        detail
                    } else {
                        format!("UNHEALTHY: {detail}")
                    }
                ),
            );
        }
        if failures.is_empty() {
            j.append(Rec::Healthy { wave: w })?;
            imagefs_store::fault::point("rollout.wave_saved");
            emit.event(
                "wave_healthy",
                json!({"wave": w + 1}),
                &format!("wave {} healthy", w + 1),
            );
        } else {
            j.append(Rec::Unhealthy { wave: w, failures })?;
            return fail_wave(dir, j, w, emit);
        }
    }
    let exit = if j.state.conflicts.is_empty() { 0 } else { 4 };
    finish(j, Outcome::Completed, exit, emit)
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
    rollback(dir, j, &back, emit)?;
    finish(j, Outcome::Failed, 1, emit)
}

/// Substitutes each of `insts` back onto its version before the rollout.
fn rollback(dir: &Path, j: &mut Journal, insts: &[String], emit: &Emit) -> Result<bool, Fail> {
    let plan = j.state.plan.clone();
    let mut all_ok = true;
    for inst in insts {
        let Some(from) = plan.from.get(inst) else {
            continue;
        };
        match substitute(dir, inst, from, plan.policy.as_deref()) {
            Ok(res) => {
                j.append(Rec::RolledBack {
                    instance: inst.clone(),
                })?;
                emit.event(
                    "rolled_back",
                    json!({"instance": inst, "to": from, "changed_blocks": res["changed_blocks"],
                    "guest": res["guest"]["guest"]}),
                    &format!("  {inst}: rolled back to {}", short(from)),
                );
            }
            Err(SubErr::Conflict(_)) | Err(SubErr::Other(_)) => {
                all_ok = false;
                emit.event(
                    "rollback_failed",
                    json!({"instance": inst}),
                    &format!("  {inst}: ROLLBACK FAILED"),
                );
            }
        }
    }
    Ok(all_ok)
}

fn finish(j: &mut Journal, outcome: Outcome, exit: i32, emit: &Emit) -> Result<i32, Fail> {
    j.append(Rec::Finished { outcome, exit })?;
    let s = &j.state;
    let mut v = super::summary(s);
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), json!("result"));
    }
    if emit.json {
        println!("{v}");
    } else {
        println!(
            "rollout {} {}: {} instance(s) on {}, {} conflict(s), {} rolled back",
            s.plan.id,
            s.state(),
            s.done.len(),
            s.plan.target,
            s.conflicts.len(),
            s.rolled_back.len()
        );
    }
    Ok(exit)
}

/// `--abort ID`: rolls back every instance the rollout moved.
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
    let ok = rollback(dir, j, &back, emit)?;
    finish(j, Outcome::Aborted, if ok { 0 } else { 1 }, emit)
}

/// `--dry-run`: the plan and each instance's conflicts; changes nothing.
pub fn dry_run(dir: &Path, plan: &Plan, diff: &Value, emit: &Emit) -> Result<i32, Fail> {
    let mut conflicts = Vec::new();
    for inst in plan.waves.iter().flatten() {
        let mut args = vec![
            "substitute",
            inst.as_str(),
            plan.target_id.as_str(),
            "--dry-run",
            "--json",
        ];
        let flag = plan.policy.as_ref().map(|p| format!("--{p}"));
        if let Some(f) = &flag {
            args.push(f);
        }
        let a = daemon(dir, &args)?;
        // A dry run lists the conflicts it would refuse rather than refusing.
        let listed = a
            .result()
            .is_some_and(|r| r["conflicts"].as_array().is_some_and(|c| !c.is_empty()));
        if a.code == 4 || (listed && plan.policy.is_none()) {
            conflicts.push(inst.clone());
        }
    }
    let v = json!({"type": "result", "dry_run": true, "target": plan.target, "target_id": plan.target_id,
        "waves": plan.waves, "changed_blocks": diff["changed_blocks"], "files": diff["files"],
        "expected": plan.expected, "conflicts": conflicts});
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
        for c in &conflicts {
            println!("  conflict: {c} (would be skipped)");
        }
    }
    Ok(if conflicts.is_empty() { 0 } else { 4 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::{ClientError, ExecReply, HashReply, NoticeAck, Pong, SubstitutionNotice};
    use std::collections::BTreeMap;

    /// An agent answering from fixed replies (the real one is exercised in tests/e2e/rollout.rs).
    struct Canned {
        exit: Option<i32>,
        timed_out: bool,
        hash: String,
    }

    impl AgentLink for Canned {
        fn ping(&self) -> Result<Pong, ClientError> {
            Err(ClientError::UnexpectedReply {
                op: "ping",
                kind: 0,
            })
        }
        fn hash(&self, path: &str) -> Result<HashReply, ClientError> {
            Ok(HashReply {
                path: path.into(),
                size: 8,
                blake3: self.hash.clone(),
            })
        }
        fn exec(&self, _: ExecRequest) -> Result<ExecReply, ClientError> {
            Ok(ExecReply {
                exit_code: self.exit,
                signal: None,
                timed_out: self.timed_out,
                stdout: String::new(),
                stderr: "bad\n".into(),
                stdout_truncated: false,
                stderr_truncated: false,
                stdout_hex: None,
                stderr_hex: None,
                duration_ms: 1,
            })
        }
        fn notice(&self, _: &SubstitutionNotice) -> Result<NoticeAck, ClientError> {
            Err(ClientError::UnexpectedReply {
                op: "notice",
                kind: 0,
            })
        }
    }

    fn plan() -> Plan {
        Plan {
            id: "r1-1".into(),
            target: "app:v2".into(),
            target_id: "b".repeat(64),
            from: BTreeMap::new(),
            waves: vec![],
            health_cmd: Some("/opt/app/check".into()),
            health_timeout_ms: 1000,
            on_failure: OnFailure::RollbackWave,
            policy: None,
            expected: [("/opt/app/version".to_string(), "a".repeat(64))].into(),
            created_at: 0,
        }
    }

    #[test]
    fn healthy_needs_exit_zero_in_time_and_every_hash_to_match() {
        let good = Canned {
            exit: Some(0),
            timed_out: false,
            hash: "a".repeat(64),
        };
        assert!(check(&good, &plan(), "web-1").is_ok());
        let failing = Canned {
            exit: Some(1),
            ..good
        };
        assert!(check(&failing, &plan(), "web-1")
            .unwrap_err()
            .contains("exited Some(1)"));
        let slow = Canned {
            exit: None,
            timed_out: true,
            hash: "a".repeat(64),
        };
        assert!(check(&slow, &plan(), "web-1")
            .unwrap_err()
            .contains("timed out"));
        let stale = Canned {
            exit: Some(0),
            timed_out: false,
            hash: "c".repeat(64),
        };
        let e = check(&stale, &plan(), "web-1").unwrap_err();
        assert!(e.contains("/opt/app/version"), "{e}");
    }

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
