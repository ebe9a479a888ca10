//! Benchmarks of the vmm against QEMU (KVM), both inside the same nested VM, run on demand:
//! `cargo test -p imagefs-tests --test e2e -- --ignored vm::bench:: --nocapture`. Boot: process
//! start to the guest's /init and to exit, and RSS outside the guest-RAM mapping at /init. Disk: sequential 1 MiB and random
//! 4 KiB O_DIRECT reads of a raw file inside the guest, measured by this test binary itself. Live:
//! substitution into a running `imagefs vm start` guest against a reboot, and an 8-VM rollout.
//! Invariant: every figure printed was measured in this run; cleanup runs on failure too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::ensure;
use imagefs_tests::nested::{self, Scenario};
use imagefs_tests::{bin, skip};

use super::{inner_initramfs_with, nested_vmm_with, prerequisites, INNER_CMDLINE};

/// QEMU and the firmware files it needs for a q35 -kernel boot, as (host, outer-VM path).
fn qemu_files() -> Vec<(PathBuf, &'static str)> {
    [
        ("/usr/bin/qemu-system-x86_64", "/bin/qemu-system-x86_64"),
        ("/usr/share/seabios/bios-256k.bin", "/qemu-fw/bios-256k.bin"),
        (
            "/usr/share/qemu/linuxboot_dma.bin",
            "/qemu-fw/linuxboot_dma.bin",
        ),
        ("/usr/share/qemu/kvmvapic.bin", "/qemu-fw/kvmvapic.bin"),
    ]
    .into_iter()
    .map(|(h, g)| (PathBuf::from(h), g))
    .collect()
}

/// The binary to measure: the release build beside the debug one when it exists (build it with
/// `cargo build --release -p vmm -p imagefs`), else the debug build.
fn bench_bin(name: &str) -> PathBuf {
    let debug = bin(name);
    let release = debug
        .parent()
        .and_then(std::path::Path::parent)
        .map(|target| target.join("release").join(name));
    match release {
        Some(r) if r.is_file() => r,
        _ => debug,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Benchmark (run with --ignored): process start to the guest's /init, and to process exit, for
/// our vmm and for QEMU (q35, KVM), same kernel and initramfs, inside the same nested VM; also
/// each one's RSS outside its 256 MiB guest-RAM mapping when /init runs. Prints medians and the ratio.
#[test]
#[ignore = "benchmark: cargo test -p imagefs-tests --test e2e -- --ignored vm::bench:: --nocapture"]
fn bench_boot_to_init_vmm_vs_qemu() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    bench_boot().unwrap_or_else(|e| panic!("{e:#}"));
}

fn bench_boot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let runs = 5;
    let outer = format!(
        "up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         watch() {{ while IFS= read -r l; do case \"$l\" in *BOOT-MARK*) \
           echo \"$(up) $(overhead $1)\";; esac; done; }}\n\
         overhead() {{ awk '/^[0-9a-f]+-[0-9a-f]+ /{{g=0}} /^Size:/{{if ($2 == 262144) g=1}} \
           /^Rss:/{{if (!g) s+=$2}} END{{print s+0}}' /proc/$1/smaps; }}\n\
         mkfifo /tmp/f\n\
         for i in $(seq {runs}); do\n\
           s=$(up); $VMM_BASE --console stdio --cmdline \"$CMDLINE quiet\" > /tmp/f & pid=$!\n\
           m=$(watch $pid < /tmp/f); wait $pid; e=$(up); echo \"RUN vmm $s $m $e\"\n\
           s=$(up); qemu-system-x86_64 -accel kvm -M q35 -cpu host -m 256 -nodefaults \
             -no-user-config -nographic -no-reboot -L /qemu-fw -serial stdio \
             -kernel /work/vmlinuz -initrd /work/inner.cpio \
             -append 'console=ttyS0 panic=-1 quiet' > /tmp/f & pid=$!\n\
           m=$(watch $pid < /tmp/f); wait $pid; e=$(up); echo \"RUN qemu $s $m $e\"\n\
         done\n\
         rss() {{ for p in /proc/[0-9]*; do if [ \"$(cat $p/comm 2>/dev/null)\" = \"$1\" ]; then \
           awk '/^VmRSS:/{{print $2}}' $p/status; return; fi; done; echo nan; }}\n\
         ready() {{ while IFS= read -r l; do case \"$l\" in *'ready on'*) \
           echo \"$(up) $(rss $2)\"; kill -9 $1;; esac; done; }}\n\
         if [ -f /work/agent.cpio.gz ]; then for i in $(seq {runs}); do\n\
           rm -f /tmp/a.sock; s=$(up); /bin/vmm --kernel /work/vmlinuz --initrd /work/agent.cpio.gz \
             --memory 256M --agent-socket /tmp/a.sock --console stdio \
             --cmdline \"$CMDLINE quiet root=none\" > /tmp/f & pid=$!\n\
           m=$(ready $pid vmm < /tmp/f); wait $pid; echo \"READY vmm $s $m\"\n\
           rm -f /tmp/q.sock; s=$(up); qemu-system-x86_64 -accel kvm -M q35 -cpu host -m 256 \
             -nodefaults -no-user-config -nographic -no-reboot -L /qemu-fw -serial stdio \
             -chardev socket,id=agent,path=/tmp/q.sock,server=on,wait=off \
             -device isa-serial,chardev=agent -kernel /work/vmlinuz -initrd /work/agent.cpio.gz \
             -append 'console=ttyS0 panic=-1 quiet root=none' > /tmp/f & pid=$!\n\
           m=$(ready $pid qemu-system-x86 < /tmp/f); wait $pid; echo \"READY qemu $s $m\"\n\
         done; fi"
    );
    let initrd = inner_initramfs_with(dir.path(), "echo BOOT-MARK; sleep 1", &[], &[])?;
    let vmm = bench_bin("vmm");
    println!("BENCH boot: measuring {}", vmm.display());
    let mut files = qemu_files();
    let agent_initramfs = imagefs_tests::workspace_root().join("target/guest/initramfs.cpio.gz");
    if agent_initramfs.is_file() {
        files.push((agent_initramfs, "/work/agent.cpio.gz"));
    } else {
        println!(
            "BENCH-SKIP boot to agent-ready: target/guest/initramfs.cpio.gz missing (make guest)"
        );
    }
    let o = nested_vmm_with(&vmm, &initrd, &outer, &files)?;
    let mut init = std::collections::HashMap::<String, Vec<f64>>::new();
    let mut total = std::collections::HashMap::<String, Vec<f64>>::new();
    let mut rss = std::collections::HashMap::<String, Vec<f64>>::new();
    for line in o.output.lines().filter(|l| l.starts_with("RUN ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(who), Some(s), Some(m), Some(r), Some(e)) =
            (f.get(1), f.get(2), f.get(3), f.get(4), f.get(5))
        else {
            anyhow::bail!("a run did not reach /init: {line}");
        };
        let (s, m, r, e): (f64, f64, f64, f64) = (s.parse()?, m.parse()?, r.parse()?, e.parse()?);
        init.entry(who.to_string()).or_default().push(m - s);
        total.entry(who.to_string()).or_default().push(e - s);
        rss.entry(who.to_string()).or_default().push(r / 1024.0);
    }
    for who in ["vmm", "qemu"] {
        let i = init.get(who).map(|v| median(v)).unwrap_or(f64::NAN);
        let t = total.get(who).map(|v| median(v)).unwrap_or(f64::NAN);
        let r = rss.get(who).map(|v| median(v)).unwrap_or(f64::NAN);
        println!("BENCH boot {who}: start->/init {i:.2}s, start->exit {t:.2}s, RSS beyond guest RAM at /init {r:.1} MiB");
    }
    let ratio = median(init.get("qemu").map(Vec::as_slice).unwrap_or_default())
        / median(init.get("vmm").map(Vec::as_slice).unwrap_or_default());
    println!("BENCH boot ratio: vmm is {ratio:.2}x faster than QEMU to /init (nested VM, {runs} runs each)");
    let mut ready = std::collections::HashMap::<String, Vec<f64>>::new();
    let mut vmrss = std::collections::HashMap::<String, Vec<f64>>::new();
    for line in o.output.lines().filter(|l| l.starts_with("READY ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(who), Some(s), Some(m)) = (f.get(1), f.get(2), f.get(3)) else {
            anyhow::bail!("a run did not reach agent-ready: {line}");
        };
        let (s, m): (f64, f64) = (s.parse()?, m.parse()?);
        ready.entry(who.to_string()).or_default().push(m - s);
        // VmRSS (kB) of the process found by name (not `$!`), read when the agent said ready.
        if let Some(r) = f.get(4).and_then(|r| r.parse::<f64>().ok()) {
            vmrss.entry(who.to_string()).or_default().push(r / 1024.0);
        }
    }
    if !ready.is_empty() {
        let med = |who: &str| ready.get(who).map(|v| median(v)).unwrap_or(f64::NAN);
        let rss = |who: &str| vmrss.get(who).map(|v| median(v)).unwrap_or(f64::NAN);
        for who in ["vmm", "qemu"] {
            println!(
                "BENCH boot-agent {who}: start->agent-ready {:.2}s, VmRSS at agent-ready {:.1} MiB \
                 (whole process incl. the guest RAM it touched, 256 MiB guest)",
                med(who),
                rss(who)
            );
        }
        println!(
            "BENCH boot-agent ratio: vmm is {:.2}x faster than QEMU to agent-ready (guest-agent \
             initramfs, root=none; nested VM, {runs} runs each)",
            med("qemu") / med("vmm")
        );
    }
    ensure!(
        init.get("vmm").map(Vec::len) == Some(runs),
        "vmm runs missing"
    );
    ensure!(
        init.get("qemu").map(Vec::len) == Some(runs),
        "qemu runs missing"
    );
    Ok(())
}

/// Inner-guest modules for both transports (our vmm: virtio-mmio; QEMU q35: virtio-pci).
const BOTH_TRANSPORTS: [&str; 7] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

/// Benchmark (run with --ignored): guest-side sequential 1 MiB and random 4 KiB O_DIRECT reads
/// of the same raw file, through our vmm's virtio-mmio block device and QEMU's virtio-blk-pci.
#[test]
#[ignore = "benchmark: cargo test -p imagefs-tests --test e2e -- --ignored vm::bench:: --nocapture"]
fn bench_disk_reads_vmm_vs_qemu() {
    if let Some(why) = prerequisites() {
        skip!("{why}");
    }
    bench_disk().unwrap_or_else(|e| panic!("{e:#}"));
}

fn bench_disk() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let me = std::env::current_exe()?;
    let guest = "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
                 PROBE_DEV=/dev/vda /bin/e2e vm::bench::disk_read_probe --exact --ignored \
                 --nocapture --test-threads=1 2>&1 | grep PROBE";
    let initrd = inner_initramfs_with(dir.path(), guest, &BOTH_TRANSPORTS, &[(me, "/bin/e2e")])?;
    let outer = format!(
        "dd if=/dev/urandom of=/tmp/disk.raw bs=1M count=128 2>/dev/null\n\
         export IMAGEFS_STORE=/tmp/store\n\
         imagefs init >/dev/null && imagefs import /tmp/disk.raw bench:v1 >/dev/null || exit 10\n\
         mkdir -p /tmp/m && imagefs mount /tmp/m --daemon || exit 11\n\
         i=0; while [ ! -e /tmp/m/images/bench/v1.raw ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
         for i in 1 2; do\n\
           /bin/vmm --kernel /work/vmlinuz --initrd /work/inner.cpio --memory 512M \
             --disk /tmp/m/images/bench/v1.raw,ro --console stdio --cmdline '{INNER_CMDLINE} quiet' \
             | grep PROBE | sed 's/^/mount /'\n\
           /bin/vmm --kernel /work/vmlinuz --initrd /work/inner.cpio --memory 512M \
             --disk /tmp/disk.raw --console stdio --cmdline '{INNER_CMDLINE} quiet' \
             | grep PROBE | sed 's/^/vmm /'\n\
           qemu-system-x86_64 -accel kvm -M q35 -cpu host -m 512 -nodefaults -no-user-config \
             -nographic -no-reboot -L /qemu-fw -serial stdio -kernel /work/vmlinuz \
             -initrd /work/inner.cpio -append 'console=ttyS0 panic=-1 quiet' \
             -drive file=/tmp/disk.raw,format=raw,if=virtio | grep PROBE | sed 's/^/qemu /'\n\
         done"
    );
    let mut sc = Scenario::new(&outer)
        .with_fuse()
        .file(bench_bin("vmm"), "/bin/vmm")
        .file(bench_bin("imagefs"), "/bin/imagefs")
        .file(nested::kernel(), "/work/vmlinuz")
        .file(&initrd, "/work/inner.cpio")
        .timeout(Duration::from_secs(900));
    for (h, g) in qemu_files() {
        sc = sc.file(h, g);
    }
    println!(
        "BENCH disk: measuring {} and {}",
        bench_bin("vmm").display(),
        bench_bin("imagefs").display()
    );
    let o = sc.run()?;
    eprintln!(
        "nested run took {:.1}s; output:\n{}",
        o.elapsed.as_secs_f64(),
        o.output
    );
    let mut seq = std::collections::HashMap::<&str, Vec<f64>>::new();
    let mut rand = std::collections::HashMap::<&str, Vec<f64>>::new();
    for line in o.output.lines() {
        let Some(who) = ["vmm", "mount", "qemu"]
            .into_iter()
            .find(|w| line.starts_with(&format!("{w} ")))
        else {
            continue;
        };
        for word in line.split_whitespace() {
            if let Some(v) = word.strip_prefix("seq_mib_s=").and_then(|v| v.parse().ok()) {
                seq.entry(who).or_default().push(v);
            }
            if let Some(v) = word.strip_prefix("rand_iops=").and_then(|v| v.parse().ok()) {
                rand.entry(who).or_default().push(v);
            }
        }
    }
    let get = |m: &std::collections::HashMap<&str, Vec<f64>>, k: &str| {
        m.get(k).map(|v| median(v)).unwrap_or(f64::NAN)
    };
    for (who, what) in [
        ("vmm", "our vmm, raw file"),
        ("mount", "our vmm, image on the imagefs mount"),
        ("qemu", "QEMU virtio-blk, raw file"),
    ] {
        println!(
            "BENCH disk {what}: sequential 1 MiB {:.1} MiB/s, random 4 KiB {:.0} IOPS (O_DIRECT in the guest, nested VM)",
            get(&seq, who),
            get(&rand, who)
        );
    }
    for who in ["vmm", "mount"] {
        println!(
            "BENCH disk ratio {who}/qemu: sequential {:.2}x, random {:.2}x (goal for mount >= 0.8x)",
            get(&seq, who) / get(&seq, "qemu"),
            get(&rand, who) / get(&rand, "qemu")
        );
    }
    ensure!(
        ["vmm", "mount", "qemu"].iter().all(|w| seq.contains_key(w)),
        "a run did not report"
    );
    Ok(())
}

/// Helper, not a test on its own: run inside the inner guest by the disk benchmark with
/// $PROBE_DEV set. Reads the device sequentially in 1 MiB O_DIRECT reads, then at random 4 KiB
/// offsets for 3 s, and prints both rates.
#[test]
#[ignore = "helper run inside the inner guest by bench_disk_reads_vmm_vs_qemu"]
fn disk_read_probe() {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let Some(dev) = std::env::var_os("PROBE_DEV") else {
        eprintln!("disk_read_probe is a helper run inside the benchmark's guest; nothing to do");
        return;
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap_or_else(|e| panic!("PROBE open failed: {e}"));
    let size = f.seek(SeekFrom::End(0)).unwrap_or(0);
    const MIB: usize = 1 << 20;
    // O_DIRECT wants an aligned buffer: take an aligned window of a larger one.
    let mut raw = vec![0u8; MIB + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let Some(buf) = raw.get_mut(off..off + MIB) else {
        panic!("PROBE cannot align a buffer");
    };
    let start = Instant::now();
    let mut pos = 0u64;
    while pos + MIB as u64 <= size {
        f.read_exact_at(buf, pos)
            .unwrap_or_else(|e| panic!("PROBE read failed: {e}"));
        pos += MIB as u64;
    }
    let seq = pos as f64 / MIB as f64 / start.elapsed().as_secs_f64();
    let blocks = (size / 4096).max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x % blocks) * 4096;
        let Some(small) = buf.get_mut(..4096) else {
            break;
        };
        f.read_exact_at(small, at)
            .unwrap_or_else(|e| panic!("PROBE read failed: {e}"));
        n += 1;
    }
    let iops = n as f64 / start.elapsed().as_secs_f64();
    println!("PROBE seq_mib_s={seq:.1} rand_iops={iops:.0}");
}

/// Live VMs for the substitution and rollout benchmarks: `imagefs vm start` guests (QEMU, software
/// emulation on a host without usable KVM) on the real mount. Dropping it stops every VM it may
/// have started and unmounts lazily, also when the benchmark fails half-way.
struct Live {
    store: PathBuf,
    mnt: PathBuf,
    names: Vec<String>,
}

impl Live {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = std::process::Command::new(bench_bin("imagefs"))
            .env("IMAGEFS_STORE", &self.store)
            .args(args)
            .output()?;
        ensure!(
            o.status.success(),
            "imagefs {args:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn hash(&self, vm: &str, file: &str) -> anyhow::Result<String> {
        let out = self.run(&["agent", "hash", "--vm", vm, file])?;
        Ok(out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// Polls the guest's hash of `file` until it is `want` (the guest may answer from its page
    /// cache for a moment); the time this takes is part of the measured interval.
    fn wait_hash(&self, vm: &str, file: &str, want: &str) -> anyhow::Result<Vec<Duration>> {
        let t = Instant::now();
        let mut polls = Vec::new();
        loop {
            let p = Instant::now();
            let got = self.hash(vm, file)?;
            polls.push(p.elapsed());
            if got == want {
                return Ok(polls);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "{vm} still reads {got} for {file}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `vm start SOURCE NAMES..` waiting for every agent; the names are remembered for cleanup.
    fn start(&mut self, source: &str, names: &[&str], k: &str, i: &str) -> anyhow::Result<()> {
        self.names.extend(names.iter().map(|n| n.to_string()));
        let mut a = vec![
            "vm",
            "start",
            source,
            "--hypervisor",
            "auto",
            "--wait",
            "240",
        ];
        a.extend(["--kernel", k, "--initrd", i]);
        a.extend(names);
        self.run(&a).map(drop)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut stop = vec!["vm", "stop", "--timeout", "3"];
        stop.extend(self.names.iter().map(String::as_str));
        let _ = self.run(&stop);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

/// Benchmark (run with --ignored), on the host with `imagefs vm start` guests: (1) one live guest
/// on v1; v2 changes 1,000 blocks of it (every block of a 4,096,000-byte file); the time from
/// `imagefs substitute` starting to the guest's `agent hash` of that file answering v2's hash,
/// against stopping the VM and booting a fresh one on v2 to the same point; (2) `imagefs rollout`
/// of v2 across 8 live VMs in one wave of 1 then the rest, with a health command.
#[test]
#[ignore = "benchmark: cargo test -p imagefs-tests --test e2e -- --ignored vm::bench:: --nocapture"]
fn bench_live_substitute_and_rollout() {
    if !imagefs_tests::is_root() {
        skip!("FUSE mounts need root here");
    }
    let (kernel, initrd) = match imagefs_tests::qemu::guest_artifacts() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    bench_live(&kernel, &initrd).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Benchmark (run with --ignored): only the live substitution of `bench_live_substitute_and_rollout`,
/// 5 runs, printing each run's steps: the `substitute --json` times, the agent's own steps and
/// the hash polls after it, to see where the interval goes.
#[test]
#[ignore = "benchmark: cargo test -p imagefs-tests --test e2e -- --ignored vm::bench:: --nocapture"]
fn bench_live_substitute_steps() {
    if !imagefs_tests::is_root() {
        skip!("FUSE mounts need root here");
    }
    let (kernel, initrd) = match imagefs_tests::qemu::guest_artifacts() {
        Ok(a) => a,
        Err(why) => skip!("{why}"),
    };
    let run = || -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut lv = live_setup(dir.path(), &kernel, &initrd)?;
        live_substitutions(&mut lv, 5, true)?;
        Ok(())
    };
    run().unwrap_or_else(|e| panic!("{e:#}"));
}

/// What the live benchmarks share: a mount serving v1 and v2 of a small ext4 root whose file
/// `FILE` (1,000 blocks of 4 KiB) is all that differs, and one live guest "solo" on v1.
struct LiveSetup {
    live: Live,
    h1: String,
    h2: String,
    kernel: String,
    initrd: String,
}

const FILE: &str = "/opt/data/blob";

fn live_setup(
    dir: &std::path::Path,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
) -> anyhow::Result<LiveSetup> {
    use anyhow::Context;
    use imagefs_tests::qemu::{build_rootfs, file_blocks};
    use std::os::unix::fs::FileExt;
    const BLOCKS: usize = 1000;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    let (d1, d2) = (noise(BLOCKS * 4096), noise(BLOCKS * 4096));
    let v1 = build_rootfs(dir, 48, &[(FILE, &d1)])?;
    let blocks = file_blocks(&v1, FILE)?;
    ensure!(blocks.len() == BLOCKS, "{FILE} has {} blocks", blocks.len());
    let v2 = dir.join("v2.img");
    std::fs::copy(&v1, &v2)?;
    {
        let f = std::fs::OpenOptions::new().write(true).open(&v2)?;
        for (i, b) in blocks.iter().enumerate() {
            let chunk = d2.get(i * 4096..(i + 1) * 4096).context("chunk")?;
            f.write_all_at(chunk, b * 4096)?;
        }
    }
    let (h1, h2) = (
        blake3::hash(&d1).to_hex().to_string(),
        blake3::hash(&d2).to_hex().to_string(),
    );
    let live = Live {
        store: dir.join("store"),
        mnt: dir.join("mnt"),
        names: Vec::new(),
    };
    std::fs::create_dir_all(&live.mnt)?;
    let p = |p: &std::path::Path| p.to_string_lossy().into_owned();
    live.run(&["init"])?;
    for (img, tag) in [(&v1, "bench:v1"), (&v2, "bench:v2")] {
        live.run(&["import", &p(img), tag, "--block-size", "4096"])?;
    }
    live.run(&["mount", &p(&live.mnt), "--daemon"])?;
    println!("BENCH live: measuring {}", bench_bin("imagefs").display());
    let mut s = LiveSetup {
        live,
        h1,
        h2,
        kernel: p(kernel),
        initrd: p(initrd),
    };
    let t = Instant::now();
    s.live.start("bench:v1", &["solo"], &s.kernel, &s.initrd)?;
    let ls = s.live.run(&["vm", "ls", "--json"])?;
    let hv = ls
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["hypervisor"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    println!(
        "BENCH live boot-1: {:.2}s (hypervisor {hv})",
        t.elapsed().as_secs_f64()
    );
    s.live.wait_hash("solo", FILE, &s.h1)?;
    Ok(s)
}

/// Substitutes v1 -> v2 into "solo" `runs` times, timing from `imagefs substitute` starting to
/// the guest's hash of FILE answering v2's (and back to v1, untimed). With `steps`, prints
/// where each timed run went.
fn live_substitutions(s: &mut LiveSetup, runs: usize, steps: bool) -> anyhow::Result<()> {
    for _ in 0..runs {
        let t = Instant::now();
        let mut args = vec!["substitute", "solo", "bench:v2"];
        if steps {
            args.push("--json");
        }
        let out = s.live.run(&args)?;
        let sub = t.elapsed();
        let polls = s.live.wait_hash("solo", FILE, &s.h2)?;
        println!("BENCH live-sub ours {:.4}", t.elapsed().as_secs_f64());
        // `substitute` returns once the agent acked, i.e. once the guest reads the new bytes.
        println!("BENCH live-sub command {:.4}", sub.as_secs_f64());
        if steps {
            let v: serde_json::Value =
                serde_json::from_str(out.lines().next_back().unwrap_or("{}")).unwrap_or_default();
            let ack = &v["guest"]["ack"];
            let agent: Vec<String> = ack["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|st| format!("{}={}", st["name"].as_str().unwrap_or("?"), st["micros"]))
                .collect();
            println!(
                "BENCH live-sub steps: substitute command {:.1} ms (times {}; agent total {} us, \
                 ack ~{} bytes: {}), then {} hash poll(s) {:.1} ms",
                sub.as_secs_f64() * 1000.0,
                v["times"],
                ack["total_micros"],
                ack.to_string().len(),
                agent.join(" "),
                polls.len(),
                (t.elapsed() - sub).as_secs_f64() * 1000.0,
            );
            for (i, d) in polls.iter().enumerate() {
                println!(
                    "BENCH live-sub poll {i}: {:.1} ms",
                    d.as_secs_f64() * 1000.0
                );
            }
            // The probe itself on a warm guest cache: what the interval cannot go below.
            let warm = s.live.wait_hash("solo", FILE, &s.h2)?;
            let ping = Instant::now();
            s.live.run(&["agent", "ping", "--vm", "solo"])?;
            println!(
                "BENCH live-sub probe: warm hash {:.1} ms, agent ping {:.1} ms",
                warm.first().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                ping.elapsed().as_secs_f64() * 1000.0
            );
        }
        s.live.run(&["substitute", "solo", "bench:v1"])?;
        s.live.wait_hash("solo", FILE, &s.h1)?;
    }
    Ok(())
}

fn bench_live(kernel: &std::path::Path, initrd: &std::path::Path) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = live_setup(dir.path(), kernel, initrd)?;

    // 1. One live guest: substitute v1 -> v2 until the guest hashes v2's bytes (3 runs).
    live_substitutions(&mut s, 3, false)?;
    let (h2, k, i) = (s.h2.clone(), s.kernel.clone(), s.initrd.clone());
    let live = &mut s.live;
    // The peer: stop the VM, boot a fresh one on v2 to the same point (2 runs).
    let mut prev = "solo".to_string();
    for r in 1..=2 {
        let name = format!("reboot-{r}");
        let t = Instant::now();
        live.run(&["vm", "stop", &prev])?;
        live.start("bench:v2", &[&name], &k, &i)?;
        live.wait_hash(&name, FILE, &h2)?;
        println!("BENCH live-sub reboot {:.4}", t.elapsed().as_secs_f64());
        prev = name;
    }
    live.run(&["vm", "stop", &prev])?;

    // 2. Eight live guests on v1 (booted together), one rollout of v2 across them.
    let names: Vec<String> = (1..=8).map(|n| format!("bench-{n}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let t = Instant::now();
    live.start("bench:v1", &names, &k, &i)?;
    println!("BENCH live boot-8: {:.2}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    live.run(&[
        "rollout",
        "bench:v2",
        "--instances",
        "bench-*",
        "--waves",
        "1,100%",
        "--health-cmd",
        "/bin/true",
    ])?;
    println!("BENCH live-rollout ours {:.4}", t.elapsed().as_secs_f64());
    for n in &names {
        ensure!(
            live.hash(n, FILE)? == h2,
            "{n} does not read v2 after the rollout"
        );
    }
    Ok(())
}
