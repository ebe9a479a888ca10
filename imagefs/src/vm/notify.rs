//! Telling a live guest that its disk changed under it: after `substitute` has retargeted an
//! instance and invalidated the host page cache, the VM running on it (if any) gets a
//! `SubstitutionNotice` (device, merged changed ranges, the guest files in them) and we wait for
//! its acknowledgement. Invariant: a substitution never fails because of the guest: no live VM,
//! an unreadable filesystem or a silent agent become a warning in the report, not an error.

use std::time::{Duration, Instant};

use agent_proto::{AgentClient, AgentLink, Range, SubstitutionNotice};
use imagefs_store::instance::SubstituteOutcome;
use imagefs_store::Store;
use serde_json::{json, Value};

use super::registry;
use crate::guest_files::changed_files;

/// The guest's root disk, as both hypervisors present the instance.
const DEVICE: &str = "/dev/vda";
/// How long the guest gets to drop its caches and answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends the notice for `outcome` to the live VM on its instance and reports what happened as
/// JSON (`guest`: "told" | "not told", with times, the agent's steps and affected processes).
pub fn tell_guest(store: &Store, outcome: &SubstituteOutcome) -> Value {
    let Some(vm) = registry::live_on_instance(store.dir(), &outcome.instance) else {
        return json!({"guest": "not told", "warning": format!(
            "no live VM runs on instance {}: the guest was not told", outcome.instance)});
    };
    if outcome.changed.is_empty() {
        return json!({"guest": "not told", "vm": vm.name, "warning": "nothing changed"});
    }
    let t = Instant::now();
    let ranges: Vec<[u64; 2]> = outcome.changed.iter().map(|r| [r.offset, r.len]).collect();
    let (files, metadata) = match changed_files(store, &outcome.from, &outcome.to, &ranges) {
        Some(f) => f,
        // Unknown files: the guest drops everything it cached of the device.
        None => (Vec::new(), true),
    };
    let files_us = t.elapsed().as_micros() as u64;
    let notice = SubstitutionNotice::new(
        DEVICE,
        outcome
            .changed
            .iter()
            .map(|r| Range {
                offset: r.offset,
                len: r.len,
            })
            .collect(),
        files.clone(),
        metadata,
    );
    let t = Instant::now();
    let ack = AgentClient::new(&vm.agent_socket)
        .with_timeout(ACK_TIMEOUT)
        .notice(&notice);
    let notify_us = t.elapsed().as_micros() as u64;
    match &ack {
        Ok(_) => crate::metrics::agent_round_trip("notice", t.elapsed()),
        Err(_) => crate::metrics::agent_failure("notice"),
    }
    match ack {
        Ok(ack) => json!({"guest": "told", "vm": vm.name, "files": notice.files,
            "files_truncated": notice.files_truncated, "metadata_changed": metadata,
            "files_us": files_us, "notify_us": notify_us, "ack": ack}),
        Err(e) => json!({"guest": "not told", "vm": vm.name, "files": notice.files,
            "files_us": files_us, "notify_us": notify_us,
            "warning": format!("the agent of VM {} did not acknowledge: {e}", vm.name)}),
    }
}
