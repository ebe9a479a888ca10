//! `fleet status`: asks every host at once (a thread each) what its daemon says to `status`,
//! `ls`, `instance ls` and `vm ls`, each host within its own deadline. A host that cannot be
//! reached, refuses our certificate, shows a certificate not for its name, or does not answer
//! in time is marked unreachable; that is a report, not a failure (exit 0).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{ClientError, Operator, Reply};
use super::inventory::Host;

/// What one host said.
#[derive(Debug, Clone)]
pub struct HostStatus {
    /// The host.
    pub host: Host,
    /// Why it is unreachable; `None` when it answered.
    pub error: Option<String>,
    /// `status --json` (imagefs version, mountpoint, pid).
    pub daemon: Value,
    /// `ls --json`: images and versions.
    pub store: Value,
    /// `instance ls --json`: one object per instance.
    pub instances: Vec<Value>,
    /// `vm ls --json`: one object per VM.
    pub vms: Vec<Value>,
    /// Failures of single commands on a reachable host.
    pub warnings: Vec<String>,
    /// Time taken.
    pub elapsed: Duration,
}

impl HostStatus {
    fn unreachable(host: Host, why: String, elapsed: Duration) -> HostStatus {
        HostStatus {
            host,
            error: Some(why),
            daemon: Value::Null,
            store: Value::Null,
            instances: Vec::new(),
            vms: Vec::new(),
            warnings: Vec::new(),
            elapsed,
        }
    }

    /// The JSON object `fleet status --json` prints for the host.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.host.name,
            "address": self.host.address,
            "reachable": self.error.is_none(),
            "error": self.error,
            "imagefs": self.daemon.get("imagefs"),
            "mountpoint": self.daemon.get("mountpoint"),
            "images": self.store.get("images"),
            "versions": self.store.get("versions"),
            "instances": self.instances,
            "vms": self.vms,
            "warnings": self.warnings,
            "elapsed_ms": self.elapsed.as_millis() as u64,
        })
    }
}

/// The JSON lines of a reply's stdout.
fn json_lines(r: &Reply) -> Vec<Value> {
    r.out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The `"type": "result"` object of a reply, without its type.
fn result_of(r: &Reply) -> Value {
    let mut v = json_lines(r)
        .into_iter()
        .rfind(|v| v["type"] == "result")
        .unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("type");
    }
    v
}

fn ask_one(op: &Operator, host: Host, deadline: Instant) -> HostStatus {
    let start = Instant::now();
    let ask = |argv: &[&str]| op.call(&host, argv, deadline);
    // The first call says whether the host is reachable at all; the rest are details.
    let daemon = match ask(&["status", "--json"]) {
        Ok(r) if r.exit == 0 => result_of(&r),
        Ok(r) => {
            let why = format!("status exited {}: {}", r.exit, r.err.trim());
            return HostStatus::unreachable(host, why, start.elapsed());
        }
        Err(e) => return HostStatus::unreachable(host, e.to_string(), start.elapsed()),
    };
    let mut warnings = Vec::new();
    let mut run = |argv: &[&str]| -> Result<Option<Reply>, ClientError> {
        let r = ask(argv)?;
        if r.exit != 0 {
            warnings.push(format!(
                "{} exited {}: {}",
                argv.join(" "),
                r.exit,
                r.err.trim()
            ));
            return Ok(None);
        }
        Ok(Some(r))
    };
    let answers = (|| {
        Ok::<_, ClientError>((
            run(&["ls", "--json"])?,
            run(&["instance", "ls", "--json"])?,
            run(&["vm", "ls", "--json"])?,
        ))
    })();
    let elapsed = start.elapsed();
    match answers {
        Ok((ls, inst, vms)) => HostStatus {
            error: None,
            daemon,
            store: ls.as_ref().map(result_of).unwrap_or(Value::Null),
            instances: inst.as_ref().map(json_lines).unwrap_or_default(),
            vms: vms.as_ref().map(json_lines).unwrap_or_default(),
            warnings,
            elapsed,
            host,
        },
        // It answered, then stopped: as unreachable as a host that never did.
        Err(e) => HostStatus::unreachable(host, e.to_string(), elapsed),
    }
}

/// Asks every host in `hosts` at once; each gets `timeout` in all. Returns them in the
/// inventory's order, within about `timeout` whatever the hosts do.
pub fn ask_all(op: &Operator, hosts: Vec<Host>, timeout: Duration) -> Vec<HostStatus> {
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    for (i, host) in hosts.iter().cloned().enumerate() {
        let (op, tx2) = (op.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("fleet-{}", host.name))
            .spawn(move || {
                let _ = tx2.send((i, ask_one(&op, host, deadline)));
            });
        if let Err(e) = spawned {
            let why = format!("cannot start a thread: {e}");
            let _ = tx.send((
                i,
                HostStatus::unreachable(hosts[i].clone(), why, Duration::ZERO),
            ));
        }
    }
    drop(tx);
    let mut got: Vec<Option<HostStatus>> = vec![None; hosts.len()];
    // A little past the deadline: every socket operation is bounded by it, so this only
    // catches a host stuck where no timeout reaches (name resolution).
    let give_up = deadline + Duration::from_millis(500);
    while got.iter().any(Option::is_none) {
        let left = give_up.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, s)) => got[i] = Some(s),
            Err(_) => break,
        }
    }
    got.into_iter()
        .zip(hosts)
        .map(|(s, h)| {
            s.unwrap_or_else(|| {
                HostStatus::unreachable(h, "no answer within the deadline".into(), timeout)
            })
        })
        .collect()
}
