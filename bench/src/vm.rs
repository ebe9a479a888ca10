//! VM benches: boot time and in-guest disk reads, our vmm against QEMU (KVM) on the same kernel,
//! initramfs and disk, both inside the same nested VM. They run as the e2e suite's ignored
//! benchmark tests (tests/e2e/vm_bench.rs, on the nested-KVM harness), whose summary lines are
//! parsed here. Invariant: a figure that is not in the test's output is a BENCH-SKIP line naming
//! why, never a number.

use std::process::Command;

use crate::report::{Better, Metric, Report};
use crate::sys::{self, Result};
use crate::Env;

const BOOT: [&str; 2] = ["vm_boot_to_init_vs_qemu", "vm_rss_at_init_vs_qemu"];
const AGENT_READY: &str = "vm_boot_to_agent_ready_vs_qemu";
const AGENT_RSS: &str = "vm_vmrss_at_agent_ready_vs_qemu";
const DISK: [&str; 4] = [
    "vm_guest_seq_read_1m_mount_vs_qemu_raw",
    "vm_guest_randread_4k_mount_vs_qemu_raw",
    "vm_guest_seq_read_1m_raw_vs_qemu_raw",
    "vm_guest_randread_4k_raw_vs_qemu_raw",
];
pub fn run(env: &Env, rep: &mut Report) {
    let boot = run_test(env, "vm::bench::bench_boot_to_init_vmm_vs_qemu")
        .and_then(|out| boot_metrics(&out));
    match boot {
        Ok(ms) => ms.into_iter().for_each(|m| rep.add(m)),
        Err(why) => BOOT.iter().for_each(|n| rep.skip(n, why.clone())),
    }
    let disk =
        run_test(env, "vm::bench::bench_disk_reads_vmm_vs_qemu").and_then(|out| disk_metrics(&out));
    match disk {
        Ok(ms) => ms.into_iter().for_each(|m| rep.add(m)),
        Err(why) => DISK.iter().for_each(|n| rep.skip(n, why.clone())),
    }
}

/// Runs one ignored e2e benchmark test (release build, into the bench's cargo target dir) and
/// returns its output; an error line saying why when it did not run.
pub fn run_test(env: &Env, test: &str) -> std::result::Result<String, String> {
    eprintln!("bench: running {test} (builds the e2e tests first)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out: Result<_> = sys::run(
        Command::new(cargo)
            .env("CARGO_TARGET_DIR", &env.cargo_target)
            .args(["test", "--release", "-p", "imagefs-tests", "--test", "e2e"])
            .args(["--", "--ignored", "--exact", test])
            .args(["--nocapture", "--test-threads=1"]),
    );
    let out = out.map_err(|e| format!("{test} failed: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(l) = text.lines().find(|l| l.contains("*** SKIPPED")) {
        return Err(l.trim_matches(|c| c == '*' || c == ' ').to_string());
    }
    Ok(text)
}

/// The first number in `line` after `key`.
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = line.split_once(key)?.1;
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

fn find_line<'a>(out: &'a str, prefix: &str) -> std::result::Result<&'a str, String> {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| format!("the test printed no {prefix:?} line"))
}

/// `BENCH boot vmm: start->/init 1.23s, start->exit 2.34s, RSS beyond guest RAM at /init 45.6 MiB`
fn boot_metrics(out: &str) -> std::result::Result<Vec<Metric>, String> {
    let runs = number_after(
        find_line(out, "BENCH boot ratio")?,
        "QEMU to /init (nested VM,",
    );
    let note = format!(
        "medians of {} runs each, as printed by the test",
        runs.map_or("?".into(), |r| r.to_string())
    );
    let mut init = Metric::new(
        BOOT[0],
        "s",
        Better::Lower,
        &format!("QEMU q35 -accel kvm, same kernel+initramfs, process start to /init ({note})"),
        "faster than QEMU (ratio < 1)",
    );
    let mut rss = Metric::new(
        BOOT[1],
        "MiB",
        Better::Lower,
        &format!(
            "QEMU's RSS outside the 256 MiB guest-RAM mapping at the guest's /init, both read \
             from /proc/$!/smaps ({note})"
        ),
        "report",
    );
    for (who, side) in [("vmm", 0), ("qemu", 1)] {
        let l = find_line(out, &format!("BENCH boot {who}:"))?;
        let t = number_after(l, "start->/init").ok_or("no start->/init figure")?;
        let r = number_after(l, "at /init").ok_or("no RSS figure")?;
        let (ti, ri) = if side == 0 {
            (&mut init.ours, &mut rss.ours)
        } else {
            (&mut init.peer, &mut rss.peer)
        };
        ti.push(t);
        ri.push(r);
    }
    let mut v = vec![init, rss];
    v.extend(agent_ready(out, &note));
    v.extend(agent_rss(out));
    Ok(v)
}

/// `BENCH boot-agent vmm: start->agent-ready 1.23s, ...`: process start to the guest agent
/// answering (guest-agent initramfs, root=none), when both sides have it.
fn agent_ready(out: &str, note: &str) -> Option<Metric> {
    let fig = |who: &str| {
        let l = find_line(out, &format!("BENCH boot-agent {who}:")).ok()?;
        number_after(l, "start->agent-ready").filter(|v| v.is_finite())
    };
    let mut m = Metric::new(
        AGENT_READY,
        "s",
        Better::Lower,
        &format!(
            "QEMU q35 -accel kvm, same kernel and guest-agent initramfs (root=none), process \
             start to the agent's ready line ({note})"
        ),
        "faster than QEMU (ratio < 1)",
    );
    m.ours.push(fig("vmm")?);
    m.peer.push(fig("qemu")?);
    Some(m)
}

/// `BENCH boot-agent vmm: start->agent-ready 1.23s, VmRSS at agent-ready 45.6 MiB (...)`: the
/// whole process's VmRSS (found by name, guest RAM it touched included), when both sides have it.
fn agent_rss(out: &str) -> Option<Metric> {
    let fig = |who: &str| {
        let l = find_line(out, &format!("BENCH boot-agent {who}:")).ok()?;
        number_after(l, "VmRSS at agent-ready").filter(|v| v.is_finite())
    };
    let mut m = Metric::new(
        AGENT_RSS,
        "MiB",
        Better::Lower,
        "QEMU q35 -accel kvm's VmRSS (process found by name) when the guest agent says ready; \
         both 256 MiB guests, guest-agent initramfs; includes the guest RAM each touched",
        "report",
    );
    m.ours.push(fig("vmm")?);
    m.peer.push(fig("qemu")?);
    Some(m)
}

/// `BENCH disk <what>: sequential 1 MiB 12.3 MiB/s, random 4 KiB 456 IOPS (...)`
fn disk_metrics(out: &str) -> std::result::Result<Vec<Metric>, String> {
    let fig = |what: &str| -> std::result::Result<(f64, f64), String> {
        let l = find_line(out, &format!("BENCH disk {what}:"))?;
        let seq = number_after(l, "sequential 1 MiB").ok_or("no sequential figure")?;
        let rand = number_after(l, "random 4 KiB").ok_or("no random figure")?;
        Ok((seq, rand))
    };
    let qemu = fig("QEMU virtio-blk, raw file")?;
    let mount = fig("our vmm, image on the imagefs mount")?;
    let raw = fig("our vmm, raw file")?;
    let peer = "QEMU q35 -accel kvm virtio-blk-pci on the raw file, O_DIRECT reads in the guest \
                (medians of the test's runs)";
    let mut v = Vec::new();
    for (i, (ours, goal)) in [(mount, ">= 0.8x"), (raw, "report")]
        .into_iter()
        .enumerate()
    {
        let mut s = Metric::new(
            DISK.get(2 * i).copied().unwrap_or("?"),
            "MiB/s",
            Better::Higher,
            peer,
            goal,
        );
        s.ours.push(ours.0);
        s.peer.push(qemu.0);
        let mut r = Metric::new(
            DISK.get(2 * i + 1).copied().unwrap_or("?"),
            "IOPS",
            Better::Higher,
            peer,
            goal,
        );
        r.ours.push(ours.1);
        r.peer.push(qemu.1);
        v.push(s);
        v.push(r);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tests_summary_lines() {
        let out = "noise\n\
            BENCH boot vmm: start->/init 1.50s, start->exit 2.00s, RSS beyond guest RAM at /init 40.5 MiB\n\
            BENCH boot qemu: start->/init 3.00s, start->exit 4.00s, RSS beyond guest RAM at /init 90.0 MiB\n\
            BENCH boot ratio: vmm is 2.00x faster than QEMU to /init (nested VM, 5 runs each)\n\
            BENCH disk our vmm, raw file: sequential 1 MiB 100.0 MiB/s, random 4 KiB 2000 IOPS (x)\n\
            BENCH disk our vmm, image on the imagefs mount: sequential 1 MiB 80.0 MiB/s, random 4 KiB 1500 IOPS (x)\n\
            BENCH disk QEMU virtio-blk, raw file: sequential 1 MiB 50.0 MiB/s, random 4 KiB 1000 IOPS (x)\n";
        let b = boot_metrics(out).unwrap();
        assert_eq!(
            b[0].line(),
            "BENCH vm_boot_to_init_vs_qemu ours=1.50 peer=3.00 unit=s ratio=0.500 better=lower"
        );
        assert_eq!(b[1].ours, vec![40.5]);
        assert_eq!(b.len(), 2, "no agent-ready lines, no agent metrics");
        let agent = format!(
            "{out}BENCH boot-agent vmm: start->agent-ready 1.00s, VmRSS at agent-ready 60.0 MiB (x)\n\
             BENCH boot-agent qemu: start->agent-ready 2.00s, VmRSS at agent-ready 120.0 MiB (x)\n"
        );
        let b = boot_metrics(&agent).unwrap();
        assert_eq!(b[2].name, "vm_boot_to_agent_ready_vs_qemu");
        assert_eq!((b[2].ours_median(), b[2].peer_median()), (1.0, 2.0));
        assert_eq!(b[3].name, "vm_vmrss_at_agent_ready_vs_qemu");
        assert_eq!((b[3].ours_median(), b[3].peer_median()), (60.0, 120.0));
        let d = disk_metrics(out).unwrap();
        assert_eq!(d[0].name, "vm_guest_seq_read_1m_mount_vs_qemu_raw");
        assert_eq!((d[0].ours_median(), d[0].peer_median()), (80.0, 50.0));
        assert_eq!((d[3].ours_median(), d[3].peer_median()), (2000.0, 1000.0));
        assert!(boot_metrics("nothing").is_err());
    }
}
