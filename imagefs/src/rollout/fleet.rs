//! Planning a rollout across hosts of the fleet (`rollout --hosts`): every chosen host is asked
//! at once for its instances and whether it has a remote; the (host, instance) pairs are ordered
//! by host, then instance, and cut into waves of pairs or of whole hosts. The target and the
//! changed files' hashes come from the operator's own store, which must also hold every base a
//! host without a remote runs (its bundle is built from it): else exit 3 before any step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use super::link::{Link, Unreached};
use super::state::{self, Plan};
use super::{plan, Answer, Fail, RolloutArgs, WaveUnit};
use crate::fleet::client::Operator;
use crate::fleet::inventory::{self, Host};

/// What one host told the planner.
struct Seen {
    /// instance -> the version it runs
    bases: BTreeMap<String, String>,
    remote: Option<String>,
}

/// The id NAME:TAG names in an `ls --json` result.
pub fn tag_id(ls: &Value, name: &str, tag: &str) -> Option<String> {
    ls["images"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
        .and_then(|i| i["tags"][tag].as_str())
        .map(str::to_string)
}

/// Runs a store command in the operator's store; its answer.
fn local(dir: &Path, args: &[&str]) -> Answer {
    let (code, out, err) = crate::daemon::client::run_on_store(dir, args);
    Answer { code, out, err }
}

fn ask(link: &Link) -> Result<Seen, String> {
    let said = |u: Unreached| u.0;
    let ls = link.call(&["instance", "ls", "--json"]).map_err(said)?;
    if ls.code != 0 {
        return Err(format!("instance ls: {}", ls.err.trim()));
    }
    let mut bases = BTreeMap::new();
    for v in ls.lines() {
        if let (Some(i), Some(b)) = (v["instance"].as_str(), v["base"].as_str()) {
            bases.insert(i.to_string(), b.to_string());
        }
    }
    let st = link.call(&["status", "--json"]).map_err(said)?;
    if st.code != 0 {
        return Err(format!("status: {}", st.err.trim()));
    }
    let remote = st
        .result()
        .and_then(|r| r["remote"].as_str().map(str::to_string));
    Ok(Seen { bases, remote })
}

/// The plan of a fleet rollout, and the widest diff (for the dry run's listing).
pub fn plan(
    dir: &Path,
    a: &RolloutArgs,
    target: &str,
    hosts_spec: &str,
    spec: &str,
) -> Result<(Plan, Value), Fail> {
    let inventory = inventory::load(dir).map_err(|e| Fail::new(e.exit_code(), e.to_string()))?;
    let names: Vec<String> = inventory.iter().map(|h| h.name.clone()).collect();
    let chosen = plan::select_named(hosts_spec, &names, "host").map_err(|e| Fail::new(2, e))?;
    let op = Operator::load(dir).map_err(|e| Fail::new(3, e.to_string()))?;
    let timeout = a.host_timeout;
    let hosts: Vec<Host> = inventory
        .into_iter()
        .filter(|h| chosen.contains(&h.name))
        .collect();
    // Every host at once: a plan waits for the slowest, not for their sum.
    let seen: Vec<(Host, Result<Seen, String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = hosts
            .iter()
            .map(|h| {
                let link = Link::Fleet {
                    op: op.clone(),
                    host: h.clone(),
                    timeout,
                };
                (h.clone(), s.spawn(move || ask(&link)))
            })
            .collect();
        hs.into_iter()
            .map(|(h, t)| {
                (
                    h,
                    t.join()
                        .unwrap_or_else(|_| Err("planning thread panicked".into())),
                )
            })
            .collect()
    });
    let mut fleet = BTreeMap::new();
    for (h, r) in seen {
        match r {
            Ok(s) => {
                fleet.insert(h.name.clone(), (h, s));
            }
            Err(e) => {
                return Err(Fail::new(
                    1,
                    format!(
                        "{}: cannot plan without it: {e} (leave it out with --hosts, or retry)",
                        h.name
                    ),
                ))
            }
        }
    }
    // Pairs by host, then instance; --instances may match none on some hosts, not on all.
    let mut from = BTreeMap::new();
    let mut pairs_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let every: Vec<String> = fleet
        .values()
        .flat_map(|(_, s)| s.bases.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    plan::select(spec, &every).map_err(|e| Fail::new(2, e))?;
    for (name, (_, s)) in &fleet {
        let insts: Vec<String> = s.bases.keys().cloned().collect();
        let on_host = plan::select(spec, &insts).unwrap_or_default();
        for i in on_host {
            let p = state::pair(name, &i);
            if let Some(b) = s.bases.get(&i) {
                from.insert(p.clone(), b.clone());
            }
            pairs_of.entry(name.clone()).or_default().push(p);
        }
    }
    let by_host = a.by == WaveUnit::Host;
    let waves = if by_host {
        let hs: Vec<String> = pairs_of.keys().cloned().collect();
        let sizes = plan::wave_sizes(a.waves.as_deref(), hs.len()).map_err(|e| Fail::new(2, e))?;
        plan::split(&hs, &sizes)
            .into_iter()
            .map(|group| {
                group
                    .iter()
                    .flat_map(|h| pairs_of.get(h).cloned().unwrap_or_default())
                    .collect()
            })
            .collect()
    } else {
        let all: Vec<String> = pairs_of.values().flatten().cloned().collect();
        let sizes = plan::wave_sizes(a.waves.as_deref(), all.len()).map_err(|e| Fail::new(2, e))?;
        plan::split(&all, &sizes)
    };
    // The target, in the operator's store.
    let ls = local(dir, &["ls", "--json"]);
    if ls.code != 0 {
        return Err(Fail::new(ls.code, ls.err.trim().to_string()));
    }
    let listing = ls.result().unwrap_or(Value::Null);
    let held: BTreeSet<String> = listing["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect();
    let target_id = match target.split_once(':') {
        Some((name, tag)) => tag_id(&listing, name, tag),
        None => held.get(target).cloned(),
    }
    .ok_or_else(|| {
        Fail::new(
            3,
            format!("the operator's store has no version {target:?} to roll out"),
        )
    })?;
    let bundle_hosts: BTreeSet<String> = fleet
        .iter()
        .filter(|(n, (_, s))| s.remote.is_none() && pairs_of.contains_key(*n))
        .map(|(n, _)| n.clone())
        .collect();
    // A host without a remote gets a bundle from the version its instance runs: the operator
    // must hold that version, or nothing starts.
    for (p, base) in &from {
        let host = p.split_once('/').map_or("", |(h, _)| h);
        if bundle_hosts.contains(host) && !held.contains(base) && base != &target_id {
            return Err(Fail::new(
                3,
                format!(
                    "{p} runs version {}, which the operator's store lacks: {host} has no \
                     remote, so it gets a bundle built from that version (pull or import it \
                     first)",
                    base.get(..12).unwrap_or(base)
                ),
            ));
        }
    }
    // Changed files and their target hashes, from each base the operator holds.
    let bases: Vec<&String> = from.values().filter(|b| held.contains(*b)).collect();
    let (d, expected, _) = super::changed_files(&bases, &target_id, |args| Ok(local(dir, args)))?;
    let hosts = fleet
        .iter()
        .filter(|(n, _)| pairs_of.contains_key(*n))
        .map(|(n, (h, _))| (n.clone(), h.address.clone()))
        .collect();
    let plan = Plan {
        hosts,
        bundle_hosts,
        by_host,
        max_unavailable: a.max_unavailable,
        ..super::new_plan(a, target, target_id, from, waves, expected)
    };
    Ok((plan, d))
}
