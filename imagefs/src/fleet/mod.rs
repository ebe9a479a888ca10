//! `imagefs fleet`: the operator's side of a fleet of hosts, each running its own daemon with
//! `mount --listen ADDR:PORT --tls-dir DIR` (daemon/tls.rs). The CA and the operator's client
//! certificate (certs.rs) and the inventory (inventory.rs) live in STORE/fleet/; client.rs runs
//! one command on one host over mutual TLS; status.rs asks every host at once.
//! Invariant: a host is known by the name it was added under, and its certificate must carry
//! that name; the address is only where to connect.

pub mod certs;
pub mod client;
pub mod inventory;
pub mod status;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use crate::cli::output::Out;
use crate::cli::CliError;

/// `imagefs fleet ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum FleetCommand {
    /// The fleet's certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
    /// Write what host NAME needs for `mount --tls-dir DIR`: ca.pem, cert.pem (DNS name NAME,
    /// for serving only) and key.pem (DIR is made 0700, the key 0600)
    Cert {
        /// The host's name, as it will be added to the inventory (a DNS name, not an address).
        name: String,
        /// The directory to write the three files to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a host to the inventory: its name (what its certificate says) and where to reach it
    Add {
        /// The host's name.
        name: String,
        /// HOST:PORT its daemon listens on (--listen).
        address: String,
    },
    /// Remove a host from the inventory
    Rm {
        /// The host's name.
        name: String,
    },
    /// List the hosts in the inventory
    Ls,
    /// Ask every host at once: reachable, imagefs version, versions, instances, VMs. Hosts
    /// that do not answer in time are marked unreachable (exit 0 all the same)
    Status {
        /// Time each host gets in all (at most 10 s of it to connect): 500ms, 10s, 2m.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// `imagefs fleet ca ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum CaCommand {
    /// Make the fleet CA and the operator's client certificate, kept in STORE/fleet/ (0600)
    Init,
}

pub use crate::cli::parse_duration;

/// Runs `cmd` on the operator's store in `dir`; returns the exit code.
pub fn run(dir: &Path, cmd: &FleetCommand, json: bool) -> i32 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = run_on(dir, cmd, &mut Out::new(&mut out, json));
    match result {
        Ok(()) => 0,
        Err(e) => crate::cli::report(&e, json, &mut out, &mut std::io::stderr()),
    }
}

impl From<certs::CertError> for CliError {
    fn from(e: certs::CertError) -> CliError {
        CliError::new(e.exit_code(), e.to_string())
    }
}

impl From<inventory::InventoryError> for CliError {
    fn from(e: inventory::InventoryError) -> CliError {
        CliError::new(e.exit_code(), e.to_string())
    }
}

impl From<client::ClientError> for CliError {
    fn from(e: client::ClientError) -> CliError {
        let code = match &e {
            client::ClientError::Files(f) => f.exit_code(),
            _ => 1,
        };
        CliError::new(code, e.to_string())
    }
}

fn run_on(dir: &Path, cmd: &FleetCommand, o: &mut Out<'_>) -> Result<(), CliError> {
    if !dir.is_dir() {
        return Err(CliError::new(
            3,
            format!("no store at {} (imagefs init)", dir.display()),
        ));
    }
    match cmd {
        FleetCommand::Ca(CaCommand::Init) => {
            let at = certs::init_ca(dir)?;
            let human = format!(
                "fleet CA and operator certificate in {} (keep ca.key safe: it makes hosts)",
                at.display()
            );
            o.result(json!({"fleet_dir": at.display().to_string()}), &human)
        }
        FleetCommand::Cert { name, out } => {
            certs::write_host_files(dir, name, out)?;
            let human = format!(
                "{}: ca.pem, cert.pem, key.pem for host {name} (imagefs mount ... --listen \
                 ADDR:PORT --tls-dir {})",
                out.display(),
                out.display()
            );
            o.result(
                json!({"host": name, "dir": out.display().to_string()}),
                &human,
            )
        }
        FleetCommand::Add { name, address } => {
            inventory::add(dir, name, address)?;
            o.result(
                json!({"added": name, "address": address}),
                &format!("added {name} at {address}"),
            )
        }
        FleetCommand::Rm { name } => {
            inventory::remove(dir, name)?;
            o.result(json!({"removed": name}), &format!("removed {name}"))
        }
        FleetCommand::Ls => {
            let hosts = inventory::load(dir)?;
            let mut text = format!("{:<24} ADDRESS\n", "HOST");
            for h in &hosts {
                text.push_str(&format!("{:<24} {}\n", h.name, h.address));
            }
            o.result(json!({"hosts": hosts}), &text)
        }
        FleetCommand::Status { timeout } => {
            let hosts = inventory::load(dir)?;
            let op = client::Operator::load(dir)?;
            let all = status::ask_all(&op, hosts, *timeout);
            let up = all.iter().filter(|s| s.error.is_none()).count();
            let mut text = format!(
                "{:<16} {:<22} {:<12} {:<8} {:>8} {:>9} {:>4}\n",
                "HOST", "ADDRESS", "STATE", "IMAGEFS", "VERSIONS", "INSTANCES", "VMS"
            );
            let mut notes = String::new();
            for s in &all {
                let count = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
                let (state, ver) = match &s.error {
                    None => (
                        "reachable",
                        s.daemon["imagefs"].as_str().unwrap_or("?").to_string(),
                    ),
                    Some(e) => {
                        notes.push_str(&format!("{}: unreachable: {e}\n", s.host.name));
                        ("UNREACHABLE", "-".to_string())
                    }
                };
                for w in &s.warnings {
                    notes.push_str(&format!("{}: {w}\n", s.host.name));
                }
                let n = |k: usize| match s.error {
                    None => k.to_string(),
                    Some(_) => "-".to_string(),
                };
                text.push_str(&format!(
                    "{:<16} {:<22} {:<12} {:<8} {:>8} {:>9} {:>4}\n",
                    s.host.name,
                    s.host.address,
                    state,
                    ver,
                    n(count(&s.store["versions"])),
                    n(s.instances.len()),
                    n(s.vms.len())
                ));
            }
            text.push_str(&notes);
            let hosts: Vec<serde_json::Value> =
                all.iter().map(status::HostStatus::to_json).collect();
            o.result(
                json!({"hosts": hosts, "reachable": up, "unreachable": all.len() - up}),
                &text,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_zero_is_refused() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["0s", "s", "10h", "-1s", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
