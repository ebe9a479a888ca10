//! Where a rollout's commands run: this store's daemon over its control socket (a local
//! rollout), or each host's daemon over the fleet transport (mutual TLS, fleet/client.rs).
//! Invariant: a call that got no answer is `Unreached`, never a failed command: the host may
//! be cut off or restarting, and nothing can be said of what it did.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::state::Plan;
use super::{Answer, Fail};
use crate::daemon::control;
use crate::fleet::client::{ClientError, Operator};
use crate::fleet::inventory::{self, Host};

/// No answer came from the host (the reason).
#[derive(Debug, Clone)]
pub struct Unreached(pub String);

/// One host's daemon.
pub enum Link {
    /// The daemon serving the operator's own store.
    Local(PathBuf),
    /// A host of the fleet.
    Fleet {
        op: Operator,
        host: Host,
        timeout: Duration,
    },
}

impl Link {
    /// Runs `args` (without the program name) there.
    pub fn call(&self, args: &[&str]) -> Result<Answer, Unreached> {
        self.exchange(args, None, Duration::ZERO)
    }

    /// Like `call`, for a command that may itself take up to `takes` (a health check's own
    /// timeout): the host gets that much on top of its per-command deadline.
    pub fn call_taking(&self, args: &[&str], takes: Duration) -> Result<Answer, Unreached> {
        self.exchange(args, None, takes)
    }

    /// Runs `args` there with the bytes of `file` as the request's upload frame (its spooled
    /// copy replaces the `@upload` word). A local daemon reads the file itself.
    pub fn call_with_upload(&self, args: &[&str], file: &Path) -> Result<Answer, Unreached> {
        self.exchange(args, Some(file), Duration::ZERO)
    }

    fn exchange(
        &self,
        args: &[&str],
        upload: Option<&Path>,
        takes: Duration,
    ) -> Result<Answer, Unreached> {
        match self {
            Link::Local(dir) => {
                let stream = control::connect(dir)
                    .ok_or_else(|| Unreached("no mount daemon serves this store".to_string()))?;
                let file = upload.map(|p| p.display().to_string());
                let argv: Vec<String> = std::iter::once("imagefs".to_string())
                    .chain(args.iter().map(|a| match (&file, *a) {
                        (Some(f), crate::daemon::tls::UPLOAD_TOKEN) => f.clone(),
                        _ => a.to_string(),
                    }))
                    .collect();
                let (mut out, mut err) = (Vec::new(), Vec::new());
                let code = control::forward(stream, argv, &mut out, &mut err)
                    .map_err(|e| Unreached(e.to_string()))?;
                Ok(Answer {
                    code,
                    out: String::from_utf8_lossy(&out).into_owned(),
                    err: String::from_utf8_lossy(&err).into_owned(),
                })
            }
            Link::Fleet { op, host, timeout } => {
                let deadline = Instant::now() + *timeout + takes;
                let r = match upload {
                    Some(f) => op.call_with_upload(host, args, f, deadline),
                    None => op.call(host, args, deadline),
                };
                match r {
                    Ok(r) => Ok(Answer {
                        code: r.exit,
                        out: r.out,
                        err: r.err,
                    }),
                    Err(e) if e.is_unreachable() => Err(Unreached(e.to_string())),
                    // the operator's own side failed: the command's failure, said as such
                    Err(e) => Ok(Answer {
                        code: 1,
                        out: String::new(),
                        err: e.to_string(),
                    }),
                }
            }
        }
    }
}

/// The link of every host of a plan ("" for a local rollout).
pub struct Links(BTreeMap<String, Link>);

impl Links {
    /// Links for `plan`: the operator's identity is loaded once; each host is reached at its
    /// address in today's inventory (the plan's if it was removed since).
    pub fn new(dir: &Path, plan: &Plan) -> Result<Links, Fail> {
        let mut m = BTreeMap::new();
        if plan.hosts.is_empty() {
            m.insert(String::new(), Link::Local(dir.to_path_buf()));
            return Ok(Links(m));
        }
        let op = Operator::load(dir).map_err(|e| match e {
            ClientError::Files(f) => Fail::new(f.exit_code(), f.to_string()),
            e => Fail::new(1, e.to_string()),
        })?;
        let now: BTreeMap<String, String> = inventory::load(dir)
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, h.address))
            .collect();
        for (name, planned) in &plan.hosts {
            let address = now.get(name).unwrap_or(planned).clone();
            m.insert(
                name.clone(),
                Link::Fleet {
                    op: op.clone(),
                    host: Host {
                        name: name.clone(),
                        address,
                    },
                    timeout: Duration::from_millis(plan.host_timeout_ms.max(1)),
                },
            );
        }
        Ok(Links(m))
    }

    /// The link to `host`.
    pub fn get(&self, host: &str) -> Result<&Link, Unreached> {
        self.0
            .get(host)
            .ok_or_else(|| Unreached(format!("{host:?} is not a host of this rollout")))
    }
}
