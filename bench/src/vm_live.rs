//! Live-VM benches: substitution of 1,000 changed blocks into a running guest against rebooting
//! onto the new version, and a rollout across 8 live VMs. They run as the e2e suite's ignored
//! test `vm::bench::bench_live_substitute_and_rollout` (guests from `imagefs vm start` on the
//! host), whose `BENCH live-*` lines are parsed here. Invariant: a figure not in the test's output
//! is a BENCH-SKIP line naming why; the rollout's peer is labelled as an estimate, never as a run.

use crate::report::{Better, Metric, Report};
use crate::vm::run_test;
use crate::Env;

const SUB: &str = "vm_substitute_1000_blocks_live_vs_reboot";
const SUB_ACK: &str = "vm_substitute_1000_blocks_live_to_ack_vs_reboot";
const ROLLOUT: &str = "rollout_8_vms";

pub fn run(env: &Env, rep: &mut Report) {
    match run_test(env, "vm::bench::bench_live_substitute_and_rollout").and_then(|o| metrics(&o)) {
        Ok(ms) => ms.into_iter().for_each(|m| rep.add(m)),
        Err(why) => [SUB, SUB_ACK, ROLLOUT]
            .iter()
            .for_each(|n| rep.skip(n, why.clone())),
    }
}

/// Every number on lines starting with `BENCH <key> ` (one sample per line).
fn samples(out: &str, key: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("BENCH {key} ")))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The hypervisor `vm ls` named for the guests (`BENCH live boot-1: 3.3s (hypervisor qemu)`).
fn hypervisor(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("BENCH live boot-1:"))
        .and_then(|l| l.split_once("(hypervisor "))
        .map(|(_, h)| h.trim_end_matches(')').to_string())
        .unwrap_or_else(|| "?".into())
}

fn metrics(out: &str) -> Result<Vec<Metric>, String> {
    let (ours, reboot) = (
        samples(out, "live-sub ours"),
        samples(out, "live-sub reboot"),
    );
    let rollout = samples(out, "live-rollout ours");
    if ours.is_empty() || reboot.is_empty() || rollout.is_empty() {
        return Err("the live test printed no live-sub/live-rollout figures".into());
    }
    let hv = hypervisor(out);
    let mut sub = Metric::new(
        SUB,
        "ms",
        Better::Lower,
        &format!(
            "`vm stop` + `vm start` of a fresh VM on v2 (hypervisor {hv}) until the guest's \
             `agent hash` answers v2's hash; ours: `imagefs substitute` start to the same answer \
             in the live guest (1,000 changed 4 KiB blocks, all of one file)"
        ),
        "<= 50 ms",
    );
    sub.ours = ours.iter().map(|s| s * 1000.0).collect();
    sub.peer = reboot.iter().map(|s| s * 1000.0).collect();
    let mut to_ack = Metric::new(
        SUB_ACK,
        "ms",
        Better::Lower,
        &format!(
            "the same reboot; ours: `imagefs substitute` start to its return, which waits for \
             the agent's ack (the guest reads the new bytes from then on); the metric above adds \
             the guest hashing the 4 MiB file, its probe (hypervisor {hv})"
        ),
        "report",
    );
    to_ack.ours = samples(out, "live-sub command")
        .iter()
        .map(|s| s * 1000.0)
        .collect();
    to_ack.peer = sub.peer.clone();
    let mut roll = Metric::new(
        ROLLOUT,
        "s",
        Better::Lower,
        &format!(
            "ESTIMATE, not run: 8 x the median stop+fresh-boot time measured for {SUB} \
             (8 sequential reboots); ours: `imagefs rollout --waves 1,100% --health-cmd` across \
             8 live VMs (hypervisor {hv})"
        ),
        "report",
    );
    roll.ours = rollout;
    roll.peer = vec![8.0 * crate::report::median(&reboot)];
    let mut v = vec![sub];
    if !to_ack.ours.is_empty() {
        v.push(to_ack);
    }
    v.push(roll);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_live_tests_lines() {
        let out = "BENCH live boot-1: 3.34s (hypervisor qemu)\n\
            BENCH live-sub ours 0.0839\nBENCH live-sub ours 0.0700\nBENCH live-sub ours 0.0718\n\
            BENCH live-sub reboot 3.4544\nBENCH live-sub reboot 3.4313\n\
            BENCH live boot-8: 11.03s\nBENCH live-rollout ours 1.2586\n";
        let m = metrics(out).unwrap();
        assert_eq!(m[0].ours_median(), 71.8);
        assert!(m[0].peer_is.contains("hypervisor qemu"));
        assert_eq!(m.len(), 2, "no command lines, no to-ack metric");
        assert_eq!(m[1].ours, vec![1.2586]);
        assert!(m[1].peer_is.starts_with("ESTIMATE"));
        let with_ack =
            format!("{out}BENCH live-sub command 0.0150\nBENCH live-sub command 0.0120\n");
        let m = metrics(&with_ack).unwrap();
        assert_eq!(m[1].name, SUB_ACK);
        assert_eq!(m[1].ours_median(), 13.5);
        assert_eq!(m[2].name, ROLLOUT);
        assert!(metrics("nothing").is_err());
    }
}
