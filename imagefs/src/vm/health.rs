//! A guest's health verdict through its agent: the health command exits 0 in time, then every
//! changed file hashes to the target version's bytes. `imagefs vm check` runs it in the daemon
//! of the host the VM runs on, so a fleet rollout checks guests through each host's daemon.

use std::collections::BTreeMap;
use std::time::Instant;

use agent_proto::{AgentLink, Command, ExecRequest};

/// What to check in one guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSpec {
    /// Run under /bin/sh -c in the guest; must exit 0 within `timeout_ms`.
    pub cmd: Option<String>,
    pub timeout_ms: u64,
    /// Guest file -> blake3 it must read as.
    pub expected: BTreeMap<String, String>,
}

/// Why a guest is not healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// The agent answered: the check failed (the reason quotes the guest)
    #[error("{0}")]
    Verdict(String),
    /// The agent did not answer
    #[error("{0}")]
    NoAnswer(String),
}

/// The verdict through `agent`: Ok(detail) when healthy.
pub fn check(
    agent: &dyn AgentLink,
    spec: &HealthSpec,
    instance: &str,
) -> Result<String, Unhealthy> {
    use Unhealthy::{NoAnswer, Verdict};
    let t = Instant::now();
    if let Some(cmd) = &spec.cmd {
        let r = agent
            .exec(ExecRequest {
                command: Command::Shell(cmd.clone()),
                timeout_ms: spec.timeout_ms,
            })
            .map_err(|e| NoAnswer(format!("{instance}: health check: {e}")))?;
        if r.timed_out {
            return Err(Verdict(format!(
                "{instance}: health check timed out after {} ms",
                spec.timeout_ms
            )));
        }
        if r.exit_code != Some(0) {
            return Err(Verdict(format!(
                "{instance}: health check exited {:?}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr_bytes())
                    .trim()
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        }
    }
    for (path, want) in &spec.expected {
        let h = agent
            .hash(path)
            .map_err(|e| NoAnswer(format!("{instance}: hash of {path}: {e}")))?;
        if &h.blake3 != want {
            return Err(Verdict(format!(
                "{instance}: {path} reads {} in the guest, the target has {}",
                short(&h.blake3),
                short(want)
            )));
        }
    }
    Ok(format!(
        "healthy ({} file hash(es) match, {} ms)",
        spec.expected.len(),
        t.elapsed().as_millis()
    ))
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Parses `--expect PATH=BLAKE3` (the hash is 64 hex digits; the path may hold '=').
pub fn parse_expect(s: &str) -> Result<(String, String), String> {
    let (path, hash) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?} is not PATH=BLAKE3"))?;
    if !path.starts_with('/') {
        return Err(format!("{path:?}: a guest path is absolute"));
    }
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{hash:?} is not a blake3 (64 hex digits)"));
    }
    Ok((path.to_string(), hash.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::{ClientError, ExecReply, HashReply, NoticeAck, Pong, SubstitutionNotice};

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

    fn spec() -> HealthSpec {
        HealthSpec {
            cmd: Some("/opt/app/check".into()),
            timeout_ms: 1000,
            expected: [("/opt/app/version".to_string(), "a".repeat(64))].into(),
        }
    }

    #[test]
    fn healthy_needs_exit_zero_in_time_and_every_hash_to_match() {
        let good = Canned {
            exit: Some(0),
            timed_out: false,
            hash: "a".repeat(64),
        };
        assert!(check(&good, &spec(), "web-1").is_ok());
        let failing = Canned {
            exit: Some(1),
            ..good
        };
        assert!(check(&failing, &spec(), "web-1")
            .unwrap_err()
            .to_string()
            .contains("exited Some(1)"));
        let slow = Canned {
            exit: None,
            timed_out: true,
            hash: "a".repeat(64),
        };
        assert!(check(&slow, &spec(), "web-1")
            .unwrap_err()
            .to_string()
            .contains("timed out"));
        let stale = Canned {
            exit: Some(0),
            timed_out: false,
            hash: "c".repeat(64),
        };
        let e = check(&stale, &spec(), "web-1").unwrap_err();
        assert!(
            matches!(&e, Unhealthy::Verdict(w) if w.contains("/opt/app/version")),
            "{e}"
        );
    }

    #[test]
    fn expectations_parse_and_bad_ones_are_refused() {
        let h = "ab".repeat(32);
        assert_eq!(
            parse_expect(&format!("/a=b/c={h}")),
            Ok(("/a=b/c".to_string(), h.clone()))
        );
        assert!(parse_expect(&format!("rel={h}")).is_err());
        assert!(parse_expect("/a=xyz").is_err());
        assert!(parse_expect("/a").is_err());
    }
}
