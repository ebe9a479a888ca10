//! The fleet bench: one patch rolled out across 3 hosts (network namespaces, one live guest
//! each, Garage as their remote) against the alternative measured in the same run: copying
//! the new full image to each host from the same Garage with rclone and rebooting each guest on
//! the copy. It runs as the e2e suite's ignored test `fleet_rollout::bench_fleet_rollout_vs_copy_and_reboot`,
//! whose `BENCH fleet-*` lines are parsed here. Invariant: a figure not in the test's output
//! is a BENCH-SKIP line naming why.

use crate::report::{Better, Metric, Report};
use crate::vm::run_test;
use crate::Env;

const TEST: &str = "fleet_rollout::bench_fleet_rollout_vs_copy_and_reboot";
const TIME: &str = "fleet_rollout_3_hosts_vs_copy_and_reboot";
const BYTES: &str = "fleet_rollout_bytes_per_host_vs_full_copy";

pub fn run(env: &Env, rep: &mut Report) {
    match run_test(env, TEST).and_then(|o| metrics(&o)) {
        Ok(ms) => ms.into_iter().for_each(|m| rep.add(m)),
        Err(why) => [TIME, BYTES].iter().for_each(|n| rep.skip(n, why.clone())),
    }
}

/// The number after each `BENCH <key> ` (one sample per line). Anywhere in the line: with
/// --nocapture the test harness's `test NAME ... ` can stand before the first one.
fn samples(out: &str, key: &str) -> Vec<f64> {
    let tag = format!("BENCH {key} ");
    out.lines()
        .filter_map(|l| l.find(&tag).map(|i| &l[i + tag.len()..]))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect()
}

fn metrics(out: &str) -> Result<Vec<Metric>, String> {
    let (ours, peer) = (
        samples(out, "fleet-rollout seconds"),
        samples(out, "fleet-copy seconds"),
    );
    let (ours_b, peer_b) = (
        samples(out, "fleet-rollout host-bytes"),
        samples(out, "fleet-copy host-bytes"),
    );
    if ours.is_empty() || peer.is_empty() || ours_b.is_empty() || peer_b.is_empty() {
        return Err("the fleet test printed no fleet-rollout/fleet-copy figures".into());
    }
    let mut time = Metric::new(
        TIME,
        "s",
        Better::Lower,
        "rclone copyto of the full new image (512 MiB ext4) from the same Garage to each of \
         the 3 hosts, then a QEMU guest booted on each copy until its agent hashes the new file \
         (hosts side by side; stopping the old guest not counted); ours: `imagefs rollout NEW \
         --hosts 'h*' --by host --waves 1,100% --health-cmd` from the operator's namespace to \
         the 3 live guests, each host pulling the new version's one changed block",
        "report",
    );
    time.ours = ours;
    time.peer = peer;
    let mut bytes = Metric::new(
        BYTES,
        "bytes",
        Better::Lower,
        "bytes rclone received per host (the full image); ours: bytes each host fetched for the \
         new version (`remote stats`, per version)",
        "report",
    );
    bytes.ours = ours_b;
    bytes.peer = peer_b;
    Ok(vec![time, bytes])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fleet_tests_lines() {
        let out = "test fleet_rollout::bench ... BENCH fleet-rollout seconds 2.5\n\
            BENCH fleet-rollout host-bytes 4096 h1\n\
            BENCH fleet-rollout host-bytes 4096 h2\nBENCH fleet-copy seconds 12.0\n\
            BENCH fleet-copy host-bytes 33554432 h1\nBENCH fleet-rollout seconds 2.7\n";
        let m = metrics(out).unwrap();
        assert_eq!(m[0].ours, vec![2.5, 2.7]);
        assert_eq!(m[0].peer, vec![12.0]);
        assert_eq!(m[1].ours_median(), 4096.0);
        assert_eq!(m[1].peer, vec![33554432.0]);
        assert!(metrics("BENCH fleet-rollout seconds 1").is_err());
    }
}
