//! A rollout's durable state: one checksummed append-only record log per rollout
//! (STORE/rollouts/ID.log, the store's `RecordLog`), one JSON record per step, synced before the
//! step is reported. Replaying the records gives where the rollout stands, so a rollout killed
//! at any point resumes or rolls back from its last recorded step.
//! Invariant: a step is recorded only after it happened (a substitution is recorded after the
//! daemon confirmed it); redoing an unrecorded step is harmless (substituting onto the version an
//! instance already has changes nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use imagefs_store::log::{LogError, RecordLog};
use serde::{Deserialize, Serialize};

/// Record kind in the log.
const KIND: u8 = 1;

/// What to do when a wave fails its health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Roll back the failing wave only.
    RollbackWave,
    /// Roll back every wave done so far.
    RollbackAll,
    /// Leave everything as it is.
    Stop,
}

/// The plan, written first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    /// What the user asked for (NAME:TAG).
    pub target: String,
    /// The version it resolved to when the rollout began (resume goes to the same one).
    pub target_id: String,
    /// Each chosen instance's version before the rollout (rollback goes there).
    pub from: BTreeMap<String, String>,
    pub waves: Vec<Vec<String>>,
    pub health_cmd: Option<String>,
    pub health_timeout_ms: u64,
    pub on_failure: OnFailure,
    /// "force", "keep-local" or none.
    pub policy: Option<String>,
    /// Changed guest files with their blake3 in the target version (the hash check).
    pub expected: BTreeMap<String, String>,
    pub created_at: u64,
    /// A fleet rollout's hosts: name -> address when planned (empty: this store's daemon).
    /// Its waves then hold pairs "HOST/INSTANCE".
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Hosts with no remote when planned: they get the target as an uploaded bundle.
    #[serde(default)]
    pub bundle_hosts: BTreeSet<String>,
    /// Waves and --max-unavailable count whole hosts.
    #[serde(default)]
    pub by_host: bool,
    /// Pairs (or hosts, by host) that may stay pending after a wave before the rollout stops.
    #[serde(default)]
    pub max_unavailable: usize,
    /// Most time one command on a host may take.
    #[serde(default = "default_host_timeout_ms")]
    pub host_timeout_ms: u64,
}

fn default_host_timeout_ms() -> u64 {
    60_000
}

impl Plan {
    /// The host and instance of a pair ("" for a local rollout's instances).
    pub fn split_pair<'a>(&self, pair: &'a str) -> (&'a str, &'a str) {
        if self.hosts.is_empty() {
            return ("", pair);
        }
        pair.split_once('/').unwrap_or(("", pair))
    }
}

/// A fleet rollout's name of `instance` on `host`.
pub fn pair(host: &str, instance: &str) -> String {
    if host.is_empty() {
        instance.to_string()
    } else {
        format!("{host}/{instance}")
    }
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Failed,
    Aborted,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum Rec {
    Plan(Plan),
    /// The process driving the rollout now (a resume writes its own).
    Driver {
        pid: u32,
    },
    Substituted {
        wave: usize,
        instance: String,
    },
    Conflict {
        wave: usize,
        instance: String,
    },
    Healthy {
        wave: usize,
    },
    Unhealthy {
        wave: usize,
        failures: Vec<String>,
    },
    RolledBack {
        instance: String,
    },
    /// The pair's guest passed its health check on the target.
    Checked {
        instance: String,
    },
    /// The pairs' host did not answer (a partition, a restart): they stay pending.
    Unreachable {
        wave: usize,
        host: String,
        pairs: Vec<String>,
        error: String,
    },
    /// More were pending than --max-unavailable allows after `wave`: the driver stopped;
    /// `--resume` goes on.
    Interrupted {
        wave: usize,
        pending: Vec<String>,
    },
    Finished {
        outcome: Outcome,
        exit: i32,
    },
}

/// Where a rollout stands, from its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub plan: Plan,
    pub driver: Option<u32>,
    /// Instances on the target version, with their wave.
    pub done: BTreeMap<String, usize>,
    pub conflicts: BTreeSet<String>,
    pub healthy: BTreeSet<usize>,
    pub unhealthy: BTreeMap<usize, Vec<String>>,
    pub rolled_back: BTreeSet<String>,
    /// Pairs whose guest passed its health check on the target.
    pub checked: BTreeSet<String>,
    /// Pairs whose host did not answer, with the last error.
    pub unreachable: BTreeMap<String, String>,
    /// The wave after which the last driver stopped for unavailable hosts.
    pub interrupted: Option<usize>,
    pub finished: Option<(Outcome, i32)>,
}

/// Errors of rollout state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The log failed
    #[error(transparent)]
    Log(#[from] LogError),
    /// A record does not parse
    #[error("rollout log {0}: a record does not parse")]
    Record(PathBuf),
    /// The log does not start with a plan
    #[error("rollout log {0} has no plan")]
    NoPlan(PathBuf),
    /// No such rollout
    #[error("no rollout {0:?}")]
    NotFound(String),
    /// Listing the rollouts failed
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Rollout {
    fn new(plan: Plan) -> Rollout {
        Rollout {
            plan,
            driver: None,
            done: BTreeMap::new(),
            conflicts: BTreeSet::new(),
            healthy: BTreeSet::new(),
            unhealthy: BTreeMap::new(),
            rolled_back: BTreeSet::new(),
            checked: BTreeSet::new(),
            unreachable: BTreeMap::new(),
            interrupted: None,
            finished: None,
        }
    }

    /// Applies one record (every transition in one match).
    pub fn apply(&mut self, r: &Rec) {
        match r {
            Rec::Plan(p) => self.plan = p.clone(),
            Rec::Driver { pid } => {
                self.driver = Some(*pid);
                self.interrupted = None;
            }
            Rec::Substituted { wave, instance } => {
                self.done.insert(instance.clone(), *wave);
                self.rolled_back.remove(instance);
                self.unreachable.remove(instance);
            }
            Rec::Checked { instance } => {
                self.checked.insert(instance.clone());
                self.unreachable.remove(instance);
            }
            Rec::Unreachable { pairs, error, .. } => {
                for p in pairs {
                    self.unreachable.insert(p.clone(), error.clone());
                }
            }
            Rec::Interrupted { wave, .. } => self.interrupted = Some(*wave),
            Rec::Conflict { instance, .. } => {
                self.conflicts.insert(instance.clone());
            }
            Rec::Healthy { wave } => {
                self.healthy.insert(*wave);
            }
            Rec::Unhealthy { wave, failures } => {
                self.unhealthy.insert(*wave, failures.clone());
            }
            Rec::RolledBack { instance } => {
                self.done.remove(instance);
                self.checked.remove(instance);
                self.rolled_back.insert(instance.clone());
            }
            Rec::Finished { outcome, exit } => self.finished = Some((*outcome, *exit)),
        }
    }

    /// Pairs of waves up to `wave` not yet on the target and checked (conflicts aside).
    pub fn pending_through(&self, wave: usize) -> Vec<String> {
        self.plan
            .waves
            .iter()
            .take(wave + 1)
            .enumerate()
            // a healthy wave's pairs were all checked (older logs record no Checked)
            .filter(|(w, _)| !self.healthy.contains(w))
            .flat_map(|(_, pairs)| pairs)
            .filter(|p| !self.checked.contains(*p) && !self.conflicts.contains(*p))
            .cloned()
            .collect()
    }

    /// Pairs tried and not finished: their host did not answer, or they are on the target and
    /// not yet checked (in wave order).
    pub fn pending(&self) -> Vec<String> {
        self.plan
            .waves
            .iter()
            .enumerate()
            .filter(|(w, _)| !self.healthy.contains(w))
            .flat_map(|(_, pairs)| pairs)
            .filter(|p| !self.checked.contains(*p) && !self.conflicts.contains(*p))
            .filter(|p| self.unreachable.contains_key(*p) || self.done.contains_key(*p))
            .cloned()
            .collect()
    }

    /// How many `pending` count against --max-unavailable: pairs, or hosts with --by host.
    pub fn unavailable(&self, pending: &[String]) -> usize {
        if self.plan.by_host {
            let hosts: BTreeSet<&str> = pending.iter().map(|p| self.plan.split_pair(p).0).collect();
            hosts.len()
        } else {
            pending.len()
        }
    }

    /// A one-word state for listings.
    pub fn state(&self) -> &'static str {
        match self.finished {
            Some((Outcome::Completed, 0)) => "completed",
            Some((Outcome::Completed, _)) => "completed-with-conflicts",
            Some((Outcome::Failed, _)) => "failed",
            Some((Outcome::Aborted, _)) => "aborted",
            None if self.driver.is_some_and(alive) => "running",
            None => "interrupted",
        }
    }
}

/// Whether process `pid` runs (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn dir(store: &Path) -> PathBuf {
    store.join("rollouts")
}

/// Where a fleet rollout keeps the bundles it uploads until it finishes.
pub fn bundle_dir(store: &Path, id: &str) -> PathBuf {
    dir(store).join(format!("{id}.bundles"))
}

fn path(store: &Path, id: &str) -> PathBuf {
    dir(store).join(format!("{id}.log"))
}

/// An open rollout log with its replayed state.
pub struct Journal {
    log: RecordLog,
    pub state: Rollout,
}

impl Journal {
    /// Creates the log of a new rollout with its plan.
    pub fn create(store: &Path, plan: Plan) -> Result<Journal, StateError> {
        let d = dir(store);
        std::fs::create_dir_all(&d).map_err(|source| StateError::Io { path: d, source })?;
        // The log appears with its plan or not at all (written aside, fsynced, renamed): a
        // kill mid-create must not leave a rollout that cannot be resumed or listed.
        let final_path = path(store, &plan.id);
        let tmp = final_path.with_extension("log.tmp");
        let _ = std::fs::remove_file(&tmp);
        let r = Rec::Plan(plan.clone());
        let bytes = serde_json::to_vec(&r).map_err(|_| StateError::Record(tmp.clone()))?;
        {
            let (mut log, _) = RecordLog::open(&tmp)?;
            log.append(KIND, &bytes)?;
            log.sync()?;
        }
        std::fs::rename(&tmp, &final_path).map_err(|source| StateError::Io {
            path: final_path.clone(),
            source,
        })?;
        imagefs_store::log::sync_parent(&final_path).map_err(|source| StateError::Io {
            path: final_path.clone(),
            source,
        })?;
        let (log, _) = RecordLog::open(&final_path)?;
        let mut state = Rollout::new(plan);
        state.apply(&r);
        Ok(Journal { log, state })
    }

    /// Opens rollout `id` and replays it.
    pub fn open(store: &Path, id: &str) -> Result<Journal, StateError> {
        let p = path(store, id);
        if !valid_id(id) || !p.exists() {
            return Err(StateError::NotFound(id.to_string()));
        }
        let (log, records) = RecordLog::open(&p)?;
        let state = replay(&p, records.iter().map(|r| r.payload.as_slice()))?;
        Ok(Journal { log, state })
    }

    /// Records a step durably, then applies it.
    pub fn append(&mut self, r: Rec) -> Result<(), StateError> {
        let bytes =
            serde_json::to_vec(&r).map_err(|_| StateError::Record(self.log.path().into()))?;
        self.log.append(KIND, &bytes)?;
        self.log.sync()?;
        self.state.apply(&r);
        Ok(())
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn replay<'a>(p: &Path, payloads: impl Iterator<Item = &'a [u8]>) -> Result<Rollout, StateError> {
    let mut st: Option<Rollout> = None;
    for bytes in payloads {
        let r: Rec = serde_json::from_slice(bytes).map_err(|_| StateError::Record(p.into()))?;
        match (&mut st, &r) {
            (None, Rec::Plan(plan)) => st = Some(Rollout::new(plan.clone())),
            (None, _) => return Err(StateError::NoPlan(p.into())),
            (Some(s), r) => s.apply(r),
        }
    }
    st.ok_or_else(|| StateError::NoPlan(p.into()))
}

/// Every rollout in the store, oldest first.
pub fn list(store: &Path) -> Result<Vec<Rollout>, StateError> {
    let d = dir(store);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StateError::Io { path: d, source }),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let records = RecordLog::read(&p)?;
            out.push(replay(&p, records.iter().map(|r| r.payload.as_slice()))?);
        }
    }
    out.sort_by(|a, b| (a.plan.created_at, &a.plan.id).cmp(&(b.plan.created_at, &b.plan.id)));
    Ok(out)
}

/// A new rollout id: UTC-ish seconds plus the pid, readable and unique per host.
pub fn new_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("r{secs}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(id: &str) -> Plan {
        Plan {
            id: id.into(),
            target: "app:v2".into(),
            target_id: "b".repeat(64),
            from: [("a".to_string(), "a".repeat(64))].into(),
            waves: vec![vec!["a".into()], vec!["b".into()]],
            health_cmd: Some("true".into()),
            health_timeout_ms: 1000,
            on_failure: OnFailure::RollbackWave,
            policy: None,
            expected: BTreeMap::new(),
            created_at: 1,
            hosts: BTreeMap::new(),
            bundle_hosts: BTreeSet::new(),
            by_host: false,
            max_unavailable: 0,
            host_timeout_ms: 60_000,
        }
    }

    #[test]
    fn steps_survive_reopen_and_replay_to_the_same_state() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::create(d.path(), plan("r1-1")).unwrap();
        j.append(Rec::Substituted {
            wave: 0,
            instance: "a".into(),
        })
        .unwrap();
        j.append(Rec::Healthy { wave: 0 }).unwrap();
        j.append(Rec::Substituted {
            wave: 1,
            instance: "b".into(),
        })
        .unwrap();
        j.append(Rec::RolledBack {
            instance: "b".into(),
        })
        .unwrap();
        let before = j.state.clone();
        drop(j);
        let again = Journal::open(d.path(), "r1-1").unwrap();
        assert_eq!(again.state, before);
        assert_eq!(again.state.done.keys().collect::<Vec<_>>(), ["a"]);
        assert!(again.state.rolled_back.contains("b"));
        assert_eq!(again.state.state(), "interrupted");
        assert_eq!(list(d.path()).unwrap().len(), 1);
        assert!(matches!(
            Journal::open(d.path(), "../x"),
            Err(StateError::NotFound(_))
        ));
    }

    fn fleet_plan(id: &str, by_host: bool) -> Plan {
        Plan {
            hosts: [("h1", "a:1"), ("h2", "b:1")]
                .iter()
                .map(|(h, a)| (h.to_string(), a.to_string()))
                .collect(),
            waves: vec![
                vec!["h1/web-1".into(), "h1/web-2".into()],
                vec!["h2/web-1".into(), "h2/web-2".into()],
            ],
            by_host,
            ..plan(id)
        }
    }

    #[test]
    fn unreachable_pairs_stay_pending_until_checked_and_count_by_host_or_pair() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::create(d.path(), fleet_plan("r3-1", true)).unwrap();
        assert_eq!(j.state.plan.split_pair("h1/web-1"), ("h1", "web-1"));
        for p in ["h1/web-1", "h1/web-2"] {
            j.append(Rec::Substituted {
                wave: 0,
                instance: p.into(),
            })
            .unwrap();
        }
        j.append(Rec::Checked {
            instance: "h1/web-1".into(),
        })
        .unwrap();
        j.append(Rec::Unreachable {
            wave: 0,
            host: "h1".into(),
            pairs: vec!["h1/web-2".into()],
            error: "cut".into(),
        })
        .unwrap();
        j.append(Rec::Unreachable {
            wave: 1,
            host: "h2".into(),
            pairs: vec!["h2/web-1".into(), "h2/web-2".into()],
            error: "cut".into(),
        })
        .unwrap();
        let pending = j.state.pending_through(1);
        assert_eq!(pending, ["h1/web-2", "h2/web-1", "h2/web-2"]);
        // by host: two hosts; by pair: three pairs
        assert_eq!(j.state.unavailable(&pending), 2);
        let mut by_pair = j.state.clone();
        by_pair.plan.by_host = false;
        assert_eq!(by_pair.unavailable(&pending), 3);
        j.append(Rec::Interrupted {
            wave: 1,
            pending: pending.clone(),
        })
        .unwrap();
        drop(j);
        let mut j = Journal::open(d.path(), "r3-1").unwrap();
        assert_eq!(j.state.interrupted, Some(1));
        assert_eq!(j.state.state(), "interrupted");
        assert_eq!(j.state.pending(), pending);
        // A resume: the host answers again; checked pairs leave the pending list.
        j.append(Rec::Driver { pid: 1 }).unwrap();
        assert_eq!(j.state.interrupted, None);
        j.append(Rec::Checked {
            instance: "h1/web-2".into(),
        })
        .unwrap();
        assert_eq!(j.state.pending_through(0), Vec::<String>::new());
        assert!(!j.state.unreachable.contains_key("h1/web-2"));
        // A rolled-back pair is no longer checked on the target.
        j.append(Rec::RolledBack {
            instance: "h1/web-2".into(),
        })
        .unwrap();
        assert_eq!(j.state.pending_through(0), ["h1/web-2"]);
    }

    #[test]
    fn a_plan_written_before_fleets_reads_as_local() {
        let mut v = serde_json::to_value(Rec::Plan(plan("r4-1"))).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in [
            "hosts",
            "bundle_hosts",
            "by_host",
            "max_unavailable",
            "host_timeout_ms",
        ] {
            o.remove(k);
        }
        let Rec::Plan(p) = serde_json::from_value(v).unwrap() else {
            panic!("not a plan")
        };
        assert!(p.hosts.is_empty());
        assert_eq!(p.host_timeout_ms, 60_000);
        assert_eq!(p.split_pair("web/1"), ("", "web/1"));
    }

    #[test]
    fn a_torn_last_record_is_dropped_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::create(d.path(), plan("r2-1")).unwrap();
        j.append(Rec::Substituted {
            wave: 0,
            instance: "a".into(),
        })
        .unwrap();
        drop(j);
        let p = path(d.path(), "r2-1");
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 3).unwrap();
        let again = Journal::open(d.path(), "r2-1").unwrap();
        assert!(again.state.done.is_empty());
    }
}
